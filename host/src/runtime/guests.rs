//! The runtimes guests run on, apart from the API's: one for calls that end
//! within their first slice, one for calls that run on.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use super::handoff;

/// How long a call must have run for the epoch check to move it to the
/// long-call threads: it moves at the first epoch tick after this, so within
/// one tick more. Long enough that a call that ends in microseconds (an
/// echo) is not moved by a tick that happens to fall inside it. A call that
/// moves also marks its node, so the node's next calls start on the
/// long-call threads (see [`Guests::spawn`]) and a burst of them does not
/// hold the short-call threads a tick each.
pub const FIRST_SLICE: Duration = Duration::from_micros(100);

/// The threads guests run on: worker threads of their own, so the API's
/// runtime never polls a guest, in two tiers.
///
/// Every call starts on the short-call threads (`guest-N`), which keep the
/// API's priority: a call that ends within [`FIRST_SLICE`] (an echo, a
/// lookup, most tools) never waits behind a lower priority. A call still
/// running after that moves, at its next epoch check, to the long-call
/// threads (`guest-long-N`), whose nice value is raised
/// (`GuestThreads::long_nice`, Linux). So however many guests spin, a thread
/// woken for a health check, an admission or a deadline answer takes the CPU
/// from them when it wakes rather than after the rest of their slice, and
/// short calls arriving meanwhile keep their own threads.
///
/// Dropping it stops both runtimes: from a plain thread it waits up to a
/// second for the guests to be dropped (each at its next yield); from inside
/// another runtime, where blocking is not allowed, it lets them go in the
/// background.
#[derive(Debug)]
pub struct GuestRuntime {
    short: Option<tokio::runtime::Runtime>,
    long: Option<tokio::runtime::Runtime>,
    guests: Guests,
}

/// How the guest runtimes' threads are set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestThreads {
    /// Worker threads of each tier.
    pub threads: usize,
    /// Added to the long-call threads' nice value (0 leaves them at the
    /// API's priority).
    pub long_nice: i32,
    /// Run both tiers' threads under `SCHED_BATCH` (see [`batch_scheduling`]).
    pub batch: bool,
}

/// Where guest calls are spawned: a cheap handle to both tiers.
#[derive(Debug, Clone)]
pub struct Guests {
    short: tokio::runtime::Handle,
    long: tokio::runtime::Handle,
}

impl GuestRuntime {
    pub fn start(settings: GuestThreads) -> std::io::Result<Self> {
        static SHORT: AtomicUsize = AtomicUsize::new(0);
        static LONG: AtomicUsize = AtomicUsize::new(0);
        let GuestThreads {
            threads,
            long_nice,
            batch,
        } = settings;
        let short = tier(threads, batch, 0, || {
            format!("guest-{}", SHORT.fetch_add(1, Ordering::Relaxed))
        })?;
        let long = tier(threads, batch, long_nice, || {
            format!("guest-long-{}", LONG.fetch_add(1, Ordering::Relaxed))
        })?;
        let guests = Guests {
            short: short.handle().clone(),
            long: long.handle().clone(),
        };
        Ok(Self {
            short: Some(short),
            long: Some(long),
            guests,
        })
    }

    pub fn guests(&self) -> &Guests {
        &self.guests
    }
}

/// One tier's runtime.
fn tier(
    threads: usize,
    batch: bool,
    nice: i32,
    name: impl Fn() -> String + Send + Sync + 'static,
) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name_fn(name)
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
        .build()
}

impl Drop for GuestRuntime {
    fn drop(&mut self) {
        let blocking_allowed = tokio::runtime::Handle::try_current().is_err();
        for runtime in [self.short.take(), self.long.take()].into_iter().flatten() {
            if blocking_allowed {
                runtime.shutdown_timeout(Duration::from_secs(1));
            } else {
                runtime.shutdown_background();
            }
        }
    }
}

impl Guests {
    /// Runs `call` on the short-call threads, or on the long-call threads if
    /// `runs_long` is set when its turn comes (a hint kept per node: its
    /// last call ran long). On the short-call threads, if its guest asks to
    /// move (see [`move_to_long_calls`]), the rest of it runs on the
    /// long-call threads. Boxed by the caller: a guest call's future is
    /// large, and moving it unboxed would copy it.
    pub fn spawn(&self, runs_long: Arc<AtomicBool>, call: GuestCall) {
        drop(self.short.spawn(FirstSlice {
            call: Some(call),
            runs_long,
            long: self.long.clone(),
        }));
    }
}

thread_local! {
    /// Set by a guest's epoch check, inside the poll of its call, when the
    /// call has run past its first slice.
    static MOVE: Cell<bool> = const { Cell::new(false) };
}

/// Asks that the call being polled on this thread move to the long-call
/// threads once it yields. Called by the epoch check of a guest that ran
/// past [`FIRST_SLICE`]; elsewhere (a pack's `describe` at load, a call
/// already on the long-call threads) it has no effect.
pub(crate) fn move_to_long_calls() {
    MOVE.set(true);
}

