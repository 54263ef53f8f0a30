//! The store interface: what the coordinator asks of a database, and what each answer guarantees.
//!
//! A backend implements two traits. [`RunStore`] holds the reads (async: for a
//! networked database a read is a round trip) and accepts write jobs. [`RunTx`] is
//! one write job's view of a transaction: synchronous, because a backend runs the
//! jobs on a writer of its own, several to a commit (group commit), each inside a
//! savepoint so a job that fails rolls back only its own writes. Nothing a job did
//! is visible to anyone, nor published, before its commit; then the backend hands
//! the batch's [`CommitEffects`] to the [`EffectSink`] it was opened with, and only
//! then answers the callers. So a NodeRun is never dispatched, an event never
//! streamed and an executor never told to cancel before the change is durable.
//!
//! Leases: a NodeRun whose dispatch is owed is leased to one coordinator process
//! ([`Lease::owner`]) until a time; several processes may share one database, so
//! every lease operation names its owner, a claim takes only unleased or expired
//! rows, and nothing releases another owner's lease (leases expire instead).
//!
//! Times are milliseconds since the Unix epoch ([`now_ms`]).

pub mod postgres;
pub mod sqlite;
mod writer;

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arp_types::run::{NodeRun, Run, RunEventType};
use arp_types::{JsonObject, NodeKind, NodeRunState};
use tokio::sync::oneshot;

/// A boxed future, so that [`RunStore`] stays usable as `dyn RunStore`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a store operation failed. Callers branch on nothing but `Closed`; the detail is for logs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed the operation.
    #[error("database: {0}")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("stored JSON is invalid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the store is shut down")]
    Closed,
    #[error("a store operation panicked")]
    Panicked,
}

/// States in which a Run or NodeRun has ended: the one list, for every backend's queries.
pub const TERMINAL_STATES: [&str; 3] = ["succeeded", "failed", "canceled"];

/// A lease on a NodeRun's dispatch: `owner` (one coordinator process) holds it until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: Arc<str>,
    /// ms since the epoch.
    pub until: i64,
}

impl Lease {
    /// A lease for `owner` running `duration` from now.
    pub fn from_now(owner: &Arc<str>, duration: std::time::Duration) -> Self {
        let ms = duration.as_millis().min(i64::MAX as u128 / 2) as i64;
        Self {
            owner: owner.clone(),
            until: now_ms().saturating_add(ms),
        }
    }
}

/// A NodeRun with the bookkeeping the coordinator keeps beside it.
#[derive(Debug, Clone)]
pub struct NodeRunRow {
    pub node_run: NodeRun,
    /// 0 for the root NodeRun.
    pub depth: u64,
    /// The dispatcher still owes this NodeRun its hand-off to an executor.
    pub dispatch_pending: bool,
    /// ms since the epoch after which the NodeRun fails with `deadline_exceeded`.
    pub deadline_at: i64,
}

/// A stored event: its seq, NodeRun and JSON line (without the newline).
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub node_run_id: Option<String>,
    pub line: String,
}

/// What one read of an event stream asks for.
#[derive(Debug, Clone, Copy)]
pub struct EventPageRequest<'a> {
    pub run_id: &'a str,
    /// Only events with a greater seq (all when `None`).
    pub after_seq: Option<u64>,
    pub limit: usize,
    /// Also return the run's NodeRun tree, when the page has events.
    pub with_tree: bool,
}

/// One consistent snapshot of a run's events.
#[derive(Debug, Clone, Default)]
pub struct EventPage {
    /// Read before the events: when true, the events include `run_completed`.
    /// `None`: no such run.
    pub terminal: Option<bool>,
    /// Oldest first, at most `limit`.
    pub events: Vec<StoredEvent>,
    /// `(node_run_id, parent_node_run_id)` of every NodeRun of the run, if asked for.
    pub tree: Option<Vec<(String, Option<String>)>>,
}

/// An open NodeRun past its deadline.
#[derive(Debug, Clone)]
pub struct OverdueNodeRun {
    pub node_run_id: String,
    pub state: NodeRunState,
    pub deadline_at: i64,
}

/// A NodeRun whose executor must be told to stop, once the transaction has committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorCancel {
    pub node_run_id: String,
    pub kind: Option<NodeKind>,
}

