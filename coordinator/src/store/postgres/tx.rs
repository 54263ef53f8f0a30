//! PostgreSQL's [`RunTx`], and the SQL and row decoding that reads and writes share.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::LazyLock;

use arp_types::JsonObject;
use arp_types::run::{NodeRun, Run, RunEvent, RunEventType};
use postgres::types::ToSql;
use postgres::{Client, Row, Statement};

use crate::store::{
    CommitEffects, Lease, NodeRunRow, OverdueNodeRun, RunTx, StoreError, StoredEvent,
    TERMINAL_STATES, now_ms,
};

/// Query parameters, as both clients take them.
pub(super) type Params<'a> = [&'a (dyn ToSql + Sync)];

/// `('succeeded', 'failed', 'canceled')`, from the one list.
pub(super) static TERMINAL_SQL: LazyLock<String> = LazyLock::new(|| {
    let quoted: Vec<String> = TERMINAL_STATES.iter().map(|s| format!("'{s}'")).collect();
    format!("({})", quoted.join(", "))
});

pub(super) const LOAD_RUN: &str = "SELECT body FROM runs WHERE run_id = $1";

pub(super) static RUN_TERMINAL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT state IN {} FROM runs WHERE run_id = $1",
        *TERMINAL_SQL
    )
});

pub(super) const LOAD_NODE_RUN: &str = "SELECT body, depth, dispatch_pending, deadline_at
     FROM node_runs WHERE node_run_id = $1";

pub(super) const EVENTS_AFTER: &str = "SELECT seq, node_run_id, body FROM events
     WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

pub(super) const NODE_RUN_TREE: &str =
    "SELECT node_run_id, parent_node_run_id FROM node_runs WHERE run_id = $1";

pub(super) static OVERDUE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT node_run_id, state, deadline_at FROM node_runs
         WHERE state NOT IN {} AND deadline_at < $1 LIMIT $2",
        *TERMINAL_SQL
    )
});

static OPEN_NODE_RUNS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT body FROM node_runs WHERE run_id = $1 AND state NOT IN {}",
        *TERMINAL_SQL
    )
});

/// Every commit that changed runs tells the other coordinators which (see `listen`).
pub(super) const NOTIFY: &str =
    "SELECT pg_notify($1, $2::text || ' ' || r) FROM unnest($3::text[]) AS r";

/// The writer's connection with its prepared statements (parsed once per connection).
pub(super) struct Conn {
    pub(super) client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("statements", &self.statements.len())
            .finish_non_exhaustive()
    }
}

impl Conn {
    pub(super) fn new(client: Client) -> Self {
        Self {
            client,
            statements: HashMap::new(),
        }
    }

    fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    pub(super) fn query(
        &mut self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.client.query(&statement, params)?)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Option<Row>, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.client.query_opt(&statement, params)?)
    }

    fn execute(&mut self, sql: &'static str, params: &Params<'_>) -> Result<u64, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.client.execute(&statement, params)?)
    }
}

/// The write side of one job, inside the writer's batch transaction.
pub(super) struct PgTx<'c> {
    /// Reads through `&self` need the connection too.
    pub(super) conn: RefCell<&'c mut Conn>,
    pub(super) effects: CommitEffects,
    /// The job's events, written when it ends.
    pub(super) events: Vec<PendingEvent>,
}

/// An event serialised with [`SEQ_PLACEHOLDER`] at `digits` of `body`.
#[derive(Debug)]
pub(super) struct PendingEvent {
    run_id: String,
    node_run_id: Option<String>,
    body: String,
    digits: std::ops::Range<usize>,
}

