//! Results handed from the guest runtime's threads to the API's, with the
//! wake-ups batched.
//!
//! A guest thread that finishes a call stores its result at once but holds the
//! wake-up of the API task waiting for it until the thread is about to park,
//! a guest has held the thread for a slice, [`MAX_HELD`] wake-ups are
//! held, or the oldest has waited [`MAX_HOLD`]. Waking the API's thread for
//! each result would preempt the guest thread once per call where the two
//! share a core; held, the results of a burst of calls cross in one switch,
//! and the API's threads can keep the ordinary scheduling policy, which lets
//! them preempt guests when a request arrives rather than at the scheduler's
//! next tick.
//!
//! A held wake-up waits at most for what the thread runs next before one of
//! those: the rest of one guest's slice (at most 10 epoch ticks, 10 ms) or one call's
//! validation (bounded by the schema limits at load). A waiter that is polled
//! for another reason (its deadline, a cancel) sees a stored result whether
//! or not it was woken for it, so a result stored before the deadline is the
//! answer even if its wake-up was still held.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Wake-ups a thread holds before it delivers them all.
pub const MAX_HELD: usize = 64;

/// Longest a held wake-up waits while its thread keeps running short calls.
pub const MAX_HOLD: Duration = Duration::from_micros(500);

/// A one-shot channel whose sender, on a thread that holds wake-ups (see
/// [`hold_wakeups`]), stores the value at once and wakes the receiver later.
pub fn handoff<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(State::Waiting(None)),
    });
    (
        Sender {
            slot: Some(slot.clone()),
        },
        Receiver { slot },
    )
}

struct Slot<T> {
    state: Mutex<State<T>>,
}

enum State<T> {
    /// No value yet; the receiver's waker, once it has been polled.
    Waiting(Option<Waker>),
    Ready(T),
    /// The value was received.
    Taken,
    /// The sender was dropped without a value.
    Closed,
}

impl<T> Slot<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing runs under the lock that could panic midway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the state; the receiver's waker, if it was waiting.
    fn settle(&self, state: State<T>) -> Option<Waker> {
        match std::mem::replace(&mut *self.lock(), state) {
            State::Waiting(waker) => waker,
            _ => None,
        }
    }
}

/// Sends one value; dropped without sending, it wakes the receiver at once
/// with `None` (the guest side panicked or its runtime shut down).
pub struct Sender<T> {
    slot: Option<Arc<Slot<T>>>,
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl<T> Sender<T> {
    pub fn send(mut self, value: T) {
        let slot = self.slot.take().expect("a sender sends once");
        if let Some(waker) = slot.settle(State::Ready(value)) {
            hold(waker);
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take()
            && let Some(waker) = slot.settle(State::Closed)
        {
            waker.wake();
        }
    }
}

/// Completes with the value sent, or `None` if the sender was dropped.
pub struct Receiver<T> {
    slot: Arc<Slot<T>>,
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

impl<T> Future for Receiver<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.slot.lock();
        match std::mem::replace(&mut *state, State::Taken) {
            State::Ready(value) => Poll::Ready(Some(value)),
            State::Closed | State::Taken => Poll::Ready(None),
            State::Waiting(waker) => {
                let waker = match waker {
                    Some(w) if w.will_wake(cx.waker()) => w,
                    _ => cx.waker().clone(),
                };
                *state = State::Waiting(Some(waker));
                Poll::Pending
            }
        }
    }
}

/// The wake-ups a thread holds, once [`hold_wakeups`] was called on it.
struct Held {
    wakers: Vec<Waker>,
    /// When the oldest of them was held.
    since: Instant,
    /// How long the oldest may wait while the thread keeps running calls.
    max_hold: Duration,
}

impl Held {
    /// Holds `waker`; the batch to wake now, if it is full or old enough.
    fn push(&mut self, waker: Waker) -> Option<Vec<Waker>> {
        if self.wakers.is_empty() {
            // The first of a batch is its oldest: nothing is due yet.
            self.since = Instant::now();
            self.wakers.push(waker);
            return None;
        }
        self.wakers.push(waker);
        (self.wakers.len() >= MAX_HELD || self.since.elapsed() >= self.max_hold)
            .then(|| self.take())
    }

