//! The durable dispatch queue: lease a NodeRun, hand it to its executor, record the outcome.
//!
//! New NodeRuns arrive leased from the transaction that created them; after a
//! restart every owed dispatch is released and claimed again by the poller, so
//! nothing stays `queued` or `running`: either an executor finishes it, or it
//! fails with a recorded code, at the latest when its deadline passes.

use std::sync::Arc;
use std::time::Duration;

use arp_types::composite::CompositeBeginRequest;
use arp_types::run::{ExecutorBinding, NodeRun, Run, RunEventType};
use arp_types::time::now_rfc3339;
use arp_types::{AtomicExecuteRequest, ConstraintEnvelope, ErrorDetail, NodeKind, NodeRunState};
use rand::Rng;
use tokio::sync::{Semaphore, mpsc};

use crate::catalog::NodeTypeInfo;
use crate::clients::CallError;
use crate::constraints;
use crate::coordinator::{
    Completion, Coordinator, complete_in_tx, constraints_of, record_atomic_result,
};
use crate::policy::{self, PolicySubject};
use crate::store::{StoreError, now_ms};

/// How often the poller looks for unowned dispatches and overdue NodeRuns.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// NodeRuns claimed per poller transaction.
const CLAIM_BATCH: usize = 256;
/// An open NodeRun fails this long after its deadline if nothing else ended it
/// (the executor enforces the wall time itself and normally reports first).
const DEADLINE_GRACE_MS: i64 = 10_000;
/// Extra time an execute call may take beyond the NodeRun's deadline, so the
/// executor's own timeout verdict arrives before ours.
const CALL_GRACE: Duration = Duration::from_secs(3);
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs the dispatcher: a task per NodeRun (bounded), plus the poller.
pub fn spawn(coord: Arc<Coordinator>, mut queue: mpsc::UnboundedReceiver<String>) {
    let permits = Arc::new(Semaphore::new(coord.config.dispatch_concurrency));
    let worker = coord.clone();
    tokio::spawn(async move {
        while let Some(node_run_id) = queue.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let coord = worker.clone();
            tokio::spawn(async move {
                dispatch(&coord, &node_run_id).await;
                drop(permit);
            });
        }
    });
    tokio::spawn(poll(coord));
}

async fn poll(coord: Arc<Coordinator>) {
    // Whatever was leased before a restart belonged to a process that is gone.
    match coord.store.write(|tx| tx.release_all_leases()).await {
        Ok(n) if n > 0 => tracing::info!(
            released = n,
            "re-queued NodeRuns left in flight by a previous process"
        ),
        Ok(_) => {}
        Err(err) => tracing::error!(error = %err, "could not release leases"),
    }
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        tick.tick().await;
        if coord.config.auto_dispatch {
            loop {
                let claimed = coord
                    .store
                    .write(|tx| tx.claim_dispatchable(now_ms(), CLAIM_BATCH))
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
        let overdue = coord
            .store
            .read(|conn| overdue(conn, now_ms() - DEADLINE_GRACE_MS))
            .unwrap_or_else(|err| {
                tracing::error!(error = %err, "looking for overdue NodeRuns failed");
                Vec::new()
            });
        for node_run_id in overdue {
            let error = ErrorDetail::new(
                "deadline_exceeded",
                "NodeRun did not finish before its deadline",
            );
            if let Err(err) = coord.fail_node_run(&node_run_id, error).await {
                tracing::error!(%node_run_id, error = %err, "failing an overdue NodeRun failed");
            }
        }
    }
}

fn overdue(conn: &rusqlite::Connection, before: i64) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT node_run_id FROM node_runs
         WHERE state NOT IN ('succeeded', 'failed', 'canceled') AND deadline_at < ?1 LIMIT 256",
    )?;
    let rows = stmt.query_map([before], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
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
        // The lease stays; the NodeRun is retried after a restart or failed at its deadline.
        tracing::error!(%node_run_id, error = %err, "dispatch failed on the store");
    }
}

