//! The step before the executor call: kind, candidates and policy, then `running`.

use std::sync::Arc;

use arp_types::pdp::PolicyDecision;
use arp_types::run::{ExecutorBinding, NodeRun, Run, RunEventType};
use arp_types::{ConstraintEnvelope, ErrorDetail, NodeKind, NodeRunState};

use crate::catalog::NodeTypeInfo;
use crate::constraints;
use crate::coordinator::{Coordinator, constraints_of};
use crate::policy::{self, PolicySubject};
use crate::runs::lifecycle::{self, Admit, Begun};
use crate::store::{RunTx, StoreError, now_ms};

use super::retry::backoff;

/// What dispatching decided before the executor call.
pub(super) enum Begin {
    Execute(Box<Execution>),
    Stop,
}

pub(super) struct Execution {
    pub(super) node_run: NodeRun,
    pub(super) run: Run,
    pub(super) deadline_at: i64,
}

/// Kind, candidate and policy checks, then `running`, in one transaction.
pub(super) async fn begin(
    coord: &Arc<Coordinator>,
    node_run_id: &str,
) -> Result<Begin, StoreError> {
    let Some(row) = coord.store.node_run(node_run_id).await? else {
        return Ok(Begin::Stop);
    };
    if row.node_run.state.is_terminal() || !row.dispatch_pending {
        return Ok(Begin::Stop);
    }
    let Some(run) = coord.store.run(&row.node_run.run_id).await? else {
        return Ok(Begin::Stop);
    };
    if run.state.is_terminal() {
        return Ok(Begin::Stop);
    }
    // `running` with its dispatch still owed: an earlier dispatch decided policy and
    // stored kind and constraints in the same transaction, then died or failed before
    // the outcome was recorded. Send the same request again; decide nothing twice.
    if row.node_run.state == NodeRunState::Running && row.node_run.kind.is_some() {
        return Ok(Begin::Execute(Box::new(Execution {
            node_run: row.node_run,
            run,
            deadline_at: row.deadline_at,
        })));
    }
    let node_run = &row.node_run;
    let info = match node_run.kind {
        Some(_) => None,
        None => Some(resolve_node_type(coord, node_run, row.deadline_at).await),
    };
    let Some(kind) = node_run.kind.or(info.as_ref().and_then(|i| i.kind)) else {
        fail(
            coord,
            node_run_id,
            "unknown_node_kind",
            "Unable to resolve node kind",
        )
        .await?;
        return Ok(Begin::Stop);
    };
    // The node type's constraints are merged here when its kind was not known
    // when the NodeRun was created (the catalog had no answer yet).
    let node_type = info.and_then(|i| i.constraints);
    let effective = match constraints_of(node_run.extensions.as_ref()) {
        Some(stored) if node_type.is_some() => {
            constraints::merge([Some(&stored), node_type.as_ref()])
        }
        Some(stored) => Some(stored),
        None => constraints::merge([
            constraints_of(run.extensions.as_ref()).as_ref(),
            node_type.as_ref(),
        ]),
    };
    if let Some((code, message)) =
        candidate_violation(effective.as_ref(), &node_run.node_type_ref.node_type_id)
    {
        fail(coord, node_run_id, code, message).await?;
        return Ok(Begin::Stop);
    }
    let subject = PolicySubject {
        run_id: &run.run_id,
        node_run_id,
        node_type_ref: &node_run.node_type_ref,
        run_context: run.run_context.as_ref(),
    };
    let decision = coord.policy.decide(ACTION_EXECUTE, subject).await;
    let admission = Admission::new(coord, kind, effective, decision);

    let id = node_run_id.to_owned();
    let begun = coord
        .store
        .write(move |tx| lifecycle::begin_dispatch(tx, &id, &admission))
        .await?;
    Ok(match begun {
        Some(Begun {
            node_run,
            run,
            deadline_at,
        }) => Begin::Execute(Box::new(Execution {
            node_run,
            run,
            deadline_at,
        })),
        None => Begin::Stop,
    })
}

/// The policy action checked before a NodeRun is handed to its executor.
pub const ACTION_EXECUTE: &str = "node.run.execute";

/// What a dispatch decided before its transaction: the NodeRun's kind, effective
/// constraints, the policy decision and the executor it goes to. The dispatcher's
/// `begin` builds one; so does starting a run, when it can begin the root's
/// dispatch in its own transaction (one commit fewer per run).
#[derive(Debug)]
pub struct Admission {
    kind: NodeKind,
    effective: Option<ConstraintEnvelope>,
    decision: PolicyDecision,
    endpoint: Result<String, (&'static str, &'static str)>,
}

