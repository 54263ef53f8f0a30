//! The only writer of Run and NodeRun state: every transition, inside the caller's transaction.
//!
//! | Run          | from      | to                                | by                                   |
//! |--------------|-----------|-----------------------------------|--------------------------------------|
//! | created      | —         | `running`                         | [`crate::runs::create`] (start a run)|
//! | root ends    | `running` | `succeeded` / `failed` / `canceled` as the root | [`complete`]           |
//! | canceled     | `running` | `canceled`                        | [`cancel_run`]                       |
//!
//! | NodeRun      | from                  | to                      | by                             |
//! |--------------|-----------------------|-------------------------|--------------------------------|
//! | created      | —                     | `queued`, or `running` when starting a run begins its root's dispatch | [`crate::runs::create`] via [`mark_running`] |
//! | dispatched   | `queued`              | `running` (bound to its executor) | [`begin_dispatch`]   |
//! | ends         | `queued` / `running`  | `succeeded` / `failed` / `canceled` | [`complete`], [`record_atomic_result`], [`fail`] |
//! | run ends     | any open              | `canceled`              | [`complete`] of the root, [`cancel_run`] |
//!
//! Terminal states are final: every transition checks the state it starts from in
//! the same transaction. A NodeRun that was `running` when it was canceled or failed
//! leaves an executor cancel in the transaction's effects, sent after the commit.
//! Evaluations and decomposition rounds change a NodeRun's body, never its state.

use arp_types::run::{
    EvaluationResult, EvaluationStatus, ExecutorBinding, NodeRun, RecoveryAction, Run,
    RunEventType, RunState,
};
use arp_types::time::now_rfc3339;
use arp_types::{ErrorDetail, JsonObject, NodeKind, NodeRunState, ResourceRef};
use serde_json::json;

use crate::coordinator::{ext, extensions_with, obj, to_object, to_value};
use crate::runs::error::RunError;
use crate::store::{ExecutorCancel, NodeRunRow, RunTx, StoreError};

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

/// The NodeRun as it is handed to its executor: `running`, of `kind`, bound to `binding`.
pub fn mark_running(node_run: &mut NodeRun, kind: NodeKind, binding: ExecutorBinding) {
    node_run.kind = Some(kind);
    node_run.state = NodeRunState::Running;
    node_run.started_at.get_or_insert_with(now_rfc3339);
    node_run.executor_binding = Some(binding);
}

/// What a dispatch decided before its transaction: kind, policy, executor.
pub trait Admit {
    fn kind(&self) -> NodeKind;
    /// Fills in what the NodeRun lacks for its execution (its effective constraints).
    fn prepare(&self, node_run: &mut NodeRun);
    /// Records the execute checkpoint's policy decision (its event).
    fn record_decision(&self, tx: &mut dyn RunTx, node_run: &NodeRun) -> Result<(), StoreError>;
    /// Why the NodeRun may not run, if it may not.
    fn refusal(&self) -> Option<ErrorDetail>;
    /// The executor the NodeRun is bound to.
    fn binding(&self) -> ExecutorBinding;
}

/// A NodeRun begun by [`begin_dispatch`]: what its executor call needs.
#[derive(Debug)]
pub struct Begun {
    pub node_run: NodeRun,
    pub run: Run,
    pub deadline_at: i64,
}

/// Begins the dispatch of an open NodeRun whose dispatch is still owed: records the
/// decision, then fails it (refused) or makes it `running`. `None`: nothing to execute.
pub fn begin_dispatch(
    tx: &mut dyn RunTx,
    node_run_id: &str,
    admission: &dyn Admit,
) -> Result<Option<Begun>, StoreError> {
    let Some(row) = tx.node_run(node_run_id)? else {
        return Ok(None);
    };
    let Some(run) = tx.run(&row.node_run.run_id)? else {
        return Ok(None);
    };
    if row.node_run.state.is_terminal() || !row.dispatch_pending || run.state.is_terminal() {
        return Ok(None);
    }
    let mut node_run = row.node_run;
    node_run.kind = Some(admission.kind());
    admission.prepare(&mut node_run);
    admission.record_decision(tx, &node_run)?;
    if let Some(error) = admission.refusal() {
        complete(tx, node_run, Completion::failed(error))?;
        return Ok(None);
    }
    mark_running(&mut node_run, admission.kind(), admission.binding());
    tx.update_node_run(&node_run)?;
    Ok(Some(Begun {
        node_run,
        run,
        deadline_at: row.deadline_at,
    }))
}

