//! The durable dispatch queue: lease a NodeRun, hand it to its executor, record the outcome.
//!
//! New NodeRuns arrive leased from the transaction that created them. A lease is
//! short (`--lease-secs`) and renewed while this process is dispatching the
//! NodeRun; when a dispatcher fails (a write failed, the process died) the lease
//! runs out and the poller takes the NodeRun up again within seconds, re-sending
//! the same request under the same `node_run_id` (the executor attaches to the
//! execution in flight or returns its recorded result). An executor's outcome is
//! written again and again until it is committed. So nothing stays `queued` or
//! `running`: either an executor finishes it, or it fails with a recorded code
//! that says why, at the latest when its deadline passes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arp_types::composite::CompositeBeginRequest;
use arp_types::pdp::PolicyDecision;
use arp_types::run::{ExecutorBinding, NodeRun, Run, RunEventType};
use arp_types::{AtomicExecuteRequest, ConstraintEnvelope, ErrorDetail, NodeKind, NodeRunState};
use rand::Rng;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::catalog::NodeTypeInfo;
use crate::clients::CallError;
use crate::constraints;
use crate::coordinator::{Coordinator, constraints_of};
use crate::policy::{self, PolicySubject};
use crate::runs::lifecycle::{self, Admit, Begun, Completion};
use crate::store::{ExecutorCancel, OverdueNodeRun};
use crate::store::{Lease, RunTx, StoreError, now_ms};

/// NodeRuns claimed per poller transaction.
const CLAIM_BATCH: usize = 256;
/// Leases renewed per transaction.
const RENEW_BATCH: usize = 512;
/// Overdue NodeRuns failed per poll.
const OVERDUE_BATCH: usize = 256;
/// Terminal runs deleted per retention transaction: short write locks.
const PRUNE_BATCH: usize = 64;
/// Free pages returned to the file system after each retention transaction.
const RECLAIM_PAGES: u32 = 4096;
/// Extra time an execute call may take beyond the NodeRun's deadline, so the
/// executor's own timeout verdict arrives before ours.
const CALL_GRACE: Duration = Duration::from_secs(3);
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long shutdown waits for dispatches and executor cancels in flight.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Retrying a failed store write: the store usually recovers in well under a second.
const WRITE_RETRY_MAX: Duration = Duration::from_secs(1);

/// The dispatcher's shared state.
struct Dispatcher {
    coord: Arc<Coordinator>,
    /// NodeRuns a task of this process is dispatching: a reclaimed lease on one of
    /// them is not dispatched twice, and their leases are renewed.
    in_flight: Mutex<HashSet<String>>,
    started_ms: i64,
}

/// Removes its NodeRun from `in_flight` when the dispatch task ends, however it ends.
struct Flight {
    dispatcher: Arc<Dispatcher>,
    node_run_id: String,
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.dispatcher
            .in_flight
            .lock()
            .unwrap()
            .remove(&self.node_run_id);
    }
}

