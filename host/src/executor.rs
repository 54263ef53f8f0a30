//! Executes atomic NodeRuns: admission, one fresh sandbox per execution, time
//! and memory limits, cancellation, and safe retries of the same NodeRun.
//!
//! Every execution runs in a task of its own, so a caller that disconnects
//! does not stop it; a retry with the same `node_run_id` and request attaches
//! to it (or, shortly after it ends, gets the recorded result) instead of
//! running the node twice.
//!
//! (Running a short execution inside the caller's task instead saves the
//! spawn, but then every response leaves the moment it is ready rather than
//! with others; at 64 connections that doubled the kernel's cycles per
//! request and lost a third of the throughput. See the README's benchmarks.)

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arp_types::time::now_rfc3339;
use arp_types::{AtomicExecuteRequest, AtomicExecuteResult, ErrorDetail, JsonObject, NodeRunState};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::registry::{Lookup, NodeEntry, PackRegistry};
use crate::runtime::{
    Cancel, Interrupted, InterruptedError, MemoryLimitExceeded, StoreState, new_store, wait_for,
};
use crate::world::Invocation;

/// What an `overloaded` answer tells the caller to wait before retrying.
const OVERLOAD_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Most validation errors reported in `details.errors`.
const MAX_REPORTED_ERRORS: usize = 16;

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

/// A NodeRun the executor knows of.
enum Slot {
    /// Running: a retry waits in `attached`, made when the first retry comes.
    Running {
        fingerprint: u64,
        cancel: Arc<Cancel>,
        attached: Option<Arc<Attached>>,
    },
    /// Finished: a retry gets the result until it is pruned. Only what a
    /// retry needs is kept, so pruning frees two blocks: the id and the JSON.
    Finished { fingerprint: u64, result: Completed },
}

impl Slot {
    fn fingerprint(&self) -> u64 {
        match self {
            Self::Running { fingerprint, .. } | Self::Finished { fingerprint, .. } => *fingerprint,
        }
    }
}

/// Where retries of a running NodeRun wait for its outcome.
#[derive(Default)]
struct Attached {
    outcome: OnceLock<Shared>,
    published: Notify,
}

impl Attached {
    async fn wait(&self) -> Shared {
        wait_for(&self.published, || self.outcome.get().cloned()).await
    }

    fn publish(&self, outcome: &Shared) {
        let _ = self.outcome.set(outcome.clone());
        self.published.notify_waiters();
    }
}

#[derive(Default)]
struct Executions {
    live: HashMap<Arc<str>, Slot, foldhash::fast::RandomState>,
    /// Finished ids (shared with `live`'s keys), oldest first, for pruning.
    finished: VecDeque<(Instant, Arc<str>)>,
}

