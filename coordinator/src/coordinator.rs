//! The Run Coordinator's operations: each API call is one store transaction.

use std::sync::Arc;
use std::time::Duration;

use arp_types::run::{
    EvaluationResult, EvaluationStatus, NodeRun, NodeRunCompleteRequest, NodeRunCreateSpec,
    NodeRunEvaluationReportRequest, NodeRunsCreateRequest, NodeRunsCreateResponse, Run,
    RunEventType, RunStartRequest, RunState,
};
use arp_types::time::now_rfc3339;
use arp_types::{
    ConstraintEnvelope, ErrorDetail, Extensions, JsonObject, NodeKind, NodeRunState, ResourceRef,
};
use rand::Rng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::catalog::{NodeCatalog, NodeTypeInfo};
use crate::clients::{AtomicExecutorClient, CompositeExecutorClient};
use crate::config::Config;
use crate::constraints;
use crate::dispatch::{self, Admission};
use crate::policy::{self, Policy, PolicySubject};
use crate::runs::error::RunError;
use crate::store::{ExecutorCancel, Lease, NodeRunRow, RunTx, Store, StoreError, now_ms};

/// Extension keys the coordinator owns on Runs and NodeRuns.
pub mod ext {
    pub const CONSTRAINTS: &str = "jarvis.constraints";
    pub const BINDING_DECISION: &str = "jarvis.binding_decision";
    pub const CANDIDATE_SET_ID: &str = "jarvis.candidate_set_id";
    pub const IDEMPOTENCY_KEY: &str = "jarvis.idempotency_key";
    pub const DECOMPOSITION_ROUNDS: &str = "jarvis.decomposition_rounds";
    pub const COMPLETION_ERROR: &str = "jarvis.completion_error";
    pub const ALL: [&str; 6] = [
        CONSTRAINTS,
        BINDING_DECISION,
        CANDIDATE_SET_ID,
        IDEMPOTENCY_KEY,
        DECOMPOSITION_ROUNDS,
        COMPLETION_ERROR,
    ];
}

/// Everything the API handlers and the dispatcher share.
#[derive(Debug)]
pub struct Coordinator {
    pub store: Store,
    pub config: Config,
    pub catalog: NodeCatalog,
    pub policy: Policy,
    pub atomic: Option<AtomicExecutorClient>,
    pub composite: Option<CompositeExecutorClient>,
    /// Where composite executors call back.
    pub public_url: String,
    pub watchers: Arc<crate::events::RunWatchers>,
    /// Who holds the leases this process takes (one id per process).
    pub lease_owner: Arc<str>,
}

/// How a NodeRun ends.
#[derive(Debug, Clone)]
pub struct Completion {
    pub state: NodeRunState,
    pub outputs: Option<JsonObject>,
    pub output_artifacts: Option<Vec<ResourceRef>>,
    pub error: Option<ErrorDetail>,
}

impl Completion {
    pub fn failed(error: ErrorDetail) -> Self {
        Self {
            state: NodeRunState::Failed,
            outputs: None,
            output_artifacts: None,
            error: Some(error),
        }
    }
}