impl PgTx<'_> {
    /// Writes the job's events, one statement per run: the run's row is updated for
    /// `n` seqs at once and stays locked until the commit (a writer in another process
    /// waits here, then takes the next ones: gapless, in commit order), and each
    /// event's seq is spliced into its JSON by the database.
    pub(super) fn flush_events(&mut self) -> Result<(), StoreError> {
        let mut events = std::mem::take(&mut self.events);
        while !events.is_empty() {
            let run_id = events[0].run_id.clone();
            let (mine, rest): (Vec<_>, Vec<_>) =
                events.into_iter().partition(|e| e.run_id == run_id);
            events = rest;
            let n = mine.len() as i64;
            let node_run_ids: Vec<Option<&str>> =
                mine.iter().map(|e| e.node_run_id.as_deref()).collect();
            let before: Vec<&str> = mine.iter().map(|e| &e.body[..e.digits.start]).collect();
            let after: Vec<&str> = mine.iter().map(|e| &e.body[e.digits.end..]).collect();
            let written = self.execute(
                "WITH next AS (
                     UPDATE runs SET next_seq = next_seq + $2 WHERE run_id = $1
                     RETURNING next_seq - $2 AS first)
                 INSERT INTO events (run_id, seq, node_run_id, body)
                 SELECT $1, first + i - 1, n, b || (first + i - 1)::text || a
                 FROM next, unnest($3::text[], $4::text[], $5::text[])
                     WITH ORDINALITY AS e(n, b, a, i)",
                &[&run_id, &n, &node_run_ids, &before, &after],
            )?;
            if written != n as u64 {
                return Err(StoreError::Commit(format!(
                    "no run {run_id} to append events to"
                )));
            }
        }
        Ok(())
    }

    fn query(&self, sql: &'static str, params: &Params<'_>) -> Result<Vec<Row>, StoreError> {
        self.conn.borrow_mut().query(sql, params)
    }

    fn query_opt(&self, sql: &'static str, params: &Params<'_>) -> Result<Option<Row>, StoreError> {
        self.conn.borrow_mut().query_opt(sql, params)
    }

    fn execute(&self, sql: &'static str, params: &Params<'_>) -> Result<u64, StoreError> {
        self.conn.borrow_mut().execute(sql, params)
    }

    fn count(&self, sql: &'static str, id: &str) -> Result<u64, StoreError> {
        let rows = self.query(sql, &[&id])?;
        let n: i64 = rows.first().map_or(0, |r| r.get(0));
        Ok(n as u64)
    }
}

