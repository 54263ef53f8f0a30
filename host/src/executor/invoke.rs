//! The guest side of an execution, run on the guest runtime: input
//! validation, a fresh sandbox, the guest call and output validation, all
//! within the execution's deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::outcome::{Failure, Outcome, check_gates, check_inputs, check_outputs};
use super::{Call, Completed, Executor};
use crate::registry::NodeEntry;
use crate::runtime::{Cancel, Interrupted, Sandbox};
use crate::world::Invocation;

/// Everything the guest side of one execution needs.
pub(super) struct GuestJob {
    pub call: Arc<Call>,
    pub entry: Arc<NodeEntry>,
    pub inputs: Value,
    pub id: Arc<str>,
    pub deadline: Instant,
    pub cancel: Arc<Cancel>,
    /// The sandbox slot, held until the guest has stopped.
    pub permit: OwnedSemaphorePermit,
}

impl Executor {
    /// Runs one execution's guest side and serializes its result, so neither
    /// validation nor serialization runs on the API's threads.
    pub(super) async fn run_guest(&self, job: GuestJob) -> Completed {
        let GuestJob {
            call,
            entry,
            inputs,
            id,
            deadline,
            cancel,
            permit,
        } = job;
        let outcome = self
            .guest_outcome(&call, &entry, inputs, &id, deadline, cancel)
            .await;
        drop(permit);
        self.complete(&call, outcome)
    }

    async fn guest_outcome(
        &self,
        call: &Call,
        entry: &NodeEntry,
        inputs: Value,
        id: &Arc<str>,
        deadline: Instant,
        cancel: Arc<Cancel>,
    ) -> Outcome {
        check_gates(entry.side_effect, &call.request)?;
        check_inputs(&entry.input_schema, &inputs)?;
        // serde_json's writer, not `Display`, which goes through `fmt`.
        let inputs = serde_json::to_string(&inputs).expect("a JSON value serializes");
        // Validation counts against the deadline; a guest whose turn came
        // late is not started at all.
        if cancel.is_cancelled() {
            return Err(Failure::Canceled);
        }
        if Instant::now() >= deadline {
            return Err(Failure::Timeout { limit: call.limit });
        }
        let text = self
            .invoke(entry, call, id, inputs, deadline, cancel)
            .await?;
        check_outputs(&entry.output_schema, &text, &self.config.outputs)
    }

    /// Runs the guest in a fresh store; returns its outputs as JSON text.
    async fn invoke(
        &self,
        entry: &NodeEntry,
        call: &Call,
        id: &Arc<str>,
        inputs: String,
        deadline: Instant,
        cancel: Arc<Cancel>,
    ) -> Result<String, Failure> {
        let request = &call.request;
        let mut store = self.registry.runtime().sandbox(Sandbox {
            node_run_id: id.clone(),
            node_type_id: entry.node_type_id.clone(),
            grants: entry.grants.clone(),
            deadline: deadline.into_std(),
            cancel: Some(cancel.clone()),
            runs_long: Some(entry.runs_long.clone()),
        });
        let budgets = request
            .constraints
            .as_ref()
            .and_then(|c| c.budgets.as_ref());
        store
            .data_mut()
            .limit_external_calls(budgets.and_then(|b| b.max_external_calls));

        let trace = request.run_context.as_ref().and_then(|c| c.trace.as_ref());
        let invocation = Invocation {
            node_type_id: String::from(&*entry.node_type_id),
            version: entry.version.clone(),
            inputs,
            run_id: request.run_id.clone(),
            node_run_id: String::from(&**id),
            trace_id: trace.and_then(|t| t.trace_id.clone()),
            span_id: trace.and_then(|t| t.span_id.clone()),
            deadline_unix_ms: unix_ms_at(deadline),
        };
        self.invocations.fetch_add(1, Ordering::Relaxed);
        // The call and its borrow of the store end before the store is read.
        let result = {
            let call_guest = async {
                let pack = &entry.pack;
                let instance = pack
                    .pre
                    .instance_pre()
                    .instantiate_async(&mut store)
                    .await?;
                let invoke = pack.invoke.func(&mut store, &instance).ok_or_else(|| {
                    wasmtime::format_err!("the instance lacks its pack's `invoke`")
                })?;
                // wasmtime lifts the whole result into host memory here; its size
                // is bounded by the guest's memory limit until the caps apply.
                let (result,) = invoke.call_async(&mut store, (&invocation,)).await?;
                Ok::<_, wasmtime::Error>(result)
            };
            let mut call_guest = std::pin::pin!(call_guest);
            // Most calls finish in their first poll; only one that does not needs
            // the timer and the cancellation waiter.
            let first = std::future::poll_fn(|cx| Poll::Ready(call_guest.as_mut().poll(cx))).await;
            match first {
                Poll::Ready(r) => Ok(r),
                // The epoch callback stops spinning guests; this stops guests
                // parked in a host call (a sleep) that the callback never sees.
                Poll::Pending => {
                    let cancelled = std::pin::pin!(cancel.cancelled());
                    let expired = std::pin::pin!(tokio::time::sleep_until(deadline));
                    wait_for_guest(call_guest, cancelled, expired).await
                }
            }
        };
        // A call that ended within its first slice lets the node's next
        // calls start on the short-call threads again (one that ran long set
        // the hint as it moved; one stopped early, by its deadline or a
        // cancel, says nothing of how long the node runs).
        if !store.data().ran_long() && matches!(result, Ok(Ok(_))) {
            entry.runs_long.store(false, Ordering::Relaxed);
        }
        let dropped = store.data().logs_dropped();
        if dropped > 0 {
            self.metrics.guest_log_lines_dropped(dropped.into());
            tracing::warn!(
                node_run_id = %request.node_run_id,
                dropped,
                "guest log lines over the per-execution budget were dropped"
            );
        }
        match result.map_err(|why| Failure::interrupted(why, call.limit))? {
            Ok(Ok(outputs)) => Ok(outputs),
            Ok(Err(node_error)) => Err(Failure::Node(node_error)),
            Err(e) => Err(Failure::from_trap(&e, &request.node_run_id, call.limit)),
        }
    }
}

/// Waits for a guest call whose first poll was pending, or for its
/// cancellation or deadline. The guest is not polled again in the poll that
/// sets the waiters up: one pending because it yielded at an epoch tick would
/// resume at once, on the same thread, and the yield (which may move it to
/// the long-call threads) would have been for nothing. Its own wake-up brings
/// the task back; from then on the guest is polled first, so a result ready
/// at the deadline is the answer.
async fn wait_for_guest<T>(
    mut guest: Pin<&mut impl Future<Output = T>>,
    mut cancelled: Pin<&mut impl Future<Output = ()>>,
    mut expired: Pin<&mut tokio::time::Sleep>,
) -> Result<T, Interrupted> {
    let mut first = true;
    std::future::poll_fn(|cx| {
        if !std::mem::take(&mut first)
            && let Poll::Ready(r) = guest.as_mut().poll(cx)
        {
            return Poll::Ready(Ok(r));
        }
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Interrupted::Canceled));
        }
        if expired.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Interrupted::Timeout));
        }
        Poll::Pending
    })
    .await
}

fn unix_ms_at(deadline: Instant) -> u64 {
    let now = Instant::now();
    let wall = SystemTime::now() + deadline.saturating_duration_since(now);
    wall.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