impl Coordinator {
    pub async fn start_run(self: &Arc<Self>, req: RunStartRequest) -> Result<Run, RunError> {
        if let Some(id) = &req.run_id
            && id.trim().is_empty()
        {
            return Err(RunError::InvalidRequest("run_id: must not be empty".into()));
        }
        validate_constraints(req.constraints.as_ref())?;
        let run_id = req.run_id.clone().unwrap_or_else(|| new_id("run"));
        let root_id = new_id("node_run");
        // Starting a run never waits on another service: what the catalog does
        // not know yet, dispatch resolves (kind and the node type's constraints).
        let info = self.catalog.lookup_cached(&req.root_node_type_ref);
        let root_constraints =
            constraints::merge([req.constraints.as_ref(), info.constraints.as_ref()]);
        let subject = || PolicySubject {
            run_id: &run_id,
            node_run_id: &root_id,
            node_type_ref: &req.root_node_type_ref,
            run_context: req.run_context.as_ref(),
        };
        let decision = self.policy.decide("run.start", subject()).await;
        let allowed = policy::allows(&decision);
        // When the root's kind is known, its candidates allow it and the execute
        // checkpoint needs no PDP call, this transaction also begins the root's
        // dispatch (`policy_decided`, `running`), as the dispatcher would right after
        // the commit: one commit fewer per run. With a PDP the dispatcher keeps that
        // checkpoint, so a POST waits on one PDP call at most.
        let admission = match info.kind {
            Some(kind)
                if allowed
                    && self.config.auto_dispatch
                    && self.policy.pdp.is_none()
                    && dispatch::candidate_violation(
                        root_constraints.as_ref(),
                        &req.root_node_type_ref.node_type_id,
                    )
                    .is_none() =>
            {
                let decision = self
                    .policy
                    .decide(dispatch::ACTION_EXECUTE, subject())
                    .await;
                Some(Admission::new(
                    self,
                    kind,
                    root_constraints.clone(),
                    decision,
                ))
            }
            _ => None,
        };
        // A root refused at its execute checkpoint fails in this transaction: nothing to dispatch.
        let refusal = admission.as_ref().and_then(Admission::refusal);
        let deadline_at = self.deadline_for(root_constraints.as_ref());
        let lease = (allowed && self.config.auto_dispatch && refusal.is_none())
            .then(|| (self.lease_owner.clone(), self.config.lease));
        let now = now_rfc3339();
        let client_extensions = strip_owned(req.extensions.clone());

        let run = Run {
            run_id: run_id.clone(),
            state: RunState::Running,
            root_node_run_id: root_id.clone(),
            run_context: req.run_context.clone(),
            started_at: Some(now.clone()),
            ended_at: None,
            extensions: extensions_with(
                client_extensions.as_ref(),
                [(ext::CONSTRAINTS, to_value(&req.constraints))],
            ),
        };
        let mut root = NodeRun {
            node_run_id: root_id.clone(),
            run_id: run_id.clone(),
            node_type_ref: req.root_node_type_ref.clone(),
            kind: info.kind,
            parent_node_run_id: None,
            state: NodeRunState::Queued,
            created_at: Some(now),
            started_at: None,
            ended_at: None,
            inputs: Some(req.input),
            outputs: None,
            output_artifacts: None,
            executor_binding: None,
            evaluation_result: None,
            recovery_actions: None,
            extensions: extensions_with(
                client_extensions.as_ref(),
                [(ext::CONSTRAINTS, to_value(&root_constraints))],
            ),
        };

        if let Some(admission) = admission.as_ref().filter(|_| refusal.is_none()) {
            admission.start(&mut root);
        }

        let (run, cancels) = self
            .store
            .write(move |tx| -> Result<_, RunError> {
                if tx.run_terminal(&run.run_id)?.is_some() {
                    return Err(RunError::RunAlreadyExists(run.run_id.clone()));
                }
                tx.insert_run(&run)?;
                tx.append_event(
                    &run.run_id,
                    None,
                    RunEventType::RunStarted,
                    Some(obj([("root_node_run_id", json!(root_id))])),
                )?;
                let lease = lease.map(|(owner, duration)| Lease::from_now(&owner, duration));
                tx.insert_node_run(&root, 0, deadline_at, lease.as_ref())?;
                tx.append_event(
                    &run.run_id,
                    Some(&root_id),
                    RunEventType::NodeRunAssigned,
                    Some(obj([("root", json!(true))])),
                )?;
                tx.append_event(
                    &run.run_id,
                    Some(&root_id),
                    RunEventType::PolicyDecided,
                    Some(policy::event_data("run.start", &decision)),
                )?;
                if let Some(admission) = &admission {
                    admission.record_decision(tx, &root)?;
                }
                let error = if allowed {
                    refusal
                } else {
                    Some(ErrorDetail::new(
                        "policy_denied",
                        "Run start denied by policy",
                    ))
                };
                match error {
                    None => Ok((run, Vec::new())),
                    Some(error) => {
                        let cancels = complete_in_tx(tx, root, Completion::failed(error))?;
                        let run = tx.run(&run.run_id)?.ok_or(StoreError::Closed)?;
                        Ok((run, cancels))
                    }
                }
            })
            .await?;
        self.cancel_at_executors(cancels);
        Ok(run)
    }

    pub async fn get_run(&self, run_id: &str) -> Result<Run, RunError> {
        self.store
            .run(run_id)
            .await?
            .ok_or_else(|| RunError::RunNotFound(run_id.to_owned()))
    }

