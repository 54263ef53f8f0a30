//! The PostgreSQL schema as a list of steps, applied in order and counted in
//! `coordinator_schema.version`.
//!
//! Every coordinator runs [`migrate`] when it opens the database. The whole upgrade
//! is one transaction that first takes a transaction-scoped advisory lock, so
//! coordinators starting at the same moment on an empty database apply each step
//! once, one after another (PostgreSQL's DDL is transactional: a crash leaves the
//! database at the version it had). Steps are history: add new ones at the end,
//! never edit one that has shipped.

use tokio_postgres::Client;

use super::tx::TERMINAL_SQL;
use crate::store::StoreError;

/// Serialises migrations of one database (any constant: `"jarvis-rc"` in ASCII).
const MIGRATION_LOCK: i64 = 0x6a61_7276_6973_2d72;

/// `(what it does, the SQL)`: version `i + 1` is reached by `MIGRATIONS[i]`.
/// `{terminal}` stands for the terminal-state list.
const MIGRATIONS: &[(&str, &str)] = &[(
    "runs, node runs with leases, events",
    "CREATE TABLE runs (
        run_id   TEXT PRIMARY KEY,
        state    TEXT NOT NULL,
        -- The seq the run's next event gets; bumped in the event's own transaction.
        next_seq BIGINT NOT NULL,
        body     TEXT NOT NULL,
        -- ms since the epoch when the run became terminal; retention deletes by it.
        ended_ms BIGINT
    );
    CREATE INDEX runs_by_end ON runs (ended_ms) WHERE ended_ms IS NOT NULL;
    CREATE TABLE node_runs (
        node_run_id        TEXT PRIMARY KEY,
        run_id             TEXT NOT NULL,
        parent_node_run_id TEXT,
        state              TEXT NOT NULL,
        depth              BIGINT NOT NULL,
        -- While a dispatcher still owes this NodeRun its hand-off to an executor.
        dispatch_pending   BOOLEAN NOT NULL,
        -- The coordinator process holding the dispatch lease, until lease_until (ms).
        lease_owner        TEXT,
        lease_until        BIGINT,
        deadline_at        BIGINT NOT NULL,
        body               TEXT NOT NULL
    );
    CREATE INDEX node_runs_by_run ON node_runs (run_id);
    CREATE INDEX node_runs_by_parent ON node_runs (parent_node_run_id);
    CREATE INDEX node_runs_to_dispatch ON node_runs (lease_until) WHERE dispatch_pending;
    CREATE INDEX node_runs_open ON node_runs (deadline_at) WHERE state NOT IN {terminal};
    CREATE TABLE events (
        run_id      TEXT NOT NULL,
        seq         BIGINT NOT NULL,
        node_run_id TEXT,
        body        TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)
    );",
)];

/// The schema version this build writes.
pub(super) const LATEST: i32 = MIGRATIONS.len() as i32;

/// Applies every step the database lacks. Refuses a database from a newer build.
pub(super) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS coordinator_schema (version INTEGER NOT NULL)")
        .await?;
    let version: i32 = match tx
        .query_opt("SELECT version FROM coordinator_schema", &[])
        .await?
    {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO coordinator_schema (version) VALUES (0)", &[])
                .await?;
            0
        }
    };
    if version > LATEST {
        return Err(StoreError::Commit(format!(
            "the database has schema version {version}; this coordinator knows up to {LATEST}"
        )));
    }
    for (i, (what, sql)) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(&sql.replace("{terminal}", &TERMINAL_SQL))
            .await?;
        tracing::info!(version = i + 1, "database schema: {what}");
    }
    if version < LATEST {
        tx.execute("UPDATE coordinator_schema SET version = $1", &[&LATEST])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
