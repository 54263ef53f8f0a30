//! Admission: a bounded number of executions hold a sandbox, a bounded
//! number more wait for one, for a bounded time. Runs on the API side, so
//! `overloaded` answers never wait for a busy guest thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::runtime::{Cancel, Interrupted};

/// Why a request was not admitted.
pub(super) enum Refused {
    Overloaded,
    Interrupted(Interrupted),
}

/// The sandbox slots and the queue in front of them.
pub(super) struct Admission {
    permits: Arc<Semaphore>,
    capacity: usize,
    queued: AtomicUsize,
    max_queue: usize,
    queue_timeout: Duration,
}

impl Admission {
    pub(super) fn new(max_concurrency: usize, max_queue: usize, queue_timeout: Duration) -> Self {
        let capacity = max_concurrency.max(1);
        Self {
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            queued: AtomicUsize::new(0),
            max_queue,
            queue_timeout,
        }
    }

    /// Executions holding a slot now. A slot is held until the guest has
    /// really stopped, even when its caller was answered before.
    pub(super) fn running(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    /// Requests waiting for a slot now.
    pub(super) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Waits for a sandbox slot within the queue's bounds.
    pub(super) async fn admit(
        &self,
        deadline: Instant,
        cancel: &Cancel,
    ) -> Result<OwnedSemaphorePermit, Refused> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Overloaded);
        }
        let _queued = QueueSlot(&self.queued);
        tokio::select! {
            permit = self.permits.clone().acquire_owned() => permit.map_err(|_| Refused::Overloaded),
            _ = tokio::time::sleep(self.queue_timeout) => Err(Refused::Overloaded),
            _ = tokio::time::sleep_until(deadline) => Err(Refused::Interrupted(Interrupted::Timeout)),
            _ = cancel.cancelled() => Err(Refused::Interrupted(Interrupted::Canceled)),
        }
    }
}

struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