/// What a commit publishes. A backend collects it on the transaction and hands it to
/// its [`EffectSink`] after the commit; the effects of a job that rolled back are dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitEffects {
    /// Runs that gained events (each once, in no particular order).
    pub changed_runs: Vec<String>,
    /// NodeRuns leased to this process in the transaction: hand them to the dispatcher.
    pub dispatch: Vec<String>,
    /// Executors to tell to stop a NodeRun.
    pub executor_cancels: Vec<ExecutorCancel>,
}

/// A position in [`CommitEffects`] to roll back to.
#[derive(Debug, Clone, Copy)]
pub struct EffectsMark(usize, usize, usize);

impl CommitEffects {
    pub fn mark(&self) -> EffectsMark {
        EffectsMark(
            self.changed_runs.len(),
            self.dispatch.len(),
            self.executor_cancels.len(),
        )
    }

    /// Drops what was collected after `mark` (the job that collected it rolled back).
    pub fn roll_back_to(&mut self, mark: EffectsMark) {
        self.changed_runs.truncate(mark.0);
        self.dispatch.truncate(mark.1);
        self.executor_cancels.truncate(mark.2);
    }

    pub fn is_empty(&self) -> bool {
        self.changed_runs.is_empty() && self.dispatch.is_empty() && self.executor_cancels.is_empty()
    }

    /// Records that `run_id` gained an event (consecutive repeats kept once).
    pub fn run_changed(&mut self, run_id: &str) {
        if self.changed_runs.last().map(String::as_str) != Some(run_id) {
            self.changed_runs.push(run_id.to_owned());
        }
    }

    /// Sorts and deduplicates `changed_runs`; backends call it before publishing.
    pub fn settle(&mut self) {
        self.changed_runs.sort_unstable();
        self.changed_runs.dedup();
    }
}

/// Receives the effects of every commit, on the backend's writer: must not block.
pub type EffectSink = Box<dyn Fn(CommitEffects) + Send + Sync>;

/// A real write failure a backend can be put into, for fault-injection tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WriteFault {
    None = 0,
    /// Every write transaction fails to begin (SQLite: `PRAGMA query_only`).
    ReadOnly = 1,
    /// Writes that need more space fail, as on a full disk (SQLite: `max_page_count`).
    Full = 2,
}

/// The write side of one job, inside a batch transaction.
///
/// Every method sees the job's own earlier writes. An `Err` from any of them leaves
/// the job free to return an error, which rolls back everything the job wrote (and
/// the effects it collected), and nothing else of the batch.
pub trait RunTx {
    /// Effects the job adds beyond those the methods below collect themselves
    /// (executor cancels).
    fn effects(&mut self) -> &mut CommitEffects;

    fn run(&self, run_id: &str) -> Result<Option<Run>, StoreError>;

    /// Whether the run is terminal, without reading its body; `None`: no such run.
    fn run_terminal(&self, run_id: &str) -> Result<Option<bool>, StoreError>;

    fn node_run(&self, node_run_id: &str) -> Result<Option<NodeRunRow>, StoreError>;

    /// Inserts a new Run whose next event seq is 0; `false` (and nothing written) if a
    /// run with its id exists, or is being created by a transaction that then commits.
    fn insert_run(&mut self, run: &Run) -> Result<bool, StoreError>;

    /// Stores the Run's state and body. The first time it is stored terminal, its end
    /// time (now) is recorded for retention; stored non-terminal, the end time is cleared.
    fn update_run(&mut self, run: &Run) -> Result<(), StoreError>;

