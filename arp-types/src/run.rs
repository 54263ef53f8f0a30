//! The Run Coordinator API: runs, node runs, run events and their requests.

use serde::{Deserialize, Serialize};

use crate::JsonObject;
use crate::common::{ErrorDetail, Extensions, ResourceRef};
use crate::core::{ConstraintEnvelope, NodeKind, NodeRunState, NodeTypeRef, RunContext};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl RunState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub run_id: String,
    pub state: RunState,
    pub root_node_run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_context: Option<RunContext>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

/// The spec's `Metadata`: string labels and annotations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

/// `POST /v1/runs` (the Run Gateway's `RunStartRequest`, which the coordinator also accepts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunStartRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    pub root_node_type_ref: NodeTypeRef,
    pub input: JsonObject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_context: Option<RunContext>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<ConstraintEnvelope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorBinding {
    pub executor_instance_id: String,
    /// An `EndpointLocator`: a URI such as `http://127.0.0.1:8082`.
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvaluationStatus {
    Success,
    Fail,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationResult {
    pub status: EvaluationStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<JsonObject>,
    /// Between 0 and 1 per the spec; checked by [`EvaluationResult::validate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

impl EvaluationResult {
    /// Checks the rule serde cannot express: `0 <= confidence <= 1`.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        match self.confidence {
            Some(c) if !(0.0..=1.0).contains(&c) => {
                Err(("evaluation_result.confidence", "must be between 0 and 1"))
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryActionType {
    Retry,
    Remap,
    DecomposeFurther,
    AskUser,
    Abort,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryAction {
    #[serde(rename = "type")]
    pub action: RecoveryActionType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node_run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node_type_ref: Option<NodeTypeRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingDecision {
    pub subtask_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_set_id: Option<String>,
    pub chosen_node_type_ref: NodeTypeRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rationale: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRun {
    pub node_run_id: String,
    pub run_id: String,
    pub node_type_ref: NodeTypeRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<NodeKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_node_run_id: Option<String>,
    pub state: NodeRunState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_artifacts: Option<Vec<ResourceRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor_binding: Option<ExecutorBinding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation_result: Option<EvaluationResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_actions: Option<Vec<RecoveryAction>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

/// One item of `NodeRunsCreateRequest.node_runs` (the spec's inline `NodeRunCreateSpec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRunCreateSpec {
    pub node_type_ref: NodeTypeRef,
    pub inputs: JsonObject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<ConstraintEnvelope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_set_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding_decision: Option<BindingDecision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_executor_instance_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

/// `POST /v1/node-runs`. `node_runs` has at least one item per the spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRunsCreateRequest {
    pub run_id: String,
    pub parent_node_run_id: String,
    pub node_runs: Vec<NodeRunCreateSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRunsCreateResponse {
    pub node_runs: Vec<NodeRun>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRunTerminalState {
    Succeeded,
    Failed,
    Canceled,
}

impl From<NodeRunTerminalState> for NodeRunState {
    fn from(s: NodeRunTerminalState) -> Self {
        match s {
            NodeRunTerminalState::Succeeded => Self::Succeeded,
            NodeRunTerminalState::Failed => Self::Failed,
            NodeRunTerminalState::Canceled => Self::Canceled,
        }
    }
}

/// `POST /v1/node-runs/{node_run_id}:complete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRunCompleteRequest {
    pub state: NodeRunTerminalState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_artifacts: Option<Vec<ResourceRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

/// `POST /v1/node-runs/{node_run_id}:evaluation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRunEvaluationReportRequest {
    pub evaluation_result: EvaluationResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_action: Option<RecoveryAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunEventType {
    RunStarted,
    NodeRunAssigned,
    CompositeDecomposed,
    CandidateSetGenerated,
    SubtaskMapped,
    AtomicExecuted,
    NodeEvaluated,
    RecoveryApplied,
    PolicyDecided,
    RunCompleted,
}

/// One line of the NDJSON event streams; `seq` is per run, gapless from 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunEvent {
    pub run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_run_id: Option<String>,
    pub seq: u64,
    #[serde(rename = "type")]
    pub event_type: RunEventType,
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_level_events_omit_node_run_id() {
        let event = RunEvent {
            run_id: "run_1".into(),
            node_run_id: None,
            seq: 0,
            event_type: RunEventType::RunStarted,
            time: "2026-01-01T00:00:00.000000Z".into(),
            data: None,
            extensions: None,
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            json,
            r#"{"run_id":"run_1","seq":0,"type":"run_started","time":"2026-01-01T00:00:00.000000Z"}"#
        );
    }

    #[test]
    fn complete_request_rejects_non_terminal_state_and_unknown_fields() {
        assert!(serde_json::from_str::<NodeRunCompleteRequest>(r#"{"state":"running"}"#).is_err());
        assert!(
            serde_json::from_str::<NodeRunCompleteRequest>(r#"{"state":"failed","x":1}"#).is_err()
        );
        let ok: NodeRunCompleteRequest = serde_json::from_str(r#"{"state":"failed"}"#).unwrap();
        assert_eq!(ok.state, NodeRunTerminalState::Failed);
    }
}
