//! The SQLite store: runs, node runs, run events and the dispatch queue in one file.
//!
//! One writer thread owns the only write connection. It takes every job that is
//! waiting, runs each inside its own savepoint of one transaction, commits once
//! (group commit) and only then answers the callers, publishes "run changed"
//! notifications and hands new NodeRuns to the dispatcher. So a NodeRun is never
//! dispatched, and an event never streamed, before it is durable. Reads use a
//! small pool of read connections (WAL lets them run beside the writer, and a
//! reader never waits for it), on the calling task: they are point lookups and
//! bounded pages served from the page cache, cheaper than a hop to another thread.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arp_types::JsonObject;
use arp_types::run::{NodeRun, Run, RunEvent, RunEventType};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::config::Durability;
use crate::events::RunWatchers;

/// Most jobs committed together; bounds the latency a single commit adds.
const MAX_BATCH: usize = 512;
/// Read connections kept open for reuse.
const MAX_IDLE_READERS: usize = 64;
/// Prepared statements kept per connection: more than the store uses, so none is parsed twice.
const STATEMENT_CACHE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored JSON is invalid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the store is shut down")]
    Closed,
    #[error("a store operation panicked")]
    Panicked,
}

/// What committed writes publish: which runs gained events, which NodeRuns to dispatch.
#[derive(Debug, Clone)]
pub struct CommitHooks {
    pub watchers: Arc<RunWatchers>,
    pub dispatch: mpsc::UnboundedSender<String>,
}

type Finisher = Box<dyn FnOnce(Result<(), Arc<StoreError>>) + Send>;
type Job = Box<dyn FnOnce(Option<&mut Tx<'_>>) -> Finisher + Send>;

/// Handle to the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    jobs: std::sync::mpsc::Sender<Job>,
    readers: Arc<ReaderPool>,
    fault: Arc<AtomicU8>,
}

/// A real SQLite failure the writer connection can be put into, for fault-injection tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WriteFault {
    None = 0,
    /// `PRAGMA query_only`: every write transaction fails to begin (SQLITE_READONLY).
    ReadOnly = 1,
    /// `PRAGMA max_page_count` at the current size: writes that need a new page fail
    /// with SQLITE_FULL, as on a full disk or under a file-size limit.
    Full = 2,
}

/// The WAL is truncated back to this after a checkpoint, so it does not keep its peak size.
const JOURNAL_SIZE_LIMIT: i64 = 16 * 1024 * 1024;

