//! NodeRun creation: the checks, idempotency keys and structural limits, in the caller's transaction.

use std::sync::Arc;
use std::time::Duration;

use arp_types::run::{
    NodeRun, NodeRunCreateSpec, NodeRunsCreateRequest, NodeRunsCreateResponse, RunEventType,
};
use arp_types::time::now_rfc3339;
use arp_types::{ConstraintEnvelope, NodeKind, NodeRunState};
use serde_json::{Value, json};

use crate::catalog::NodeTypeInfo;
use crate::constraints;
use crate::coordinator::{
    constraints_of, ext, extensions_with, idempotent_node_run_id, new_id, obj, strip_owned,
    to_value,
};
use crate::runs::error::RunError;
use crate::runs::lifecycle;
use crate::store::{Lease, RunTx, now_ms};

/// A NodeRun's deadline: its `max_wall_time_ms`, else `default_timeout`, from now.
pub fn deadline_for(constraints: Option<&ConstraintEnvelope>, default_timeout: Duration) -> i64 {
    let budget = constraints
        .and_then(ConstraintEnvelope::max_wall_time_ms)
        .unwrap_or(default_timeout.as_millis() as u64);
    now_ms().saturating_add(budget.min(i64::MAX as u64 / 2) as i64)
}

/// Creates the children of a composite NodeRun (or returns those an idempotency key
/// already created), with their events, leased for dispatch when `lease` is given.
pub fn create_node_runs(
    tx: &mut dyn RunTx,
    req: NodeRunsCreateRequest,
    parent_kind: Option<NodeKind>,
    infos: Vec<NodeTypeInfo>,
    lease: Option<(Arc<str>, Duration)>,
    default_timeout: Duration,
) -> Result<NodeRunsCreateResponse, RunError> {
    let run = tx
        .run(&req.run_id)?
        .ok_or_else(|| RunError::RunNotFound(req.run_id.clone()))?;
    let parent_row = tx
        .node_run(&req.parent_node_run_id)?
        .ok_or_else(|| RunError::ParentNotFound(req.parent_node_run_id.clone()))?;
    let mut parent = parent_row.node_run;
    if parent.run_id != run.run_id {
        return Err(RunError::ParentMismatch);
    }
    if parent.kind.or(parent_kind) != Some(NodeKind::Composite) {
        return Err(RunError::ParentNotComposite);
    }
    if run.state.is_terminal() {
        return Err(RunError::RunNotActive {
            run_id: run.run_id.clone(),
            state: run.state.as_str(),
        });
    }
    if parent.state.is_terminal() {
        return Err(RunError::ParentTerminal(parent.node_run_id.clone()));
    }

    let run_constraints = constraints_of(run.extensions.as_ref());
    let parent_constraints = constraints_of(parent.extensions.as_ref());
    let structural = constraints::merge([run_constraints.as_ref(), parent_constraints.as_ref()])
        .and_then(|c| c.structural);

    let mut response: Vec<NodeRun> = Vec::with_capacity(req.node_runs.len());
    let mut new_runs: Vec<(NodeRun, i64)> = Vec::new();
    for (spec, info) in req.node_runs.iter().zip(&infos) {
        let effective = constraints::merge([
            run_constraints.as_ref(),
            info.constraints.as_ref(),
            spec.constraints.as_ref(),
        ]);
        let node_run_id = match &spec.idempotency_key {
            Some(key) => idempotent_node_run_id(&req.run_id, &req.parent_node_run_id, key),
            None => new_id("node_run"),
        };
        if spec.idempotency_key.is_some() {
            let earlier = match tx.node_run(&node_run_id)? {
                Some(row) => Some(row.node_run),
                None => new_runs
                    .iter()
                    .find(|(n, _)| n.node_run_id == node_run_id)
                    .map(|(n, _)| n.clone()),
            };
            if let Some(existing) = earlier {
                assert_idempotent_match(&existing, spec, &req, effective.as_ref())?;
                response.push(existing);
                continue;
            }
        }
        let candidate_set_id = spec.candidate_set_id.clone().or_else(|| {
            spec.binding_decision
                .as_ref()
                .and_then(|b| b.candidate_set_id.clone())
        });
        let extensions = extensions_with(
            strip_owned(spec.extensions.clone()).as_ref(),
            [
                (ext::BINDING_DECISION, to_value(&spec.binding_decision)),
                (ext::CANDIDATE_SET_ID, to_value(&candidate_set_id)),
                (ext::IDEMPOTENCY_KEY, to_value(&spec.idempotency_key)),
                (ext::CONSTRAINTS, to_value(&effective)),
            ],
        );
        let node_run = NodeRun {
            node_run_id,
            run_id: req.run_id.clone(),
            node_type_ref: spec.node_type_ref.clone(),
            kind: info.kind,
            parent_node_run_id: Some(req.parent_node_run_id.clone()),
            state: NodeRunState::Queued,
            created_at: Some(now_rfc3339()),
            started_at: None,
            ended_at: None,
            inputs: Some(spec.inputs.clone()),
            outputs: None,
            output_artifacts: None,
            executor_binding: None,
            evaluation_result: None,
            recovery_actions: None,
            extensions,
        };
        response.push(node_run.clone());
        new_runs.push((node_run, deadline_for(effective.as_ref(), default_timeout)));
    }

    let new_count = new_runs.len() as u64;
    if new_count == 0 {
        return Ok(NodeRunsCreateResponse {
            node_runs: response,
            extensions: req.extensions,
        });
    }
    let rounds = parent
        .extensions
        .as_ref()
        .and_then(|e| e.get(ext::DECOMPOSITION_ROUNDS))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if let Some(s) = &structural {
        let violation = RunError::ConstraintViolation;
        if s.max_depth.is_some_and(|max| parent_row.depth + 1 > max) {
            return Err(violation("max_depth"));
        }
        if let Some(max) = s.max_children_per_composite
            && tx.count_children(&parent.node_run_id)? + new_count > max
        {
            return Err(violation("max_children_per_composite"));
        }
        if let Some(max) = s.max_total_nodes_per_run
            && tx.count_node_runs(&run.run_id)? + new_count > max
        {
            return Err(violation("max_total_nodes_per_run"));
        }
        if s.max_decomposition_rounds_per_node
            .is_some_and(|max| rounds + 1 > max)
        {
            return Err(violation("max_decomposition_rounds_per_node"));
        }
    }

    tx.append_event(
        &run.run_id,
        Some(&parent.node_run_id),
        RunEventType::CompositeDecomposed,
        Some(obj([("node_run_count", json!(new_count))])),
    )?;
    lifecycle::count_decomposition_round(tx, &mut parent, rounds + 1)?;

    for (node_run, deadline_at) in &new_runs {
        let lease = lease
            .as_ref()
            .map(|(owner, duration)| Lease::from_now(owner, *duration));
        tx.insert_node_run(node_run, parent_row.depth + 1, *deadline_at, lease.as_ref())?;
        let id = Some(node_run.node_run_id.as_str());
        tx.append_event(
            &run.run_id,
            id,
            RunEventType::NodeRunAssigned,
            Some(obj([("parent_node_run_id", json!(parent.node_run_id))])),
        )?;
        let extensions = node_run.extensions.as_ref();
        let binding = extensions
            .and_then(|e| e.get(ext::BINDING_DECISION))
            .cloned();
        if let Some(Value::Object(binding)) = &binding {
            tx.append_event(
                &run.run_id,
                id,
                RunEventType::SubtaskMapped,
                Some(binding.clone()),
            )?;
        }
        if let Some(candidate_set_id) = extensions.and_then(|e| e.get(ext::CANDIDATE_SET_ID)) {
            let mut data = obj([("candidate_set_id", candidate_set_id.clone())]);
            if let Some(subtask) = binding.as_ref().and_then(|b| b.get("subtask_id")) {
                data.insert("subtask_id".into(), subtask.clone());
            }
            tx.append_event(
                &run.run_id,
                id,
                RunEventType::CandidateSetGenerated,
                Some(data),
            )?;
        }
    }
    Ok(NodeRunsCreateResponse {
        node_runs: response,
        extensions: req.extensions,
    })
}

