//! Node packs: what they declare ([`load`], [`spec`]) and need granted ([`needs`]), the [`registry`] of loaded packs, its [`index`], the directory [`watch`]er, and [`inspect`]ion of pack files as the registry would load them.

pub mod index;
pub mod inspect;
pub mod load;
pub mod needs;
pub mod registry;
pub mod spec;
pub mod watch;

pub use inspect::{NodeNeedsReport, PackContents, PackInspector, PackReport, pack_files};
