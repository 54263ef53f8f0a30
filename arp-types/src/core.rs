//! Core ARP objects: node types and refs, run context, constraints, states.

use serde::{Deserialize, Serialize};

use crate::JsonObject;
use crate::common::{Extensions, ResourceRef};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTypeRef {
    pub node_type_id: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Atomic,
    Composite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRunState {
    Queued,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl NodeRunState {
    /// The state as it is written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Assigned => "assigned",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }
}

/// What running a node may change in the world, least to most dangerous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SideEffectClass {
    Read,
    Write,
    Irreversible,
}

impl SideEffectClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Irreversible => "irreversible",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeType {
    pub node_type_id: String,
    pub version: String,
    pub kind: NodeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<ConstraintEnvelope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_executor_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<ResourceRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budgets: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstraintEnvelope {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structural: Option<StructuralConstraints>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<CandidateConstraints>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budgets: Option<BudgetConstraints>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gates: Option<GateConstraints>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

impl ConstraintEnvelope {
    /// `budgets.max_wall_time_ms`, if set.
    pub fn max_wall_time_ms(&self) -> Option<u64> {
        self.budgets.as_ref().and_then(|b| b.max_wall_time_ms)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructuralConstraints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_depth: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_children_per_composite: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_nodes_per_run: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_decomposition_rounds_per_node: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidateConstraints {
    /// At least 1 per the spec; checked by [`CandidateConstraints::validate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_candidates_per_subtask: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_node_type_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied_node_type_ids: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConstraints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wall_time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_external_calls: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateConstraints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side_effect_class: Option<SideEffectClass>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_approval: Option<bool>,
}

impl ConstraintEnvelope {
    /// Checks the rules serde cannot express: `max_candidates_per_subtask >= 1`
    /// and `max_cost >= 0`. Returns the JSON path of the first violation.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if let Some(c) = &self.candidates
            && c.max_candidates_per_subtask == Some(0)
        {
            return Err((
                "constraints.candidates.max_candidates_per_subtask",
                "must be >= 1",
            ));
        }
        if let Some(b) = &self.budgets
            && let Some(cost) = b.max_cost
            && (cost.is_nan() || cost < 0.0)
        {
            return Err(("constraints.budgets.max_cost", "must be a number >= 0"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::NodeRunState;

    #[test]
    fn a_node_run_state_as_text_is_its_wire_form() {
        for state in [
            NodeRunState::Queued,
            NodeRunState::Assigned,
            NodeRunState::Running,
            NodeRunState::Succeeded,
            NodeRunState::Failed,
            NodeRunState::Canceled,
        ] {
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::Value::from(state.as_str())
            );
        }
    }
}