/// Kind, candidate and policy checks, then `running`, in one transaction.
async fn begin(coord: &Arc<Coordinator>, node_run_id: &str) -> Result<Begin, StoreError> {
    let Some(row) = coord.store.get_node_run(node_run_id)? else {
        return Ok(Begin::Stop);
    };
    if row.node_run.state.is_terminal() || !row.dispatch_pending {
        return Ok(Begin::Stop);
    }
    let Some(run) = coord.store.get_run(&row.node_run.run_id)? else {
        return Ok(Begin::Stop);
    };
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
    let decision = coord.policy.decide("node.run.execute", subject).await;
    let endpoint = match kind {
        NodeKind::Atomic => coord.atomic.as_ref().map(|c| c.base_url.clone()).ok_or((
            "atomic_executor_unconfigured",
            "Atomic Executor is not configured",
        )),
        NodeKind::Composite => coord.composite.as_ref().map(|c| c.base_url.clone()).ok_or((
            "composite_executor_unconfigured",
            "Composite Executor is not configured",
        )),
    };

    let id = node_run_id.to_owned();
    let (begin, cancels) = coord
        .store
        .write(move |tx| -> Result<_, StoreError> {
            let Some(row) = tx.node_run(&id)? else {
                return Ok((Begin::Stop, Vec::new()));
            };
            let Some(run) = tx.run(&row.node_run.run_id)? else {
                return Ok((Begin::Stop, Vec::new()));
            };
            if row.node_run.state.is_terminal() || !row.dispatch_pending || run.state.is_terminal()
            {
                return Ok((Begin::Stop, Vec::new()));
            }
            let mut node_run = row.node_run;
            node_run.kind = Some(kind);
            if node_run.extensions.is_none()
                || constraints_of(node_run.extensions.as_ref()).is_none()
            {
                node_run.extensions = crate::coordinator::extensions_with(
                    node_run.extensions.as_ref(),
                    [(
                        crate::coordinator::ext::CONSTRAINTS,
                        serde_json::to_value(&effective).unwrap_or_default(),
                    )],
                );
            }
            tx.append_event(
                &run.run_id,
                Some(&id),
                RunEventType::PolicyDecided,
                Some(policy::event_data("node.run.execute", &decision)),
            )?;
            let refusal = if !policy::allows(&decision) {
                Some(ErrorDetail::new(
                    "policy_denied",
                    "NodeRun denied by policy",
                ))
            } else {
                endpoint
                    .clone()
                    .err()
                    .map(|(code, message)| ErrorDetail::new(code, message))
            };
            if let Some(error) = refusal {
                let cancels = complete_in_tx(tx, node_run, Completion::failed(error))?;
                return Ok((Begin::Stop, cancels));
            }
            node_run.state = NodeRunState::Running;
            node_run.started_at.get_or_insert_with(now_rfc3339);
            node_run.executor_binding = Some(ExecutorBinding {
                executor_instance_id: match kind {
                    NodeKind::Atomic => "jarvis-atomic-executor".into(),
                    NodeKind::Composite => "jarvis-composite-executor".into(),
                },
                endpoint: endpoint.clone().unwrap_or_default(),
                audience: None,
                extensions: None,
            });
            tx.update_node_run(&node_run)?;
            Ok((
                Begin::Execute(Box::new(Execution {
                    node_run,
                    run,
                    deadline_at: row.deadline_at,
                })),
                Vec::new(),
            ))
        })
        .await?;
    coord.cancel_at_executors(cancels);
    Ok(begin)
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
        match coord.store.get_node_run(&node_run.node_run_id) {
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

fn candidate_violation(
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
    let mut last_reason = String::new();
    for n in 0u32.. {
        let remaining = deadline_at - now_ms();
        if remaining <= 0 {
            break;
        }
        let timeout = Duration::from_millis(remaining as u64) + CALL_GRACE;
        let retry_after = match attempt(timeout).await {
            Ok(value) => return Ok(Some(value)),
            Err(CallError::Terminal(detail)) => return Err(detail),
            Err(CallError::Transient {
                reason,
                retry_after,
            }) => {
                tracing::debug!(%node_run_id, attempt = n, %reason, "transient dispatch failure; retrying");
                last_reason = reason;
                retry_after
            }
        };
        tokio::time::sleep(backoff(n, retry_after, deadline_at)).await;
        match coord.store.get_node_run(node_run_id) {
            Ok(Some(row)) if !row.node_run.state.is_terminal() => {}
            _ => return Ok(None),
        }
    }
    Err(ErrorDetail::new(
        unavailable_code,
        format!("Executor unavailable until the NodeRun's deadline: {last_reason}"),
    )
    .with_retryable(true))
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
                let result = atomic.execute(request, timeout).await?;
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
                Ok(result)
            }
        },
    )
    .await;
    let completion = match outcome {
        Ok(None) => return Ok(()),
        Ok(Some(result)) => Completion {
            state: result.state,
            outputs: result.outputs,
            output_artifacts: result.output_artifacts,
            error: result.error,
        },
        Err(error) => Completion::failed(error),
    };
    let cancels = coord
        .store
        .write(move |tx| -> Result<_, StoreError> {
            match tx.node_run(&id)? {
                Some(row) if !row.node_run.state.is_terminal() => {
                    record_atomic_result(tx, row.node_run, completion)
                }
                _ => Ok(Vec::new()),
            }
        })
        .await?;
    coord.cancel_at_executors(cancels);
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
    match outcome {
        Ok(None) => Ok(()),
        Ok(Some(resp)) if resp.accepted => {
            tracing::debug!(node_run_id = %id, "composite assignment accepted");
            coord.store.write(move |tx| tx.finish_dispatch(&id)).await
        }
        Ok(Some(resp)) => {
            let message = resp
                .message
                .unwrap_or_else(|| "Composite assignment rejected".into());
            coord
                .fail_node_run(&id, ErrorDetail::new("composite_rejected", message))
                .await
        }
        Err(error) => coord.fail_node_run(&id, error).await,
    }
}
