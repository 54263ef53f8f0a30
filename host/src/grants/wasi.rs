//! WASI 0.2 (`wasi:cli`, `wasi:clocks`, `wasi:filesystem`, `wasi:io`,
//! `wasi:random`, `wasi:sockets`), served empty: no files, no environment
//! variables, no arguments, no sockets, stdin at its end and stdout/stderr
//! discarded.
//!
//! Language runtimes compiled to components import these whether or not a
//! node uses them (CPython asks for its environment and opens stdio at
//! start), so serving them lets such packs load without their build
//! replacing every WASI import by a trapping stub — which, for
//! componentize-py's `--stub-wasi`, would stub `wasi:http` too. Serving them
//! grants nothing: the only way out of the sandbox stays `wasi:http`,
//! checked by [`super::http`], and clocks and randomness are what the
//! `jarvis:node` interfaces already give.
//!
//! The context is built on first use, so an execution that touches no WASI
//! (the built-in echo, most Rust packs) pays for one `None`. The resource
//! table is the one `wasi:http` uses, with its bound.

use wasmtime::component::Linker;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::runtime::StoreState;

/// WASI's slice of store state: its context, once a guest asks for it.
#[derive(Default)]
pub struct WasiState {
    ctx: Option<WasiCtx>,
}

impl std::fmt::Debug for WasiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasiState")
            .field("built", &self.ctx.is_some())
            .finish()
    }
}

impl WasiState {
    fn ctx(&mut self) -> &mut WasiCtx {
        self.ctx.get_or_insert_with(empty_ctx)
    }
}

/// A context granting nothing: the builder's defaults (no preopened
/// directories, environment or arguments; stdin empty, stdout and stderr
/// discarded; every socket address refused) with sockets and name lookups
/// switched off outright.
fn empty_ctx() -> WasiCtx {
    WasiCtxBuilder::new()
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build()
}

pub(crate) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: self.wasi.ctx(),
            table: self.http.table(),
        }
    }
}
