//! Executes atomic NodeRuns: admission, one fresh sandbox per execution, time
//! and memory limits, cancellation, and safe retries of the same NodeRun.
//!
//! An execution goes `dedupe -> lookup -> admit` on the API's runtime, then
//! `validate inputs -> invoke -> validate outputs -> serialize` on the guest
//! runtime, whose threads are the guests' alone. The API side waits for that
//! until the deadline and no longer: at the deadline it answers `timeout`
//! itself and cancels the guest, which stops at its next epoch check. So an
//! answer never waits for a guest's turn on a busy thread, and health checks
//! and admission are never queued behind guests.
//!
//! # Layout
//! - [`dedupe`]: one execution per NodeRun, retries, retained results.
//! - [`admission`]: sandbox slots and the queue in front of them.
//! - [`invoke`]: the guest side (validation, sandbox, call).
//! - [`outcome`]: every failed or canceled code, and the caps on outputs and errors.
//!
//! Every execution's API side runs in a task of its own, so a caller that
//! disconnects does not stop it; a retry with the same `node_run_id` and
//! request attaches to it (or, shortly after it ends, gets the recorded
//! result) instead of running the node twice. That task alone records the
//! outcome, so each NodeRun gets exactly one, whichever side ended first.

mod admission;
mod dedupe;
mod invoke;
mod outcome;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arp_types::time::now_rfc3339;
use arp_types::{AtomicExecuteRequest, AtomicExecuteResult, NodeRunState};
use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use self::admission::{Admission, Refused};
use self::dedupe::{Begin, NodeRuns, Retention};
use self::invoke::GuestJob;
use self::outcome::{Failure, Outcome};
use crate::grants::log::Sanitized;
use crate::metrics::{Gauges, Metrics, NodeLabels};
use crate::registry::{Lookup, PackRegistry};
use crate::runtime::Cancel;
use crate::runtime::Guests;
use crate::runtime::handoff::handoff;

pub use self::outcome::{MAX_ERROR_CODE_BYTES, NODE_ERROR, NODE_ERROR_INVALID_CODE, OutputLimits};

/// What an `overloaded` answer tells the caller to wait before retrying.
const OVERLOAD_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Operator limits on executions.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Time limit when neither the request nor the node sets a smaller one.
    pub default_timeout: Duration,
    /// Executions holding a sandbox at once.
    pub max_concurrency: usize,
    /// Requests that may wait for a slot; more are answered `overloaded`.
    pub max_queue: usize,
    /// Longest a request waits for a slot before `overloaded`.
    pub queue_timeout: Duration,
    /// How long a finished result is kept for retries of the same NodeRun.
    pub retention: Duration,
    /// How many finished results are kept at most.
    pub retention_max: usize,
    /// How many bytes of finished results (their JSON) are kept at most.
    pub retention_max_bytes: usize,
    /// Caps on outputs and node errors.
    pub outputs: OutputLimits,
}

/// A finished execution: its terminal state and its result as JSON,
/// serialized once. Clones share the JSON, which is a single allocation, so a
/// retained result costs pruning one block rather than a tree of them (each a
/// cache miss by the time it is pruned).
#[derive(Debug, Clone)]
pub struct Completed {
    pub state: NodeRunState,
    pub json: Arc<[u8]>,
}

impl Completed {
    /// The JSON as a response body, sharing the buffer rather than copying it.
    pub fn body(&self) -> Bytes {
        Bytes::from_owner(self.json.clone())
    }
}

/// Why an execute call got no result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExecuteError {
    #[error("the executor is at capacity")]
    Overloaded { retry_after: Duration },
    #[error("node_run_id {0} is already used by a different request")]
    Conflict(String),
    /// The execution failed inside the executor (a bug, never a guest's doing).
    #[error("the execution failed inside the executor")]
    Internal,
}

type Shared = Result<Completed, ExecuteError>;