/// A guest call as spawned.
pub type GuestCall = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A call on the short-call threads, until its guest asks to move.
struct FirstSlice {
    call: Option<GuestCall>,
    runs_long: Arc<AtomicBool>,
    long: tokio::runtime::Handle,
}

impl FirstSlice {
    /// Hands the call to the long-call threads; this task ends.
    fn move_on(&mut self) -> Poll<()> {
        if let Some(call) = self.call.take() {
            drop(self.long.spawn(call));
        }
        Poll::Ready(())
    }
}

impl Future for FirstSlice {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Read when its turn comes rather than when it was spawned: calls
        // that arrived together behind one that ran long go straight on.
        if self.runs_long.load(Ordering::Relaxed) {
            return self.move_on();
        }
        let Some(call) = self.call.as_mut() else {
            return Poll::Ready(());
        };
        MOVE.set(false);
        let polled = call.as_mut().poll(cx);
        if polled.is_pending() && MOVE.replace(false) {
            // The guest yielded (its future resolves when polled again, from
            // any thread): the long-call runtime polls it from here on. The
            // wake-up it left for this task finds the task ended.
            return self.move_on();
        }
        if polled.is_ready() {
            self.call = None;
        }
        polled
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

    /// The calling thread's name, scheduling policy and nice value.
    #[allow(unsafe_code)]
    fn here() -> (String, i32, i32) {
        let name = std::thread::current().name().unwrap_or_default().to_owned();
        // SAFETY: neither call takes memory of ours; pid 0 (PRIO_PROCESS)
        // is the calling thread.
        let (policy, nice) = unsafe {
            (
                libc::sched_getscheduler(0),
                libc::getpriority(libc::PRIO_PROCESS, 0),
            )
        };
        (name, policy, nice)
    }

    const SETTINGS: GuestThreads = GuestThreads {
        threads: 1,
        long_nice: 7,
        batch: true,
    };

    /// Where a call ran before and after its first yield, asking to move
    /// (or not) before it.
    fn before_and_after_a_yield(
        settings: GuestThreads,
        ask: bool,
    ) -> ((String, i32, i32), (String, i32, i32)) {
        let runtime = GuestRuntime::start(settings).expect("guest runtime");
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.guests().spawn(
            Arc::default(),
            Box::pin(async move {
                let before = here();
                if ask {
                    move_to_long_calls();
                }
                tokio::task::yield_now().await;
                tx.send((before, here())).unwrap();
            }),
        );
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the call ran to its end")
    }

    #[test]
    fn a_call_that_asks_moves_to_the_long_call_threads_at_its_yield() {
        let (before, after) = before_and_after_a_yield(SETTINGS, true);
        assert!(before.0.starts_with("guest-") && !before.0.starts_with("guest-long-"));
        assert_eq!((before.1, before.2), (libc::SCHED_BATCH, 0));
        assert!(after.0.starts_with("guest-long-"), "{after:?}");
        assert_eq!((after.1, after.2), (libc::SCHED_BATCH, 7));
    }

    #[test]
    fn a_call_that_does_not_ask_stays_on_the_short_call_threads() {
        let (before, after) = before_and_after_a_yield(SETTINGS, false);
        for (name, _, nice) in [before, after] {
            assert!(!name.starts_with("guest-long-"), "{name}");
            assert_eq!(nice, 0);
        }
    }

    #[test]
    fn an_ask_left_by_other_code_on_the_thread_does_not_move_a_call() {
        let runtime = GuestRuntime::start(SETTINGS).expect("guest runtime");
        let (tx, rx) = std::sync::mpsc::channel();
        let guests = runtime.guests().clone();
        // A pack's describe, say, asked on this thread and was not a call.
        runtime.guests().spawn(
            Arc::default(),
            Box::pin(async move {
                move_to_long_calls();
                guests.spawn(
                    Arc::default(),
                    Box::pin(async move {
                        tokio::task::yield_now().await;
                        tx.send(here()).unwrap();
                    }),
                );
            }),
        );
        let (name, _, _) = rx.recv_timeout(Duration::from_secs(10)).expect("ran");
        assert!(!name.starts_with("guest-long-"), "{name}");
    }

    #[test]
    fn a_call_of_a_node_that_runs_long_starts_on_the_long_call_threads() {
        let runtime = GuestRuntime::start(SETTINGS).expect("guest runtime");
        let (tx, rx) = std::sync::mpsc::channel();
        let hint = Arc::new(AtomicBool::new(true));
        runtime.guests().spawn(
            hint.clone(),
            Box::pin(async move { tx.send(here()).unwrap() }),
        );
        let (name, _, nice) = rx.recv_timeout(Duration::from_secs(10)).expect("ran");
        assert!(name.starts_with("guest-long-"), "{name}");
        assert_eq!(nice, 7);
        // The hint is the node's to set and clear, not the runtime's.
        assert!(hint.load(Ordering::Relaxed));
    }

    #[test]
    fn both_tiers_run_under_the_policy_asked_for() {
        let normal = GuestThreads {
            batch: false,
            ..SETTINGS
        };
        let (before, after) = before_and_after_a_yield(normal, true);
        assert_eq!((before.1, after.1), (libc::SCHED_OTHER, libc::SCHED_OTHER));
    }
}