/// Runs atomic NodeRuns against the packs of a [`PackRegistry`].
pub struct Executor {
    registry: Arc<PackRegistry>,
    config: ExecutorConfig,
    permits: Arc<Semaphore>,
    queued: AtomicUsize,
    executions: Mutex<Executions>,
    /// Seeds request fingerprints, randomly per process, so no caller can
    /// craft a different request that passes for another's retry.
    fingerprints: foldhash::quality::RandomState,
    /// Guest invocations started, ever (retries that attach do not count).
    invocations: AtomicU64,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Executor {
    pub fn new(registry: Arc<PackRegistry>, config: ExecutorConfig) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
            registry,
            config,
            queued: AtomicUsize::new(0),
            executions: Mutex::new(Executions::default()),
            fingerprints: foldhash::quality::RandomState::default(),
            invocations: AtomicU64::new(0),
        }
    }

    pub fn registry(&self) -> &Arc<PackRegistry> {
        &self.registry
    }

    pub fn config(&self) -> &ExecutorConfig {
        &self.config
    }

    /// Executions running now (holding a sandbox).
    pub fn running(&self) -> usize {
        self.config.max_concurrency.max(1) - self.permits.available_permits()
    }

    /// Guest invocations started since the executor was created.
    pub fn invocations(&self) -> u64 {
        self.invocations.load(Ordering::Relaxed)
    }

    /// Executes `request` for `principal` (the caller's `sub`, named on the
    /// execution's log line), or attaches to the execution of the same NodeRun.
    pub async fn execute(
        self: &Arc<Self>,
        request: AtomicExecuteRequest,
        principal: &str,
    ) -> Shared {
        let arrival = Instant::now();
        let fingerprint = fingerprint(&self.fingerprints, &request);
        /// What the lookup found to do, decided under the lock.
        enum Next {
            Run(Arc<str>, Arc<Cancel>),
            Attach(Arc<Attached>),
        }
        let next = {
            let mut executions = self.lock();
            self.prune(&mut executions, arrival);
            match executions.live.get_mut(request.node_run_id.as_str()) {
                Some(slot) if slot.fingerprint() != fingerprint => {
                    return Err(ExecuteError::Conflict(request.node_run_id));
                }
                Some(Slot::Finished { result, .. }) => return Ok(result.clone()),
                Some(Slot::Running { attached, .. }) => {
                    Next::Attach(attached.get_or_insert_with(Default::default).clone())
                }
                None => {
                    let cancel = Arc::new(Cancel::default());
                    let id = Arc::<str>::from(request.node_run_id.as_str());
                    executions.live.insert(
                        id.clone(),
                        Slot::Running {
                            fingerprint,
                            cancel: cancel.clone(),
                            attached: None,
                        },
                    );
                    Next::Run(id, cancel)
                }
            }
        };
        let (id, cancel) = match next {
            Next::Run(id, cancel) => (id, cancel),
            // The lock is released before waiting.
            Next::Attach(attached) => return attached.wait().await,
        };
        let this = self.clone();
        let principal = Arc::<str>::from(principal);
        let execution = async move {
            let mut unfinished = Unfinished {
                executor: &this,
                node_run_id: Some(id.clone()),
            };
            let outcome = this.run(request, &id, &principal, cancel, arrival).await;
            if let Some(id) = unfinished.node_run_id.take() {
                this.finish(id, &outcome);
            }
            outcome
        };
        // Boxed: the execution's future holds wasmtime's call state, and
        // spawning an unboxed one would copy it.
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
        let executions = self.lock();
        match executions.live.get(node_run_id) {
            Some(Slot::Running { cancel, .. }) => {
                cancel.cancel();
                true
            }
            _ => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Executions> {
        self.executions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a finished execution for retries, or forgets one that got no
    /// result (overloaded) so a retry can run it; hands the outcome to the
    /// retries attached to it.
    fn finish(&self, node_run_id: Arc<str>, outcome: &Shared) {
        let attached = {
            let mut executions = self.lock();
            match outcome {
                Ok(result) => {
                    let attached = executions.live.get_mut(&node_run_id).and_then(|slot| {
                        let attached = match slot {
                            Slot::Running { attached, .. } => attached.take(),
                            Slot::Finished { .. } => None,
                        };
                        *slot = Slot::Finished {
                            fingerprint: slot.fingerprint(),
                            result: result.clone(),
                        };
                        attached
                    });
                    executions.finished.push_back((Instant::now(), node_run_id));
                    attached
                }
                Err(_) => match executions.live.remove(&node_run_id) {
                    Some(Slot::Running { attached, .. }) => attached,
                    _ => None,
                },
            }
        };
        if let Some(attached) = attached {
            attached.publish(outcome);
        }
    }

    fn prune(&self, executions: &mut Executions, now: Instant) {
        while let Some((at, _)) = executions.finished.front() {
            let expired = now.duration_since(*at) > self.config.retention;
            if !expired && executions.finished.len() <= self.config.retention_max {
                break;
            }
            let (_, id) = executions.finished.pop_front().expect("front exists");
            executions.live.remove(&id);
        }
    }

    async fn run(
        &self,
        mut request: AtomicExecuteRequest,
        id: &Arc<str>,
        principal: &str,
        cancel: Arc<Cancel>,
        arrival: Instant,
    ) -> Shared {
        let started_at = now_rfc3339();
        let ref_ = &request.node_type_ref;
        let mut limit = self.config.default_timeout;
        if let Some(ms) = request
            .constraints
            .as_ref()
            .and_then(|c| c.max_wall_time_ms())
        {
            limit = limit.min(Duration::from_millis(ms));
        }
        let mut deadline = arrival + limit;

        let mut lookup = self.registry.lookup(&ref_.node_type_id, &ref_.version);
        if !matches!(lookup, Lookup::Found(_)) && self.registry.pending() > 0 {
            // Packs are still loading: the node may be on its way.
            self.registry.wait_loaded(deadline).await;
            lookup = self.registry.lookup(&ref_.node_type_id, &ref_.version);
        }
        let entry = match lookup {
            Lookup::Found(entry) => entry,
            Lookup::UnknownNode => {
                let error = ErrorDetail::new(
                    "unknown_node_type",
                    format!("Unknown node_type_id: {}", ref_.node_type_id),
                );
                return Ok(self.complete(&request, principal, started_at, Err(failed(error))));
            }
            Lookup::UnknownVersion { available } => {
                let error = ErrorDetail::new(
                    "unknown_node_version",
                    format!(
                        "{} is not served at version {}",
                        ref_.node_type_id, ref_.version
                    ),
                )
                .with_details(object(
                    json!({ "requested": ref_.version, "available": available }),
                ));
                return Ok(self.complete(&request, principal, started_at, Err(failed(error))));
            }
        };
        if let Some(node_limit) = entry.max_wall_time {
            deadline = deadline.min(arrival + node_limit);
        }

        // The result does not repeat the inputs, so they move out of the request.
        let inputs = Value::Object(std::mem::take(&mut request.inputs));
        if !entry.input_schema.is_valid(&inputs) {
            let error = ErrorDetail::new(
                "invalid_inputs",
                "inputs do not match the node's input schema",
            )
            .with_details(schema_errors(&entry.input_schema, &inputs));
            return Ok(self.complete(&request, principal, started_at, Err(failed(error))));
        }

        let _permit = match self.admit(deadline, &cancel).await {
            Ok(permit) => permit,
            Err(Admission::Overloaded) => {
                return Err(ExecuteError::Overloaded {
                    retry_after: OVERLOAD_RETRY_AFTER,
                });
            }
            Err(Admission::Interrupted(why)) => {
                return Ok(self.complete(
                    &request,
                    principal,
                    started_at,
                    Err(interrupted_error(why, limit)),
                ));
            }
        };

        let outcome = self
            .invoke(
                &entry,
                &mut request,
                id,
                // serde_json's writer, not `Display`, which goes through `fmt`.
                serde_json::to_string(&inputs).expect("a JSON value serializes"),
                deadline,
                cancel,
            )
            .await;
        let outcome = outcome.and_then(|text| check_outputs(&entry, &text));
        Ok(self.complete(
            &request,
            principal,
            started_at,
            outcome.map_err(|e| e.into_ended(limit)),
        ))
    }

    /// Waits for a sandbox slot within the queue's bounds.
    async fn admit(
        &self,
        deadline: Instant,
        cancel: &Cancel,
    ) -> Result<OwnedSemaphorePermit, Admission> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.config.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Admission::Overloaded);
        }
        let _queued = QueueSlot(&self.queued);
        tokio::select! {
            permit = self.permits.clone().acquire_owned() => permit.map_err(|_| Admission::Overloaded),
            _ = tokio::time::sleep(self.config.queue_timeout) => Err(Admission::Overloaded),
            _ = tokio::time::sleep_until(deadline) => Err(Admission::Interrupted(Interrupted::Timeout)),
            _ = cancel.cancelled() => Err(Admission::Interrupted(Interrupted::Canceled)),
        }
    }

    /// Runs the guest in a fresh store; returns its outputs as JSON text.
    /// The ids in `request` are lent to the guest's invocation and put back.
    async fn invoke(
        &self,
        entry: &NodeEntry,
        request: &mut AtomicExecuteRequest,
        id: &Arc<str>,
        inputs: String,
        deadline: Instant,
        cancel: Arc<Cancel>,
    ) -> Result<String, Failure> {
        let state = StoreState::new(
            self.registry.limits(),
            id.clone(),
            entry.node_type_id.clone(),
        );
        let mut store = new_store(
            self.registry.engine(),
            state,
            deadline.into_std(),
            Some(cancel.clone()),
        );

        let trace = request.run_context.as_ref().and_then(|c| c.trace.as_ref());
        let mut invocation = Invocation {
            node_type_id: String::from(&*entry.node_type_id),
            version: entry.version.clone(),
            inputs,
            run_id: std::mem::take(&mut request.run_id),
            node_run_id: std::mem::take(&mut request.node_run_id),
            trace_id: trace.and_then(|t| t.trace_id.clone()),
            span_id: trace.and_then(|t| t.span_id.clone()),
            deadline_unix_ms: unix_ms_at(deadline),
        };
        self.invocations.fetch_add(1, Ordering::Relaxed);
        // The call and its borrows end before the ids go back.
        let result = {
            let call = async {
                let pack = &entry.pack;
                let instance = pack
                    .pre
                    .instance_pre()
                    .instantiate_async(&mut store)
                    .await?;
                let invoke = pack.invoke.func(&mut store, &instance).ok_or_else(|| {
                    wasmtime::format_err!("the instance lacks its pack's `invoke`")
                })?;
                let (result,) = invoke.call_async(&mut store, (&invocation,)).await?;
                Ok::<_, wasmtime::Error>(result)
            };
            let mut call = std::pin::pin!(call);
            // Most calls finish in their first poll; only one that does not needs
            // the timer and the cancellation waiter.
            let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
            match first {
                Poll::Ready(r) => Ok(r),
                // The epoch callback stops spinning guests; this stops guests
                // parked in a host call (a sleep) that the callback never sees.
                Poll::Pending => tokio::select! {
                    biased;
                    r = &mut call => Ok(r),
                    _ = cancel.cancelled() => Err(Interrupted::Canceled),
                    _ = tokio::time::sleep_until(deadline) => Err(Interrupted::Timeout),
                },
            }
        };
        request.run_id = std::mem::take(&mut invocation.run_id);
        request.node_run_id = std::mem::take(&mut invocation.node_run_id);
        let dropped = store.data().logs_dropped();
        if dropped > 0 {
            tracing::warn!(
                node_run_id = %request.node_run_id,
                dropped,
                "guest log lines over the per-execution budget were dropped"
            );
        }
        let result = result.map_err(Failure::Interrupted)?;
        match result {
            Ok(Ok(outputs)) => Ok(outputs),
            Ok(Err(node_error)) => Err(Failure::Node(node_error)),
            Err(e) => Err(classify_trap(&e, &request.node_run_id)),
        }
    }

    fn complete(
        &self,
        request: &AtomicExecuteRequest,
        principal: &str,
        started_at: String,
        outcome: Result<JsonObject, (NodeRunState, ErrorDetail)>,
    ) -> Completed {
        let (state, outputs, error) = match outcome {
            Ok(outputs) => (NodeRunState::Succeeded, Some(outputs), None),
            Err((state, e)) => (state, None, Some(e)),
        };
        let ref_ = &request.node_type_ref;
        // One line per execution, naming who asked for it. Successes are the hot path, so they are logged at debug level.
        macro_rules! finished {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    node_run_id = %request.node_run_id,
                    run_id = %request.run_id,
                    principal,
                    node_type_id = %ref_.node_type_id,
                    version = %ref_.version,
                    state = ?state,
                    code = error.as_ref().map(|e| e.code.as_str()),
                    "execution finished"
                )
            };
        }
        if state == NodeRunState::Succeeded {
            finished!(tracing::Level::DEBUG);
        } else {
            finished!(tracing::Level::INFO);
        }
        let result = AtomicExecuteResult {
            node_run_id: request.node_run_id.clone(),
            state,
            outputs,
            output_artifacts: None,
            started_at: Some(started_at),
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
            self.executor.finish(id, &Err(ExecuteError::Internal));
        }
    }
}

