//! An atomic NodeRun: the execute call, then its outcome recorded.

use std::sync::Arc;

use arp_types::AtomicExecuteRequest;

use crate::clients::CallError;
use crate::coordinator::{Coordinator, constraints_of};
use crate::runs::lifecycle::{self, Completion};
use crate::store::StoreError;

use super::begin::Execution;
use super::retry::{until_committed, with_retries};

pub(super) async fn execute_atomic(
    coord: &Arc<Coordinator>,
    execution: Execution,
) -> Result<(), StoreError> {
    let Execution {
        node_run,
        run,
        deadline_at,
    } = execution;
    let Some(atomic) = coord.atomic.clone() else {
        return Ok(());
    };
    let request = AtomicExecuteRequest {
        node_run_id: node_run.node_run_id.clone(),
        run_id: node_run.run_id.clone(),
        node_type_ref: node_run.node_type_ref.clone(),
        inputs: node_run.inputs.clone().unwrap_or_default(),
        run_context: run.run_context.clone(),
        constraints: constraints_of(node_run.extensions.as_ref()),
        extensions: None,
    };
    let id = node_run.node_run_id.clone();
    let outcome = with_retries(
        coord,
        "atomic_executor_unavailable",
        &id,
        deadline_at,
        |timeout| {
            let atomic = atomic.clone();
            let request = &request;
            async move {
                let (result, answered_by) = atomic.execute(request, timeout).await?;
                if result.node_run_id != request.node_run_id {
                    return Err(CallError::terminal(
                        "atomic_executor_bad_response",
                        "Executor answered for another NodeRun",
                    ));
                }
                // A non-terminal answer is no verdict: ask again; the retry attaches to the execution in flight.
                if !result.state.is_terminal() {
                    return Err(CallError::Transient {
                        reason: format!("result not terminal ({:?})", result.state),
                        retry_after: None,
                    });
                }
                Ok((result, answered_by))
            }
        },
    )
    .await;
    let (completion, answered_by) = match outcome {
        Ok(None) => return Ok(()),
        Ok(Some((result, answered_by))) => (
            Completion {
                state: result.state,
                outputs: result.outputs,
                output_artifacts: result.output_artifacts,
                error: result.error,
            },
            Some(answered_by),
        ),
        Err(error) => (Completion::failed(error), None),
    };
    until_committed(coord, &id, "recording the outcome", || {
        let (id, completion, answered_by) = (id.clone(), completion.clone(), answered_by.clone());
        coord
            .store
            .write(move |tx| lifecycle::record_atomic_result(tx, &id, completion, answered_by))
    })
    .await;
    Ok(())
}
