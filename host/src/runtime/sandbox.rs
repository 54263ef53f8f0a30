//! The one way to build a sandbox (a fresh `Store`) for a guest call, used
//! alike by `describe` when a pack loads and by every invoke.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use wasmtime::{ResourceLimiter, Store, UpdateDeadline};

use super::guests::{FIRST_SLICE, move_to_long_calls};
use super::{Cancel, Interrupted, InterruptedError, MemoryLimitExceeded, Runtime};
use crate::grants::NodeGrants;
use crate::grants::clock::Clock;
use crate::grants::config::ConfigState;
use crate::grants::http::HttpState;
use crate::grants::log::LogState;
use crate::grants::random::Random;
use crate::grants::timer::Timer;
use crate::grants::wasi::WasiState;

/// Epoch ticks a guest on the long-call threads runs between yields.
pub const LONG_SLICE: u32 = 10;

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
    /// Set when the call runs past its first slice: the node's hint that
    /// its calls run long (see [`Guests::spawn`](super::Guests::spawn)).
    pub runs_long: Option<Arc<AtomicBool>>,
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
    /// Set by the epoch check once the call has run past its first slice.
    ran_long: bool,
}

impl StoreState {
    /// Guest log lines dropped over the per-execution budget.
    pub fn logs_dropped(&self) -> u32 {
        self.log.dropped()
    }

    /// Whether the call ran past its first slice
    /// ([`FIRST_SLICE`](super::FIRST_SLICE)) and so moved to the long-call
    /// threads.
    pub fn ran_long(&self) -> bool {
        self.ran_long
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
    /// stops the guest at the deadline or on cancel, checked at every tick.
    ///
    /// The guard also decides where the guest runs: one still running
    /// [`FIRST_SLICE`](super::guests::FIRST_SLICE) after its store was made
    /// yields and moves to the long-call threads (see
    /// [`GuestRuntime`](super::GuestRuntime)); there it yields to the async
    /// runtime every [`LONG_SLICE`] ticks, so a spinning guest never
    /// monopolises a thread.
    ///
    /// A guest that yielded is checked again the moment it resumes, before it
    /// runs another slice: with many guests on a thread its turn may come long
    /// after its deadline or cancellation, and it then stops at once instead of
    /// spending a whole slice of CPU first.
    pub fn sandbox(&self, sandbox: Sandbox) -> Store<StoreState> {
        let Sandbox {
            node_run_id,
            node_type_id,
            grants,
            deadline,
            cancel,
            runs_long,
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
            ran_long: false,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        let made = Instant::now();
        let mut ticks = 0;
        let mut resumed = false;
        store.epoch_deadline_callback(move |mut store| {
            let now = Instant::now();
            if cancel.as_deref().is_some_and(Cancel::is_cancelled) {
                return Err(wasmtime::Error::new(InterruptedError(
                    Interrupted::Canceled,
                )));
            }
            if now >= deadline {
                return Err(wasmtime::Error::new(InterruptedError(Interrupted::Timeout)));
            }
            if resumed {
                // The check right after a yield passed: run on.
                resumed = false;
                return Ok(UpdateDeadline::Continue(1));
            }
            ticks += 1;
            let yields = if store.data().ran_long {
                ticks >= LONG_SLICE
            } else if now - made >= FIRST_SLICE {
                store.data_mut().ran_long = true;
                if let Some(hint) = &runs_long {
                    hint.store(true, Ordering::Relaxed);
                }
                move_to_long_calls();
                true
            } else {
                false
            };
            if !yields {
                return Ok(UpdateDeadline::Continue(1));
            }
            ticks = 0;
            resumed = true;
            // This guest held the thread for a slice: results finished
            // before it are not held behind it.
            super::handoff::deliver_held();
            // tokio's yield_now lets the runtime poll its I/O driver first;
            // a plain wake-up would starve network tasks. A deadline of 0
            // ticks after the yield calls back here as soon as it resumes.
            Ok(UpdateDeadline::YieldCustom(
                0,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        store.set_epoch_deadline(1);
        store
    }
}