    /// `run_not_found` unless the run exists (without reading its body).
    pub async fn ensure_run(&self, run_id: &str) -> Result<(), RunError> {
        match self.store.run_terminal(run_id).await? {
            Some(_) => Ok(()),
            None => Err(RunError::RunNotFound(run_id.to_owned())),
        }
    }

    pub async fn get_node_run(&self, node_run_id: &str) -> Result<NodeRun, RunError> {
        let row = self.store.node_run(node_run_id).await?;
        row.map(|r| r.node_run)
            .ok_or_else(|| RunError::NodeRunNotFound(node_run_id.to_owned()))
    }

    pub async fn cancel_run(self: &Arc<Self>, run_id: String) -> Result<Run, RunError> {
        let (run, cancels) = self
            .store
            .write(move |tx| -> Result<_, RunError> {
                let mut run = tx
                    .run(&run_id)?
                    .ok_or_else(|| RunError::RunNotFound(run_id.clone()))?;
                if run.state.is_terminal() {
                    return Ok((run, Vec::new()));
                }
                run.state = RunState::Canceled;
                run.ended_at = Some(now_rfc3339());
                tx.update_run(&run)?;
                let cancels = cancel_open_node_runs(tx, &run.run_id)?;
                tx.append_event(
                    &run.run_id,
                    None,
                    RunEventType::RunCompleted,
                    Some(obj([("state", json!("canceled"))])),
                )?;
                Ok((run, cancels))
            })
            .await?;
        self.cancel_at_executors(cancels);
        Ok(run)
    }

    pub async fn create_node_runs(
        self: &Arc<Self>,
        req: NodeRunsCreateRequest,
    ) -> Result<NodeRunsCreateResponse, RunError> {
        if req.node_runs.is_empty() {
            return Err(RunError::InvalidRequest(
                "node_runs: must contain at least 1 item".into(),
            ));
        }
        for spec in &req.node_runs {
            validate_constraints(spec.constraints.as_ref())?;
        }
        // Cheap checks first so a bad request costs no catalog lookups; the
        // transaction below checks everything again against committed state.
        let run = self.get_run(&req.run_id).await?;
        let parent = self
            .store
            .node_run(&req.parent_node_run_id)
            .await?
            .ok_or_else(|| RunError::ParentNotFound(req.parent_node_run_id.clone()))?;
        if parent.node_run.run_id != run.run_id {
            return Err(RunError::ParentMismatch);
        }
        let parent_kind = match parent.node_run.kind {
            Some(kind) => Some(kind),
            None => {
                self.catalog
                    .lookup(&parent.node_run.node_type_ref)
                    .await
                    .kind
            }
        };
        if parent_kind != Some(NodeKind::Composite) {
            return Err(RunError::ParentNotComposite);
        }
        // Together, so a source that hangs costs the request one bounded wait, not one per child.
        let lookups = req
            .node_runs
            .iter()
            .map(|s| self.catalog.lookup(&s.node_type_ref));
        let infos: Vec<NodeTypeInfo> = futures_util::future::join_all(lookups).await;
        let lease = self
            .config
            .auto_dispatch
            .then(|| (self.lease_owner.clone(), self.config.lease));
        let default_timeout = self.config.node_run_timeout;

        self.store
            .write(move |tx| {
                create_node_runs_in_tx(tx, req, parent_kind, infos, lease, default_timeout)
            })
            .await
    }

    pub async fn complete_node_run(
        self: &Arc<Self>,
        node_run_id: String,
        req: NodeRunCompleteRequest,
    ) -> Result<(), RunError> {
        let cancels = self
            .store
            .write(move |tx| -> Result<_, RunError> {
                let row = open_node_run(tx, &node_run_id)?;
                let completion = Completion {
                    state: req.state.into(),
                    outputs: req.outputs,
                    output_artifacts: req.output_artifacts,
                    error: req.error,
                };
                Ok(complete_in_tx(tx, row.node_run, completion)?)
            })
            .await?;
        self.cancel_at_executors(cancels);
        Ok(())
    }

