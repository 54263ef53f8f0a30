//! Host bindings for the `jarvis:node` WIT world: the one place `bindgen!` runs.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "node-pack",
    imports: {
        "jarvis:node/timer.sleep": async,
        default: trappable,
    },
    exports: { default: async },
});

pub use jarvis::node::{clock, log, random, timer};
