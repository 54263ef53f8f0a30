//! The PostgreSQL store: what lets several coordinator processes share runs and work.
//!
//! - **Writes**: as with SQLite, one writer thread per process takes every job that
//!   is waiting, runs each in its own savepoint of one transaction and commits once
//!   (group commit), then answers the callers and publishes the effects. It talks
//!   to the database with the synchronous `postgres` client, because a job runs
//!   synchronously inside the transaction ([`RunTx`]); it reconnects when the
//!   connection breaks (the jobs of that moment fail and their callers retry).
//! - **Reads**: `tokio-postgres` clients from a `deadpool-postgres` pool, on the
//!   calling task, with statements prepared once per connection.
//! - **Several processes**: a NodeRun's dispatch is claimed with
//!   `FOR UPDATE SKIP LOCKED` under a lease that names its owner; a run's next seq
//!   is taken by updating the run's row, which stays locked until the commit, so
//!   events stay gapless whichever process writes them. Every commit that added
//!   events sends `NOTIFY` with the runs it changed; each process `LISTEN`s and wakes
//!   its own event streams for changes other processes made.
//! - **Durability**: `flush` commits with `synchronous_commit = on`, `fast` with
//!   `off` (a database crash may lose the last commits; it stays consistent).
//!
//! TLS is not supported: reach the database over a local socket, a trusted network
//! or a TLS-terminating proxy.

mod migrations;
mod tx;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arp_types::run::Run;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::config::Durability;
use crate::store::writer::{Batches, Writer};
use crate::store::{
    BoxFuture, CommitEffects, EffectSink, EventPage, EventPageRequest, JobDone, NodeRunRow,
    OverdueNodeRun, RunStore, RunTx, StoreError, WriteFault, WriteJob,
};
use tx::{Conn, Params, PgTx};

/// Most jobs committed together; bounds the latency a single commit adds. Each job
/// is a subtransaction: PostgreSQL keeps up to 64 of a transaction in shared memory
/// (more slow down every other session's snapshots while it runs).
const MAX_BATCH: usize = 64;
/// Read connections per process.
const READ_POOL: usize = 16;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// No statement runs longer (unless the URL's `options` set another).
const STATEMENT_TIMEOUT: &str = "30s";
/// Waits between attempts to reconnect the listener.
const LISTEN_RETRY: Duration = Duration::from_secs(1);
/// The channel commits notify and every coordinator listens on.
const CHANNEL: &str = "jarvis_run_events";

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        StoreError::Database(Box::new(err))
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        StoreError::Database(Box::new(err))
    }
}

/// The PostgreSQL backend of [`RunStore`].
pub struct PgStore {
    writer: Writer,
    reads: Pool,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stop_listening: watch::Sender<bool>,
    fault: Arc<AtomicU8>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

/// Parses a `postgres://` URL (or key=value string) with this store's connection settings.
pub fn connection_config(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.connect_timeout(CONNECT_TIMEOUT);
    if config.get_application_name().is_none() {
        config.application_name("jarvis-run-coordinator");
    }
    // No statement runs longer on any of the store's connections (a hung database or
    // a lock never released fails the statement, and its callers retry or answer 503).
    let timeout = format!("-c statement_timeout={STATEMENT_TIMEOUT}");
    let options = match config.get_options() {
        Some(given) if given.contains("statement_timeout") => given.to_owned(),
        Some(given) => format!("{given} {timeout}"),
        None => timeout,
    };
    config.options(&options);
    Ok(config)
}

impl PgStore {
    /// Connects to the database at `url`, brings its schema up to date (serialised
    /// with any other coordinator doing the same), starts the writer thread and the
    /// listener. `tag` names this process in notifications; every commit's effects,
    /// and other processes' changed runs, go to `sink`.
    pub async fn open(
        url: &str,
        durability: Durability,
        tag: &str,
        sink: EffectSink,
    ) -> Result<Self, StoreError> {
        let config = connection_config(url)?;
        let (mut client, connection) = config.connect(NoTls).await?;
        let driver = tokio::spawn(connection);
        let migrated = migrations::migrate(&mut client).await;
        drop(client);
        let _ = driver.await;
        migrated?;

        let sink: Arc<EffectSink> = Arc::new(sink);
        let fault = Arc::new(AtomicU8::new(WriteFault::None as u8));
        let committer = Committer {
            config: config.clone(),
            synchronous_commit: match durability {
                Durability::Flush => "on",
                Durability::Fast => "off",
            },
            tag: tag.to_owned(),
            sink: sink.clone(),
            fault: fault.clone(),
        };
        // The synchronous client runs a runtime of its own: connect on the writer's thread.
        let (ready, connected) = tokio::sync::oneshot::channel();
        let writer = Writer::spawn(MAX_BATCH, move |batches| match committer.connect() {
            Ok(conn) => {
                let _ = ready.send(Ok(()));
                committer.run(conn, batches);
            }
            Err(err) => {
                let _ = ready.send(Err(err));
            }
        })?;
        connected.await.map_err(|_| StoreError::Panicked)??;

        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let reads = Pool::builder(manager)
            .max_size(READ_POOL)
            .build()
            .map_err(|e| StoreError::Commit(format!("read pool: {e}")))?;
        let (stop_listening, stopped) = watch::channel(false);
        let listener = tokio::spawn(listen(config, tag.to_owned(), sink, stopped));
        Ok(Self {
            writer,
            reads,
            listener: Mutex::new(Some(listener)),
            stop_listening,
            fault,
        })
    }