    pub async fn report_evaluation(
        &self,
        node_run_id: String,
        req: NodeRunEvaluationReportRequest,
    ) -> Result<(), RunError> {
        if let Err((path, msg)) = req.evaluation_result.validate() {
            return Err(RunError::InvalidRequest(format!("{path}: {msg}")));
        }
        self.store
            .write(move |tx| -> Result<_, RunError> {
                let row = open_node_run(tx, &node_run_id)?;
                evaluate_in_tx(tx, row.node_run, req.evaluation_result, req.recovery_action)?;
                Ok(())
            })
            .await
    }

    /// Fails an open NodeRun (no-op if it already ended) and stops its executor if it was running.
    pub async fn fail_node_run(
        self: &Arc<Self>,
        node_run_id: &str,
        error: ErrorDetail,
    ) -> Result<(), StoreError> {
        let id = node_run_id.to_owned();
        let cancels = self
            .store
            .write(move |tx| -> Result<_, StoreError> {
                let Some(row) = tx.node_run(&id)? else {
                    return Ok(Vec::new());
                };
                if row.node_run.state.is_terminal() {
                    return Ok(Vec::new());
                }
                let was_running = row.node_run.state == NodeRunState::Running;
                let kind = row.node_run.kind;
                let mut cancels = complete_in_tx(tx, row.node_run, Completion::failed(error))?;
                if was_running {
                    cancels.push(ExecutorCancel {
                        node_run_id: id,
                        kind,
                    });
                }
                Ok(cancels)
            })
            .await?;
        self.cancel_at_executors(cancels);
        Ok(())
    }

    /// Tells executors to stop NodeRuns that were canceled; best effort, in the background.
    pub fn cancel_at_executors(self: &Arc<Self>, cancels: Vec<ExecutorCancel>) {
        for cancel in cancels {
            let this = self.clone();
            tokio::spawn(async move {
                let result = match cancel.kind {
                    Some(NodeKind::Atomic) => match &this.atomic {
                        Some(atomic) => atomic.cancel(&cancel.node_run_id).await,
                        None => Ok(()),
                    },
                    Some(NodeKind::Composite) => match &this.composite {
                        Some(composite) => composite.cancel(&cancel.node_run_id).await,
                        None => Ok(()),
                    },
                    None => Ok(()),
                };
                if let Err(err) = result {
                    tracing::warn!(node_run_id = %cancel.node_run_id, error = %err, "executor cancel failed");
                }
            });
        }
    }

    /// A NodeRun's deadline: its `max_wall_time_ms`, else the configured default, from now.
    pub fn deadline_for(&self, constraints: Option<&ConstraintEnvelope>) -> i64 {
        deadline_for(constraints, self.config.node_run_timeout)
    }
}

fn deadline_for(constraints: Option<&ConstraintEnvelope>, default_timeout: Duration) -> i64 {
    let budget = constraints
        .and_then(ConstraintEnvelope::max_wall_time_ms)
        .unwrap_or(default_timeout.as_millis() as u64);
    now_ms().saturating_add(budget.min(i64::MAX as u64 / 2) as i64)
}

