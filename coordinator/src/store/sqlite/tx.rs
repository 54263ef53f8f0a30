//! SQLite's [`RunTx`] and the queries reads and writes share.

use std::sync::LazyLock;

use arp_types::JsonObject;
use arp_types::run::{NodeRun, Run, RunEvent, RunEventType};
use rusqlite::{Connection, OptionalExtension, params};

use crate::store::{
    CommitEffects, Lease, NodeRunRow, OverdueNodeRun, RunTx, StoreError, StoredEvent,
    TERMINAL_STATES, now_ms,
};

/// `('succeeded', 'failed', 'canceled')`, from the one list.
pub(super) static TERMINAL_SQL: LazyLock<String> = LazyLock::new(|| {
    let quoted: Vec<String> = TERMINAL_STATES.iter().map(|s| format!("'{s}'")).collect();
    format!("({})", quoted.join(", "))
});

static OPEN_NODE_RUNS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT body FROM node_runs WHERE run_id = ?1 AND state NOT IN {}",
        *TERMINAL_SQL
    )
});

static OVERDUE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT node_run_id, state, deadline_at FROM node_runs
         WHERE state NOT IN {} AND deadline_at < ?1 LIMIT ?2",
        *TERMINAL_SQL
    )
});

static RUN_TERMINAL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT state IN {} FROM runs WHERE run_id = ?1",
        *TERMINAL_SQL
    )
});

/// The write side of one job, inside the writer's batch transaction.
pub(super) struct SqliteTx<'c> {
    pub(super) conn: &'c Connection,
    pub(super) effects: CommitEffects,
}

impl RunTx for SqliteTx<'_> {
    fn effects(&mut self) -> &mut CommitEffects {
        &mut self.effects
    }

    fn run(&self, run_id: &str) -> Result<Option<Run>, StoreError> {
        load_run(self.conn, run_id)
    }

    fn run_terminal(&self, run_id: &str) -> Result<Option<bool>, StoreError> {
        run_terminal(self.conn, run_id)
    }

    fn node_run(&self, node_run_id: &str) -> Result<Option<NodeRunRow>, StoreError> {
        load_node_run(self.conn, node_run_id)
    }

    fn insert_run(&mut self, run: &Run) -> Result<bool, StoreError> {
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO runs (run_id, state, next_seq, body) VALUES (?1, ?2, 0, ?3)
                 ON CONFLICT (run_id) DO NOTHING",
            )?
            .execute(params![
                run.run_id,
                run.state.as_str(),
                serde_json::to_string(run)?
            ])?;
        Ok(inserted == 1)
    }

    fn update_run(&mut self, run: &Run) -> Result<(), StoreError> {
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

    fn insert_node_run(
        &mut self,
        node_run: &NodeRun,
        depth: u64,
        deadline_at: i64,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO node_runs (node_run_id, run_id, parent_node_run_id, state, depth,
                 dispatch_pending, lease_owner, lease_until, deadline_at, body)
             VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                node_run.node_run_id,
                node_run.run_id,
                node_run.parent_node_run_id,
                node_run.state.as_str(),
                depth as i64,
                lease.map(|l| &*l.owner),
                lease.map(|l| l.until),
                deadline_at,
                serde_json::to_string(node_run)?
            ])?;
        if lease.is_some() {
            self.effects.dispatch.push(node_run.node_run_id.clone());
        }
        Ok(())
    }

    fn update_node_run(&mut self, node_run: &NodeRun) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE node_runs SET state = ?2, body = ?3,
                 dispatch_pending = CASE WHEN ?4 THEN 0 ELSE dispatch_pending END,
                 lease_owner = CASE WHEN ?4 THEN NULL ELSE lease_owner END,
                 lease_until = CASE WHEN ?4 THEN NULL ELSE lease_until END
             WHERE node_run_id = ?1",
            )?
            .execute(params![
                node_run.node_run_id,
                node_run.state.as_str(),
                serde_json::to_string(node_run)?,
                node_run.state.is_terminal()
            ])?;
        Ok(())
    }

    fn finish_dispatch(&mut self, node_run_id: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE node_runs SET dispatch_pending = 0, lease_owner = NULL, lease_until = NULL
                 WHERE node_run_id = ?1",
            )?
            .execute(params![node_run_id])?;
        Ok(())
    }

    fn count_children(&self, parent_node_run_id: &str) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM node_runs WHERE parent_node_run_id = ?1")?
            .query_row(params![parent_node_run_id], |r| r.get(0))?;
        Ok(n as u64)
    }

    fn count_node_runs(&self, run_id: &str) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM node_runs WHERE run_id = ?1")?
            .query_row(params![run_id], |r| r.get(0))?;
        Ok(n as u64)
    }

    fn open_node_runs(&self, run_id: &str) -> Result<Vec<NodeRun>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&OPEN_NODE_RUNS)?;
        let rows = stmt.query_map(params![run_id], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for body in rows {
            out.push(serde_json::from_str(&body?)?);
        }
        Ok(out)
    }

    fn append_event(
        &mut self,
        run_id: &str,
        node_run_id: Option<&str>,
        event_type: RunEventType,
        data: Option<JsonObject>,
    ) -> Result<(), StoreError> {
        // One writer connection and the seq bumped in the event's own transaction: gapless.
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
        self.effects.run_changed(run_id);
        Ok(())
    }

    fn claim_dispatchable(
        &mut self,
        now: i64,
        lease: &Lease,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let ids: Vec<String> = {
            let mut stmt = self.conn.prepare_cached(
                "UPDATE node_runs SET lease_until = ?3, lease_owner = ?4
                 WHERE node_run_id IN (
                     SELECT node_run_id FROM node_runs
                     WHERE dispatch_pending = 1 AND (lease_until IS NULL OR lease_until < ?1)
                     LIMIT ?2)
                 RETURNING node_run_id",
            )?;
            let rows = stmt.query_map(
                params![now, limit as i64, lease.until, &*lease.owner],
                |r| r.get::<_, String>(0),
            )?;
            rows.collect::<Result<_, _>>()?
        };
        let n = ids.len();
        self.effects.dispatch.extend(ids);
        Ok(n)
    }

    fn renew_leases(&mut self, node_run_ids: &[String], lease: &Lease) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "UPDATE node_runs SET lease_until = ?2
             WHERE node_run_id = ?1 AND dispatch_pending = 1 AND lease_owner = ?3",
        )?;
        for id in node_run_ids {
            stmt.execute(params![id, lease.until, &*lease.owner])?;
        }
        Ok(())
    }

    fn prune_runs(&mut self, ended_before: i64, limit: usize) -> Result<usize, StoreError> {
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

    /// A no-op unless the database was created with `auto_vacuum=INCREMENTAL`.
    fn reclaim_space(&mut self, pages: u32) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("PRAGMA incremental_vacuum({pages})"))?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
        Ok(())
    }
}