    /// Inserts a NodeRun whose dispatch is owed. With a lease, the NodeRun is leased to
    /// `lease.owner` and added to the effects' `dispatch`; without, it waits unleased
    /// for a claim.
    fn insert_node_run(
        &mut self,
        node_run: &NodeRun,
        depth: u64,
        deadline_at: i64,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError>;

    /// Stores the NodeRun's state and body. A terminal NodeRun leaves the dispatch queue
    /// (no dispatch owed, no lease).
    fn update_node_run(&mut self, node_run: &NodeRun) -> Result<(), StoreError>;

    /// The NodeRun has been handed to its executor: no dispatch owed, no lease.
    fn finish_dispatch(&mut self, node_run_id: &str) -> Result<(), StoreError>;

    /// How many NodeRuns have `parent_node_run_id` as their parent.
    fn count_children(&self, parent_node_run_id: &str) -> Result<u64, StoreError>;

    /// How many NodeRuns the run has.
    fn count_node_runs(&self, run_id: &str) -> Result<u64, StoreError>;

    /// Every NodeRun of the run that is not yet terminal.
    fn open_node_runs(&self, run_id: &str) -> Result<Vec<NodeRun>, StoreError>;

    /// Appends an event to the run. Its seq is the run's next: per run gapless from 0
    /// and in commit order (taken and bumped in the transaction that writes the event,
    /// so concurrent writers, in this process or another, never share or skip one).
    /// A backend may write the job's events when the job ends (in the job's
    /// savepoint, before its commit); an error then fails the job. Adds the run to
    /// the effects' `changed_runs`.
    fn append_event(
        &mut self,
        run_id: &str,
        node_run_id: Option<&str>,
        event_type: RunEventType,
        data: Option<JsonObject>,
    ) -> Result<(), StoreError>;

    /// Leases to `lease` up to `limit` NodeRuns whose dispatch is owed and which are
    /// unleased or whose lease expired before `now` (whoever held it), adds them to the
    /// effects' `dispatch` and returns how many. Two concurrent claims never take the
    /// same NodeRun.
    fn claim_dispatchable(
        &mut self,
        now: i64,
        lease: &Lease,
        limit: usize,
    ) -> Result<usize, StoreError>;

    /// Extends to `lease.until` the leases `lease.owner` holds on these NodeRuns while
    /// their dispatch is owed; a lease another owner took over is left alone.
    fn renew_leases(&mut self, node_run_ids: &[String], lease: &Lease) -> Result<(), StoreError>;

    /// Deletes up to `limit` runs that ended before `ended_before`, with their NodeRuns
    /// and events; returns how many runs went.
    fn prune_runs(&mut self, ended_before: i64, limit: usize) -> Result<usize, StoreError>;

    /// Returns up to `pages` freed pages to the file system, where the backend can.
    fn reclaim_space(&mut self, _pages: u32) -> Result<(), StoreError> {
        Ok(())
    }
}

impl fmt::Debug for dyn RunTx + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunTx").finish_non_exhaustive()
    }
}

/// A backend: reads, and a writer that runs [`WriteJob`]s in group-committed transactions.
pub trait RunStore: Send + Sync + fmt::Debug {
    /// Queues a job for the writer. The writer runs it inside a savepoint of its next
    /// transaction ([`WriteJob::run`]), rolls the savepoint back if the job failed,
    /// commits, publishes the batch's effects, then calls [`JobDone::finish`] with the
    /// commit's result. A job the writer cannot start a transaction for is
    /// [refused](WriteJob::refuse). `Err(Closed)` once the store is closed.
    fn submit(&self, job: WriteJob) -> Result<(), StoreError>;

    fn run<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<Option<Run>, StoreError>>;

    /// Whether the run is terminal, without reading its body; `None`: no such run.
    fn run_terminal<'a>(
        &'a self,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<bool>, StoreError>>;

    fn node_run<'a>(
        &'a self,
        node_run_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<NodeRunRow>, StoreError>>;

    /// A page of a run's events from one consistent snapshot (see [`EventPage`]).
    fn event_page<'a>(
        &'a self,
        req: EventPageRequest<'a>,
    ) -> BoxFuture<'a, Result<EventPage, StoreError>>;

    /// Up to `limit` open NodeRuns whose deadline passed before `before`.
    fn overdue_node_runs(
        &self,
        before: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<OverdueNodeRun>, StoreError>>;

    /// Stops taking jobs, finishes those already queued and releases the writer
    /// (joins its thread). Later submits fail with `Closed`.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// Test hook: puts the writer into `fault` (or back to normal) from its next
    /// transaction on. Backends without the hook ignore it.
    #[doc(hidden)]
    fn inject_write_fault(&self, _fault: WriteFault) {}
}

type Finisher = Box<dyn FnOnce(Result<(), Arc<StoreError>>) + Send>;

/// A job's body: run with the transaction, or with `None` when it is refused.
type JobBody = dyn FnOnce(Option<&mut dyn RunTx>) -> JobDone + Send;

/// A write job as a backend sees it: opaque, run once or refused once.
pub struct WriteJob(Box<JobBody>);

impl fmt::Debug for WriteJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteJob").finish_non_exhaustive()
    }
}