/// One execution's request (its inputs moved out) and what its result
/// repeats, shared by the API side and the guest side.
struct Call {
    request: AtomicExecuteRequest,
    principal: Box<str>,
    started_at: String,
    /// The time limit that applies, as reported in a `timeout` error.
    limit: Duration,
    /// What its log line and metrics say beyond the request.
    record: Record,
}

/// What an execution's log line and metrics say beyond its request, recorded
/// once per execution.
struct Record {
    /// The node's labels, if the index serves it.
    node: Option<NodeLabels>,
    arrival: Instant,
    /// Microseconds waited for a sandbox slot (0 if it never asked for one).
    queue_wait_us: AtomicU64,
    /// Set by the first [`Executor::complete`]: a guest the API side answered
    /// `timeout` or `canceled` for completes again when it stops, and that
    /// second outcome is not the execution's. (A guest finishing in the same
    /// instant as the deadline may record its own outcome first.)
    done: AtomicBool,
}

impl Record {
    fn new(arrival: Instant, node: Option<NodeLabels>) -> Self {
        Self {
            node,
            arrival,
            queue_wait_us: AtomicU64::new(0),
            done: AtomicBool::new(false),
        }
    }

    /// Notes how long the execution waited for a slot, admitted or not.
    fn waited(&self, metrics: &Metrics, waited: Duration) {
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.queue_wait_us.store(us, Ordering::Relaxed);
        metrics.queue_wait(waited);
    }
}