fn create_node_runs_in_tx(
    tx: &mut dyn RunTx,
    req: NodeRunsCreateRequest,
    parent_kind: Option<NodeKind>,
    infos: Vec<NodeTypeInfo>,
    lease: Option<(Arc<str>, Duration)>,
    default_timeout: Duration,
) -> Result<NodeRunsCreateResponse, RunError> {
    let run = tx
        .run(&req.run_id)?
        .ok_or_else(|| RunError::RunNotFound(req.run_id.clone()))?;
    let parent_row = tx
        .node_run(&req.parent_node_run_id)?
        .ok_or_else(|| RunError::ParentNotFound(req.parent_node_run_id.clone()))?;
    let mut parent = parent_row.node_run;
    if parent.run_id != run.run_id {
        return Err(RunError::ParentMismatch);
    }
    if parent.kind.or(parent_kind) != Some(NodeKind::Composite) {
        return Err(RunError::ParentNotComposite);
    }
    if run.state.is_terminal() {
        return Err(RunError::RunNotActive {
            run_id: run.run_id.clone(),
            state: run.state.as_str(),
        });
    }
    if parent.state.is_terminal() {
        return Err(RunError::ParentTerminal(parent.node_run_id.clone()));
    }

    let run_constraints = constraints_of(run.extensions.as_ref());
    let parent_constraints = constraints_of(parent.extensions.as_ref());
    let structural = constraints::merge([run_constraints.as_ref(), parent_constraints.as_ref()])
        .and_then(|c| c.structural);

    let mut response: Vec<NodeRun> = Vec::with_capacity(req.node_runs.len());
    let mut new_runs: Vec<(NodeRun, i64)> = Vec::new();
    for (spec, info) in req.node_runs.iter().zip(&infos) {
        let effective = constraints::merge([
            run_constraints.as_ref(),
            info.constraints.as_ref(),
            spec.constraints.as_ref(),
        ]);
        let node_run_id = match &spec.idempotency_key {
            Some(key) => idempotent_node_run_id(&req.run_id, &req.parent_node_run_id, key),
            None => new_id("node_run"),
        };
        if spec.idempotency_key.is_some() {
            let earlier = match tx.node_run(&node_run_id)? {
                Some(row) => Some(row.node_run),
                None => new_runs
                    .iter()
                    .find(|(n, _)| n.node_run_id == node_run_id)
                    .map(|(n, _)| n.clone()),
            };
            if let Some(existing) = earlier {
                assert_idempotent_match(&existing, spec, &req, effective.as_ref())?;
                response.push(existing);
                continue;
            }
        }
        let candidate_set_id = spec.candidate_set_id.clone().or_else(|| {
            spec.binding_decision
                .as_ref()
                .and_then(|b| b.candidate_set_id.clone())
        });
        let extensions = extensions_with(
            strip_owned(spec.extensions.clone()).as_ref(),
            [
                (ext::BINDING_DECISION, to_value(&spec.binding_decision)),
                (ext::CANDIDATE_SET_ID, to_value(&candidate_set_id)),
                (ext::IDEMPOTENCY_KEY, to_value(&spec.idempotency_key)),
                (ext::CONSTRAINTS, to_value(&effective)),
            ],
        );
        let node_run = NodeRun {
            node_run_id,
            run_id: req.run_id.clone(),
            node_type_ref: spec.node_type_ref.clone(),
            kind: info.kind,
            parent_node_run_id: Some(req.parent_node_run_id.clone()),
            state: NodeRunState::Queued,
            created_at: Some(now_rfc3339()),
            started_at: None,
            ended_at: None,
            inputs: Some(spec.inputs.clone()),
            outputs: None,
            output_artifacts: None,
            executor_binding: None,
            evaluation_result: None,
            recovery_actions: None,
            extensions,
        };
        response.push(node_run.clone());
        new_runs.push((node_run, deadline_for(effective.as_ref(), default_timeout)));
    }

    let new_count = new_runs.len() as u64;
    if new_count == 0 {
        return Ok(NodeRunsCreateResponse {
            node_runs: response,
            extensions: req.extensions,
        });
    }
    let rounds = parent
        .extensions
        .as_ref()
        .and_then(|e| e.get(ext::DECOMPOSITION_ROUNDS))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if let Some(s) = &structural {
        let violation = RunError::ConstraintViolation;
        if s.max_depth.is_some_and(|max| parent_row.depth + 1 > max) {
            return Err(violation("max_depth"));
        }
        if let Some(max) = s.max_children_per_composite
            && tx.count_children(&parent.node_run_id)? + new_count > max
        {
            return Err(violation("max_children_per_composite"));
        }
        if let Some(max) = s.max_total_nodes_per_run
            && tx.count_node_runs(&run.run_id)? + new_count > max
        {
            return Err(violation("max_total_nodes_per_run"));
        }
        if s.max_decomposition_rounds_per_node
            .is_some_and(|max| rounds + 1 > max)
        {
            return Err(violation("max_decomposition_rounds_per_node"));
        }
    }

    tx.append_event(
        &run.run_id,
        Some(&parent.node_run_id),
        RunEventType::CompositeDecomposed,
        Some(obj([("node_run_count", json!(new_count))])),
    )?;
    parent.extensions = extensions_with(
        parent.extensions.as_ref(),
        [(ext::DECOMPOSITION_ROUNDS, json!(rounds + 1))],
    );
    tx.update_node_run(&parent)?;

    for (node_run, deadline_at) in &new_runs {
        let lease = lease
            .as_ref()
            .map(|(owner, duration)| Lease::from_now(owner, *duration));
        tx.insert_node_run(node_run, parent_row.depth + 1, *deadline_at, lease.as_ref())?;
        let id = Some(node_run.node_run_id.as_str());
        tx.append_event(
            &run.run_id,
            id,
            RunEventType::NodeRunAssigned,
            Some(obj([("parent_node_run_id", json!(parent.node_run_id))])),
        )?;
        let extensions = node_run.extensions.as_ref();
        let binding = extensions
            .and_then(|e| e.get(ext::BINDING_DECISION))
            .cloned();
        if let Some(Value::Object(binding)) = &binding {
            tx.append_event(
                &run.run_id,
                id,
                RunEventType::SubtaskMapped,
                Some(binding.clone()),
            )?;
        }
        if let Some(candidate_set_id) = extensions.and_then(|e| e.get(ext::CANDIDATE_SET_ID)) {
            let mut data = obj([("candidate_set_id", candidate_set_id.clone())]);
            if let Some(subtask) = binding.as_ref().and_then(|b| b.get("subtask_id")) {
                data.insert("subtask_id".into(), subtask.clone());
            }
            tx.append_event(
                &run.run_id,
                id,
                RunEventType::CandidateSetGenerated,
                Some(data),
            )?;
        }
    }
    Ok(NodeRunsCreateResponse {
        node_runs: response,
        extensions: req.extensions,
    })
}