    async fn query(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let client = self.reads.get().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query(&statement, params).await?)
    }
}

impl RunStore for PgStore {
    fn submit(&self, job: WriteJob) -> Result<(), StoreError> {
        self.writer.submit(job)
    }

    fn run<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<Option<Run>, StoreError>> {
        Box::pin(async move {
            let rows = self.query(tx::LOAD_RUN, &[&run_id]).await?;
            rows.first().map(tx::decode_run).transpose()
        })
    }

    fn run_terminal<'a>(
        &'a self,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<bool>, StoreError>> {
        Box::pin(async move {
            let rows = self.query(&tx::RUN_TERMINAL, &[&run_id]).await?;
            Ok(rows.first().map(|r| r.get(0)))
        })
    }

    fn node_run<'a>(
        &'a self,
        node_run_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<NodeRunRow>, StoreError>> {
        Box::pin(async move {
            let rows = self.query(tx::LOAD_NODE_RUN, &[&node_run_id]).await?;
            rows.first().map(tx::decode_node_run_row).transpose()
        })
    }

    fn event_page<'a>(
        &'a self,
        req: EventPageRequest<'a>,
    ) -> BoxFuture<'a, Result<EventPage, StoreError>> {
        // Three statements, each on a newer snapshot than the one before, in this
        // order: a run read terminal has its run_completed among the events read
        // next, and every NodeRun an event names is in the tree read last.
        Box::pin(async move {
            let client = self.reads.get().await?;
            let terminal_sql = client.prepare_cached(&tx::RUN_TERMINAL).await?;
            let terminal = client
                .query_opt(&terminal_sql, &[&req.run_id])
                .await?
                .map(|r| r.get(0));
            let events_sql = client.prepare_cached(tx::EVENTS_AFTER).await?;
            let after = req.after_seq.map_or(-1, |a| a as i64);
            let limit = req.limit as i64;
            let events: Vec<_> = client
                .query(&events_sql, &[&req.run_id, &after, &limit])
                .await?
                .iter()
                .map(tx::decode_event)
                .collect();
            let tree = if req.with_tree && !events.is_empty() {
                let tree_sql = client.prepare_cached(tx::NODE_RUN_TREE).await?;
                let rows = client.query(&tree_sql, &[&req.run_id]).await?;
                Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            } else {
                None
            };
            Ok(EventPage {
                terminal,
                events,
                tree,
            })
        })
    }

    fn overdue_node_runs(
        &self,
        before: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<OverdueNodeRun>, StoreError>> {
        Box::pin(async move {
            let rows = self
                .query(&tx::OVERDUE, &[&before, &(limit as i64)])
                .await?;
            rows.iter().map(tx::decode_overdue).collect()
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        let _ = self.stop_listening.send(true);
        let listener = self.listener.lock().unwrap().take();
        let writer = self.writer.close();
        Box::pin(async move {
            if let Some(listener) = listener {
                let _ = listener.await;
            }
            writer.await;
            self.reads.close();
        })
    }

    fn inject_write_fault(&self, fault: WriteFault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }
}

/// The writer thread's side: (re)connects, commits batches, publishes their effects.
struct Committer {
    config: tokio_postgres::Config,
    synchronous_commit: &'static str,
    tag: String,
    sink: Arc<EffectSink>,
    fault: Arc<AtomicU8>,
}

impl Committer {
    fn connect(&self) -> Result<Conn, StoreError> {
        let mut client = postgres::Config::from(self.config.clone()).connect(NoTls)?;
        client.batch_execute(&format!(
            "SET synchronous_commit = {}",
            self.synchronous_commit
        ))?;
        Ok(Conn::new(client))
    }

    fn run(&self, conn: Conn, mut batches: Batches) {
        let mut conn = Some(conn);
        let mut applied_fault = WriteFault::None as u8;
        while let Some(batch) = batches.next() {
            if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
                conn = match self.connect() {
                    Ok(fresh) => {
                        tracing::info!("the store's writer reconnected to the database");
                        applied_fault = WriteFault::None as u8;
                        Some(fresh)
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "the store's writer cannot reach the database");
                        batch.into_iter().for_each(WriteJob::refuse);
                        continue;
                    }
                };
            }
            let Some(c) = conn.as_mut() else { continue };
            let wanted = self.fault.load(Ordering::SeqCst);
            if wanted != applied_fault {
                match apply_fault(c, wanted) {
                    Ok(()) => applied_fault = wanted,
                    Err(e) => {
                        tracing::error!(error = %e, "could not apply the injected write fault")
                    }
                }
            }
            self.commit_batch(c, batch);
        }
    }

    /// Runs `batch` in one transaction, each job in its own savepoint; commits; answers.
    ///
    /// One round trip per job besides its own statements: the savepoint a job kept is
    /// released in the same round trip that sets the next one, and the last one with
    /// the commit (`BEGIN; SAVEPOINT job` … `RELEASE SAVEPOINT job; SAVEPOINT job` …
    /// `RELEASE SAVEPOINT job; COMMIT`). A job that failed is rolled back to its
    /// savepoint, which stays set for the next.
    fn commit_batch(&self, conn: &mut Conn, batch: Vec<WriteJob>) {
        if let Err(e) = conn.client.batch_execute("BEGIN; SAVEPOINT job") {
            tracing::error!(error = %e, "could not begin a write transaction");
            let _ = conn.client.batch_execute("ROLLBACK");
            batch.into_iter().for_each(WriteJob::refuse);
            return;
        }
        let last = batch.len().saturating_sub(1);
        let mut tx = PgTx {
            conn: std::cell::RefCell::new(conn),
            effects: CommitEffects::default(),
            events: Vec::new(),
        };
        let mut done = Vec::with_capacity(batch.len());
        let mut jobs = batch.into_iter().enumerate();
        let mut failed = None;
        for (i, job) in jobs.by_ref() {
            match in_savepoint(&mut tx, job, i == last) {
                Ok(finish) => done.push(finish),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let mut effects = std::mem::take(&mut tx.effects);
        drop(tx);
        if let Some(e) = failed {
            // A savepoint could not be set or undone: nothing of this batch can be trusted.
            tracing::error!(error = %e, "savepoint failed; rolling back the batch");
            let _ = conn.client.batch_execute("ROLLBACK");
            let failed = Arc::new(e);
            for finish in done {
                finish.finish(Err(failed.clone()));
            }
            jobs.for_each(|(_, job)| job.refuse());
            return;
        }
        effects.settle();
        // Fails, and the COMMIT after it is skipped, if a statement of a job that
        // reported success failed (the transaction is then aborted): the batch is
        // rolled back rather than committed short.
        let committed = match self.notify(conn, &effects) {
            Ok(()) => conn
                .client
                .batch_execute("RELEASE SAVEPOINT job; COMMIT")
                .map_err(StoreError::from),
            Err(e) => Err(e),
        }
        .map_err(|e| {
            tracing::error!(error = %e, "commit failed; rolling back the batch");
            let _ = conn.client.batch_execute("ROLLBACK");
            Arc::new(e)
        });
        let ok = committed.is_ok();
        for finish in done {
            finish.finish(committed.clone());
        }
        if ok && !effects.is_empty() {
            (self.sink.as_ref())(effects);
        }
    }

    /// Queues, in the transaction, a notification per changed run for the other
    /// coordinators (PostgreSQL delivers them at the commit, or never).
    fn notify(&self, conn: &mut Conn, effects: &CommitEffects) -> Result<(), StoreError> {
        if effects.changed_runs.is_empty() {
            return Ok(());
        }
        conn.query(tx::NOTIFY, &[&CHANNEL, &self.tag, &effects.changed_runs])?;
        Ok(())
    }
}

/// Runs `job` in the savepoint `commit_batch` set; rolls back to it if the job
/// failed, else releases it and sets the next one (unless `last`).
fn in_savepoint(tx: &mut PgTx<'_>, job: WriteJob, last: bool) -> Result<JobDone, StoreError> {
    let mark = tx.effects.mark();
    let mut done = job.run(tx as &mut dyn RunTx);
    if done.keep
        && let Err(e) = tx.flush_events()
    {
        // The job's events could not be written: the job fails, not the batch.
        tracing::warn!(error = %e, "writing a job's events failed; rolling the job back");
        done = done.fail(e);
    }
    tx.events.clear();
    let client = &mut tx.conn.get_mut().client;
    let next = if !done.keep {
        tx.effects.roll_back_to(mark);
        Some("ROLLBACK TO SAVEPOINT job")
    } else if !last {
        // Fails if a statement of a job that reported success failed: the batch is
        // rolled back rather than committed short.
        Some("RELEASE SAVEPOINT job; SAVEPOINT job")
    } else {
        None
    };
    if let Some(sql) = next
        && let Err(e) = client.batch_execute(sql)
    {
        done.finish(Err(Arc::new(StoreError::from(e))));
        return Err(StoreError::Commit(format!("savepoint: {sql}")));
    }
    Ok(done)
}

/// Puts the writer's session into the fault the test hook asked for: both faults
/// make every write fail (PostgreSQL has no per-session size limit to reach).
fn apply_fault(conn: &mut Conn, fault: u8) -> Result<(), StoreError> {
    let mode = if fault == WriteFault::None as u8 {
        "READ WRITE"
    } else {
        "READ ONLY"
    };
    conn.client.batch_execute(&format!(
        "SET SESSION CHARACTERISTICS AS TRANSACTION {mode}"
    ))?;
    Ok(())
}

/// Listens for other coordinators' commits and wakes this process's event streams;
/// reconnects when the connection drops (streams re-read on their own meanwhile).
async fn listen(
    config: tokio_postgres::Config,
    tag: String,
    sink: Arc<EffectSink>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = listen_once(&config, &tag, &sink) => {}
            _ = stop.changed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(LISTEN_RETRY) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn listen_once(config: &tokio_postgres::Config, tag: &str, sink: &EffectSink) {
    let (client, mut connection) = match config.connect(NoTls).await {
        Ok(pair) => pair,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for other coordinators' changes");
            return;
        }
    };
    let (notes, mut received) = tokio::sync::mpsc::unbounded_channel();
    // The connection yields notifications only while it is polled.
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let drive = async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    if notes.send(note).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "the listening connection failed");
                    return;
                }
            }
        }
    };
    let handle = async {
        if let Err(err) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
            tracing::warn!(error = %err, "LISTEN failed");
            return;
        }
        while let Some(note) = received.recv().await {
            let Some((from, run_id)) = note.payload().split_once(' ') else {
                continue;
            };
            // This process's own commits woke its streams already.
            if from != tag {
                sink(CommitEffects {
                    changed_runs: vec![run_id.to_owned()],
                    ..CommitEffects::default()
                });
            }
        }
    };
    tokio::select! {
        () = drive => {}
        () = handle => {}
    }
}