impl Store {
    /// Opens (creating if needed) the database at `path` and starts the writer thread.
    pub fn open(
        path: &Path,
        hooks: CommitHooks,
        durability: Durability,
    ) -> Result<Self, StoreError> {
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
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;

        let fault = Arc::new(AtomicU8::new(WriteFault::None as u8));
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let writer_fault = fault.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(conn, rx, hooks, &writer_fault))
            .map_err(|e| StoreError::Commit(e.to_string()))?;
        let readers = Arc::new(ReaderPool {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
        });
        Ok(Self {
            jobs,
            readers,
            fault,
        })
    }

    /// Test hook: puts the writer connection into `fault` (or back to normal) from
    /// its next transaction on.
    #[doc(hidden)]
    pub fn inject_write_fault(&self, fault: WriteFault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }

    /// Runs `op` in the next write transaction; answers once it is committed.
    /// An `Err` from `op` rolls back everything `op` wrote, and nothing else.
    pub async fn write<T, E, F>(&self, op: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, E>>();
        let job: Job = Box::new(move |tx: Option<&mut Tx<'_>>| -> Finisher {
            let Some(tx) = tx else {
                return Box::new(move |_| {
                    let _ = reply.send(Err(E::from(StoreError::Commit(
                        "transaction did not begin".into(),
                    ))));
                });
            };
            let result = tx.in_savepoint(op);
            Box::new(move |commit: Result<(), Arc<StoreError>>| {
                let result = match (commit, result) {
                    (Err(e), Ok(_)) => Err(E::from(StoreError::Commit(e.to_string()))),
                    (_, result) => result,
                };
                let _ = reply.send(result);
            })
        });
        self.jobs
            .send(job)
            .map_err(|_| E::from(StoreError::Closed))?;
        answer.await.map_err(|_| E::from(StoreError::Closed))?
    }

    /// Runs `op` on a read connection (a consistent snapshot), here and now.
    /// Keep `op` bounded (a lookup, a page): it runs on the caller's thread.
    pub fn read<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError>,
    {
        let conn = self.readers.take()?;
        let result = op(&conn);
        self.readers.give_back(conn);
        result
    }

    pub fn get_run(&self, run_id: &str) -> Result<Option<Run>, StoreError> {
        self.read(|c| load_run(c, run_id))
    }

    pub fn get_node_run(&self, node_run_id: &str) -> Result<Option<NodeRunRow>, StoreError> {
        self.read(|c| load_node_run(c, node_run_id))
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    run_id   TEXT PRIMARY KEY,
    state    TEXT NOT NULL,
    next_seq INTEGER NOT NULL,
    body     TEXT NOT NULL,
    -- ms since the epoch when the run became terminal; retention deletes by it.
    ended_ms INTEGER
);
CREATE TABLE IF NOT EXISTS node_runs (
    node_run_id        TEXT PRIMARY KEY,
    run_id             TEXT NOT NULL,
    parent_node_run_id TEXT,
    state              TEXT NOT NULL,
    depth              INTEGER NOT NULL,
    -- 1 while the dispatcher still owes this NodeRun its hand-off to an executor.
    dispatch_pending   INTEGER NOT NULL,
    -- ms since the epoch; a dispatcher owns the NodeRun until then.
    lease_until        INTEGER,
    deadline_at        INTEGER NOT NULL,
    body               TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS node_runs_by_run ON node_runs (run_id);
CREATE INDEX IF NOT EXISTS node_runs_by_parent ON node_runs (parent_node_run_id);
CREATE INDEX IF NOT EXISTS node_runs_to_dispatch ON node_runs (lease_until) WHERE dispatch_pending = 1;
CREATE INDEX IF NOT EXISTS node_runs_open ON node_runs (deadline_at)
    WHERE state NOT IN ('succeeded', 'failed', 'canceled');
CREATE TABLE IF NOT EXISTS events (
    run_id      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    node_run_id TEXT,
    body        TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
";

/// Brings a database created by an older version up to `SCHEMA`.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let has_ended_ms: bool = conn
        .prepare("SELECT COUNT(*) FROM pragma_table_info('runs') WHERE name = 'ended_ms'")?
        .query_row([], |r| r.get::<_, i64>(0))?
        > 0;
    if !has_ended_ms {
        // Terminal runs of older versions get their end time from their body, else now.
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             ALTER TABLE runs ADD COLUMN ended_ms INTEGER;
             UPDATE runs SET ended_ms = COALESCE(
                 CAST(ROUND((julianday(json_extract(body, '$.ended_at')) - 2440587.5) * 86400000) AS INTEGER),
                 {now})
             WHERE state IN ('succeeded', 'failed', 'canceled');
             COMMIT;",
            now = now_ms()
        ))?;
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS runs_by_end ON runs (ended_ms) WHERE ended_ms IS NOT NULL;",
    )?;
    Ok(())
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

