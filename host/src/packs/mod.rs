//! Node packs: what they declare ([`load`], [`spec`]), the [`registry`] of loaded packs, its [`index`] and the directory [`watch`]er.

pub mod index;
pub mod load;
pub mod registry;
pub mod spec;
pub mod watch;
