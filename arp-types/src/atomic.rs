//! The Atomic Executor API: `POST /v1/atomic-node-runs:execute` and its result.

use serde::{Deserialize, Serialize};

use crate::JsonObject;
use crate::common::{ErrorDetail, Extensions, ResourceRef};
use crate::core::{ConstraintEnvelope, NodeRunState, NodeTypeRef, RunContext};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtomicExecuteRequest {
    pub node_run_id: String,
    pub run_id: String,
    pub node_type_ref: NodeTypeRef,
    pub inputs: JsonObject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_context: Option<RunContext>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<ConstraintEnvelope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtomicExecuteResult {
    pub node_run_id: String,
    pub state: NodeRunState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_artifacts: Option<Vec<ResourceRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}