fn writer_loop(
    mut conn: Connection,
    jobs: std::sync::mpsc::Receiver<Job>,
    hooks: CommitHooks,
    fault: &AtomicU8,
) {
    let mut applied_fault = WriteFault::None as u8;
    while let Ok(first) = jobs.recv() {
        let wanted = fault.load(Ordering::SeqCst);
        if wanted != applied_fault {
            match apply_fault(&conn, wanted) {
                Ok(()) => applied_fault = wanted,
                Err(e) => tracing::error!(error = %e, "could not apply the injected write fault"),
            }
        }
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let began = run_statement(&conn, "BEGIN IMMEDIATE");
        if let Err(e) = &began {
            tracing::error!(error = %e, "could not begin a write transaction");
        }
        let mut tx = Tx {
            conn: &mut conn,
            changed_runs: Vec::new(),
            dispatch: Vec::new(),
        };
        let finishers: Vec<Finisher> = batch
            .into_iter()
            .map(|job| {
                if began.is_ok() {
                    job(Some(&mut tx))
                } else {
                    job(None)
                }
            })
            .collect();
        let Tx {
            mut changed_runs,
            dispatch,
            ..
        } = tx;
        let committed = match began {
            Ok(()) => run_statement(&conn, "COMMIT").map_err(|e| {
                tracing::error!(error = %e, "commit failed; rolling back the batch");
                let _ = run_statement(&conn, "ROLLBACK");
                Arc::new(StoreError::from(e))
            }),
            Err(e) => Err(Arc::new(StoreError::from(e))),
        };
        let ok = committed.is_ok();
        for finish in finishers {
            finish(committed.clone());
        }
        if ok {
            changed_runs.sort_unstable();
            changed_runs.dedup();
            for run_id in changed_runs {
                hooks.watchers.notify(&run_id);
            }
            for node_run_id in dispatch {
                let _ = hooks.dispatch.send(node_run_id);
            }
        }
    }
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

/// A NodeRun with the bookkeeping the coordinator keeps beside it.
#[derive(Debug, Clone)]
pub struct NodeRunRow {
    pub node_run: NodeRun,
    /// 0 for the root NodeRun.
    pub depth: u64,
    pub dispatch_pending: bool,
    /// ms since the epoch after which the NodeRun fails with `deadline_exceeded`.
    pub deadline_at: i64,
}

/// The write side of one job, inside the batch transaction.
pub struct Tx<'c> {
    conn: &'c mut Connection,
    changed_runs: Vec<String>,
    dispatch: Vec<String>,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

impl Tx<'_> {
    fn in_savepoint<T, E: From<StoreError>>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, E>,
    ) -> Result<T, E> {
        let marks = (self.changed_runs.len(), self.dispatch.len());
        self.statement("SAVEPOINT job")?;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| op(self)))
            .unwrap_or_else(|_| Err(E::from(StoreError::Panicked)));
        if result.is_err() {
            self.changed_runs.truncate(marks.0);
            self.dispatch.truncate(marks.1);
            self.statement("ROLLBACK TO job")?;
        }
        self.statement("RELEASE job")?;
        result
    }

    fn statement(&self, sql: &str) -> Result<(), StoreError> {
        Ok(run_statement(self.conn, sql)?)
    }

    pub fn conn(&self) -> &Connection {
        self.conn
    }

    pub fn run(&self, run_id: &str) -> Result<Option<Run>, StoreError> {
        load_run(self.conn, run_id)
    }

    pub fn node_run(&self, node_run_id: &str) -> Result<Option<NodeRunRow>, StoreError> {
        load_node_run(self.conn, node_run_id)
    }

    pub fn insert_run(&mut self, run: &Run) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO runs (run_id, state, next_seq, body) VALUES (?1, ?2, 0, ?3)",
            )?
            .execute(params![
                run.run_id,
                run.state.as_str(),
                serde_json::to_string(run)?
            ])?;
        Ok(())
    }

    pub fn update_run(&mut self, run: &Run) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE runs SET state = ?2, body = ?3,
                 ended_ms = CASE WHEN ?4 THEN COALESCE(ended_ms, ?5) ELSE NULL END
                 WHERE run_id = ?1",
            )?
            .execute(params![
                run.run_id,
                run.state.as_str(),
                serde_json::to_string(run)?,
                run.state.is_terminal(),
                now_ms()
            ])?;
        Ok(())
    }

    /// Inserts a NodeRun; with `lease_until`, leases it to this process until then
    /// and hands it to the dispatcher once the transaction commits.
    pub fn insert_node_run(
        &mut self,
        node_run: &NodeRun,
        depth: u64,
        deadline_at: i64,
        lease_until: Option<i64>,
    ) -> Result<(), StoreError> {
        let dispatch = lease_until.is_some();
        let lease = lease_until;
        self.conn
            .prepare_cached(
                "INSERT INTO node_runs (node_run_id, run_id, parent_node_run_id, state, depth,
                 dispatch_pending, lease_until, deadline_at, body)
             VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, ?8)",
            )?
            .execute(params![
                node_run.node_run_id,
                node_run.run_id,
                node_run.parent_node_run_id,
                node_run.state.as_str(),
                depth as i64,
                lease,
                deadline_at,
                serde_json::to_string(node_run)?
            ])?;
        if dispatch {
            self.dispatch.push(node_run.node_run_id.clone());
        }
        Ok(())
    }

    /// Stores the NodeRun's new state and body; a terminal NodeRun leaves the dispatch queue.
    pub fn update_node_run(&mut self, node_run: &NodeRun) -> Result<(), StoreError> {
        let terminal = node_run.state.is_terminal();
        self.conn
            .prepare_cached(
                "UPDATE node_runs SET state = ?2, body = ?3,
                 dispatch_pending = CASE WHEN ?4 THEN 0 ELSE dispatch_pending END,
                 lease_until = CASE WHEN ?4 THEN NULL ELSE lease_until END
             WHERE node_run_id = ?1",
            )?
            .execute(params![
                node_run.node_run_id,
                node_run.state.as_str(),
                serde_json::to_string(node_run)?,
                terminal
            ])?;
        Ok(())
    }

    /// The NodeRun has been handed to its executor (composite begin accepted).
    pub fn finish_dispatch(&mut self, node_run_id: &str) -> Result<(), StoreError> {
        self.conn.prepare_cached(
            "UPDATE node_runs SET dispatch_pending = 0, lease_until = NULL WHERE node_run_id = ?1",
        )?.execute(params![node_run_id],
        )?;
        Ok(())
    }

    pub fn count_children(&self, parent_node_run_id: &str) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM node_runs WHERE parent_node_run_id = ?1")?
            .query_row(params![parent_node_run_id], |r| r.get(0))?;
        Ok(n as u64)
    }

    pub fn count_node_runs(&self, run_id: &str) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM node_runs WHERE run_id = ?1")?
            .query_row(params![run_id], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// Every NodeRun of the run that is not yet terminal.
    pub fn open_node_runs(&self, run_id: &str) -> Result<Vec<NodeRun>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT body FROM node_runs WHERE run_id = ?1
               AND state NOT IN ('succeeded', 'failed', 'canceled')",
        )?;
        let rows = stmt.query_map(params![run_id], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for body in rows {
            out.push(serde_json::from_str(&body?)?);
        }
        Ok(out)
    }

    /// Appends the run's next event (seq is gapless from 0 because it is taken
    /// and bumped in the same transaction that writes the event).
    pub fn append_event(
        &mut self,
        run_id: &str,
        node_run_id: Option<&str>,
        event_type: RunEventType,
        data: Option<JsonObject>,
    ) -> Result<u64, StoreError> {
        let seq: i64 = self
            .conn
            .prepare_cached(
                "UPDATE runs SET next_seq = next_seq + 1 WHERE run_id = ?1 RETURNING next_seq - 1",
            )?
            .query_row(params![run_id], |r| r.get(0))?;
        let event = RunEvent {
            run_id: run_id.to_owned(),
            node_run_id: node_run_id.map(str::to_owned),
            seq: seq as u64,
            event_type,
            time: arp_types::time::now_rfc3339(),
            data,
            extensions: None,
        };
        self.conn
            .prepare_cached(
                "INSERT INTO events (run_id, seq, node_run_id, body) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                run_id,
                seq,
                node_run_id,
                serde_json::to_string(&event)?
            ])?;
        if self.changed_runs.last().map(String::as_str) != Some(run_id) {
            self.changed_runs.push(run_id.to_owned());
        }
        Ok(seq as u64)
    }

    /// Leases (until `lease_until`) up to `limit` NodeRuns whose dispatch is owed and
    /// unowned or whose lease expired, and hands them to the dispatcher.
    pub fn claim_dispatchable(
        &mut self,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let ids: Vec<String> = {
            let mut stmt = self.conn.prepare_cached(
                "UPDATE node_runs SET lease_until = ?3
                 WHERE node_run_id IN (
                     SELECT node_run_id FROM node_runs
                     WHERE dispatch_pending = 1 AND (lease_until IS NULL OR lease_until < ?1)
                     LIMIT ?2)
                 RETURNING node_run_id",
            )?;
            let rows = stmt.query_map(params![now, limit as i64, lease_until], |r| {
                r.get::<_, String>(0)
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let n = ids.len();
        self.dispatch.extend(ids);
        Ok(n)
    }

    /// Open NodeRuns whose deadline passed before `now`.
    pub fn overdue_node_runs(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT node_run_id FROM node_runs
             WHERE state NOT IN ('succeeded', 'failed', 'canceled') AND deadline_at < ?1 LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![now, limit as i64], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Extends the leases of NodeRuns this process is still dispatching.
    pub fn renew_leases(&mut self, node_run_ids: &[String], until: i64) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "UPDATE node_runs SET lease_until = ?2 WHERE node_run_id = ?1 AND dispatch_pending = 1",
        )?;
        for id in node_run_ids {
            stmt.execute(params![id, until])?;
        }
        Ok(())
    }

    /// Deletes up to `limit` runs that ended before `ended_before`, with their NodeRuns
    /// and events; returns how many runs went.
    pub fn prune_runs(&mut self, ended_before: i64, limit: usize) -> Result<usize, StoreError> {
        let run_ids: Vec<String> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT run_id FROM runs WHERE ended_ms IS NOT NULL AND ended_ms < ?1
                 ORDER BY ended_ms LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![ended_before, limit as i64], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for run_id in &run_ids {
            for sql in [
                "DELETE FROM events WHERE run_id = ?1",
                "DELETE FROM node_runs WHERE run_id = ?1",
                "DELETE FROM runs WHERE run_id = ?1",
            ] {
                self.conn.prepare_cached(sql)?.execute(params![run_id])?;
            }
        }
        Ok(run_ids.len())
    }

    /// Returns up to `pages` free pages to the file system (a no-op unless the
    /// database was created with `auto_vacuum=INCREMENTAL`).
    pub fn reclaim_free_pages(&mut self, pages: u32) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("PRAGMA incremental_vacuum({pages})"))?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
        Ok(())
    }
}