impl RunTx for PgTx<'_> {
    fn effects(&mut self) -> &mut CommitEffects {
        &mut self.effects
    }

    fn run(&self, run_id: &str) -> Result<Option<Run>, StoreError> {
        self.query_opt(LOAD_RUN, &[&run_id])?
            .map(|row| decode_run(&row))
            .transpose()
    }

    fn run_terminal(&self, run_id: &str) -> Result<Option<bool>, StoreError> {
        Ok(self
            .query_opt(RUN_TERMINAL.as_str(), &[&run_id])?
            .map(|row| row.get(0)))
    }

    fn node_run(&self, node_run_id: &str) -> Result<Option<NodeRunRow>, StoreError> {
        self.query_opt(LOAD_NODE_RUN, &[&node_run_id])?
            .map(|row| decode_node_run_row(&row))
            .transpose()
    }

    fn insert_run(&mut self, run: &Run) -> Result<bool, StoreError> {
        // A concurrent insert of the same id (another coordinator) is waited for:
        // if it commits, this one conflicts.
        let inserted = self.execute(
            "INSERT INTO runs (run_id, state, next_seq, body) VALUES ($1, $2, 0, $3)
             ON CONFLICT (run_id) DO NOTHING",
            &[
                &run.run_id,
                &run.state.as_str(),
                &serde_json::to_string(run)?,
            ],
        )?;
        Ok(inserted == 1)
    }

    fn update_run(&mut self, run: &Run) -> Result<(), StoreError> {
        self.execute(
            "UPDATE runs SET state = $2, body = $3,
             ended_ms = CASE WHEN $4 THEN COALESCE(ended_ms, $5) ELSE NULL END
             WHERE run_id = $1",
            &[
                &run.run_id,
                &run.state.as_str(),
                &serde_json::to_string(run)?,
                &run.state.is_terminal(),
                &now_ms(),
            ],
        )?;
        Ok(())
    }

    fn insert_node_run(
        &mut self,
        node_run: &NodeRun,
        depth: u64,
        deadline_at: i64,
        lease: Option<&Lease>,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO node_runs (node_run_id, run_id, parent_node_run_id, state, depth,
                 dispatch_pending, lease_owner, lease_until, deadline_at, body)
             VALUES ($1, $2, $3, $4, $5, TRUE, $6, $7, $8, $9)",
            &[
                &node_run.node_run_id,
                &node_run.run_id,
                &node_run.parent_node_run_id,
                &node_run.state.as_str(),
                &(depth as i64),
                &lease.map(|l| &*l.owner),
                &lease.map(|l| l.until),
                &deadline_at,
                &serde_json::to_string(node_run)?,
            ],
        )?;
        if lease.is_some() {
            self.effects.dispatch.push(node_run.node_run_id.clone());
        }
        Ok(())
    }

    fn update_node_run(&mut self, node_run: &NodeRun) -> Result<(), StoreError> {
        self.execute(
            "UPDATE node_runs SET state = $2, body = $3,
                 dispatch_pending = CASE WHEN $4 THEN FALSE ELSE dispatch_pending END,
                 lease_owner = CASE WHEN $4 THEN NULL ELSE lease_owner END,
                 lease_until = CASE WHEN $4 THEN NULL ELSE lease_until END
             WHERE node_run_id = $1",
            &[
                &node_run.node_run_id,
                &node_run.state.as_str(),
                &serde_json::to_string(node_run)?,
                &node_run.state.is_terminal(),
            ],
        )?;
        Ok(())
    }

    fn finish_dispatch(&mut self, node_run_id: &str) -> Result<(), StoreError> {
        self.execute(
            "UPDATE node_runs SET dispatch_pending = FALSE, lease_owner = NULL, lease_until = NULL
             WHERE node_run_id = $1",
            &[&node_run_id],
        )?;
        Ok(())
    }

    fn count_children(&self, parent_node_run_id: &str) -> Result<u64, StoreError> {
        self.count(
            "SELECT COUNT(*) FROM node_runs WHERE parent_node_run_id = $1",
            parent_node_run_id,
        )
    }

    fn count_node_runs(&self, run_id: &str) -> Result<u64, StoreError> {
        self.count("SELECT COUNT(*) FROM node_runs WHERE run_id = $1", run_id)
    }

    fn open_node_runs(&self, run_id: &str) -> Result<Vec<NodeRun>, StoreError> {
        self.query(OPEN_NODE_RUNS.as_str(), &[&run_id])?
            .iter()
            .map(|row| Ok(serde_json::from_str(row.get::<_, &str>(0))?))
            .collect()
    }

    fn append_event(
        &mut self,
        run_id: &str,
        node_run_id: Option<&str>,
        event_type: RunEventType,
        data: Option<JsonObject>,
    ) -> Result<(), StoreError> {
        // Written by `flush_events` when the job ends: one round trip per run.
        let event = RunEvent {
            run_id: run_id.to_owned(),
            node_run_id: node_run_id.map(str::to_owned),
            seq: SEQ_PLACEHOLDER,
            event_type,
            time: arp_types::time::now_rfc3339(),
            data,
            extensions: None,
        };
        let body = serde_json::to_string(&event)?;
        let digits = seq_position(&body)?;
        self.events.push(PendingEvent {
            run_id: event.run_id,
            node_run_id: event.node_run_id,
            body,
            digits,
        });
        self.effects.run_changed(run_id);
        Ok(())
    }

    fn claim_dispatchable(
        &mut self,
        now: i64,
        lease: &Lease,
        limit: usize,
    ) -> Result<usize, StoreError> {
        // SKIP LOCKED: rows another coordinator is claiming or changing right now are
        // left to it; two claims never take the same NodeRun.
        let rows = self.query(
            "UPDATE node_runs SET lease_until = $3, lease_owner = $4
             WHERE node_run_id IN (
                 SELECT node_run_id FROM node_runs
                 WHERE dispatch_pending AND (lease_until IS NULL OR lease_until < $1)
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)
             RETURNING node_run_id",
            &[&now, &(limit as i64), &lease.until, &&*lease.owner],
        )?;
        let n = rows.len();
        self.effects
            .dispatch
            .extend(rows.iter().map(|r| r.get::<_, String>(0)));
        Ok(n)
    }

    fn renew_leases(&mut self, node_run_ids: &[String], lease: &Lease) -> Result<(), StoreError> {
        self.execute(
            "UPDATE node_runs SET lease_until = $2
             WHERE node_run_id = ANY($1) AND dispatch_pending AND lease_owner = $3",
            &[&node_run_ids, &lease.until, &&*lease.owner],
        )?;
        Ok(())
    }

    fn prune_runs(&mut self, ended_before: i64, limit: usize) -> Result<usize, StoreError> {
        let run_ids: Vec<String> = self
            .query(
                "SELECT run_id FROM runs WHERE ended_ms IS NOT NULL AND ended_ms < $1
                 ORDER BY ended_ms LIMIT $2",
                &[&ended_before, &(limit as i64)],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if run_ids.is_empty() {
            return Ok(0);
        }
        for sql in [
            "DELETE FROM events WHERE run_id = ANY($1)",
            "DELETE FROM node_runs WHERE run_id = ANY($1)",
            "DELETE FROM runs WHERE run_id = ANY($1)",
        ] {
            self.execute(sql, &[&run_ids])?;
        }
        Ok(run_ids.len())
    }
}

