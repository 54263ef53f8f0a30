//! One test binary for the node packs run in the executor (see the crate docs).

mod core;
mod fetch;
mod python;
mod scaffold;
mod support;