/// The dispatcher's background loops; [`Background::stop`] ends them.
#[derive(Debug)]
pub struct Background {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Background {
    /// Stops the queue, poller, lease renewer, pruner and cancel sender and waits for
    /// them. Dispatch tasks and executor cancels in flight get [`DRAIN_LIMIT`] to finish;
    /// the rest are aborted: their leases run out and whoever holds the database next
    /// takes them up again.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Runs the dispatcher: a task per NodeRun (bounded), the poller, the lease renewer
/// and (with a retention window) the pruner.
pub fn spawn(
    coord: Arc<Coordinator>,
    queue: mpsc::UnboundedReceiver<String>,
    cancels: mpsc::UnboundedReceiver<ExecutorCancel>,
) -> Background {
    let (stop, stopped) = watch::channel(false);
    let dispatcher = Arc::new(Dispatcher {
        coord: coord.clone(),
        in_flight: Mutex::new(HashSet::new()),
        started_ms: now_ms(),
    });
    let mut tasks = vec![
        tokio::spawn(run_queue(dispatcher.clone(), queue, stopped.clone())),
        tokio::spawn(until_stopped(stopped.clone(), poll(dispatcher.clone()))),
        tokio::spawn(until_stopped(stopped.clone(), renew(dispatcher))),
        tokio::spawn(send_cancels(coord.clone(), cancels, stopped.clone())),
    ];
    if let Some(retention) = coord.config.retention {
        tasks.push(tokio::spawn(until_stopped(
            stopped,
            prune(coord, retention),
        )));
    }
    Background { stop, tasks }
}

async fn until_stopped(mut stopped: watch::Receiver<bool>, work: impl Future<Output = ()>) {
    tokio::select! {
        _ = stopped.wait_for(|s| *s) => {}
        () = work => {}
    }
}

/// Waits for the owned tasks up to [`DRAIN_LIMIT`], then aborts those left.
async fn drain(mut tasks: JoinSet<()>, what: &str) {
    let drained = tokio::time::timeout(DRAIN_LIMIT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "{what} still in flight at shutdown; aborted"
        );
    }
}

/// The next item of `queue` while reaping finished `tasks`; `None` once stopped or closed.
async fn next_or_stop<T>(
    queue: &mut mpsc::UnboundedReceiver<T>,
    tasks: &mut JoinSet<()>,
    stopped: &mut watch::Receiver<bool>,
) -> Option<T> {
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return None,
            item = queue.recv() => return item,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

async fn run_queue(
    dispatcher: Arc<Dispatcher>,
    mut queue: mpsc::UnboundedReceiver<String>,
    mut stopped: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(dispatcher.coord.config.dispatch_concurrency));
    let mut tasks = JoinSet::new();
    while let Some(node_run_id) = next_or_stop(&mut queue, &mut tasks, &mut stopped).await {
        if !dispatcher
            .in_flight
            .lock()
            .unwrap()
            .insert(node_run_id.clone())
        {
            // Its lease was reclaimed while our own dispatch is still working on it.
            continue;
        }
        let flight = Flight {
            dispatcher: dispatcher.clone(),
            node_run_id,
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let coord = dispatcher.coord.clone();
        tasks.spawn(async move {
            dispatch(&coord, &flight.node_run_id).await;
            drop(permit);
            drop(flight);
        });
    }
    drain(tasks, "dispatches").await;
}

/// Tells executors to stop NodeRuns that committed transactions canceled; best effort.
async fn send_cancels(
    coord: Arc<Coordinator>,
    mut cancels: mpsc::UnboundedReceiver<ExecutorCancel>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    while let Some(cancel) = next_or_stop(&mut cancels, &mut tasks, &mut stopped).await {
        let coord = coord.clone();
        tasks.spawn(async move {
            let result = match cancel.kind {
                Some(NodeKind::Atomic) => match &coord.atomic {
                    Some(atomic) => atomic.cancel(&cancel.node_run_id).await,
                    None => Ok(()),
                },
                Some(NodeKind::Composite) => match &coord.composite {
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
    drain(tasks, "executor cancels").await;
}

/// Takes up NodeRuns whose lease ran out and fails NodeRuns past their deadline.
async fn poll(dispatcher: Arc<Dispatcher>) {
    let coord = &dispatcher.coord;
    let mut tick = tokio::time::interval(coord.config.timing.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if coord.config.auto_dispatch {
            loop {
                let (owner, duration) = (coord.lease_owner.clone(), coord.config.lease);
                let claimed = coord
                    .store
                    .write(move |tx| {
                        let lease = Lease::from_now(&owner, duration);
                        tx.claim_dispatchable(now_ms(), &lease, CLAIM_BATCH)
                    })
                    .await;
                match claimed {
                    Ok(n) if n == CLAIM_BATCH => continue,
                    Ok(_) => break,
                    Err(err) => {
                        tracing::error!(error = %err, "claiming NodeRuns failed");
                        break;
                    }
                }
            }
        }
        let grace = coord.config.timing.deadline_grace.as_millis() as i64;
        let overdue = coord
            .store
            .overdue_node_runs(now_ms() - grace, OVERDUE_BATCH)
            .await
            .unwrap_or_else(|err| {
                tracing::error!(error = %err, "looking for overdue NodeRuns failed");
                Vec::new()
            });
        for OverdueNodeRun {
            node_run_id,
            state,
            deadline_at,
        } in overdue
        {
            // A dispatch of ours gives its own verdict by deadline + CALL_GRACE, and may
            // hold an outcome it is still trying to record: leave it that long, and a grace more.
            let dispatching = dispatcher.in_flight.lock().unwrap().contains(&node_run_id);
            let patience = (CALL_GRACE.as_millis() as i64).saturating_add(2 * grace);
            if dispatching && now_ms() < deadline_at.saturating_add(patience) {
                continue;
            }
            let error = dispatcher.deadline_error(&node_run_id, state, deadline_at);
            if let Err(err) = coord.fail_node_run(&node_run_id, error).await {
                tracing::error!(%node_run_id, error = %err, "failing an overdue NodeRun failed");
            }
        }
    }
}

impl Dispatcher {
    /// `deadline_exceeded`, saying what kept the NodeRun from finishing.
    fn deadline_error(
        &self,
        node_run_id: &str,
        state: NodeRunState,
        deadline_at: i64,
    ) -> ErrorDetail {
        let dispatching = self.in_flight.lock().unwrap().contains(node_run_id);
        let running = state == NodeRunState::Running;
        let why = if dispatching && running {
            "the executor did not answer before the deadline"
        } else if dispatching {
            "its dispatch did not reach the executor before the deadline"
        } else if self.started_ms > deadline_at {
            "the coordinator was not running at the deadline"
        } else if running {
            "no dispatcher held it at the deadline (its dispatch failed and was not retried in time)"
        } else {
            "it was never dispatched (auto-dispatch off, or every dispatch attempt failed)"
        };
        let iso = |ms: i64| time_from_ms(ms).unwrap_or_default();
        ErrorDetail::new(
            "deadline_exceeded",
            format!("NodeRun did not finish before its deadline: {why}"),
        )
        .with_details(
            [
                ("state".to_owned(), json!(state.as_str())),
                ("deadline_at".to_owned(), json!(iso(deadline_at))),
                ("dispatching".to_owned(), json!(dispatching)),
                (
                    "coordinator_started_at".to_owned(),
                    json!(iso(self.started_ms)),
                ),
            ]
            .into_iter()
            .collect(),
        )
    }
}

/// RFC 3339 of ms since the epoch.
fn time_from_ms(ms: i64) -> Option<String> {
    let t = std::time::UNIX_EPOCH.checked_add(Duration::from_millis(u64::try_from(ms).ok()?))?;
    Some(humantime::format_rfc3339_millis(t).to_string())
}

/// Extends the leases of the NodeRuns this process is dispatching, every third of a lease.
async fn renew(dispatcher: Arc<Dispatcher>) {
    let coord = &dispatcher.coord;
    let lease = coord.config.lease;
    let owner = coord.lease_owner.clone();
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ids: Vec<String> = dispatcher
            .in_flight
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect();
        for chunk in ids.chunks(RENEW_BATCH) {
            let (chunk, owner) = (chunk.to_vec(), owner.clone());
            let renewed = coord
                .store
                .write(move |tx| tx.renew_leases(&chunk, &Lease::from_now(&owner, lease)))
                .await;
            if let Err(err) = renewed {
                // The next tick tries again; in-process the NodeRun is not dispatched twice.
                tracing::warn!(error = %err, "renewing leases failed");
                break;
            }
        }
    }
}

/// Deletes terminal runs older than `retention` in small batches and returns the pages.
async fn prune(coord: Arc<Coordinator>, retention: Duration) {
    let every = (retention / 4).clamp(Duration::from_millis(50), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let window = retention.as_millis().min(i64::MAX as u128 / 2) as i64;
    loop {
        tick.tick().await;
        let mut pruned = 0;
        loop {
            let cutoff = now_ms().saturating_sub(window);
            let result = coord
                .store
                .write(move |tx| {
                    let n = tx.prune_runs(cutoff, PRUNE_BATCH)?;
                    if n > 0 {
                        tx.reclaim_space(RECLAIM_PAGES)?;
                    }
                    Ok::<_, StoreError>(n)
                })
                .await;
            match result {
                Ok(n) => {
                    pruned += n;
                    if n < PRUNE_BATCH {
                        break;
                    }
                    // Let waiting requests have the writer between batches.
                    tokio::task::yield_now().await;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "deleting expired runs failed");
                    break;
                }
            }
        }
        if pruned > 0 {
            tracing::debug!(runs = pruned, "deleted runs past the retention window");
        }
    }
}

/// What dispatching decided before the executor call.
enum Begin {
    Execute(Box<Execution>),
    Stop,
}

struct Execution {
    node_run: NodeRun,
    run: Run,
    deadline_at: i64,
}

async fn dispatch(coord: &Arc<Coordinator>, node_run_id: &str) {
    let result = match begin(coord, node_run_id).await {
        Ok(Begin::Execute(execution)) => match execution.node_run.kind {
            Some(NodeKind::Atomic) => execute_atomic(coord, *execution).await,
            Some(NodeKind::Composite) => begin_composite(coord, *execution).await,
            None => Ok(()),
        },
        Ok(Begin::Stop) => Ok(()),
        Err(err) => Err(err),
    };
    if let Err(err) = result {
        // Its lease runs out and the poller takes the NodeRun up again.
        tracing::error!(%node_run_id, error = %err, "dispatch failed on the store");
    }
}

/// Kind, candidate and policy checks, then `running`, in one transaction.
async fn begin(coord: &Arc<Coordinator>, node_run_id: &str) -> Result<Begin, StoreError> {
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

/// Exponential backoff with full jitter, at least `retry_after`, at most until the deadline.
fn backoff(attempt: u32, retry_after: Option<Duration>, deadline_at: i64) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(BACKOFF_MAX);
    let jittered = Duration::from_millis(rand::rng().random_range(0..=ceiling.as_millis() as u64));
    let wait = retry_after.map_or(jittered, |r| r.max(jittered));
    wait.min(Duration::from_millis((deadline_at - now_ms()).max(0) as u64))
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

async fn fail(
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

/// Calls `attempt` until it gives a verdict, retrying transient failures with
/// exponential backoff and full jitter until the deadline. Stops early if the
/// NodeRun ended meanwhile (canceled, completed through the API).
async fn with_retries<T, F, Fut>(
    coord: &Arc<Coordinator>,
    unavailable_code: &str,
    node_run_id: &str,
    deadline_at: i64,
    mut attempt: F,
) -> Result<Option<T>, ErrorDetail>
where
    F: FnMut(Duration) -> Fut,
    Fut: std::future::Future<Output = Result<T, CallError>>,
{
    let mut last_reason = None;
    let mut silent = false;
    for n in 0u32.. {
        let remaining = deadline_at - now_ms();
        if remaining <= 0 {
            break;
        }
        let timeout = Duration::from_millis(remaining as u64) + CALL_GRACE;
        let called = Instant::now();
        let retry_after = match attempt(timeout).await {
            Ok(value) => return Ok(Some(value)),
            Err(CallError::Terminal(detail)) => return Err(detail),
            Err(CallError::Transient {
                reason,
                retry_after,
            }) => {
                tracing::debug!(%node_run_id, attempt = n, %reason, "transient dispatch failure; retrying");
                // The call lasted until its timeout: the executor never answered.
                silent = called.elapsed() + Duration::from_millis(50) >= timeout;
                last_reason = Some(reason);
                retry_after
            }
        };
        tokio::time::sleep(backoff(n, retry_after, deadline_at)).await;
        match coord.store.node_run(node_run_id).await {
            Ok(Some(row)) if !row.node_run.state.is_terminal() => {}
            _ => return Ok(None),
        }
    }
    Err(match last_reason {
        Some(reason) if silent => ErrorDetail::new(
            "deadline_exceeded",
            format!(
                "NodeRun did not finish before its deadline: the executor did not answer ({reason})"
            ),
        ),
        Some(reason) => ErrorDetail::new(
            unavailable_code,
            format!("Executor unavailable until the NodeRun's deadline: {reason}"),
        )
        .with_retryable(true),
        None => ErrorDetail::new(
            "deadline_exceeded",
            "NodeRun did not finish before its deadline: its deadline had passed before the executor could be called",
        ),
    })
}

/// Repeats `write` (backing off, up to a second apart) until it commits, while the
/// NodeRun is still open: an outcome the executor delivered must not be lost to a
/// store that fails for a while. `None` if the NodeRun ended meanwhile.
async fn until_committed<T, F, Fut>(
    coord: &Arc<Coordinator>,
    node_run_id: &str,
    what: &str,
    mut write: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    for n in 0u32.. {
        match write().await {
            Ok(value) => return Some(value),
            // Shutting down: the lease runs out and whoever opens the database next takes it up.
            Err(StoreError::Closed) => return None,
            Err(err) => {
                tracing::warn!(%node_run_id, attempt = n, error = %err, "{what} failed; retrying");
            }
        }
        let ceiling = BACKOFF_BASE
            .saturating_mul(2u32.saturating_pow(n.min(16)))
            .min(WRITE_RETRY_MAX);
        let wait =
            rand::rng().random_range(ceiling.as_millis() as u64 / 2..=ceiling.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        match coord.store.node_run(node_run_id).await {
            Ok(Some(row)) if row.node_run.state.is_terminal() => return None,
            Ok(None) => return None,
            // A failing read is no reason to give up the outcome.
            _ => {}
        }
    }
    unreachable!("the loop returns")
}

async fn execute_atomic(coord: &Arc<Coordinator>, execution: Execution) -> Result<(), StoreError> {
    let Execution {
        node_run,
        run,
        deadline_at,
    } = execution;
    let Some(atomic) = coord.atomic.clone() else {
        return Ok(());
    };
    let request = AtomicExecuteRequest {
        node_run_id: node_run.node_run_id.clone(),
        run_id: node_run.run_id.clone(),
        node_type_ref: node_run.node_type_ref.clone(),
        inputs: node_run.inputs.clone().unwrap_or_default(),
        run_context: run.run_context.clone(),
        constraints: constraints_of(node_run.extensions.as_ref()),
        extensions: None,
    };
    let id = node_run.node_run_id.clone();
    let outcome = with_retries(
        coord,
        "atomic_executor_unavailable",
        &id,
        deadline_at,
        |timeout| {
            let atomic = atomic.clone();
            let request = &request;
            async move {
                let (result, answered_by) = atomic.execute(request, timeout).await?;
                if result.node_run_id != request.node_run_id {
                    return Err(CallError::terminal(
                        "atomic_executor_bad_response",
                        "Executor answered for another NodeRun",
                    ));
                }
                // A non-terminal answer is no verdict: ask again; the retry attaches to the execution in flight.
                if !result.state.is_terminal() {
                    return Err(CallError::Transient {
                        reason: format!("result not terminal ({:?})", result.state),
                        retry_after: None,
                    });
                }
                Ok((result, answered_by))
            }
        },
    )
    .await;
    let (completion, answered_by) = match outcome {
        Ok(None) => return Ok(()),
        Ok(Some((result, answered_by))) => (
            Completion {
                state: result.state,
                outputs: result.outputs,
                output_artifacts: result.output_artifacts,
                error: result.error,
            },
            Some(answered_by),
        ),
        Err(error) => (Completion::failed(error), None),
    };
    until_committed(coord, &id, "recording the outcome", || {
        let (id, completion, answered_by) = (id.clone(), completion.clone(), answered_by.clone());
        coord
            .store
            .write(move |tx| lifecycle::record_atomic_result(tx, &id, completion, answered_by))
    })
    .await;
    Ok(())
}

async fn begin_composite(coord: &Arc<Coordinator>, execution: Execution) -> Result<(), StoreError> {
    let Execution {
        node_run,
        run,
        deadline_at,
    } = execution;
    let Some(composite) = coord.composite.clone() else {
        return Ok(());
    };
    let request = CompositeBeginRequest {
        node_run_id: node_run.node_run_id.clone(),
        run_id: node_run.run_id.clone(),
        node_type_ref: node_run.node_type_ref.clone(),
        inputs: node_run.inputs.clone().unwrap_or_default(),
        run_context: run.run_context.clone(),
        constraints: constraints_of(node_run.extensions.as_ref()),
        coordinator_endpoint: coord.public_url.clone(),
        assignment_token: None,
        extensions: node_run.extensions.clone(),
    };
    let id = node_run.node_run_id.clone();
    let outcome = with_retries(
        coord,
        "composite_executor_unavailable",
        &id,
        deadline_at,
        |timeout| {
            let composite = composite.clone();
            let request = &request;
            async move { composite.begin(request, timeout).await }
        },
    )
    .await;
    let error = match outcome {
        Ok(None) => return Ok(()),
        Ok(Some(resp)) if resp.accepted => {
            tracing::debug!(node_run_id = %id, "composite assignment accepted");
            until_committed(coord, &id, "recording the composite assignment", || {
                let id = id.clone();
                coord.store.write(move |tx| tx.finish_dispatch(&id))
            })
            .await;
            return Ok(());
        }
        Ok(Some(resp)) => {
            let message = resp
                .message
                .unwrap_or_else(|| "Composite assignment rejected".into());
            ErrorDetail::new("composite_rejected", message)
        }
        Err(error) => error,
    };
    until_committed(coord, &id, "recording the composite failure", || {
        coord.fail_node_run(&id, error.clone())
    })
    .await;
    Ok(())
}