enum Admission {
    Overloaded,
    Interrupted(Interrupted),
}

struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a node produced no outputs.
#[derive(Debug)]
enum Failure {
    Interrupted(Interrupted),
    Node(crate::world::NodeError),
    MemoryLimit(String),
    Trapped,
    InvalidOutputs {
        message: String,
        details: Option<JsonObject>,
    },
}

impl Failure {
    /// The terminal state and error this failure is reported as.
    fn into_ended(self, limit: Duration) -> (NodeRunState, ErrorDetail) {
        let detail = match self {
            Failure::Interrupted(why) => return interrupted_error(why, limit),
            Failure::Node(e) => {
                let mut detail = ErrorDetail::new(e.code, e.message);
                if let Some(text) = e.details {
                    detail.details = Some(match serde_json::from_str::<Value>(&text) {
                        Ok(Value::Object(map)) => map,
                        // Details a node sent that are not an object are kept, wrapped.
                        _ => object(json!({ "raw": text })),
                    });
                }
                if detail.code.is_empty() {
                    detail.code = "node_error".into();
                }
                detail
            }
            Failure::MemoryLimit(message) => ErrorDetail::new("memory_limit_exceeded", message),
            Failure::Trapped => {
                ErrorDetail::new("node_trapped", "the node crashed (WebAssembly trap)")
            }
            Failure::InvalidOutputs { message, details } => {
                let detail = ErrorDetail::new("invalid_outputs", message);
                match details {
                    Some(d) => detail.with_details(d),
                    None => detail,
                }
            }
        };
        failed(detail)
    }
}

