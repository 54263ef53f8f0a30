//! Policy checkpoints: ask the PDP, or decide locally (deny unless `dev-allow`).

use arp_types::pdp::{PolicyDecision, PolicyDecisionOutcome, PolicyDecisionRequest};
use arp_types::{JsonObject, NodeTypeRef, RunContext};
use serde_json::json;

use crate::clients::{CallError, PdpClient, Peer};
use crate::config::LocalPolicy;

#[derive(Debug)]
pub struct Policy {
    pub pdp: Option<PdpClient>,
    pub local: LocalPolicy,
}

/// The subject of a policy checkpoint.
#[derive(Debug)]
pub struct PolicySubject<'a> {
    pub run_id: &'a str,
    pub node_run_id: &'a str,
    pub node_type_ref: &'a NodeTypeRef,
    pub run_context: Option<&'a RunContext>,
}

impl Policy {
    pub async fn decide(&self, action: &str, subject: PolicySubject<'_>) -> PolicyDecision {
        let Some(pdp) = &self.pdp else {
            return self.local_decision();
        };
        let request = PolicyDecisionRequest {
            action: action.to_owned(),
            run_id: Some(subject.run_id.to_owned()),
            node_run_id: Some(subject.node_run_id.to_owned()),
            node_type_ref: Some(subject.node_type_ref.clone()),
            run_context: subject.run_context.cloned(),
            constraints: None,
            context: None,
            extensions: None,
        };
        match pdp.decide(&request).await {
            Ok(decision) => decision,
            Err(err) => {
                let reason = match &err {
                    CallError::Terminal(e) if e.code == Peer::Pdp.bad_response_code() => {
                        "pdp_bad_response"
                    }
                    _ => "pdp_unavailable",
                };
                tracing::warn!(error = %err, action, reason, "no usable PDP decision; denying");
                deny(reason, Some(err.to_string()))
            }
        }
    }

    fn local_decision(&self) -> PolicyDecision {
        match self.local {
            LocalPolicy::AllowAll => PolicyDecision {
                decision: PolicyDecisionOutcome::Allow,
                reason_code: Some("policy_bypass".into()),
                message: None,
                approval_ref: None,
                metadata: None,
                extensions: None,
            },
            LocalPolicy::DenyAll => deny(
                "policy_unconfigured",
                Some("No PDP configured for policy enforcement".into()),
            ),
        }
    }
}

fn deny(reason_code: &str, message: Option<String>) -> PolicyDecision {
    PolicyDecision {
        decision: PolicyDecisionOutcome::Deny,
        reason_code: Some(reason_code.into()),
        message,
        approval_ref: None,
        metadata: None,
        extensions: None,
    }
}

/// Only an explicit `allow` lets work proceed (`require_approval` does not).
pub fn allows(decision: &PolicyDecision) -> bool {
    decision.decision == PolicyDecisionOutcome::Allow
}

/// The `policy_decided` event's data, as the Python coordinator writes it.
pub fn event_data(action: &str, decision: &PolicyDecision) -> JsonObject {
    let mut data = JsonObject::new();
    data.insert("action".into(), json!(action));
    data.insert("decision".into(), json!(decision.decision.as_str()));
    if let Some(code) = &decision.reason_code {
        data.insert("reason_code".into(), json!(code));
    }
    if let Some(message) = &decision.message {
        data.insert("message".into(), json!(message));
    }
    if let Some(approval) = &decision.approval_ref {
        data.insert(
            "approval_ref".into(),
            serde_json::to_value(approval).unwrap_or_default(),
        );
    }
    data
}
