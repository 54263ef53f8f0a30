//! Answers from peer services, read liberally and turned into the strict types.
//!
//! What we send and what our own APIs accept follow the spec's schemas strictly.
//! What a peer (PDP, Node Registry, Atomic or Composite Executor) answers is read
//! the way other ARP implementations write it: unknown fields are ignored and
//! extension keys need no namespace (the Python PDP answers with
//! `{"policy_hash": …}`). Converting into the strict type keeps the namespaced
//! extension keys and drops the others, so nothing we later write breaks the spec.
//! Only what the coordinator cannot use at all (a missing `decision`, a `state`
//! that is no state) fails to deserialize.

use serde::Deserialize;

use crate::JsonObject;
use crate::atomic::AtomicExecuteResult;
use crate::common::{ErrorCause, ErrorDetail, Extensions, ResourceRef, is_namespaced_key};
use crate::composite::CompositeBeginResponse;
use crate::core::{
    BudgetConstraints, CandidateConstraints, ConstraintEnvelope, GateConstraints, NodeKind,
    NodeRunState, NodeType, SideEffectClass, StructuralConstraints,
};
use crate::pdp::{ApprovalRef, PolicyDecision, PolicyDecisionOutcome};
use crate::run::Metadata;

/// Extensions as a peer writes them: any key.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct PeerExtensions(pub JsonObject);

impl PeerExtensions {
    /// The namespaced keys; `None` when none is left.
    pub fn namespaced(self) -> Option<Extensions> {
        let kept: JsonObject = self
            .0
            .into_iter()
            .filter(|(k, _)| is_namespaced_key(k))
            .collect();
        if kept.is_empty() {
            None
        } else {
            Extensions::new(kept).ok()
        }
    }
}

fn namespaced(extensions: Option<PeerExtensions>) -> Option<Extensions> {
    extensions.and_then(PeerExtensions::namespaced)
}