/// Ends a NodeRun: state, outputs, `atomic_executed`, and when it is the root,
/// the Run's end (`run_completed`) and the cancellation of whatever is still open.
pub fn complete_in_tx(
    tx: &mut dyn RunTx,
    mut node_run: NodeRun,
    completion: Completion,
) -> Result<Vec<ExecutorCancel>, StoreError> {
    node_run.state = completion.state;
    node_run.outputs = completion.outputs;
    node_run.output_artifacts = completion.output_artifacts;
    node_run.ended_at = Some(now_rfc3339());
    if let Some(error) = &completion.error {
        node_run.extensions = extensions_with(
            node_run.extensions.as_ref(),
            [(ext::COMPLETION_ERROR, to_value(error))],
        );
    }
    tx.update_node_run(&node_run)?;
    let state = json!(node_run.state.as_str());
    if node_run.kind == Some(NodeKind::Atomic) {
        tx.append_event(
            &node_run.run_id,
            Some(&node_run.node_run_id),
            RunEventType::AtomicExecuted,
            Some(obj([("state", state.clone())])),
        )?;
    }
    let mut cancels = Vec::new();
    if let Some(mut run) = tx.run(&node_run.run_id)?
        && run.root_node_run_id == node_run.node_run_id
        && !run.state.is_terminal()
    {
        run.state = match node_run.state {
            NodeRunState::Failed => RunState::Failed,
            NodeRunState::Canceled => RunState::Canceled,
            _ => RunState::Succeeded,
        };
        run.ended_at = node_run.ended_at.clone();
        tx.update_run(&run)?;
        cancels = cancel_open_node_runs(tx, &run.run_id)?;
        tx.append_event(
            &run.run_id,
            Some(&node_run.node_run_id),
            RunEventType::RunCompleted,
            Some(obj([("state", json!(run.state.as_str()))])),
        )?;
    }
    Ok(cancels)
}

/// Records an evaluation (and recovery hint) with its events.
pub fn evaluate_in_tx(
    tx: &mut dyn RunTx,
    mut node_run: NodeRun,
    evaluation: EvaluationResult,
    recovery: Option<arp_types::run::RecoveryAction>,
) -> Result<NodeRun, StoreError> {
    apply_evaluation(tx, &mut node_run, evaluation, recovery)?;
    tx.update_node_run(&node_run)?;
    Ok(node_run)
}

/// Sets the evaluation on `node_run` and appends its events; the caller stores the NodeRun.
fn apply_evaluation(
    tx: &mut dyn RunTx,
    node_run: &mut NodeRun,
    evaluation: EvaluationResult,
    recovery: Option<arp_types::run::RecoveryAction>,
) -> Result<(), StoreError> {
    let id = Some(node_run.node_run_id.as_str());
    tx.append_event(
        &node_run.run_id,
        id,
        RunEventType::NodeEvaluated,
        Some(to_object(&evaluation)),
    )?;
    if let Some(recovery) = &recovery {
        tx.append_event(
            &node_run.run_id,
            id,
            RunEventType::RecoveryApplied,
            Some(to_object(recovery)),
        )?;
    }
    node_run.evaluation_result = Some(evaluation);
    node_run.recovery_actions = recovery.map(|r| vec![r]);
    Ok(())
}

