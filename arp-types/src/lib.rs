//! ARP spec/v1 wire types shared by the JARVIS Rust services.
//!
//! The types mirror the spec's JSON Schemas: objects the spec closes with
//! `additionalProperties: false` reject unknown fields, and absent optional
//! fields are omitted on output (never `null`). Answers from other services
//! are read through [`peer`]'s liberal twins instead. No runtime lives here, so the
//! run coordinator can share these types without compiling wasmtime.
//!
//! # Layout
//! - [`common`]: error envelope, health, version, extensions, resource refs.
//! - [`core`]: node types, run context, constraints, node-run states.
//! - [`atomic`]: the Atomic Executor's execute request and result.
//! - [`run`]: the Run Coordinator's runs, node runs, run events and requests.
//! - [`composite`]: the Composite Executor's begin request and response.
//! - [`pdp`]: policy decision requests and decisions.
//! - [`peer`]: peers' answers read liberally (unknown fields, any extension key).
//! - [`time`]: RFC 3339 timestamps as the spec writes them.

pub mod atomic;
pub mod common;
pub mod composite;
pub mod core;
pub mod pdp;
pub mod peer;
pub mod run;
pub mod time;

pub use atomic::{AtomicExecuteRequest, AtomicExecuteResult};
pub use common::{
    ErrorDetail, ErrorEnvelope, Extensions, Health, ResourceRef, Status, VersionInfo,
};
pub use core::{
    ConstraintEnvelope, NodeKind, NodeRunState, NodeType, NodeTypeRef, RunContext, SideEffectClass,
};

/// A JSON object (`type: object, additionalProperties: true` in the spec).
pub type JsonObject = serde_json::Map<String, serde_json::Value>;