    fn take(&mut self) -> Vec<Waker> {
        std::mem::replace(&mut self.wakers, Vec::with_capacity(MAX_HELD))
    }
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Makes senders on the calling thread hold their wake-ups until
/// [`deliver_held`], the oldest for at most `max_hold` ([`MAX_HOLD`] on the
/// guest threads) while the thread keeps running calls. Call it where the
/// thread starts, and `deliver_held` before the thread parks or stops.
pub fn hold_wakeups(max_hold: Duration) {
    HELD.with(|held| {
        held.borrow_mut().get_or_insert_with(|| Held {
            wakers: Vec::with_capacity(MAX_HELD),
            since: Instant::now(),
            max_hold,
        });
    });
}

fn hold(waker: Waker) {
    let due = HELD.with(|held| match held.borrow_mut().as_mut() {
        Some(held) => held.push(waker),
        None => Some(vec![waker]),
    });
    wake_all(due);
}

/// Delivers every wake-up the calling thread holds.
pub fn deliver_held() {
    let due = HELD.with(|held| {
        held.borrow_mut()
            .as_mut()
            .filter(|held| !held.wakers.is_empty())
            .map(Held::take)
    });
    wake_all(due);
}

/// Woken outside the thread's borrow of its held wake-ups: a waker may run
/// code that holds again.
fn wake_all(due: Option<Vec<Waker>>) {
    for waker in due.into_iter().flatten() {
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_value_sent_before_the_receiver_waits_is_received() {
        let (tx, rx) = handoff();
        tx.send(7);
        assert_eq!(rx.await, Some(7));
    }

    #[tokio::test]
    async fn a_dropped_sender_ends_the_wait_with_none() {
        let (tx, rx) = handoff::<u8>();
        let waiting = tokio::spawn(rx);
        tokio::task::yield_now().await;
        drop(tx);
        let got = tokio::time::timeout(Duration::from_secs(10), waiting).await;
        assert_eq!(got.expect("woken").expect("joined"), None);
    }

    /// Counts its wake-ups.
    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A receiver polled once with `waker`, so it waits with it.
    fn waiting(waker: &Waker) -> (Sender<u8>, Receiver<u8>) {
        let (tx, mut rx) = handoff();
        let mut cx = Context::from_waker(waker);
        assert!(Pin::new(&mut rx).poll(&mut cx).is_pending());
        (tx, rx)
    }

    #[test]
    fn held_wakeups_are_delivered_together_and_not_before() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let woken = || count.0.load(Ordering::SeqCst);
        // Held by count and delivery alone: a preempted test thread must not
        // make the age bound deliver early.
        hold_wakeups(Duration::from_secs(3600));

        let (tx, mut rx) = waiting(&waker);
        tx.send(1);
        assert_eq!(woken(), 0, "held until delivered");
        let mut cx = Context::from_waker(&waker);
        assert_eq!(
            Pin::new(&mut rx).poll(&mut cx),
            Poll::Ready(Some(1)),
            "stored at once"
        );
        deliver_held();
        assert_eq!(woken(), 1);

        // A full batch is delivered without waiting for the thread to park.
        let (senders, _receivers): (Vec<_>, Vec<_>) =
            (0..MAX_HELD).map(|_| waiting(&waker)).unzip();
        for tx in senders {
            tx.send(1);
        }
        assert_eq!(woken(), 1 + MAX_HELD);
        deliver_held();
        assert_eq!(woken(), 1 + MAX_HELD, "nothing was left held");
    }

    #[test]
    fn a_thread_that_does_not_hold_wakes_at_once() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        std::thread::spawn(move || {
            let (tx, _rx) = waiting(&waker);
            tx.send(1);
        })
        .join()
        .unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_receiver_on_another_runtime_waits_for_the_delivery() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (tx, rx) = handoff();
        let (send_tx, send_rx) = std::sync::mpsc::channel::<()>();
        let (deliver_tx, deliver_rx) = std::sync::mpsc::channel::<()>();
        let guest = std::thread::spawn(move || {
            hold_wakeups(MAX_HOLD);
            send_rx.recv().unwrap();
            tx.send("done");
            deliver_rx.recv().unwrap();
            deliver_held();
        });
        runtime.block_on(async move {
            let received = tokio::spawn(rx);
            // Waiting, with its waker registered, before the value is sent.
            tokio::time::sleep(Duration::from_millis(10)).await;
            send_tx.send(()).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!received.is_finished(), "woken before the delivery");
            deliver_tx.send(()).unwrap();
            let got = tokio::time::timeout(Duration::from_secs(10), received).await;
            assert_eq!(got.expect("woken").expect("joined"), Some("done"));
        });
        guest.join().unwrap();
    }
}
