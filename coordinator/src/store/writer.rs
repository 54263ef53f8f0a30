//! What every backend's writer thread shares: the job queue, batching, closing and
//! joining. A backend supplies what a batch is (its transaction); this module owns
//! the thread's life.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;

use crate::store::{BoxFuture, StoreError, WriteJob};

enum Message {
    Job(WriteJob),
    /// Finish what was queued before, then end the writer thread.
    Close,
}

/// The jobs as a writer thread takes them: all that are waiting, up to `max` a batch.
#[derive(Debug)]
pub(crate) struct Batches {
    rx: Receiver<Message>,
    max: usize,
    closing: bool,
}

impl Batches {
    /// Waits for the next batch; `None` once the store is closed and every job
    /// queued before was handed out.
    pub(crate) fn next(&mut self) -> Option<Vec<WriteJob>> {
        if self.closing {
            return None;
        }
        let Ok(Message::Job(first)) = self.rx.recv() else {
            return None;
        };
        let mut batch = vec![first];
        while batch.len() < self.max {
            match self.rx.try_recv() {
                Ok(Message::Job(job)) => batch.push(job),
                Ok(Message::Close) => {
                    self.closing = true;
                    break;
                }
                Err(_) => break,
            }
        }
        Some(batch)
    }
}

/// A backend's handle on its writer thread.
#[derive(Debug)]
pub(crate) struct Writer {
    jobs: Mutex<Sender<Message>>,
    closed: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Message::Job(_) => "Job",
            Message::Close => "Close",
        })
    }
}

impl Writer {
    /// Starts the thread `store-writer`, which runs `body` on the batches of at most `max` jobs.
    pub(crate) fn spawn(
        max: usize,
        body: impl FnOnce(Batches) + Send + 'static,
    ) -> Result<Self, StoreError> {
        let (jobs, rx) = std::sync::mpsc::channel();
        let batches = Batches {
            rx,
            max,
            closing: false,
        };
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || body(batches))
            .map_err(|e| StoreError::Commit(e.to_string()))?;
        Ok(Self {
            jobs: Mutex::new(jobs),
            closed: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a job; `Err(Closed)` once the store is closed.
    pub(crate) fn submit(&self, job: WriteJob) -> Result<(), StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        self.jobs
            .lock()
            .unwrap()
            .send(Message::Job(job))
            .map_err(|_| StoreError::Closed)
    }

    /// Stops taking jobs; the future ends when the thread has committed what was
    /// queued and ended.
    pub(crate) fn close(&self) -> BoxFuture<'static, ()> {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.jobs.lock().unwrap().send(Message::Close);
        let thread = self.thread.lock().unwrap().take();
        Box::pin(async move {
            if let Some(thread) = thread {
                // Joining blocks until the last batch is committed: off the runtime's threads.
                let joined = tokio::task::spawn_blocking(move || thread.join()).await;
                if !matches!(joined, Ok(Ok(()))) {
                    tracing::error!("the store's writer thread ended abnormally");
                }
            }
        })
    }
}
