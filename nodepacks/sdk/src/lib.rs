//! The JARVIS pack SDK: write a node pack (a `jarvis:node` WebAssembly
//! component) as a few plain Rust functions.
//!
//! A pack is a list of nodes. Each node declares its id, version, JSON
//! Schemas and side effect, and names a function from its inputs to its
//! outputs; the SDK generates `describe` and the dispatch of `invoke`:
//!
//! ```ignore
//! use jarvis_pack_sdk::{Context, Node, NodeError, Pack, SideEffect, json};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Greet { name: String }
//! #[derive(Serialize)]
//! struct Greeting { greeting: String }
//!
//! fn greet(input: Greet, _: &Context) -> Result<Greeting, NodeError> {
//!     Ok(Greeting { greeting: format!("Hello, {}!", input.name) })
//! }
//!
//! fn pack() -> Pack {
//!     Pack::new("acme.hello", "0.1.0").node(
//!         Node::new("acme.hello.greet", "Greet someone by name.")
//!             .input_schema(|| json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}))
//!             .output_schema(|| json!({"type": "object", "properties": {"greeting": {"type": "string"}}, "required": ["greeting"]}))
//!             .side_effect(SideEffect::Read)
//!             .run(greet),
//!     )
//! }
//!
//! jarvis_pack_sdk::export_pack!(pack());
//! ```
//!
//! The host validates inputs against the input schema before `invoke` and
//! outputs against the output schema after it, so a handler may rely on the
//! shape it declared. A handler fails on purpose by returning a [`NodeError`];
//! [`NodeError::handler`] gives the `handler_error` code the JARVIS Python
//! executor reports for a node that raises.
//!
//! # Layout
//! - [`bindings`]: the `jarvis:node` world, generated from `wit/` by wit-bindgen.
//! - `pack`: [`Pack`], [`Node`] and [`Context`], and the `describe`/`invoke` dispatch.
//! - [`time`], [`random`], [`log`], [`config`]: what the host grants a pack, in std types.
//! - [`http`]: a blocking HTTP client over `wasi:http`, for the destinations
//!   the operator grants.
//! - `arena` (feature, on by default): the pack's global allocator, which
//!   serves a call from the initial memory instead of growing it.

// The bindings and the export macro name this crate by its absolute path so
// that they also resolve inside user crates.
extern crate self as jarvis_pack_sdk;

#[cfg(all(
    feature = "arena",
    target_arch = "wasm32",
    not(target_feature = "atomics")
))]
mod arena;
pub mod http;
mod pack;

#[cfg(all(
    feature = "arena",
    target_arch = "wasm32",
    not(target_feature = "atomics")
))]
#[global_allocator]
static ALLOCATOR: arena::Arena = arena::Arena::new();

pub use pack::{Context, Node, Pack};
pub use serde_json::{self, Value, json};

/// The `jarvis:node/node-pack` world, generated from `wit/node-pack.wit`.
#[allow(missing_docs, missing_debug_implementations, unreachable_pub)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "node-pack",
        pub_export_macro: true,
        generate_all,
        export_macro_name: "__export_node_pack",
        default_bindings_module: "::jarvis_pack_sdk::bindings",
        runtime_path: "::jarvis_pack_sdk::__wit_bindgen::rt",
    });
}

pub use bindings::{NodeError, SideEffect};

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

#[doc(hidden)]
pub use pack::{describe as __describe, invoke as __invoke};

/// The error code the JARVIS Python executor gives every node that raises;
/// kept so callers of ported nodes see the same code.
pub const HANDLER_ERROR: &str = "handler_error";

impl NodeError {
    /// A failure with a stable, snake_case `code` of your choosing.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            details: None,
        }
    }

    /// The node rejected its inputs or could not do its work: what a JARVIS
    /// Python node signals by raising `ValueError`. The code stays
    /// `handler_error` for compatibility; the message says what went wrong.
    pub fn handler(message: impl Into<String>) -> Self {
        Self::new(HANDLER_ERROR, message)
    }

    /// Attach structured details (a JSON object) for the caller.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details.to_string());
        self
    }
}