/// The atomic executor's result becomes an evaluation plus a completion, as in the Python coordinator.
pub fn record_atomic_result(
    tx: &mut dyn RunTx,
    node_run: NodeRun,
    completion: Completion,
) -> Result<Vec<ExecutorCancel>, StoreError> {
    let status = if completion.state == NodeRunState::Succeeded {
        EvaluationStatus::Success
    } else {
        EvaluationStatus::Fail
    };
    let evaluation = EvaluationResult {
        status,
        reason_code: Some("atomic_completed".into()),
        message: None,
        details: None,
        confidence: None,
        extensions: None,
    };
    // Stored once, by the completion.
    let mut node_run = node_run;
    apply_evaluation(tx, &mut node_run, evaluation, None)?;
    complete_in_tx(tx, node_run, completion)
}

/// Cancels every open NodeRun of the run; returns those an executor is working on.
fn cancel_open_node_runs(
    tx: &mut dyn RunTx,
    run_id: &str,
) -> Result<Vec<ExecutorCancel>, StoreError> {
    let mut cancels = Vec::new();
    let ended_at = now_rfc3339();
    for mut node_run in tx.open_node_runs(run_id)? {
        if node_run.state == NodeRunState::Running {
            cancels.push(ExecutorCancel {
                node_run_id: node_run.node_run_id.clone(),
                kind: node_run.kind,
            });
        }
        node_run.state = NodeRunState::Canceled;
        node_run.ended_at = Some(ended_at.clone());
        tx.update_node_run(&node_run)?;
    }
    Ok(cancels)
}

fn open_node_run(tx: &dyn RunTx, node_run_id: &str) -> Result<NodeRunRow, RunError> {
    let row = tx
        .node_run(node_run_id)?
        .ok_or_else(|| RunError::NodeRunNotFound(node_run_id.to_owned()))?;
    if row.node_run.state.is_terminal() {
        return Err(RunError::NodeRunAlreadyTerminal {
            node_run_id: node_run_id.to_owned(),
            state: row.node_run.state.as_str(),
        });
    }
    Ok(row)
}

