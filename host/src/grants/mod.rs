//! Host interfaces granted to packs, one file each (only `log` lives here so far).

pub mod log;
