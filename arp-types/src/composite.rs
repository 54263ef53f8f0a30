//! The Composite Executor API: `POST /v1/composite-node-runs:begin` and its answer.

use serde::{Deserialize, Serialize};

use crate::JsonObject;
use crate::common::Extensions;
use crate::core::{ConstraintEnvelope, NodeTypeRef, RunContext};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeBeginRequest {
    pub node_run_id: String,
    pub run_id: String,
    pub node_type_ref: NodeTypeRef,
    pub inputs: JsonObject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_context: Option<RunContext>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<ConstraintEnvelope>,
    /// The coordinator's base URL, which the composite executor calls back.
    pub coordinator_endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeBeginResponse {
    pub accepted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}
