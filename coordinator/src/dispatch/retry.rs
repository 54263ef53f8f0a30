//! Retrying executor calls (until a verdict or the deadline) and store writes (until committed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arp_types::ErrorDetail;
use rand::Rng;

use crate::clients::CallError;
use crate::coordinator::Coordinator;
use crate::store::{StoreError, now_ms};

/// Extra time an execute call may take beyond the NodeRun's deadline, so the
/// executor's own timeout verdict arrives before ours.
pub(super) const CALL_GRACE: Duration = Duration::from_secs(3);
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Retrying a failed store write: the store usually recovers in well under a second.
const WRITE_RETRY_MAX: Duration = Duration::from_secs(1);

/// Exponential backoff with full jitter, at least `retry_after`, at most until the deadline.
pub(super) fn backoff(attempt: u32, retry_after: Option<Duration>, deadline_at: i64) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(BACKOFF_MAX);
    let jittered = Duration::from_millis(rand::rng().random_range(0..=ceiling.as_millis() as u64));
    let wait = retry_after.map_or(jittered, |r| r.max(jittered));
    wait.min(Duration::from_millis((deadline_at - now_ms()).max(0) as u64))
}

/// Calls `attempt` until it gives a verdict, retrying transient failures with
/// exponential backoff and full jitter until the deadline. Stops early if the
/// NodeRun ended meanwhile (canceled, completed through the API).
pub(super) async fn with_retries<T, F, Fut>(
    coord: &Arc<Coordinator>,
    unavailable_code: &str,
    node_run_id: &str,
    deadline_at: i64,
    mut attempt: F,
) -> Result<Option<T>, ErrorDetail>
where
    F: FnMut(Duration) -> Fut,
    Fut: std::future::Future<Output = Result<T, CallError>>,
{
    let mut last_reason = None;
    let mut silent = false;
    for n in 0u32.. {
        let remaining = deadline_at - now_ms();
        if remaining <= 0 {
            break;
        }
        let timeout = Duration::from_millis(remaining as u64) + CALL_GRACE;
        let called = Instant::now();
        let retry_after = match attempt(timeout).await {
            Ok(value) => return Ok(Some(value)),
            Err(CallError::Terminal(detail)) => return Err(detail),
            Err(CallError::Transient {
                reason,
                retry_after,
            }) => {
                tracing::debug!(%node_run_id, attempt = n, %reason, "transient dispatch failure; retrying");
                // The call lasted until its timeout: the executor never answered.
                silent = called.elapsed() + Duration::from_millis(50) >= timeout;
                last_reason = Some(reason);
                retry_after
            }
        };
        tokio::time::sleep(backoff(n, retry_after, deadline_at)).await;
        match coord.store.node_run(node_run_id).await {
            Ok(Some(row)) if !row.node_run.state.is_terminal() => {}
            _ => return Ok(None),
        }
    }
    Err(match last_reason {
        Some(reason) if silent => ErrorDetail::new(
            "deadline_exceeded",
            format!(
                "NodeRun did not finish before its deadline: the executor did not answer ({reason})"
            ),
        ),
        Some(reason) => ErrorDetail::new(
            unavailable_code,
            format!("Executor unavailable until the NodeRun's deadline: {reason}"),
        )
        .with_retryable(true),
        None => ErrorDetail::new(
            "deadline_exceeded",
            "NodeRun did not finish before its deadline: its deadline had passed before the executor could be called",
        ),
    })
}

/// Repeats `write` (backing off, up to a second apart) until it commits, while the
/// NodeRun is still open: an outcome the executor delivered must not be lost to a
/// store that fails for a while. `None` if the NodeRun ended meanwhile.
pub(super) async fn until_committed<T, F, Fut>(
    coord: &Arc<Coordinator>,
    node_run_id: &str,
    what: &str,
    mut write: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    for n in 0u32.. {
        match write().await {
            Ok(value) => return Some(value),
            // Shutting down: the lease runs out and whoever opens the database next takes it up.
            Err(StoreError::Closed) => return None,
            Err(err) => {
                tracing::warn!(%node_run_id, attempt = n, error = %err, "{what} failed; retrying");
            }
        }
        let ceiling = BACKOFF_BASE
            .saturating_mul(2u32.saturating_pow(n.min(16)))
            .min(WRITE_RETRY_MAX);
        let wait =
            rand::rng().random_range(ceiling.as_millis() as u64 / 2..=ceiling.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        match coord.store.node_run(node_run_id).await {
            Ok(Some(row)) if row.node_run.state.is_terminal() => return None,
            Ok(None) => return None,
            // A failing read is no reason to give up the outcome.
            _ => {}
        }
    }
    unreachable!("the loop returns")
}