impl WriteJob {
    /// Runs the job in `tx`; the backend rolls its savepoint back unless `keep`.
    pub fn run(self, tx: &mut dyn RunTx) -> JobDone {
        (self.0)(Some(tx))
    }

    /// The job's transaction did not begin: answers the caller with an error.
    pub fn refuse(self) {
        (self.0)(None).finish(Err(Arc::new(StoreError::Commit(
            "transaction did not begin".into(),
        ))));
    }
}

/// What running a job left to do: keep or roll back its writes, then answer its caller.
pub struct JobDone {
    pub keep: bool,
    finish: Finisher,
}

impl fmt::Debug for JobDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobDone")
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

impl JobDone {
    /// Answers the caller with the commit's result (a kept job's answer stands only if
    /// the commit succeeded).
    pub fn finish(self, commit: Result<(), Arc<StoreError>>) {
        (self.finish)(commit);
    }

    /// The backend could not complete the writes of a job that succeeded: its
    /// savepoint is to be rolled back, and its caller answered with `err`.
    pub fn fail(self, err: StoreError) -> JobDone {
        let finish = self.finish;
        let err = Arc::new(err);
        JobDone {
            keep: false,
            finish: Box::new(move |_| finish(Err(err))),
        }
    }
}

/// Handle to the store the coordinator uses; cheap to clone. Reads go straight to
/// the backend (it derefs to [`RunStore`]); writes through [`Store::write`].
#[derive(Clone, Debug)]
pub struct Store(Arc<dyn RunStore>);

impl std::ops::Deref for Store {
    type Target = dyn RunStore;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Store {
    pub fn new(backend: Arc<dyn RunStore>) -> Self {
        Self(backend)
    }

    /// Runs `op` in the next write transaction; answers once it is committed.
    /// An `Err` from `op` (or a panic) rolls back everything `op` wrote, and nothing else.
    pub async fn write<T, E, F>(&self, op: F) -> Result<T, E>
    where
        F: FnOnce(&mut dyn RunTx) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, E>>();
        let job = WriteJob(Box::new(move |tx: Option<&mut dyn RunTx>| -> JobDone {
            let Some(tx) = tx else {
                return JobDone {
                    keep: false,
                    finish: Box::new(move |commit| {
                        let err = match commit {
                            Err(e) => Arc::try_unwrap(e)
                                .unwrap_or_else(|e| StoreError::Commit(e.to_string())),
                            Ok(()) => StoreError::Closed,
                        };
                        let _ = reply.send(Err(E::from(err)));
                    }),
                };
            };
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| op(tx)))
                .unwrap_or_else(|_| Err(E::from(StoreError::Panicked)));
            JobDone {
                keep: result.is_ok(),
                finish: Box::new(move |commit| {
                    let result = match (commit, result) {
                        (Err(e), Ok(_)) => Err(E::from(StoreError::Commit(e.to_string()))),
                        (_, result) => result,
                    };
                    let _ = reply.send(result);
                }),
            }
        }));
        self.0.submit(job).map_err(E::from)?;
        answer.await.map_err(|_| E::from(StoreError::Closed))?
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arp_types::run::RunState;

    #[test]
    fn the_terminal_state_list_is_the_one_the_types_define() {
        let all = [
            NodeRunState::Queued,
            NodeRunState::Assigned,
            NodeRunState::Running,
            NodeRunState::Succeeded,
            NodeRunState::Failed,
            NodeRunState::Canceled,
        ];
        for state in all {
            assert_eq!(
                TERMINAL_STATES.contains(&state.as_str()),
                state.is_terminal(),
                "{state:?}"
            );
        }
        for state in [RunState::Queued, RunState::Running, RunState::Succeeded] {
            assert_eq!(
                TERMINAL_STATES.contains(&state.as_str()),
                state.is_terminal()
            );
        }
    }

    #[test]
    fn effects_of_a_rolled_back_job_are_dropped() {
        let mut effects = CommitEffects::default();
        effects.run_changed("run_a");
        let mark = effects.mark();
        effects.run_changed("run_b");
        effects.dispatch.push("node_run_b".into());
        effects.roll_back_to(mark);
        effects.run_changed("run_a");
        effects.settle();
        assert_eq!(effects.changed_runs, ["run_a"]);
        assert!(effects.dispatch.is_empty());
    }
}