pub fn load_run(conn: &Connection, run_id: &str) -> Result<Option<Run>, StoreError> {
    let body: Option<String> = conn
        .prepare_cached("SELECT body FROM runs WHERE run_id = ?1")?
        .query_row(params![run_id], |r| r.get(0))
        .optional()?;
    Ok(body.map(|b| serde_json::from_str(&b)).transpose()?)
}

pub fn load_node_run(
    conn: &Connection,
    node_run_id: &str,
) -> Result<Option<NodeRunRow>, StoreError> {
    let row: Option<(String, i64, i64, i64)> = conn
        .prepare_cached("SELECT body, depth, dispatch_pending, deadline_at FROM node_runs WHERE node_run_id = ?1")?
        .query_row(params![node_run_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    row.map(|(body, depth, pending, deadline_at)| {
        Ok(NodeRunRow {
            node_run: serde_json::from_str(&body)?,
            depth: depth as u64,
            dispatch_pending: pending != 0,
            deadline_at,
        })
    })
    .transpose()
}

/// A stored event: its seq, NodeRun and JSON line (without the newline).
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub node_run_id: Option<String>,
    pub line: String,
}

/// Whether the run is in a terminal state (`None`: no such run), without reading its body.
pub fn run_is_terminal(conn: &Connection, run_id: &str) -> Result<Option<bool>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT state IN ('succeeded', 'failed', 'canceled') FROM runs WHERE run_id = ?1",
        )?
        .query_row(params![run_id], |r| r.get(0))
        .optional()?)
}