/// A duration in milliseconds, to the microsecond, for the log line.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// Runs atomic NodeRuns against the packs of a [`PackRegistry`].
pub struct Executor {
    registry: Arc<PackRegistry>,
    config: ExecutorConfig,
    admission: Admission,
    runs: NodeRuns,
    /// Where guests run: never the API's runtime.
    guests: Guests,
    /// Guest invocations started, ever (retries that attach do not count).
    invocations: AtomicU64,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// An executor whose guests run on `guests` (see
    /// [`GuestRuntime`](crate::runtime::GuestRuntime)).
    pub fn new(
        registry: Arc<PackRegistry>,
        config: ExecutorConfig,
        guests: Guests,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            admission: Admission::new(
                config.max_concurrency,
                config.max_queue,
                config.queue_timeout,
            ),
            runs: NodeRuns::new(Retention {
                max_age: config.retention,
                max_count: config.retention_max,
                max_bytes: config.retention_max_bytes,
            }),
            registry,
            config,
            guests,
            invocations: AtomicU64::new(0),
            metrics,
        }
    }

    pub fn registry(&self) -> &Arc<PackRegistry> {
        &self.registry
    }

    pub fn config(&self) -> &ExecutorConfig {
        &self.config
    }

    /// Executions holding a sandbox now (a guest answered `timeout` holds
    /// one until it has stopped).
    pub fn running(&self) -> usize {
        self.admission.running()
    }

    /// Requests waiting for a sandbox slot now.
    pub fn queued(&self) -> usize {
        self.admission.queued()
    }

    /// `GET /metrics`: every metric, with the gauges read now.
    pub fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        self.metrics.render(Gauges {
            in_flight: self.running(),
            queue_depth: self.queued(),
            pack_load_failures: self.registry.failed_count(),
        })
    }

    /// Guest invocations started since the executor was created.
    pub fn invocations(&self) -> u64 {
        self.invocations.load(Ordering::Relaxed)
    }

    /// Finished results kept for retries now: how many, and their JSON bytes.
    pub fn retained(&self) -> (usize, usize) {
        self.runs.retained()
    }

    /// Executes `request` for `principal` (the caller's `sub`, named on the
    /// execution's log line), or attaches to the execution of the same NodeRun.
    pub async fn execute(
        self: &Arc<Self>,
        request: AtomicExecuteRequest,
        principal: &str,
    ) -> Shared {
        let arrival = Instant::now();
        let (id, cancel) = match self.runs.begin(&request, arrival)? {
            Begin::Run(id, cancel) => (id, cancel),
            Begin::Done(result) => return Ok(result),
            // No lock is held while waiting.
            Begin::Attach(attached) => return attached.wait().await,
        };
        let this = self.clone();
        let principal = Box::<str>::from(principal);
        let execution = async move {
            let mut unfinished = Unfinished {
                executor: &this,
                node_run_id: Some(id.clone()),
            };
            let outcome = this.run(request, &id, principal, cancel, arrival).await;
            if let Some(id) = unfinished.node_run_id.take() {
                this.runs.finish(id, &outcome);
            }
            outcome
        };
        // Boxed: a task's cell holds its future and then its output in one
        // slot, so an unboxed execution's state would be copied into the cell
        // at spawn and its whole slot written again at the end.
        match tokio::spawn(Box::pin(execution)).await {
            Ok(outcome) => outcome,
            // The execution panicked (its guard has forgotten the NodeRun):
            // never expected, but answer rather than hang.
            Err(e) => {
                tracing::error!(error = %e, "an execution failed inside the executor");
                Err(ExecuteError::Internal)
            }
        }
    }

    /// Cancels the execution of `node_run_id` if it is still running.
    /// Unknown and finished NodeRuns are left alone.
    pub fn cancel(&self, node_run_id: &str) -> bool {
        self.runs.cancel(node_run_id)
    }

    /// The API side of one execution: finds the node, admits the call, hands
    /// it to the guest runtime and waits for it until the deadline.
    async fn run(
        self: &Arc<Self>,
        mut request: AtomicExecuteRequest,
        id: &Arc<str>,
        principal: Box<str>,
        cancel: Arc<Cancel>,
        arrival: Instant,
    ) -> Shared {
        let started_at = now_rfc3339();
        let mut limit = self.config.default_timeout;
        if let Some(ms) = request
            .constraints
            .as_ref()
            .and_then(|c| c.max_wall_time_ms())
        {
            limit = limit.min(Duration::from_millis(ms));
        }

        let ref_ = &request.node_type_ref;
        let mut lookup = self.registry.lookup(&ref_.node_type_id, &ref_.version);
        if !matches!(lookup, Lookup::Found(_)) && self.registry.pending() > 0 {
            // Packs are still loading: the node may be on its way.
            self.registry.wait_loaded(arrival + limit).await;
            lookup = self.registry.lookup(&ref_.node_type_id, &ref_.version);
        }
        let found = match lookup {
            Lookup::Found(entry) => Ok(entry),
            Lookup::UnknownNode => Err(Failure::UnknownNodeType {
                node_type_id: ref_.node_type_id.clone(),
            }),
            Lookup::UnknownVersion { available } => Err(Failure::UnknownNodeVersion {
                node_type_id: ref_.node_type_id.clone(),
                requested: ref_.version.clone(),
                available,
            }),
        };
        if let Ok(entry) = &found
            && let Some(node_limit) = entry.max_wall_time
        {
            limit = limit.min(node_limit);
        }
        let deadline = arrival + limit;
        // The result does not repeat the inputs, so they move out of the request.
        let inputs = Value::Object(std::mem::take(&mut request.inputs));
        let node = found.as_ref().ok().map(|e| e.metric_labels.clone());
        let call = Arc::new(Call {
            request,
            principal,
            started_at,
            limit,
            record: Record::new(arrival, node),
        });
        let entry = match found {
            Ok(entry) => entry,
            Err(failure) => return Ok(self.complete(&call, Err(failure))),
        };

        let asked = Instant::now();
        let admitted = self.admission.admit(deadline, &cancel).await;
        call.record.waited(&self.metrics, asked.elapsed());
        let permit = match admitted {
            Ok(permit) => permit,
            Err(Refused::Overloaded) => {
                self.metrics.overloaded();
                return Err(ExecuteError::Overloaded {
                    retry_after: OVERLOAD_RETRY_AFTER,
                });
            }
            Err(Refused::Interrupted(why)) => {
                return Ok(self.complete(&call, Err(Failure::interrupted(why, limit))));
            }
        };

        let runs_long = entry.runs_long.clone();
        let job = GuestJob {
            call: call.clone(),
            entry,
            inputs,
            id: id.clone(),
            deadline,
            cancel: cancel.clone(),
            permit,
        };
        let this = self.clone();
        // The result comes back through a handoff rather than the task's
        // join handle, so the guest thread wakes this task along with the
        // others it finished (see `runtime::handoff`). Boxed: the guest
        // side's future holds wasmtime's call state, and spawning an unboxed
        // one would copy it.
        let (result, mut guest) = handoff();
        self.guests.spawn(
            runs_long,
            Box::pin(async move {
                result.send(this.run_guest(job).await);
            }),
        );
        let ended = tokio::select! {
            biased;
            done = &mut guest => {
                return done.ok_or_else(|| {
                    tracing::error!("an execution's guest side failed inside the executor");
                    ExecuteError::Internal
                });
            }
            _ = cancel.cancelled() => Failure::Canceled,
            _ = tokio::time::sleep_until(deadline) => Failure::Timeout { limit },
        };
        // Answered here; the guest stops at its next epoch check (or its
        // validation ends) and its result is dropped with the handle.
        cancel.cancel();
        Ok(self.complete(&call, Err(ended)))
    }

    /// The result of `call`, logged and serialized once.
    fn complete(&self, call: &Call, outcome: Outcome) -> Completed {
        let (state, outputs, error) = match outcome {
            Ok(outputs) => (NodeRunState::Succeeded, Some(outputs), None),
            Err(failure) => {
                let (state, error) = failure.into_ended(&self.config.outputs);
                (state, None, Some(error))
            }
        };
        if !call.record.done.swap(true, Ordering::AcqRel) {
            self.record(call, state, error.as_ref().map(|e| e.code.as_str()));
        }
        let result = AtomicExecuteResult {
            node_run_id: call.request.node_run_id.clone(),
            state,
            outputs,
            output_artifacts: None,
            started_at: Some(call.started_at.clone()),
            ended_at: Some(now_rfc3339()),
            error,
            extensions: None,
        };
        let json = serde_json::to_vec(&result).expect("results serialize");
        Completed {
            state,
            json: json.into(),
        }
    }

    /// The execution's one log line and its metrics.
    fn record(&self, call: &Call, state: NodeRunState, code: Option<&str>) {
        let record = &call.record;
        let duration = record.arrival.elapsed();
        let queue_wait = Duration::from_micros(record.queue_wait_us.load(Ordering::Relaxed));
        self.metrics
            .execution(record.node.as_ref(), state, code, duration);
        let request = &call.request;
        let ref_ = &request.node_type_ref;
        // One line per execution, naming who asked for it. Successes are the hot path, so they are logged at debug level.
        macro_rules! finished {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    node_run_id = %Sanitized(&request.node_run_id),
                    run_id = %Sanitized(&request.run_id),
                    principal = %Sanitized(&call.principal),
                    node_type_id = %Sanitized(&ref_.node_type_id),
                    version = %Sanitized(&ref_.version),
                    state = ?state,
                    code,
                    duration_ms = millis(duration),
                    queue_wait_ms = millis(queue_wait),
                    "execution finished"
                )
            };
        }
        if state == NodeRunState::Succeeded {
            finished!(tracing::Level::DEBUG);
        } else {
            finished!(tracing::Level::INFO);
        }
    }
}

/// Forgets a NodeRun whose execution was dropped before it finished, and
/// answers the retries attached to it, so none of them waits forever.
struct Unfinished<'a> {
    executor: &'a Executor,
    node_run_id: Option<Arc<str>>,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.node_run_id.take() {
            self.executor.runs.finish(id, &Err(ExecuteError::Internal));
        }
    }
}
