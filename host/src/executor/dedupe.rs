//! One execution per NodeRun: retries attach to the running execution or get
//! its recorded result, which is kept within a count, an age and a byte budget.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use arp_types::AtomicExecuteRequest;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Completed, ExecuteError, Shared};
use crate::runtime::{Cancel, wait_for};

/// How long finished results are kept for retries, and how many.
#[derive(Debug, Clone, Copy)]
pub(super) struct Retention {
    pub max_age: Duration,
    pub max_count: usize,
    /// Sum of the retained results' JSON bytes.
    pub max_bytes: usize,
}

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
pub(super) struct Attached {
    outcome: OnceLock<Shared>,
    published: Notify,
}

impl Attached {
    pub(super) async fn wait(&self) -> Shared {
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
    /// Finished ids (shared with `live`'s keys) and their JSON sizes, oldest
    /// first, for pruning.
    finished: VecDeque<(Instant, Arc<str>, usize)>,
    /// Sum of the sizes in `finished`.
    retained_bytes: usize,
}

/// What [`NodeRuns::begin`] found to do.
pub(super) enum Begin {
    /// A new execution, registered as running.
    Run(Arc<str>, Arc<Cancel>),
    /// The same request is running: wait for its outcome.
    Attach(Arc<Attached>),
    /// The same request finished: its result.
    Done(Completed),
}

/// The NodeRuns running or recently finished, by id.
pub(super) struct NodeRuns {
    executions: Mutex<Executions>,
    retention: Retention,
    /// Seeds request fingerprints, randomly per process, so no caller can
    /// craft a different request that passes for another's retry.
    fingerprints: foldhash::quality::RandomState,
}

impl NodeRuns {
    pub(super) fn new(retention: Retention) -> Self {
        Self {
            executions: Mutex::default(),
            retention,
            fingerprints: foldhash::quality::RandomState::default(),
        }
    }

    /// Registers `request` as running, or finds the execution it retries.
    pub(super) fn begin(
        &self,
        request: &AtomicExecuteRequest,
        now: Instant,
    ) -> Result<Begin, ExecuteError> {
        let fingerprint = fingerprint(&self.fingerprints, request);
        let mut executions = self.lock();
        self.prune(&mut executions, now);
        match executions.live.get_mut(request.node_run_id.as_str()) {
            Some(slot) if slot.fingerprint() != fingerprint => {
                Err(ExecuteError::Conflict(request.node_run_id.clone()))
            }
            Some(Slot::Finished { result, .. }) => Ok(Begin::Done(result.clone())),
            Some(Slot::Running { attached, .. }) => Ok(Begin::Attach(
                attached.get_or_insert_with(Default::default).clone(),
            )),
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
                Ok(Begin::Run(id, cancel))
            }
        }
    }

    /// Cancels the execution of `node_run_id` if it is still running.
    pub(super) fn cancel(&self, node_run_id: &str) -> bool {
        let executions = self.lock();
        match executions.live.get(node_run_id) {
            Some(Slot::Running { cancel, .. }) => {
                cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// Records a finished execution for retries, or forgets one that got no
    /// result (overloaded) so a retry can run it; hands the outcome to the
    /// retries attached to it. Called once per execution.
    pub(super) fn finish(&self, node_run_id: Arc<str>, outcome: &Shared) {
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
                    let bytes = result.json.len();
                    executions.retained_bytes += bytes;
                    executions
                        .finished
                        .push_back((Instant::now(), node_run_id, bytes));
                    // The byte budget holds now, not at the next arrival.
                    if executions.retained_bytes > self.retention.max_bytes {
                        self.prune(&mut executions, Instant::now());
                    }
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

    /// Finished results kept now: how many, and their JSON bytes.
    pub(super) fn retained(&self) -> (usize, usize) {
        let executions = self.lock();
        (executions.finished.len(), executions.retained_bytes)
    }

    fn prune(&self, executions: &mut Executions, now: Instant) {
        let Retention {
            max_age,
            max_count,
            max_bytes,
        } = self.retention;
        while let Some((at, _, _)) = executions.finished.front() {
            let expired = now.saturating_duration_since(*at) > max_age;
            if !expired
                && executions.finished.len() <= max_count
                && executions.retained_bytes <= max_bytes
            {
                break;
            }
            let (_, id, bytes) = executions.finished.pop_front().expect("front exists");
            executions.retained_bytes -= bytes;
            executions.live.remove(&id);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Executions> {
        self.executions.lock().unwrap_or_else(|e| e.into_inner())
    }
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