pub(super) fn load_run(conn: &Connection, run_id: &str) -> Result<Option<Run>, StoreError> {
    let body: Option<String> = conn
        .prepare_cached("SELECT body FROM runs WHERE run_id = ?1")?
        .query_row(params![run_id], |r| r.get(0))
        .optional()?;
    Ok(body.map(|b| serde_json::from_str(&b)).transpose()?)
}

pub(super) fn load_node_run(
    conn: &Connection,
    node_run_id: &str,
) -> Result<Option<NodeRunRow>, StoreError> {
    let row: Option<(String, i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT body, depth, dispatch_pending, deadline_at FROM node_runs WHERE node_run_id = ?1",
        )?
        .query_row(params![node_run_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
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

pub(super) fn run_terminal(conn: &Connection, run_id: &str) -> Result<Option<bool>, StoreError> {
    Ok(conn
        .prepare_cached(&RUN_TERMINAL)?
        .query_row(params![run_id], |r| r.get(0))
        .optional()?)
}

/// Events of `run_id` with seq greater than `after` (all when `None`), oldest first.
pub(super) fn events_after(
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
pub(super) fn node_run_tree(
    conn: &Connection,
    run_id: &str,
) -> Result<Vec<(String, Option<String>)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT node_run_id, parent_node_run_id FROM node_runs WHERE run_id = ?1",
    )?;
    let rows = stmt.query_map(params![run_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn overdue_node_runs(
    conn: &Connection,
    before: i64,
    limit: usize,
) -> Result<Vec<OverdueNodeRun>, StoreError> {
    let mut stmt = conn.prepare_cached(&OVERDUE)?;
    let rows = stmt.query_map(params![before, limit as i64], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (node_run_id, state, deadline_at) = row?;
        out.push(OverdueNodeRun {
            node_run_id,
            state: serde_json::from_value(serde_json::Value::String(state))?,
            deadline_at,
        });
    }
    Ok(out)
}