/// The body of a peer's non-2xx answer.
#[derive(Debug, Clone, Deserialize)]
pub struct PeerErrorEnvelope {
    pub error: PeerErrorDetail,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PeerErrorDetail {
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub details: Option<JsonObject>,
    #[serde(default)]
    pub retryable: Option<bool>,
    #[serde(default)]
    pub cause: Option<PeerErrorCause>,
    #[serde(default)]
    pub extensions: Option<PeerExtensions>,
}

impl From<PeerErrorDetail> for ErrorDetail {
    fn from(e: PeerErrorDetail) -> Self {
        Self {
            code: e.code,
            message: e.message,
            details: e.details,
            retryable: e.retryable,
            cause: e.cause.map(Into::into),
            extensions: namespaced(e.extensions),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct PeerErrorCause {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub details: Option<JsonObject>,
    #[serde(default)]
    pub extensions: Option<PeerExtensions>,
}

impl From<PeerErrorCause> for ErrorCause {
    fn from(c: PeerErrorCause) -> Self {
        Self {
            code: c.code,
            message: c.message,
            details: c.details,
            extensions: namespaced(c.extensions),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct PeerResourceRef {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub extensions: Option<PeerExtensions>,
}

impl From<PeerResourceRef> for ResourceRef {
    fn from(r: PeerResourceRef) -> Self {
        Self {
            kind: r.kind,
            id: r.id,
            uri: r.uri,
            extensions: namespaced(r.extensions),
        }
    }
}

/// An Atomic Executor's answer to `:execute`.
#[derive(Debug, Clone, Deserialize)]
pub struct PeerAtomicExecuteResult {
    pub node_run_id: String,
    pub state: NodeRunState,
    #[serde(default)]
    pub outputs: Option<JsonObject>,
    #[serde(default)]
    pub output_artifacts: Option<Vec<PeerResourceRef>>,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub ended_at: Option<String>,
    #[serde(default)]
    pub error: Option<PeerErrorDetail>,
    #[serde(default)]
    pub extensions: Option<PeerExtensions>,
}

impl From<PeerAtomicExecuteResult> for AtomicExecuteResult {
    fn from(r: PeerAtomicExecuteResult) -> Self {
        Self {
            node_run_id: r.node_run_id,
            state: r.state,
            outputs: r.outputs,
            output_artifacts: r
                .output_artifacts
                .map(|a| a.into_iter().map(Into::into).collect()),
            started_at: r.started_at,
            ended_at: r.ended_at,
            error: r.error.map(Into::into),
            extensions: namespaced(r.extensions),
        }
    }
}

/// A Composite Executor's answer to `:begin`.
#[derive(Debug, Clone, Deserialize)]
pub struct PeerCompositeBeginResponse {
    pub accepted: bool,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub extensions: Option<PeerExtensions>,
}

impl From<PeerCompositeBeginResponse> for CompositeBeginResponse {
    fn from(r: PeerCompositeBeginResponse) -> Self {
        Self {
            accepted: r.accepted,
            message: r.message,
            extensions: namespaced(r.extensions),
        }
    }
}

/// A node type as an executor lists it or a Node Registry serves it.
#[derive(Debug, Clone, Deserialize)]
pub struct PeerNodeType {
    pub node_type_id: String,
    pub version: String,
    pub kind: NodeKind,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub input_schema: Option<JsonObject>,
    #[serde(default)]
    pub output_schema: Option<JsonObject>,
    #[serde(default)]
    pub constraints: Option<PeerConstraintEnvelope>,
    #[serde(default)]
    pub evaluation: Option<JsonObject>,
    #[serde(default)]
    pub preferred_executor_types: Option<Vec<String>>,
    #[serde(default)]
    pub metadata: Option<JsonObject>,
    #[serde(default)]
    pub extensions: Option<PeerExtensions>,
}

impl From<PeerNodeType> for NodeType {
    fn from(t: PeerNodeType) -> Self {
        Self {
            node_type_id: t.node_type_id,
            version: t.version,
            kind: t.kind,
            description: t.description,
            input_schema: t.input_schema,
            output_schema: t.output_schema,
            constraints: t.constraints.map(Into::into),
            evaluation: t.evaluation,
            preferred_executor_types: t.preferred_executor_types,
            metadata: t.metadata,
            extensions: namespaced(t.extensions),
        }
    }
}

/// A node type's constraints as a peer writes them. The known constraints keep
/// their types: a peer's restriction is never silently dropped for a bad value.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PeerConstraintEnvelope {
    #[serde(default)]
    pub structural: Option<PeerStructuralConstraints>,
    #[serde(default)]
    pub candidates: Option<PeerCandidateConstraints>,
    #[serde(default)]
    pub budgets: Option<PeerBudgetConstraints>,
    #[serde(default)]
    pub gates: Option<PeerGateConstraints>,
    #[serde(default)]
    pub extensions: Option<PeerExtensions>,
}

impl From<PeerConstraintEnvelope> for ConstraintEnvelope {
    fn from(c: PeerConstraintEnvelope) -> Self {
        Self {
            structural: c.structural.map(|s| StructuralConstraints {
                max_depth: s.max_depth,
                max_children_per_composite: s.max_children_per_composite,
                max_total_nodes_per_run: s.max_total_nodes_per_run,
                max_decomposition_rounds_per_node: s.max_decomposition_rounds_per_node,
            }),
            candidates: c.candidates.map(|s| CandidateConstraints {
                max_candidates_per_subtask: s.max_candidates_per_subtask,
                allowed_node_type_ids: s.allowed_node_type_ids,
                denied_node_type_ids: s.denied_node_type_ids,
            }),
            budgets: c.budgets.map(|b| BudgetConstraints {
                max_wall_time_ms: b.max_wall_time_ms,
                max_steps: b.max_steps,
                max_external_calls: b.max_external_calls,
                max_cost: b.max_cost,
            }),
            gates: c.gates.map(|g| GateConstraints {
                side_effect_class: g.side_effect_class,
                require_approval: g.require_approval,
            }),
            extensions: namespaced(c.extensions),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PeerStructuralConstraints {
    #[serde(default)]
    pub max_depth: Option<u64>,
    #[serde(default)]
    pub max_children_per_composite: Option<u64>,
    #[serde(default)]
    pub max_total_nodes_per_run: Option<u64>,
    #[serde(default)]
    pub max_decomposition_rounds_per_node: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PeerCandidateConstraints {
    #[serde(default)]
    pub max_candidates_per_subtask: Option<u64>,
    #[serde(default)]
    pub allowed_node_type_ids: Option<Vec<String>>,
    #[serde(default)]
    pub denied_node_type_ids: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PeerBudgetConstraints {
    #[serde(default)]
    pub max_wall_time_ms: Option<u64>,
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(default)]
    pub max_external_calls: Option<u64>,
    #[serde(default)]
    pub max_cost: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PeerGateConstraints {
    #[serde(default)]
    pub side_effect_class: Option<SideEffectClass>,
    #[serde(default)]
    pub require_approval: Option<bool>,
}

/// A PDP's decision.
#[derive(Debug, Clone, Deserialize)]
pub struct PeerPolicyDecision {
    pub decision: PolicyDecisionOutcome,
    #[serde(default)]
    pub reason_code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub approval_ref: Option<PeerApprovalRef>,
    #[serde(default)]
    pub metadata: Option<PeerMetadata>,
    #[serde(default)]
    pub extensions: Option<PeerExtensions>,
}

impl From<PeerPolicyDecision> for PolicyDecision {
    fn from(d: PeerPolicyDecision) -> Self {
        Self {
            decision: d.decision,
            reason_code: d.reason_code,
            message: d.message,
            approval_ref: d.approval_ref.map(|a| ApprovalRef {
                approval_id: a.approval_id,
                uri: a.uri,
                extensions: namespaced(a.extensions),
            }),
            metadata: d.metadata.map(|m| Metadata {
                labels: m.labels,
                annotations: m.annotations,
                extensions: namespaced(m.extensions),
            }),
            extensions: namespaced(d.extensions),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct PeerApprovalRef {
    pub approval_id: String,
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub extensions: Option<PeerExtensions>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PeerMetadata {
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub extensions: Option<PeerExtensions>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_decision_with_plain_extension_keys_and_unknown_fields_is_read() {
        let body = json!({
            "decision": "allow",
            "reason_code": "rule_matched",
            "extensions": {"policy_hash": "abc", "policy_version": "3", "acme.rule": "r1"},
            "evaluated_rules": ["r1"],
        });
        let decision: PolicyDecision = serde_json::from_value::<PeerPolicyDecision>(body)
            .unwrap()
            .into();
        assert_eq!(decision.decision, PolicyDecisionOutcome::Allow);
        let extensions = decision.extensions.unwrap();
        assert_eq!(
            extensions.as_map().len(),
            1,
            "only namespaced keys are kept"
        );
        assert_eq!(extensions.get("acme.rule"), Some(&json!("r1")));
    }

    #[test]
    fn nested_unknown_fields_are_ignored_but_known_constraints_kept() {
        let body = json!({
            "node_type_id": "acme.x", "version": "1", "kind": "atomic", "vendor": {"a": 1},
            "constraints": {"gates": {"side_effect_class": "write", "new_gate": true}, "later": 1},
            "extensions": {"plain": 1},
        });
        let t: NodeType = serde_json::from_value::<PeerNodeType>(body).unwrap().into();
        let gates = t.constraints.unwrap().gates.unwrap();
        assert_eq!(gates.side_effect_class, Some(SideEffectClass::Write));
        assert_eq!(t.extensions, None);
    }

    #[test]
    fn an_answer_without_what_we_need_is_refused() {
        assert!(serde_json::from_value::<PeerPolicyDecision>(json!({"reason": "x"})).is_err());
        let bad_state = json!({"node_run_id": "n", "state": "done"});
        assert!(serde_json::from_value::<PeerAtomicExecuteResult>(bad_state).is_err());
    }
}
