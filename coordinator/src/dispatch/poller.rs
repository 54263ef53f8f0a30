//! Takes up NodeRuns whose lease ran out and fails NodeRuns past their deadline.

use std::sync::Arc;
use std::time::Duration;

use arp_types::{ErrorDetail, NodeRunState};
use serde_json::json;

use crate::store::OverdueNodeRun;
use crate::store::{Lease, now_ms};

use super::Dispatcher;
use super::retry::CALL_GRACE;

/// NodeRuns claimed per poller transaction.
const CLAIM_BATCH: usize = 256;
/// Overdue NodeRuns failed per poll.
const OVERDUE_BATCH: usize = 256;

/// Takes up NodeRuns whose lease ran out and fails NodeRuns past their deadline.
pub(super) async fn poll(dispatcher: Arc<Dispatcher>) {
    let coord = &dispatcher.coord;
    let mut tick = tokio::time::interval(coord.config.timing.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if coord.config.auto_dispatch {
            loop {
                let (owner, duration) = (coord.lease_owner.clone(), coord.config.lease);
                let claimed = coord
                    .store
                    .write(move |tx| {
                        let lease = Lease::from_now(&owner, duration);
                        tx.claim_dispatchable(now_ms(), &lease, CLAIM_BATCH)
                    })
                    .await;
                match claimed {
                    Ok(n) if n == CLAIM_BATCH => continue,
                    Ok(_) => break,
                    Err(err) => {
                        tracing::error!(error = %err, "claiming NodeRuns failed");
                        break;
                    }
                }
            }
        }
        let grace = coord.config.timing.deadline_grace.as_millis() as i64;
        let overdue = coord
            .store
            .overdue_node_runs(now_ms() - grace, OVERDUE_BATCH)
            .await
            .unwrap_or_else(|err| {
                tracing::error!(error = %err, "looking for overdue NodeRuns failed");
                Vec::new()
            });
        for OverdueNodeRun {
            node_run_id,
            state,
            deadline_at,
        } in overdue
        {
            // A dispatch of ours gives its own verdict by deadline + CALL_GRACE, and may
            // hold an outcome it is still trying to record: leave it that long, and a grace more.
            let dispatching = dispatcher.in_flight.lock().unwrap().contains(&node_run_id);
            let patience = (CALL_GRACE.as_millis() as i64).saturating_add(2 * grace);
            if dispatching && now_ms() < deadline_at.saturating_add(patience) {
                continue;
            }
            let error = dispatcher.deadline_error(&node_run_id, state, deadline_at);
            if let Err(err) = coord.fail_node_run(&node_run_id, error).await {
                tracing::error!(%node_run_id, error = %err, "failing an overdue NodeRun failed");
            }
        }
    }
}

impl Dispatcher {
    /// `deadline_exceeded`, saying what kept the NodeRun from finishing.
    fn deadline_error(
        &self,
        node_run_id: &str,
        state: NodeRunState,
        deadline_at: i64,
    ) -> ErrorDetail {
        let dispatching = self.in_flight.lock().unwrap().contains(node_run_id);
        let running = state == NodeRunState::Running;
        let why = if dispatching && running {
            "the executor did not answer before the deadline"
        } else if dispatching {
            "its dispatch did not reach the executor before the deadline"
        } else if self.started_ms > deadline_at {
            "the coordinator was not running at the deadline"
        } else if running {
            "no dispatcher held it at the deadline (its dispatch failed and was not retried in time)"
        } else {
            "it was never dispatched (auto-dispatch off, or every dispatch attempt failed)"
        };
        let iso = |ms: i64| time_from_ms(ms).unwrap_or_default();
        ErrorDetail::new(
            "deadline_exceeded",
            format!("NodeRun did not finish before its deadline: {why}"),
        )
        .with_details(
            [
                ("state".to_owned(), json!(state.as_str())),
                ("deadline_at".to_owned(), json!(iso(deadline_at))),
                ("dispatching".to_owned(), json!(dispatching)),
                (
                    "coordinator_started_at".to_owned(),
                    json!(iso(self.started_ms)),
                ),
            ]
            .into_iter()
            .collect(),
        )
    }
}

/// RFC 3339 of ms since the epoch.
fn time_from_ms(ms: i64) -> Option<String> {
    let t = std::time::UNIX_EPOCH.checked_add(Duration::from_millis(u64::try_from(ms).ok()?))?;
    Some(humantime::format_rfc3339_millis(t).to_string())
}