/// Events of `run_id` with seq greater than `after` (all when `None`), oldest first.
pub fn events_after(
    conn: &Connection,
    run_id: &str,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    // No `LIMIT ?`: SQLite re-plans a statement whose LIMIT is a bound parameter
    // on every execution (it may use the value); stopping the iteration is as good.
    let mut stmt = conn.prepare_cached(
        "SELECT seq, node_run_id, body FROM events WHERE run_id = ?1 AND seq > ?2 ORDER BY seq",
    )?;
    let after = after.map_or(-1, |a| a as i64);
    let rows = stmt.query_map(params![run_id, after], |r| {
        Ok(StoredEvent {
            seq: r.get::<_, i64>(0)? as u64,
            node_run_id: r.get(1)?,
            line: r.get(2)?,
        })
    })?;
    Ok(rows.take(limit).collect::<Result<_, _>>()?)
}

/// `(node_run_id, parent_node_run_id)` of every NodeRun of the run.
pub fn node_run_tree(
    conn: &Connection,
    run_id: &str,
) -> Result<Vec<(String, Option<String>)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT node_run_id, parent_node_run_id FROM node_runs WHERE run_id = ?1",
    )?;
    let rows = stmt.query_map(params![run_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks() -> CommitHooks {
        CommitHooks {
            watchers: Arc::new(RunWatchers::default()),
            dispatch: mpsc::unbounded_channel().0,
        }
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
        let _store = Store::open(&path, hooks(), Durability::Flush).unwrap();
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
        drop(_store);
        Store::open(&path, hooks(), Durability::Fast).unwrap();
    }
}
