//! Host bindings for the `jarvis:node` WIT world: the one place `bindgen!` runs.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "node-pack",
    imports: {
        "jarvis:node/timer.sleep": async,
        default: trappable,
    },
    exports: { default: async },
    // The wasi interfaces are wasmtime-wasi(-http)'s own bindings, so their
    // host implementations (grants/http.rs links them) serve our world.
    with: {
        "wasi:io": wasmtime_wasi::p2::bindings::io,
        "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
        "wasi:http": wasmtime_wasi_http::p2::bindings::http,
    },
    require_store_data_send: true,
});

pub use jarvis::node::{clock, config, log, random, timer};

use wasmtime::AsContextMut;
use wasmtime::component::{ComponentExportIndex, Instance, TypedFunc};

/// A pack's `invoke` export as a typed function.
pub type InvokeFunc<'a> = TypedFunc<(&'a Invocation,), (Result<String, NodeError>,)>;

/// Where a component's `invoke` export is, its type checked once at load, so
/// that each fresh instance skips the type check (bindgen's loader repeats it
/// for every export on every instantiation).
#[derive(Debug, Clone, Copy)]
pub struct InvokeExport(ComponentExportIndex);

impl InvokeExport {
    /// Finds `invoke` in `instance` and checks it has [`InvokeFunc`]'s type.
    pub fn check(mut store: impl AsContextMut, instance: &Instance) -> wasmtime::Result<Self> {
        let index = instance
            .get_export_index(&mut store, None, "invoke")
            .ok_or_else(|| wasmtime::format_err!("the component exports no `invoke`"))?;
        instance
            .get_typed_func::<(&Invocation,), (Result<String, NodeError>,)>(&mut store, index)?;
        Ok(Self(index))
    }

    /// The `invoke` function of `instance`; `None` if `instance` is not an
    /// instance of the component [`InvokeExport::check`] saw.
    #[allow(unsafe_code)]
    pub fn func<'a>(self, store: impl AsContextMut, instance: &Instance) -> Option<InvokeFunc<'a>> {
        let func = instance.get_func(store, self.0)?;
        // SAFETY: `get_func` resolves this index only in an instance of the
        // component it came from (wasmtime compares the component's id), and
        // `check` type-checked that component's export against exactly
        // `InvokeFunc`'s parameters and results. Every instance of a component
        // has the same export types.
        Some(unsafe { InvokeFunc::new_unchecked(func) })
    }
}

/// Name of the optional `needs` interface a pack of the
/// `node-pack-with-needs` world exports.
pub const NEEDS_INTERFACE: &str = "jarvis:node/needs@0.1.0";

/// One entry of a pack's `needs` answer: the `node-needs` record of
/// `jarvis:node/needs`. Written out here because `bindgen!` reads the
/// `node-pack` world, which does not export the interface (a pack without it
/// must keep loading); [`NeedsExport::find`] checks it against the
/// component's own type, so a mismatch is refused at load, never misread.
#[derive(Debug, Clone, wasmtime::component::ComponentType, wasmtime::component::Lift)]
#[component(record)]
pub struct NodeNeeds {
    #[component(name = "node-type-id")]
    pub node_type_id: String,
    pub hosts: Vec<String>,
    pub config: Vec<String>,
    pub secrets: Vec<String>,
}

/// A pack's `needs` function as a typed function.
pub type NeedsFunc = TypedFunc<(), (Vec<NodeNeeds>,)>;

/// The optional `needs` export of a pack.
#[derive(Debug, Clone, Copy)]
pub struct NeedsExport;

impl NeedsExport {
    /// The `needs` function of `instance`, type-checked; `None` if the
    /// component exports no [`NEEDS_INTERFACE`] (it declares no needs).
    pub fn find(
        mut store: impl AsContextMut,
        instance: &Instance,
    ) -> wasmtime::Result<Option<NeedsFunc>> {
        let Some(interface) = instance.get_export_index(&mut store, None, NEEDS_INTERFACE) else {
            return Ok(None);
        };
        let index = instance
            .get_export_index(&mut store, Some(&interface), "needs")
            .ok_or_else(|| wasmtime::format_err!("{NEEDS_INTERFACE} exports no `needs`"))?;
        let func = instance.get_typed_func::<(), (Vec<NodeNeeds>,)>(&mut store, index)?;
        Ok(Some(func))
    }
}