fn failed(detail: ErrorDetail) -> (NodeRunState, ErrorDetail) {
    (NodeRunState::Failed, detail)
}

fn interrupted_error(why: Interrupted, limit: Duration) -> (NodeRunState, ErrorDetail) {
    match why {
        Interrupted::Timeout => {
            let message = format!(
                "execution exceeded its time limit of {} ms",
                limit.as_millis()
            );
            let details = object(json!({ "limit_ms": limit.as_millis() as u64 }));
            failed(ErrorDetail::new("timeout", message).with_details(details))
        }
        Interrupted::Canceled => (
            NodeRunState::Canceled,
            ErrorDetail::new("canceled", "execution canceled"),
        ),
    }
}

fn classify_trap(error: &wasmtime::Error, node_run_id: &str) -> Failure {
    if let Some(InterruptedError(why)) = error.downcast_ref::<InterruptedError>() {
        return Failure::Interrupted(*why);
    }
    if let Some(limit) = error.downcast_ref::<MemoryLimitExceeded>() {
        return Failure::MemoryLimit(limit.to_string());
    }
    // The detail stays in our log: guests must not learn host internals.
    tracing::warn!(node_run_id, error = %format!("{error:#}"), "guest trapped");
    Failure::Trapped
}

fn check_outputs(entry: &NodeEntry, text: &str) -> Result<JsonObject, Failure> {
    let value: Value = serde_json::from_str(text).map_err(|e| Failure::InvalidOutputs {
        message: format!("outputs are not valid JSON: {e}"),
        details: None,
    })?;
    if !value.is_object() {
        return Err(Failure::InvalidOutputs {
            message: "outputs must be a JSON object".into(),
            details: None,
        });
    }
    if !entry.output_schema.is_valid(&value) {
        return Err(Failure::InvalidOutputs {
            message: "outputs do not match the node's output schema".into(),
            details: Some(schema_errors(&entry.output_schema, &value)),
        });
    }
    match value {
        Value::Object(map) => Ok(map),
        _ => unreachable!("checked above"),
    }
}