/// The seq an event is serialised with before the database gives it its own.
const SEQ_PLACEHOLDER: u64 = u64::MAX;

/// Where the placeholder's digits are in an event's JSON. `seq` is serialised
/// before `data` and `extensions`, so the first `"seq":` followed by the
/// placeholder is the event's own.
fn seq_position(body: &str) -> Result<std::ops::Range<usize>, StoreError> {
    let key = "\"seq\":";
    let digits = SEQ_PLACEHOLDER.to_string();
    let at = body
        .find(&format!("{key}{digits}"))
        .ok_or_else(|| StoreError::Commit("an event without its seq".into()))?;
    Ok(at + key.len()..at + key.len() + digits.len())
}

pub(super) fn decode_run(row: &Row) -> Result<Run, StoreError> {
    Ok(serde_json::from_str(row.get::<_, &str>(0))?)
}

pub(super) fn decode_node_run_row(row: &Row) -> Result<NodeRunRow, StoreError> {
    Ok(NodeRunRow {
        node_run: serde_json::from_str(row.get::<_, &str>(0))?,
        depth: row.get::<_, i64>(1) as u64,
        dispatch_pending: row.get(2),
        deadline_at: row.get(3),
    })
}

pub(super) fn decode_event(row: &Row) -> StoredEvent {
    StoredEvent {
        seq: row.get::<_, i64>(0) as u64,
        node_run_id: row.get(1),
        line: row.get(2),
    }
}

pub(super) fn decode_overdue(row: &Row) -> Result<OverdueNodeRun, StoreError> {
    Ok(OverdueNodeRun {
        node_run_id: row.get(0),
        state: serde_json::from_value(serde_json::Value::String(row.get(1)))?,
        deadline_at: row.get(2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_split_around_its_own_seq_not_one_in_its_data() {
        let mut data = JsonObject::new();
        data.insert("seq".into(), serde_json::json!(SEQ_PLACEHOLDER));
        let event = RunEvent {
            run_id: "run_1".into(),
            node_run_id: Some("node_run_\"seq\":1".into()),
            seq: SEQ_PLACEHOLDER,
            event_type: RunEventType::RunStarted,
            time: "t".into(),
            data: Some(data),
            extensions: None,
        };
        let body = serde_json::to_string(&event).unwrap();
        let digits = seq_position(&body).unwrap();
        let stored: RunEvent = serde_json::from_str(&format!(
            "{}7{}",
            &body[..digits.start],
            &body[digits.end..]
        ))
        .unwrap();
        assert_eq!(stored.seq, 7);
        assert_eq!(
            stored.data.unwrap()["seq"],
            serde_json::json!(SEQ_PLACEHOLDER)
        );
        assert_eq!(stored.node_run_id.as_deref(), Some("node_run_\"seq\":1"));
    }
}