/// Ends a NodeRun: state, outputs, `atomic_executed`, and when it is the root,
/// the Run's end (`run_completed`) and the cancellation of whatever is still open.
pub fn complete(
    tx: &mut dyn RunTx,
    mut node_run: NodeRun,
    completion: Completion,
) -> Result<(), StoreError> {
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
        cancel_open_node_runs(tx, &run.run_id)?;
        tx.append_event(
            &run.run_id,
            Some(&node_run.node_run_id),
            RunEventType::RunCompleted,
            Some(obj([("state", json!(run.state.as_str()))])),
        )?;
    }
    Ok(())
}

/// Cancels a running Run and its open NodeRuns; a terminal Run is returned as it is.
pub fn cancel_run(tx: &mut dyn RunTx, run_id: &str) -> Result<Run, RunError> {
    let mut run = tx
        .run(run_id)?
        .ok_or_else(|| RunError::RunNotFound(run_id.to_owned()))?;
    if run.state.is_terminal() {
        return Ok(run);
    }
    run.state = RunState::Canceled;
    run.ended_at = Some(now_rfc3339());
    tx.update_run(&run)?;
    cancel_open_node_runs(tx, &run.run_id)?;
    tx.append_event(
        &run.run_id,
        None,
        RunEventType::RunCompleted,
        Some(obj([("state", json!("canceled"))])),
    )?;
    Ok(run)
}

/// Fails an open NodeRun (no-op if it already ended) and stops its executor if it was running.
pub fn fail(tx: &mut dyn RunTx, node_run_id: &str, error: ErrorDetail) -> Result<(), StoreError> {
    let Some(row) = tx.node_run(node_run_id)? else {
        return Ok(());
    };
    if row.node_run.state.is_terminal() {
        return Ok(());
    }
    let was_running = row.node_run.state == NodeRunState::Running;
    let kind = row.node_run.kind;
    complete(tx, row.node_run, Completion::failed(error))?;
    if was_running {
        tx.effects().executor_cancels.push(ExecutorCancel {
            node_run_id: node_run_id.to_owned(),
            kind,
        });
    }
    Ok(())
}

/// Records an evaluation (and recovery hint) with its events.
pub fn evaluate(
    tx: &mut dyn RunTx,
    mut node_run: NodeRun,
    evaluation: EvaluationResult,
    recovery: Option<RecoveryAction>,
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
    recovery: Option<RecoveryAction>,
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

/// The atomic executor's result, if the NodeRun is still open, becomes an evaluation
/// plus a completion, as in the Python coordinator.
/// Records an atomic executor's verdict; `answered_by`, the executor that gave it,
/// becomes the NodeRun's binding endpoint (several executors may serve one node type).
pub fn record_atomic_result(
    tx: &mut dyn RunTx,
    node_run_id: &str,
    completion: Completion,
    answered_by: Option<String>,
) -> Result<(), StoreError> {
    let mut node_run = match tx.node_run(node_run_id)? {
        Some(row) if !row.node_run.state.is_terminal() => row.node_run,
        _ => return Ok(()),
    };
    if let (Some(url), Some(binding)) = (answered_by, node_run.executor_binding.as_mut()) {
        binding.endpoint = url;
    }
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
    apply_evaluation(tx, &mut node_run, evaluation, None)?;
    complete(tx, node_run, completion)
}

/// Counts one more decomposition round on a composite NodeRun (its body, not its state).
pub fn count_decomposition_round(
    tx: &mut dyn RunTx,
    parent: &mut NodeRun,
    rounds: u64,
) -> Result<(), StoreError> {
    parent.extensions = extensions_with(
        parent.extensions.as_ref(),
        [(ext::DECOMPOSITION_ROUNDS, json!(rounds))],
    );
    tx.update_node_run(parent)
}

/// Cancels every open NodeRun of the run; those an executor is working on leave a cancel.
fn cancel_open_node_runs(tx: &mut dyn RunTx, run_id: &str) -> Result<(), StoreError> {
    let ended_at = now_rfc3339();
    for mut node_run in tx.open_node_runs(run_id)? {
        if node_run.state == NodeRunState::Running {
            tx.effects().executor_cancels.push(ExecutorCancel {
                node_run_id: node_run.node_run_id.clone(),
                kind: node_run.kind,
            });
        }
        node_run.state = NodeRunState::Canceled;
        node_run.ended_at = Some(ended_at.clone());
        tx.update_node_run(&node_run)?;
    }
    Ok(())
}

/// The NodeRun, if it exists and has not ended.
pub fn open_node_run(tx: &dyn RunTx, node_run_id: &str) -> Result<NodeRunRow, RunError> {
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
