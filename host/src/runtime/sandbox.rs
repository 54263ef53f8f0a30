//! The one way to build a sandbox (a fresh `Store`) for a guest call, used
//! alike by `describe` when a pack loads and by every invoke.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::{ResourceLimiter, Store, UpdateDeadline};

use super::{Cancel, Interrupted, InterruptedError, MemoryLimitExceeded, Runtime};
use crate::grants::NodeGrants;
use crate::grants::clock::Clock;
use crate::grants::config::ConfigState;
use crate::grants::http::HttpState;
use crate::grants::log::LogState;
use crate::grants::random::Random;
use crate::grants::timer::Timer;
use crate::grants::wasi::WasiState;

/// What one sandbox is built for.
#[derive(Debug)]
pub struct Sandbox {
    /// Tags the guest's log lines.
    pub node_run_id: Arc<str>,
    pub node_type_id: Arc<str>,
    /// What the node is granted.
    pub grants: Arc<NodeGrants>,
    /// When the guest is stopped with `timeout`.
    pub deadline: Instant,
    /// Stops the guest with `canceled` once set.
    pub cancel: Option<Arc<Cancel>>,
}

/// Everything one execution's `Store` holds: the memory budget and each
/// host interface's slice of state. Created fresh per execution.
#[derive(Debug)]
pub struct StoreState {
    memory: MemoryBudget,
    pub(crate) log: LogState,
    pub(crate) clock: Clock,
    pub(crate) random: Random,
    pub(crate) timer: Timer,
    pub(crate) config: ConfigState,
    pub(crate) http: HttpState,
    pub(crate) wasi: WasiState,
}

impl StoreState {
    /// Guest log lines dropped over the per-execution budget.
    pub fn logs_dropped(&self) -> u32 {
        self.log.dropped()
    }

    /// Lowers this execution's outbound call budget to the request's
    /// `constraints.budgets.max_external_calls`.
    pub fn limit_external_calls(&mut self, max_external_calls: Option<u64>) {
        self.http.limit_calls(max_external_calls);
    }
}

/// Linear memory one execution may hold, all its memories together.
#[derive(Debug)]
struct MemoryBudget {
    limit: usize,
    used: usize,
}

impl ResourceLimiter for MemoryBudget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // The budget covers every memory of the instance together.
        let total = self.used - current.min(self.used) + desired;
        if total > self.limit {
            return Err(wasmtime::Error::new(MemoryLimitExceeded {
                limit: self.limit,
                desired: total,
            }));
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl Runtime {
    /// A fresh store for one call: memory limits, and an epoch guard that
    /// stops the guest at the deadline or on cancel and otherwise yields to
    /// the async runtime at every tick, so a spinning guest never
    /// monopolises a thread.
    ///
    /// A guest that yielded is checked again the moment it resumes, before it
    /// runs another slice: with many guests on a thread its turn may come long
    /// after its deadline or cancellation, and it then stops at once instead of
    /// spending a whole tick of CPU first.
    pub fn sandbox(&self, sandbox: Sandbox) -> Store<StoreState> {
        let Sandbox {
            node_run_id,
            node_type_id,
            grants,
            deadline,
            cancel,
        } = sandbox;
        let limits = &self.limits;
        let state = StoreState {
            memory: MemoryBudget {
                limit: limits.max_memory_bytes,
                used: 0,
            },
            http: HttpState::new(grants.clone(), deadline, node_run_id.clone()),
            log: LogState::new(node_run_id, node_type_id, limits.max_log_lines),
            clock: Clock,
            random: Random,
            timer: Timer,
            config: ConfigState::new(grants),
            wasi: WasiState::default(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        let mut resumed = false;
        store.epoch_deadline_callback(move |_| {
            if cancel.as_deref().is_some_and(Cancel::is_cancelled) {
                Err(wasmtime::Error::new(InterruptedError(
                    Interrupted::Canceled,
                )))
            } else if Instant::now() >= deadline {
                Err(wasmtime::Error::new(InterruptedError(Interrupted::Timeout)))
            } else if resumed {
                // The check right after a yield passed: run until the next tick.
                resumed = false;
                Ok(UpdateDeadline::Continue(1))
            } else {
                resumed = true;
                // This guest held the thread for a tick: results finished
                // before it are not held behind it.
                super::handoff::deliver_held();
                // tokio's yield_now lets the runtime poll its I/O driver first;
                // a plain wake-up would starve network tasks. A deadline of 0
                // ticks after the yield calls back here as soon as it resumes.
                Ok(UpdateDeadline::YieldCustom(
                    0,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });
        store.set_epoch_deadline(1);
        store
    }
}