fn assert_idempotent_match(
    existing: &NodeRun,
    spec: &NodeRunCreateSpec,
    req: &NodeRunsCreateRequest,
    expected_constraints: Option<&ConstraintEnvelope>,
) -> Result<(), RunError> {
    let conflict = RunError::IdempotencyConflict;
    if existing.run_id != req.run_id
        || existing.parent_node_run_id.as_deref() != Some(&req.parent_node_run_id)
    {
        return Err(conflict("parent/run"));
    }
    if existing.node_type_ref != spec.node_type_ref {
        return Err(conflict("NodeTypeRef"));
    }
    if existing.inputs.as_ref() != Some(&spec.inputs) {
        return Err(conflict("inputs"));
    }
    let stored = |key: &str| {
        existing
            .extensions
            .as_ref()
            .and_then(|e| e.get(key))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let candidate_set_id = spec.candidate_set_id.clone().or_else(|| {
        spec.binding_decision
            .as_ref()
            .and_then(|b| b.candidate_set_id.clone())
    });
    for (key, expected) in [
        (ext::BINDING_DECISION, to_value(&spec.binding_decision)),
        (ext::CANDIDATE_SET_ID, to_value(&candidate_set_id)),
        (ext::CONSTRAINTS, to_value(&expected_constraints)),
    ] {
        if stored(key) != expected {
            return Err(conflict(key.trim_start_matches("jarvis.")));
        }
    }
    Ok(())
}

fn validate_constraints(constraints: Option<&ConstraintEnvelope>) -> Result<(), RunError> {
    match constraints.map(ConstraintEnvelope::validate) {
        Some(Err((path, msg))) => Err(RunError::InvalidRequest(format!("{path}: {msg}"))),
        _ => Ok(()),
    }
}

/// The constraints the coordinator stored on a Run or NodeRun.
pub fn constraints_of(extensions: Option<&Extensions>) -> Option<ConstraintEnvelope> {
    let value = extensions?.get(ext::CONSTRAINTS)?;
    match serde_json::from_value(value.clone()) {
        Ok(c) => Some(c),
        Err(err) => {
            tracing::error!(error = %err, "stored constraints are invalid; ignoring them");
            None
        }
    }
}

/// `base` (minus keys the coordinator owns, so a client cannot forge them) plus
/// `entries` whose value is not null; `None` if the result is empty.
pub fn extensions_with<const N: usize>(
    base: Option<&Extensions>,
    entries: [(&str, Value); N],
) -> Option<Extensions> {
    let mut map = base.map(|e| e.as_map().clone()).unwrap_or_default();
    for (key, value) in entries {
        if value.is_null() {
            map.remove(key);
        } else {
            map.insert(key.to_owned(), value);
        }
    }
    Extensions::new(map).ok().filter(|e| !e.is_empty())
}

/// Removes coordinator-owned keys from client-supplied extensions.
pub fn strip_owned(extensions: Option<Extensions>) -> Option<Extensions> {
    let mut map = extensions?.into_map();
    for key in ext::ALL {
        map.remove(key);
    }
    Extensions::new(map).ok().filter(|e| !e.is_empty())
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn to_object<T: serde::Serialize>(value: &T) -> JsonObject {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        _ => JsonObject::new(),
    }
}

fn obj<const N: usize>(entries: [(&str, Value); N]) -> JsonObject {
    entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// `<prefix>_<32 hex>`: 12 hex digits of the current time in ms, then 80 random bits
/// (the layout of a UUIDv7). Ids made later sort later, so the rows and index entries
/// of new runs land on the last pages of each B-tree, where one commit of many runs
/// writes a few pages; random ids would scatter every run over pages of its own.
pub fn new_id(prefix: &str) -> String {
    let ms = (now_ms() as u64) & 0xFFFF_FFFF_FFFF;
    let random = rand::rng().random::<u128>() & ((1 << 80) - 1);
    format!("{prefix}_{ms:012x}{random:020x}")
}

/// The Python coordinator's deterministic id: `node_run_` + the first 32 hex
/// digits of sha256("{run_id}:{parent_node_run_id}:{idempotency_key}").
pub fn idempotent_node_run_id(
    run_id: &str,
    parent_node_run_id: &str,
    idempotency_key: &str,
) -> String {
    let digest =
        Sha256::digest(format!("{run_id}:{parent_node_run_id}:{idempotency_key}").as_bytes());
    let mut hex = String::with_capacity(32);
    for byte in &digest[..16] {
        hex.push_str(&format!("{byte:02x}"));
    }
    format!("node_run_{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_have_32_hex_digits_and_sort_by_creation_time() {
        let first = new_id("run");
        std::thread::sleep(Duration::from_millis(2));
        let second = new_id("run");
        for id in [&first, &second] {
            let hex = id.strip_prefix("run_").unwrap();
            assert_eq!(hex.len(), 32, "{id}");
            assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
        assert!(first < second, "{first} then {second}");
        assert_ne!(new_id("run"), new_id("run"));
    }

    #[test]
    fn idempotent_ids_match_the_python_coordinator() {
        // python: "node_run_" + hashlib.sha256(b"run_1:node_run_p:k1").hexdigest()[:32]
        assert_eq!(
            idempotent_node_run_id("run_1", "node_run_p", "k1"),
            "node_run_55a279293b109e93f7ad28b362dbd182"
        );
    }

    #[test]
    fn owned_extension_keys_are_stripped_and_nulls_dropped() {
        let client: Extensions =
            serde_json::from_value(json!({"jarvis.constraints": {"x": 1}, "acme.tag": "t"}))
                .unwrap();
        let stripped = strip_owned(Some(client));
        let merged = extensions_with(
            stripped.as_ref(),
            [(ext::CONSTRAINTS, Value::Null), ("jarvis.other", json!(1))],
        );
        assert_eq!(
            serde_json::to_value(merged).unwrap(),
            json!({"acme.tag": "t", "jarvis.other": 1})
        );
    }
}
