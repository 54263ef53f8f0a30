//! The JARVIS pack tool: scaffold a node pack, build it into a
//! `jarvis:node` WebAssembly component in a packs directory, and check that
//! a component is a usable pack. The `jarvis-pack` binary is a thin CLI over
//! this library, which the end-to-end tests drive directly.
//!
//! Rust packs build with whatever wasm-capable Rust is at hand: rustup with
//! the `wasm32-unknown-unknown` target, or Debian's `rustc-web`, which builds
//! std from source. Python packs build with `componentize-py`.
//!
//! # Layout
//! - `check`: validates a component against the WIT and what `describe` says.
//! - `compile`: toolchain detection, cargo / componentize-py, componentizing,
//!   installing into the packs directory.
//! - `scaffold`: the `new` command's templates.

mod check;
mod compile;
mod scaffold;

pub use check::{CheckError, NODE_PACK_WIT, NodeSummary, PackSummary, check};
pub use compile::{
    BuildOptions, BuiltPack, PackSource, Toolchain, build, build_all, componentize, install,
};
pub use scaffold::{default_sdk_path, pack_id_for, scaffold};