/// `{"errors": [{"path": "/echo", "message": "..."}]}` for a failed validation.
fn schema_errors(validator: &jsonschema::Validator, instance: &Value) -> JsonObject {
    let errors: Vec<Value> = validator
        .iter_errors(instance)
        .take(MAX_REPORTED_ERRORS)
        .map(|e| json!({ "path": e.instance_path().to_string(), "message": e.to_string() }))
        .collect();
    object(json!({ "errors": errors }))
}

fn object(value: Value) -> JsonObject {
    match value {
        Value::Object(map) => map,
        _ => JsonObject::new(),
    }
}

fn unix_ms_at(deadline: Instant) -> u64 {
    let now = Instant::now();
    let wall = SystemTime::now() + deadline.saturating_duration_since(now);
    wall.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Identifies a request's content, so a retry can be told from a conflict.
fn fingerprint(seed: &impl BuildHasher, request: &AtomicExecuteRequest) -> u64 {
    /// Feeds serialized bytes to the hasher in chunks of up to `N` bytes:
    /// serde_json writes token by token, and a hasher is fastest on long runs.
    struct Chunked<H, const N: usize> {
        hasher: H,
        buffer: [u8; N],
        len: usize,
    }
    impl<H: Hasher, const N: usize> std::io::Write for Chunked<H, N> {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if self.len + bytes.len() > N {
                self.flush()?;
                if bytes.len() >= N {
                    self.hasher.write(bytes);
                    return Ok(bytes.len());
                }
            }
            self.buffer[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.hasher.write(&self.buffer[..self.len]);
            self.len = 0;
            Ok(())
        }
    }
    let mut writer = Chunked::<_, 256> {
        hasher: seed.build_hasher(),
        buffer: [0; 256],
        len: 0,
    };
    // Serialization is canonical: struct fields in order, maps sorted.
    serde_json::to_writer(&mut writer, request).expect("requests serialize");
    let _ = std::io::Write::flush(&mut writer);
    writer.hasher.finish()
}
