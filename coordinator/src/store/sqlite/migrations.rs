//! The SQLite schema as a list of steps, applied in order and counted in `PRAGMA user_version`.
//!
//! Step `i` brings a database from version `i` to `i + 1`, in its own transaction
//! that also sets the version, so a crash leaves a database at a whole version and
//! coordinators opening one database at the same moment apply each step once
//! (`BEGIN IMMEDIATE` serialises them; the version is read again inside). A
//! database from before versioning (version 0, tables present) passes through the
//! steps too: each is written to find its work done or to do it.
//! Steps are history: add new ones at the end, never edit one that has shipped.

use rusqlite::Connection;

use super::tx::TERMINAL_SQL;
use crate::store::{StoreError, now_ms};

type Step = fn(&Connection) -> Result<(), StoreError>;

/// `(what it does, the step)`: version `i + 1` is reached by `MIGRATIONS[i]`.
const MIGRATIONS: &[(&str, Step)] = &[
    ("runs, node runs, events", initial_tables),
    ("end times of terminal runs, for retention", run_end_times),
    ("lease owners", lease_owners),
];

/// The schema version this build writes.
pub(super) const LATEST: i64 = MIGRATIONS.len() as i64;

/// Applies every step the database lacks. Refuses a database from a newer build.
pub(super) fn migrate(conn: &Connection) -> Result<(), StoreError> {
    loop {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let applied = apply_next(conn);
        match applied {
            Ok(true) => conn.execute_batch("COMMIT")?,
            Ok(false) => {
                conn.execute_batch("COMMIT")?;
                return Ok(());
            }
            Err(err) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(err);
            }
        }
    }
}

/// Inside a transaction: applies the next missing step; `false` when none is missing.
fn apply_next(conn: &Connection) -> Result<bool, StoreError> {
    let version = version(conn)?;
    if version > LATEST {
        return Err(StoreError::Commit(format!(
            "the database has schema version {version}; this coordinator knows up to {LATEST}"
        )));
    }
    let Some((what, step)) = MIGRATIONS.get(version as usize) else {
        return Ok(false);
    };
    step(conn)?;
    conn.pragma_update(None, "user_version", version + 1)?;
    tracing::info!(version = version + 1, "database schema: {what}");
    Ok(true)
}

pub(super) fn version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

fn has_column(conn: &Connection, table: &str, column: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare("SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2")?
        .query_row([table, column], |r| r.get::<_, i64>(0))?
        > 0)
}

/// The tables as the first versions created them (`IF NOT EXISTS`: an unversioned
/// database already has them).
fn initial_tables(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS runs (
            run_id   TEXT PRIMARY KEY,
            state    TEXT NOT NULL,
            next_seq INTEGER NOT NULL,
            body     TEXT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS node_runs (
            node_run_id        TEXT PRIMARY KEY,
            run_id             TEXT NOT NULL,
            parent_node_run_id TEXT,
            state              TEXT NOT NULL,
            depth              INTEGER NOT NULL,
            -- 1 while the dispatcher still owes this NodeRun its hand-off to an executor.
            dispatch_pending   INTEGER NOT NULL,
            -- ms since the epoch; the lease holder dispatches the NodeRun until then.
            lease_until        INTEGER,
            deadline_at        INTEGER NOT NULL,
            body               TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS node_runs_by_run ON node_runs (run_id);
        CREATE INDEX IF NOT EXISTS node_runs_by_parent ON node_runs (parent_node_run_id);
        CREATE INDEX IF NOT EXISTS node_runs_to_dispatch ON node_runs (lease_until)
            WHERE dispatch_pending = 1;
        CREATE INDEX IF NOT EXISTS node_runs_open ON node_runs (deadline_at)
            WHERE state NOT IN {terminal};
        CREATE TABLE IF NOT EXISTS events (
            run_id      TEXT NOT NULL,
            seq         INTEGER NOT NULL,
            node_run_id TEXT,
            body        TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        ) WITHOUT ROWID;",
        terminal = *TERMINAL_SQL
    ))?;
    Ok(())
}

