//! The SQLite store: runs, node runs, run events and the dispatch queue in one file.
//!
//! One writer thread owns the only write connection. It takes every job that is
//! waiting, runs each inside its own savepoint of one transaction, commits once
//! (group commit) and only then answers the callers and publishes the commit's
//! effects. Reads use a small pool of read connections (WAL lets them run beside
//! the writer, and a reader never waits for it), on the calling task: they are
//! point lookups and bounded pages served from the page cache, cheaper than a hop
//! to another thread.

mod migrations;
mod tx;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use arp_types::run::Run;
use rusqlite::Connection;

use crate::config::Durability;
use crate::store::writer::{Batches, Writer};
use crate::store::{
    BoxFuture, CommitEffects, EffectSink, EventPage, EventPageRequest, NodeRunRow, OverdueNodeRun,
    RunStore, RunTx, StoreError, WriteFault, WriteJob,
};
use tx::SqliteTx;

/// Most jobs committed together; bounds the latency a single commit adds.
const MAX_BATCH: usize = 512;
/// Read connections kept open for reuse.
const MAX_IDLE_READERS: usize = 64;
/// Prepared statements kept per connection: more than the store uses, so none is parsed twice.
const STATEMENT_CACHE: usize = 64;
/// The WAL is truncated back to this after a checkpoint, so it does not keep its peak size.
const JOURNAL_SIZE_LIMIT: i64 = 16 * 1024 * 1024;

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Database(Box::new(err))
    }
}

/// The SQLite backend of [`RunStore`].
#[derive(Debug)]
pub struct SqliteStore {
    writer: Writer,
    readers: ReaderPool,
    fault: Arc<AtomicU8>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, brings its schema up to
    /// date and starts the writer thread, which hands every commit's effects to `sink`.
    pub fn open(path: &Path, durability: Durability, sink: EffectSink) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Commit(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        // Takes effect only in a new database (before its first table): pages freed
        // by retention can then be returned to the file system. An older file reuses
        // them for new rows instead, so it stops growing but does not shrink.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // In WAL mode FULL fsyncs the log at every commit, so an acknowledged change
        // survives power loss; NORMAL fsyncs only at checkpoints, which survives a
        // process crash (kill -9) but may lose the last commits on an OS crash.
        let synchronous = match durability {
            Durability::Flush => "FULL",
            Durability::Fast => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", synchronous)?;
        conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        migrations::migrate(&conn)?;

        let fault = Arc::new(AtomicU8::new(WriteFault::None as u8));
        let writer_fault = fault.clone();
        let writer = Writer::spawn(MAX_BATCH, move |batches| {
            writer_loop(conn, batches, sink, &writer_fault);
        })?;
        Ok(Self {
            writer,
            readers: ReaderPool {
                path: path.to_owned(),
                idle: Mutex::new(Vec::new()),
            },
            fault,
        })
    }

    /// Runs `op` on a read connection (a consistent snapshot), here and now.
    fn read<T>(
        &self,
        op: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.readers.take()?;
        let result = op(&conn);
        self.readers.give_back(conn);
        result
    }
}

/// A read answered before the future is polled: SQLite reads are local and bounded.
fn ready<'a, T: Send + 'a>(value: Result<T, StoreError>) -> BoxFuture<'a, Result<T, StoreError>> {
    Box::pin(std::future::ready(value))
}

impl RunStore for SqliteStore {
    fn submit(&self, job: WriteJob) -> Result<(), StoreError> {
        self.writer.submit(job)
    }

    fn run<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<Option<Run>, StoreError>> {
        ready(self.read(|c| tx::load_run(c, run_id)))
    }

    fn run_terminal<'a>(
        &'a self,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<bool>, StoreError>> {
        ready(self.read(|c| tx::run_terminal(c, run_id)))
    }

    fn node_run<'a>(
        &'a self,
        node_run_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<NodeRunRow>, StoreError>> {
        ready(self.read(|c| tx::load_node_run(c, node_run_id)))
    }

    fn event_page<'a>(
        &'a self,
        req: EventPageRequest<'a>,
    ) -> BoxFuture<'a, Result<EventPage, StoreError>> {
        ready(self.read(|c| {
            let terminal = tx::run_terminal(c, req.run_id)?;
            let events = tx::events_after(c, req.run_id, req.after_seq, req.limit)?;
            let tree = if req.with_tree && !events.is_empty() {
                Some(tx::node_run_tree(c, req.run_id)?)
            } else {
                None
            };
            Ok(EventPage {
                terminal,
                events,
                tree,
            })
        }))
    }

    fn overdue_node_runs(
        &self,
        before: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<OverdueNodeRun>, StoreError>> {
        ready(self.read(|c| tx::overdue_node_runs(c, before, limit)))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.writer.close()
    }

    fn inject_write_fault(&self, fault: WriteFault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }
}

