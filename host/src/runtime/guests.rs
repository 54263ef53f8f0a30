//! The runtime guests run on, apart from the API's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

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
            // Outbound HTTP (grants/http) connects and reads on these threads.
            .enable_io()
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