/// `runs.ended_ms`: ms since the epoch when the run became terminal; retention deletes
/// by it. Terminal runs of older versions get it from their body's `ended_at`, else now.
fn run_end_times(conn: &Connection) -> Result<(), StoreError> {
    if !has_column(conn, "runs", "ended_ms")? {
        conn.execute_batch(&format!(
            "ALTER TABLE runs ADD COLUMN ended_ms INTEGER;
             UPDATE runs SET ended_ms = COALESCE(
                 CAST(ROUND((julianday(json_extract(body, '$.ended_at')) - 2440587.5) * 86400000) AS INTEGER),
                 {now})
             WHERE state IN {terminal};",
            now = now_ms(),
            terminal = *TERMINAL_SQL
        ))?;
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS runs_by_end ON runs (ended_ms) WHERE ended_ms IS NOT NULL;",
    )?;
    Ok(())
}

/// `node_runs.lease_owner`: the coordinator process holding the lease. Leases taken
/// before it existed have none; they expire like any other.
fn lease_owners(conn: &Connection) -> Result<(), StoreError> {
    if !has_column(conn, "node_runs", "lease_owner")? {
        conn.execute_batch("ALTER TABLE node_runs ADD COLUMN lease_owner TEXT;")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema of the last unversioned build, with a run in flight.
    const UNVERSIONED: &str = "
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, state TEXT NOT NULL,
            next_seq INTEGER NOT NULL, body TEXT NOT NULL, ended_ms INTEGER);
        CREATE TABLE node_runs (node_run_id TEXT PRIMARY KEY, run_id TEXT NOT NULL,
            parent_node_run_id TEXT, state TEXT NOT NULL, depth INTEGER NOT NULL,
            dispatch_pending INTEGER NOT NULL, lease_until INTEGER,
            deadline_at INTEGER NOT NULL, body TEXT NOT NULL);
        CREATE INDEX node_runs_by_run ON node_runs (run_id);
        CREATE TABLE events (run_id TEXT NOT NULL, seq INTEGER NOT NULL, node_run_id TEXT,
            body TEXT NOT NULL, PRIMARY KEY (run_id, seq)) WITHOUT ROWID;
        CREATE INDEX runs_by_end ON runs (ended_ms) WHERE ended_ms IS NOT NULL;
        INSERT INTO runs VALUES ('run_1', 'running', 2, '{}', NULL);
        INSERT INTO node_runs VALUES ('node_run_1', 'run_1', NULL, 'running', 0, 1, 99, 123, '{}');
        INSERT INTO events VALUES ('run_1', 0, NULL, '{}'), ('run_1', 1, 'node_run_1', '{}');";

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_new_database_gets_every_step_and_a_second_open_changes_nothing() {
        let conn = Connection::open_in_memory().unwrap();
        migrate(&conn).unwrap();
        assert_eq!(version(&conn).unwrap(), LATEST);
        assert!(has_column(&conn, "node_runs", "lease_owner").unwrap());
        migrate(&conn).unwrap();
        assert_eq!(version(&conn).unwrap(), LATEST);
    }

    #[test]
    fn an_unversioned_database_of_the_last_build_is_upgraded_in_place() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(UNVERSIONED).unwrap();
        assert_eq!(version(&conn).unwrap(), 0);
        migrate(&conn).unwrap();
        assert_eq!(version(&conn).unwrap(), LATEST);
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM events"), 2);
        assert_eq!(
            count(
                &conn,
                "SELECT lease_until FROM node_runs WHERE lease_owner IS NULL"
            ),
            99
        );
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM runs WHERE ended_ms IS NULL"),
            1
        );
        // The indexes the first build created only in later versions are there too.
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'node_runs_open'"
            ),
            1
        );
    }

    #[test]
    fn a_database_from_a_newer_build_is_refused_untouched() {
        let conn = Connection::open_in_memory().unwrap();
        migrate(&conn).unwrap();
        conn.pragma_update(None, "user_version", LATEST + 1)
            .unwrap();
        let err = migrate(&conn).unwrap_err();
        assert!(err.to_string().contains("newer") || err.to_string().contains("knows up to"));
        assert_eq!(version(&conn).unwrap(), LATEST + 1);
    }
}
