//! A composite NodeRun: the begin call; the composite executor reports back through the API.

use std::sync::Arc;

use arp_types::ErrorDetail;
use arp_types::composite::CompositeBeginRequest;

use crate::coordinator::{Coordinator, constraints_of};
use crate::store::StoreError;

use super::begin::Execution;
use super::retry::{until_committed, with_retries};

pub(super) async fn begin_composite(
    coord: &Arc<Coordinator>,
    execution: Execution,
) -> Result<(), StoreError> {
    let Execution {
        node_run,
        run,
        deadline_at,
    } = execution;
    let Some(composite) = coord.composite.clone() else {
        return Ok(());
    };
    let request = CompositeBeginRequest {
        node_run_id: node_run.node_run_id.clone(),
        run_id: node_run.run_id.clone(),
        node_type_ref: node_run.node_type_ref.clone(),
        inputs: node_run.inputs.clone().unwrap_or_default(),
        run_context: run.run_context.clone(),
        constraints: constraints_of(node_run.extensions.as_ref()),
        coordinator_endpoint: coord.public_url.clone(),
        assignment_token: None,
        extensions: node_run.extensions.clone(),
    };
    let id = node_run.node_run_id.clone();
    let outcome = with_retries(
        coord,
        "composite_executor_unavailable",
        &id,
        deadline_at,
        |timeout| {
            let composite = composite.clone();
            let request = &request;
            async move { composite.begin(request, timeout).await }
        },
    )
    .await;
    let error = match outcome {
        Ok(None) => return Ok(()),
        Ok(Some(resp)) if resp.accepted => {
            tracing::debug!(node_run_id = %id, "composite assignment accepted");
            until_committed(coord, &id, "recording the composite assignment", || {
                let id = id.clone();
                coord.store.write(move |tx| tx.finish_dispatch(&id))
            })
            .await;
            return Ok(());
        }
        Ok(Some(resp)) => {
            let message = resp
                .message
                .unwrap_or_else(|| "Composite assignment rejected".into());
            ErrorDetail::new("composite_rejected", message)
        }
        Err(error) => error,
    };
    until_committed(coord, &id, "recording the composite failure", || {
        coord.fail_node_run(&id, error.clone())
    })
    .await;
    Ok(())
}
