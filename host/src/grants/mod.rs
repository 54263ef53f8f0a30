//! Host interfaces granted to packs, one module each; each owns its slice of
//! the store state and its registration in the linker; [`file`] reads what
//! the operator grants each pack, and [`http`] checks outbound calls against it.

pub mod clock;
pub mod config;
pub mod file;
pub mod http;
pub mod log;
pub mod random;
pub mod timer;
pub mod wasi;

use wasmtime::component::Linker;

use crate::runtime::StoreState;

pub use self::file::{Grants, GrantsError, HttpEnv, NodeGrants, Secret};

/// Adds every host interface of the `node-pack` world to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    log::add_to_linker(linker)?;
    clock::add_to_linker(linker)?;
    random::add_to_linker(linker)?;
    timer::add_to_linker(linker)?;
    config::add_to_linker(linker)?;
    wasi::add_to_linker(linker)?;
    http::add_to_linker(linker)?;
    Ok(())
}
