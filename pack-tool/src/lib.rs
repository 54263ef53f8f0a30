//! The JARVIS pack tool: scaffold a node pack, build it into a
//! `jarvis:node` WebAssembly component in a packs directory, and list,
//! inspect and check pack files. Verdicts come from the executor's own
//! loading code, so `check` says what the running executor would do with a
//! file. The `jarvis-pack` binary is a thin CLI over this library, which the
//! end-to-end tests drive directly.
//!
//! Rust packs build with whatever wasm-capable Rust is at hand: rustup with
//! the `wasm32-unknown-unknown` target, or Debian's `rustc-web`, which builds
//! std from source. Python packs build with `componentize-py`.
//!
//! # Layout
//! - `check`: `list`, `inspect` and `check` on top of the executor's
//!   `PackInspector`, and their text.
//! - `compile`: toolchain detection, cargo / componentize-py, componentizing,
//!   installing into the packs directory.
//! - `scaffold`: the `new` command's templates.

mod check;
mod compile;
mod scaffold;

pub use check::{
    CheckError, NODE_PACK_WIT, NodeSummary, PackContents, PackInspector, PackReport, PackSummary,
    WIT_DEPS, check, check_line, inspect_paths, inspect_paths_with_grants, inspect_text, list_line,
};
pub use compile::{
    BuildOptions, BuiltPack, PackSource, Toolchain, build, build_all, componentize, install,
};
pub use scaffold::{default_sdk_path, pack_id_for, scaffold};
