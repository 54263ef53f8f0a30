//! The wasm runtime, built once: the engine, the linker with every host
//! interface, the operator's limits and the epoch ticker; and the one way to
//! build a sandbox for a guest call ([`sandbox`]).
//!
//! # Layout
//! - [`sandbox`]: the store state of one execution and its constructor,
//!   used by `describe` at load and by every invoke.
//! - [`trap`]: the errors a stopped guest call ends with.
//! - [`guests`]: the tokio runtimes guests run on (short calls, long calls).
//! - [`handoff`]: results from the guests' threads to the API's, woken in batches.

mod guests;
pub mod handoff;
pub mod sandbox;
mod trap;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::Notify;
use wasmtime::component::Linker;
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use self::guests::{FIRST_SLICE, GuestCall, GuestRuntime, GuestThreads, Guests};
pub use self::sandbox::{Sandbox, StoreState};
pub use self::trap::{Interrupted, InterruptedError, MemoryLimitExceeded};

/// The engine every pack is compiled with, the linker holding every host
/// interface, and the limits each sandbox gets. Built once per service.
pub struct Runtime {
    engine: Engine,
    linker: Linker<StoreState>,
    limits: RuntimeLimits,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// A runtime on `engine` (see [`build_engine`]) whose linker grants every
    /// host interface of the `node-pack` world.
    pub fn new(engine: Engine, limits: RuntimeLimits) -> wasmtime::Result<Self> {
        let mut linker = Linker::new(&engine);
        crate::grants::add_to_linker(&mut linker)?;
        Ok(Self {
            engine,
            linker,
            limits,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn linker(&self) -> &Linker<StoreState> {
        &self.linker
    }

    pub fn limits(&self) -> &RuntimeLimits {
        &self.limits
    }
}

/// How often the epoch advances: how often a running guest's deadline and
/// cancellation are checked, and the unit of its slices (see
/// [`Runtime::sandbox`]).
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Operator-set limits on the wasm runtime.
#[derive(Debug, Clone)]
pub struct RuntimeLimits {
    /// Linear memory one execution may hold, in bytes (all memories together).
    pub max_memory_bytes: usize,
    /// Executions that may hold an instance at once (pool size).
    pub max_instances: u32,
    /// Log lines one execution may write before the rest are dropped.
    pub max_log_lines: u32,
}

/// Builds the engine used for every pack: epoch interruption, async support and
/// a pooling allocator sized for `limits`.
pub fn build_engine(
    limits: &RuntimeLimits,
    cache_dir: Option<&std::path::Path>,
) -> anyhow::Result<Engine> {
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    // Memories with 1-byte pages may be smaller than a host page, and a
    // memory within one host page is reset by a memset alone (see
    // `WatPack::with_byte_pages`, which the built-in echo uses).
    config.wasm_custom_page_sizes(true);
    // Fibers for async calls: guest stacks are bounded by max_wasm_stack.
    config.max_wasm_stack(1 << 20);
    config.async_stack_size(2 << 20);

    let memory_slot = limits.max_memory_bytes.next_multiple_of(1 << 16);
    let mut pool = PoolingAllocationConfig::new();
    let instances = limits.max_instances.max(1);
    pool.total_component_instances(instances)
        // A componentize-py component holds ~40 core instances (the CPython
        // runtime and its shims); core instances only count against these
        // totals, while memories and tables reserve address space per slot.
        .total_core_instances(instances.saturating_mul(64))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(8))
        .total_stacks(instances)
        .max_memories_per_component(4)
        .max_core_instances_per_component(128)
        .max_tables_per_component(32)
        .max_memory_size(memory_slot)
        .max_unused_warm_slots(instances.min(64))
        // Resetting a small slot by memset beats madvise, whose TLB
        // shootdowns interrupt every other core on each execution.
        .linear_memory_keep_resident(1 << 20)
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(128 << 10)
        // Where the kernel can say which pages a guest dirtied (Linux 6.7+),
        // only those are reset; the rest of the slot stays as it was.
        .pagemap_scan(wasmtime::Enabled::Auto);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));

    if let Some(dir) = cache_dir {
        let mut cache = wasmtime::CacheConfig::new();
        cache.with_directory(dir);
        config.cache(Some(wasmtime::Cache::new(cache)?));
    }
    Ok(Engine::new(&config)?)
}

/// Stops the kernel from backing this process's memory with transparent huge
/// pages (Linux `PR_SET_THP_DISABLE`; elsewhere a no-op), including memory the
/// allocator has asked huge pages for. A fresh huge page is zeroed whole, 2 MiB
/// at once, by the thread whose access faulted it in: on the API's threads a
/// burst of new connections then cost tens of milliseconds of zeroing in one
/// go (measured: 70% of the API's CPU while 1,000 calls arrived, health
/// answers up to 110 ms late) where 4 KiB pages cost a little per request.
#[allow(unsafe_code)]
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only a
        // flag of this process.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Advances an engine's epoch every [`EPOCH_TICK`] on a thread of its own;
/// dropping it stops and joins the thread.
#[derive(Debug)]
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch ticker thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Cancels one execution: set by whoever cancels it, read by the epoch
/// callback of its store and awaited next to its guest call.
#[derive(Debug, Default)]
pub struct Cancel {
    cancelled: AtomicBool,
    notify: Notify,
}

impl Cancel {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Completes once [`Cancel::cancel`] has been called.
    pub async fn cancelled(&self) {
        wait_for(&self.notify, || self.is_cancelled().then_some(())).await
    }
}

/// Waits on `notify` until `check` gives a value. The waiter is registered
/// before each check, so a `notify_waiters` between the check and the wait is
/// not missed.
pub async fn wait_for<T>(notify: &Notify, mut check: impl FnMut() -> Option<T>) -> T {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(value) = check() {
            return value;
        }
        notified.await;
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    #[allow(unsafe_code)]
    fn huge_pages_are_disabled_for_the_process() {
        super::disable_transparent_huge_pages().unwrap();
        // SAFETY: PR_GET_THP_DISABLE takes no pointers.
        assert_eq!(
            unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) },
            1
        );
    }
}
