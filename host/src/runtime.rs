//! The wasmtime engine, its epoch ticker, per-execution store state and the
//! host functions every pack is granted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use tokio::sync::Notify;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    UpdateDeadline,
};

use crate::world::{self, clock, log, random, timer};

/// How often the epoch advances. A running guest yields to the async runtime
/// at every tick, so this bounds how long one guest holds a worker thread.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Largest single `get-random-bytes` request the host serves.
const MAX_RANDOM_BYTES: u64 = 1 << 20;

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

/// The runtime guests run on: worker threads of their own, named `guest-N`,
/// so the API's runtime never polls a guest. On Linux the threads run at a
/// lower priority (a higher nice value), so on a saturated machine the API's
/// threads win the CPU and health checks, admission and deadline answers
/// stay prompt however many guests spin.
///
/// Dropping it stops the runtime: from a plain thread it waits up to a second
/// for the guests to be dropped (each at its next yield, within an epoch
/// tick); from inside another runtime, where blocking is not allowed, it lets
/// them go in the background.
#[derive(Debug)]
pub struct GuestRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

/// How the guest runtime's threads are set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestThreads {
    /// Worker threads.
    pub threads: usize,
    /// Added to the threads' nice value (0 leaves their priority as it is).
    pub nice: i32,
}

impl GuestRuntime {
    pub fn start(settings: GuestThreads) -> std::io::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nice = settings.nice;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.threads.max(1))
            .thread_name_fn(|| format!("guest-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
            .on_thread_start(move || lower_thread_priority(nice))
            .enable_time()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("running until dropped")
            .handle()
    }
}

impl Drop for GuestRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                runtime.shutdown_background();
            } else {
                runtime.shutdown_timeout(Duration::from_secs(1));
            }
        }
    }
}

/// Raises the calling thread's nice value by `nice` (Linux schedules threads
/// one by one, so only this thread is affected).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn lower_thread_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: `nice` takes a plain integer and changes only the calling
    // thread's scheduling priority; it touches no memory of ours.
    let applied = unsafe { libc::nice(nice) };
    if applied == -1 {
        tracing::debug!(nice, "could not lower the guest thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_thread_priority(_nice: i32) {}

/// Marker error raised into the guest when it asks for more memory than the
/// execution may hold; the executor maps it to `memory_limit_exceeded`.
#[derive(Debug, thiserror::Error)]
#[error("linear memory limit of {limit} bytes exceeded (asked for {desired})")]
pub struct MemoryLimitExceeded {
    pub limit: usize,
    pub desired: usize,
}

/// Everything one execution's `Store` holds. Created fresh per execution.
#[derive(Debug)]
pub struct StoreState {
    /// Tags the guest's log lines.
    pub node_run_id: Arc<str>,
    pub node_type_id: Arc<str>,
    memory_limit: usize,
    memory_used: usize,
    logs_left: u32,
    logs_dropped: u32,
}

impl StoreState {
    pub fn new(limits: &RuntimeLimits, node_run_id: Arc<str>, node_type_id: Arc<str>) -> Self {
        Self {
            node_run_id,
            node_type_id,
            memory_limit: limits.max_memory_bytes,
            memory_used: 0,
            logs_left: limits.max_log_lines,
            logs_dropped: 0,
        }
    }

    pub fn logs_dropped(&self) -> u32 {
        self.logs_dropped
    }
}

impl ResourceLimiter for StoreState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // The budget covers every memory of the instance together.
        let total = self.memory_used - current.min(self.memory_used) + desired;
        if total > self.memory_limit {
            return Err(wasmtime::Error::new(MemoryLimitExceeded {
                limit: self.memory_limit,
                desired: total,
            }));
        }
        self.memory_used = total;
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

/// How a guest call was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Interrupted {
    #[error("time limit reached")]
    Timeout,
    #[error("canceled")]
    Canceled,
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

/// The error a guest call fails with when it was interrupted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InterruptedError(pub Interrupted);

/// A fresh store for one call: memory limits, and an epoch guard that stops
/// the guest at `deadline` or on `cancel` and otherwise yields to the async
/// runtime at every tick, so a spinning guest never monopolises a thread.
///
/// A guest that yielded is checked again the moment it resumes, before it
/// runs another slice: with many guests on a thread its turn may come long
/// after its deadline or cancellation, and it then stops at once instead of
/// spending a whole tick of CPU first.
pub fn new_store(
    engine: &Engine,
    state: StoreState,
    deadline: std::time::Instant,
    cancel: Option<Arc<Cancel>>,
) -> Store<StoreState> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| s);
    let mut resumed = false;
    store.epoch_deadline_callback(move |_| {
        if cancel.as_deref().is_some_and(Cancel::is_cancelled) {
            Err(wasmtime::Error::new(InterruptedError(
                Interrupted::Canceled,
            )))
        } else if std::time::Instant::now() >= deadline {
            Err(wasmtime::Error::new(InterruptedError(Interrupted::Timeout)))
        } else if resumed {
            // The check right after a yield passed: run until the next tick.
            resumed = false;
            Ok(UpdateDeadline::Continue(1))
        } else {
            resumed = true;
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

/// Adds the host functions of the `node-pack` world to `linker`.
pub fn add_grants(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    world::NodePack::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)
}

impl log::Host for StoreState {
    fn log(
        &mut self,
        level: log::Level,
        message: String,
        fields: Vec<log::Field>,
    ) -> wasmtime::Result<()> {
        if self.logs_left == 0 {
            self.logs_dropped = self.logs_dropped.saturating_add(1);
            return Ok(());
        }
        self.logs_left -= 1;
        crate::grants::log::emit(
            level,
            &self.node_run_id,
            &self.node_type_id,
            &message,
            &fields,
        );
        Ok(())
    }
}

impl clock::Host for StoreState {
    fn now(&mut self) -> wasmtime::Result<clock::Datetime> {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ok(clock::Datetime {
            seconds: d.as_secs(),
            nanoseconds: d.subsec_nanos(),
        })
    }

    fn monotonic_now(&mut self) -> wasmtime::Result<u64> {
        Ok(monotonic_origin().elapsed().as_nanos() as u64)
    }
}

fn monotonic_origin() -> std::time::Instant {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(std::time::Instant::now)
}

impl random::Host for StoreState {
    fn get_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        if len > MAX_RANDOM_BYTES {
            return Err(wasmtime::format_err!(
                "get-random-bytes: {len} bytes asked, at most {MAX_RANDOM_BYTES} per call"
            ));
        }
        let mut bytes = vec![0; len as usize];
        rand::rng().fill_bytes(&mut bytes);
        Ok(bytes)
    }

    fn get_random_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(rand::rng().next_u64())
    }
}

impl timer::Host for StoreState {
    async fn sleep(&mut self, duration_ms: u64) {
        // The execution's deadline is enforced around the whole call, so a
        // long sleep is cut short there; this only parks the fiber.
        tokio::time::sleep(Duration::from_millis(duration_ms)).await;
    }
}