/// Puts the writer connection into the fault the test hook asked for.
fn apply_fault(conn: &Connection, fault: u8) -> rusqlite::Result<()> {
    let read_only = fault == WriteFault::ReadOnly as u8;
    conn.pragma_update(None, "query_only", read_only)?;
    // Below the current size SQLite clamps it to the current size.
    let max_pages: i64 = if fault == WriteFault::Full as u8 {
        1
    } else {
        0xFFFF_FFFE
    };
    conn.query_row(&format!("PRAGMA max_page_count = {max_pages}"), [], |_| {
        Ok(())
    })?;
    Ok(())
}

fn writer_loop(conn: Connection, mut batches: Batches, sink: EffectSink, fault: &AtomicU8) {
    let mut applied_fault = WriteFault::None as u8;
    while let Some(batch) = batches.next() {
        let wanted = fault.load(Ordering::SeqCst);
        if wanted != applied_fault {
            match apply_fault(&conn, wanted) {
                Ok(()) => applied_fault = wanted,
                Err(e) => tracing::error!(error = %e, "could not apply the injected write fault"),
            }
        }
        commit_batch(&conn, batch, &sink);
    }
}

/// Runs `batch` in one transaction, each job in its own savepoint; commits; answers.
fn commit_batch(conn: &Connection, batch: Vec<WriteJob>, sink: &EffectSink) {
    if let Err(e) = run_statement(conn, "BEGIN IMMEDIATE") {
        tracing::error!(error = %e, "could not begin a write transaction");
        for job in batch {
            job.refuse();
        }
        return;
    }
    let mut tx = SqliteTx {
        conn,
        effects: CommitEffects::default(),
    };
    let mut done = Vec::with_capacity(batch.len());
    let mut jobs = batch.into_iter();
    for job in jobs.by_ref() {
        match in_savepoint(&mut tx, job) {
            Ok(finish) => done.push(finish),
            Err(e) => {
                // A savepoint could not be set or undone: nothing of this batch can be trusted.
                tracing::error!(error = %e, "savepoint failed; rolling back the batch");
                let _ = run_statement(conn, "ROLLBACK");
                let failed = Arc::new(e);
                for finish in done {
                    finish.finish(Err(failed.clone()));
                }
                jobs.for_each(WriteJob::refuse);
                return;
            }
        }
    }
    let mut effects = tx.effects;
    let committed = run_statement(conn, "COMMIT").map_err(|e| {
        tracing::error!(error = %e, "commit failed; rolling back the batch");
        let _ = run_statement(conn, "ROLLBACK");
        Arc::new(StoreError::from(e))
    });
    let ok = committed.is_ok();
    for finish in done {
        finish.finish(committed.clone());
    }
    if ok && !effects.is_empty() {
        effects.settle();
        sink(effects);
    }
}

fn in_savepoint(tx: &mut SqliteTx<'_>, job: WriteJob) -> Result<crate::store::JobDone, StoreError> {
    let mark = tx.effects.mark();
    if let Err(e) = run_statement(tx.conn, "SAVEPOINT job") {
        job.refuse();
        return Err(StoreError::from(e));
    }
    let done = job.run(tx as &mut dyn RunTx);
    if !done.keep {
        tx.effects.roll_back_to(mark);
        if let Err(e) = run_statement(tx.conn, "ROLLBACK TO job") {
            done.finish(Err(Arc::new(StoreError::from(e))));
            return Err(StoreError::Commit("rolling back a job failed".into()));
        }
    }
    if let Err(e) = run_statement(tx.conn, "RELEASE job") {
        done.finish(Err(Arc::new(StoreError::from(e))));
        return Err(StoreError::Commit("releasing a savepoint failed".into()));
    }
    Ok(done)
}

/// Runs a parameterless statement, parsed once per connection.
fn run_statement(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

#[derive(Debug)]
struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.idle.lock().unwrap().pop() {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink() -> EffectSink {
        Box::new(|_| {})
    }

    #[test]
    fn a_database_of_an_older_version_gets_end_times_for_its_terminal_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite3");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE runs (run_id TEXT PRIMARY KEY, state TEXT NOT NULL,
                     next_seq INTEGER NOT NULL, body TEXT NOT NULL);
                 INSERT INTO runs VALUES ('done', 'succeeded', 3,
                     '{\"ended_at\":\"2026-01-02T03:04:05.678Z\"}');
                 INSERT INTO runs VALUES ('open', 'running', 1, '{}');",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path, Durability::Flush, sink()).unwrap();
        let conn = Connection::open(&path).unwrap();
        let ended = |id: &str| -> Option<i64> {
            conn.query_row("SELECT ended_ms FROM runs WHERE run_id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
        };
        assert_eq!(ended("done"), Some(1_767_323_045_678));
        assert_eq!(ended("open"), None);
        // Opening again does not migrate twice.
        drop(store);
        SqliteStore::open(&path, Durability::Fast, sink()).unwrap();
    }
}
