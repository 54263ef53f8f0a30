//! The runtime guests run on, apart from the API's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::handoff;

/// The runtime guests run on: worker threads of their own, named `guest-N`,
/// so the API's runtime never polls a guest. On Linux their nice value can be
/// raised (`GuestThreads::nice`), so on a saturated machine the API's
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
    /// Run them under `SCHED_BATCH` (see [`batch_scheduling`]).
    pub batch: bool,
}

impl GuestRuntime {
    pub fn start(settings: GuestThreads) -> std::io::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let GuestThreads { nice, batch, .. } = settings;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.threads.max(1))
            .thread_name_fn(|| format!("guest-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
            .on_thread_start(move || {
                if batch {
                    batch_scheduling();
                }
                lower_thread_priority(nice);
                handoff::hold_wakeups(handoff::MAX_HOLD);
            })
            // Results held on a thread are delivered before it sleeps.
            .on_thread_park(handoff::deliver_held)
            .on_thread_stop(handoff::deliver_held)
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

/// Puts the calling thread under `SCHED_BATCH` (Linux): when it wakes, it
/// does not preempt the thread running on its CPU; the scheduler's tick does
/// that within a few milliseconds. The guests' threads run under it, so an
/// API thread handing them calls keeps its core until it has read every
/// request that is ready, and the guest thread then runs them all; their
/// results come back together through [`handoff`](super::handoff). The API's
/// threads keep the default policy, so one woken by a request may preempt a
/// guest without waiting for the tick.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn batch_scheduling() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `sched_setscheduler` reads the one `sched_param` passed by
    // reference for the duration of the call; pid 0 is the calling thread.
    let applied = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if applied == -1 {
        tracing::debug!("could not put the thread under SCHED_BATCH");
    }
}

#[cfg(not(target_os = "linux"))]
fn batch_scheduling() {}

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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    fn policy() -> i32 {
        // SAFETY: no arguments but the calling thread's pid 0.
        unsafe { libc::sched_getscheduler(0) }
    }

    fn policy_on(settings: GuestThreads) -> i32 {
        let guests = GuestRuntime::start(settings).expect("guest runtime");
        let (tx, rx) = std::sync::mpsc::channel();
        guests
            .handle()
            .spawn(async move { tx.send(policy()).unwrap() });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the task ran")
    }

    #[test]
    fn guest_threads_run_under_the_policy_asked_for() {
        let batch = GuestThreads {
            threads: 1,
            nice: 0,
            batch: true,
        };
        assert_eq!(policy_on(batch), libc::SCHED_BATCH);
        let normal = GuestThreads {
            batch: false,
            ..batch
        };
        assert_eq!(policy_on(normal), libc::SCHED_OTHER);
    }
}
