//! What packs declare: read out of the guest within bounds ([`load`]) and checked ([`spec`]).

pub mod load;
pub mod spec;