/// Export `pack` as this component's `describe` and `invoke`.
///
/// `pack` is an expression of type [`Pack`], typically a call of a function
/// that builds it. It is evaluated on every call: each execution runs in a
/// fresh instance, so there is nothing to cache across calls anyway.
#[macro_export]
macro_rules! export_pack {
    ($pack:expr) => {
        struct __JarvisPackExport;

        impl $crate::bindings::Guest for __JarvisPackExport {
            fn describe() -> $crate::bindings::PackInfo {
                $crate::__describe(&$pack)
            }

            fn invoke(
                call: $crate::bindings::Invocation,
            ) -> ::core::result::Result<::std::string::String, $crate::bindings::NodeError> {
                $crate::__invoke(&$pack, call)
            }
        }

        $crate::bindings::__export_node_pack!(__JarvisPackExport with_types_in $crate::bindings);
    };
}

/// Wall-clock time and waiting, from the host.
pub mod time {
    use std::time::{Duration, SystemTime};

    use crate::bindings::jarvis::node::{clock, timer};

    /// The current wall-clock time (`std::time::SystemTime::now` is not
    /// available inside a pack).
    pub fn now() -> SystemTime {
        let now = clock::now();
        SystemTime::UNIX_EPOCH + Duration::new(now.seconds, now.nanoseconds)
    }

    /// A reading of a clock that never goes backwards; only differences
    /// between two readings mean anything.
    pub fn monotonic() -> Duration {
        Duration::from_nanos(clock::monotonic_now())
    }

    /// Pause this execution. The host holds no thread while it waits. The
    /// wait is rounded up to whole milliseconds so it never ends early; it
    /// counts against the execution's time limit.
    pub fn sleep(duration: Duration) {
        let millis = duration.as_nanos().div_ceil(1_000_000);
        timer::sleep(u64::try_from(millis).unwrap_or(u64::MAX));
    }
}

/// Cryptographically secure randomness, from the host.
pub mod random {
    use crate::bindings::jarvis::node::random;

    /// `len` random bytes. The host caps one call at 1 MiB, so larger
    /// requests are served in several calls.
    pub fn bytes(len: usize) -> Vec<u8> {
        const MAX_PER_CALL: usize = 1 << 20;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let chunk = (len - out.len()).min(MAX_PER_CALL);
            out.extend(random::get_random_bytes(chunk as u64));
        }
        out
    }

    /// One random 64-bit number.
    pub fn u64() -> u64 {
        random::get_random_u64()
    }
}

/// Config values and secrets the operator grants this pack in the executor's
/// grants file. Anything not granted reads as `None`.
pub mod config {
    use crate::bindings::jarvis::node::config;

    /// The config value `key`, if granted.
    pub fn get(key: &str) -> Option<String> {
        config::get(key)
    }

    /// The secret `name`, if granted. Keep it out of logs and outputs.
    pub fn secret(name: &str) -> Option<String> {
        config::get_secret(name)
    }
}

/// Structured logging into the host's log, tagged with the execution's ids.
pub mod log {
    pub use crate::bindings::jarvis::node::log::Level;
    use crate::bindings::jarvis::node::log::{Field, log};

    /// Write one line with key/value fields.
    pub fn write(level: Level, message: &str, fields: &[(&str, &str)]) {
        let fields: Vec<Field> = fields
            .iter()
            .map(|(key, value)| Field {
                key: (*key).to_owned(),
                value: (*value).to_owned(),
            })
            .collect();
        log(level, message, &fields);
    }

    /// Write one debug line.
    pub fn debug(message: &str) {
        write(Level::Debug, message, &[]);
    }

    /// Write one info line.
    pub fn info(message: &str) {
        write(Level::Info, message, &[]);
    }

    /// Write one warning line.
    pub fn warn(message: &str) {
        write(Level::Warn, message, &[]);
    }

    /// Write one error line.
    pub fn error(message: &str) {
        write(Level::Error, message, &[]);
    }
}
