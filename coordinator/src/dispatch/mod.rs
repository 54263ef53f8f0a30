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
//!
//! # Layout
//! - this module: the [`Dispatcher`]'s queue, lease renewer, pruner and executor
//!   cancels, owned by [`Background`];
//! - `begin`: kind, candidates and policy, then `running`, in one transaction;
//! - `atomic` / `composite`: the executor call and recording its outcome;
//! - `retry`: backoff for executor calls and store writes;
//! - `poller`: expired leases taken up, overdue NodeRuns failed.

mod atomic;
mod begin;
mod composite;
mod poller;
mod retry;

use atomic::execute_atomic;
pub use begin::{ACTION_EXECUTE, Admission, candidate_violation};
use begin::{Begin, begin};
use composite::begin_composite;
use poller::poll;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arp_types::NodeKind;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::coordinator::Coordinator;
use crate::store::ExecutorCancel;
use crate::store::{Lease, StoreError, now_ms};

/// Leases renewed per transaction.
const RENEW_BATCH: usize = 512;
/// Terminal runs deleted per retention transaction: short write locks.
const PRUNE_BATCH: usize = 64;
/// Free pages returned to the file system after each retention transaction.
const RECLAIM_PAGES: u32 = 4096;
/// How long shutdown waits for dispatches and executor cancels in flight.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

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
