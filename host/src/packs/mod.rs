//! What packs declare: copied out of the guest within a budget ([`load`]) and checked ([`spec`]).

pub mod load;
pub mod spec;