fn assert_idempotent_match(
    existing: &NodeRun,
    spec: &NodeRunCreateSpec,
    req: &NodeRunsCreateRequest,
    expected_constraints: Option<&ConstraintEnvelope>,
) -> Result<(), RunError> {
    let conflict = RunError::IdempotencyConflict;
    if existing.run_id != req.run_id
        || existing.parent_node_run_id.as_deref() != Some(&req.parent_node_run_id)
    {
        return Err(conflict("parent/run"));
    }
    if existing.node_type_ref != spec.node_type_ref {
        return Err(conflict("NodeTypeRef"));
    }
    if existing.inputs.as_ref() != Some(&spec.inputs) {
        return Err(conflict("inputs"));
    }
    let stored = |key: &str| {
        existing
            .extensions
            .as_ref()
            .and_then(|e| e.get(key))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let candidate_set_id = spec.candidate_set_id.clone().or_else(|| {
        spec.binding_decision
            .as_ref()
            .and_then(|b| b.candidate_set_id.clone())
    });
    for (key, expected) in [
        (ext::BINDING_DECISION, to_value(&spec.binding_decision)),
        (ext::CANDIDATE_SET_ID, to_value(&candidate_set_id)),
        (ext::CONSTRAINTS, to_value(&expected_constraints)),
    ] {
        if stored(key) != expected {
            return Err(conflict(key.trim_start_matches("jarvis.")));
        }
    }
    Ok(())
}

/// `invalid_request` naming the field when a constraint envelope is malformed.
pub fn validate_constraints(constraints: Option<&ConstraintEnvelope>) -> Result<(), RunError> {
    match constraints.map(ConstraintEnvelope::validate) {
        Some(Err((path, msg))) => Err(RunError::InvalidRequest(format!("{path}: {msg}"))),
        _ => Ok(()),
    }
}