impl Admission {
    pub fn new(
        coord: &Coordinator,
        kind: NodeKind,
        effective: Option<ConstraintEnvelope>,
        decision: PolicyDecision,
    ) -> Self {
        let endpoint = match kind {
            NodeKind::Atomic => coord.atomic.as_ref().map(|c| c.endpoint()).ok_or((
                "atomic_executor_unconfigured",
                "Atomic Executor is not configured",
            )),
            NodeKind::Composite => coord.composite.as_ref().map(|c| c.base_url.clone()).ok_or((
                "composite_executor_unconfigured",
                "Composite Executor is not configured",
            )),
        };
        Self {
            kind,
            effective,
            decision,
            endpoint,
        }
    }

    /// The executor's binding, named by kind.
    fn executor_binding(&self) -> ExecutorBinding {
        ExecutorBinding {
            executor_instance_id: match self.kind {
                NodeKind::Atomic => "jarvis-atomic-executor".into(),
                NodeKind::Composite => "jarvis-composite-executor".into(),
            },
            endpoint: self.endpoint.clone().unwrap_or_default(),
            audience: None,
            extensions: None,
        }
    }
}

impl Admit for Admission {
    fn kind(&self) -> NodeKind {
        self.kind
    }

    fn prepare(&self, node_run: &mut NodeRun) {
        if node_run.extensions.is_none() || constraints_of(node_run.extensions.as_ref()).is_none() {
            node_run.extensions = crate::coordinator::extensions_with(
                node_run.extensions.as_ref(),
                [(
                    crate::coordinator::ext::CONSTRAINTS,
                    serde_json::to_value(&self.effective).unwrap_or_default(),
                )],
            );
        }
    }

    /// Appends the `policy_decided` event of the execute checkpoint.
    fn record_decision(&self, tx: &mut dyn RunTx, node_run: &NodeRun) -> Result<(), StoreError> {
        tx.append_event(
            &node_run.run_id,
            Some(&node_run.node_run_id),
            RunEventType::PolicyDecided,
            Some(policy::event_data(ACTION_EXECUTE, &self.decision)),
        )?;
        Ok(())
    }

    /// Why the NodeRun may not run: denied by policy, or no executor for its kind.
    fn refusal(&self) -> Option<ErrorDetail> {
        if !policy::allows(&self.decision) {
            return Some(ErrorDetail::new(
                "policy_denied",
                "NodeRun denied by policy",
            ));
        }
        self.endpoint
            .as_ref()
            .err()
            .map(|&(code, message)| ErrorDetail::new(code, message))
    }

    fn binding(&self) -> ExecutorBinding {
        self.executor_binding()
    }
}

/// Looks the node type up, again and again while its sources are unreachable
/// (an executor that is down cannot list its nodes yet), until the deadline.
async fn resolve_node_type(
    coord: &Arc<Coordinator>,
    node_run: &NodeRun,
    deadline_at: i64,
) -> NodeTypeInfo {
    for n in 0u32.. {
        let info = coord.catalog.lookup(&node_run.node_type_ref).await;
        if info.kind.is_some() || !info.sources_unreachable || now_ms() >= deadline_at {
            return info;
        }
        tokio::time::sleep(backoff(n, None, deadline_at)).await;
        match coord.store.node_run(&node_run.node_run_id).await {
            Ok(Some(row)) if !row.node_run.state.is_terminal() => {}
            _ => return info,
        }
    }
    unreachable!("the loop returns")
}

pub fn candidate_violation(
    constraints: Option<&ConstraintEnvelope>,
    node_type_id: &str,
) -> Option<(&'static str, &'static str)> {
    let candidates = constraints?.candidates.as_ref()?;
    if candidates
        .allowed_node_type_ids
        .as_ref()
        .is_some_and(|ids| !ids.iter().any(|i| i == node_type_id))
    {
        return Some((
            "node_type_not_allowed",
            "NodeType is not in the allowed candidate set",
        ));
    }
    if candidates
        .denied_node_type_ids
        .as_ref()
        .is_some_and(|ids| ids.iter().any(|i| i == node_type_id))
    {
        return Some((
            "node_type_denied",
            "NodeType is denied by candidate constraints",
        ));
    }
    None
}

pub(super) async fn fail(
    coord: &Arc<Coordinator>,
    node_run_id: &str,
    code: &str,
    message: &str,
) -> Result<(), StoreError> {
    tracing::warn!(%node_run_id, code, message, "NodeRun failed before dispatch");
    coord
        .fail_node_run(node_run_id, ErrorDetail::new(code, message))
        .await
}
