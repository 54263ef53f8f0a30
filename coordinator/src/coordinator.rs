//! The Run Coordinator's operations: each API call is one store transaction.

use std::sync::Arc;

use arp_types::run::{
    NodeRun, NodeRunCompleteRequest, NodeRunEvaluationReportRequest, NodeRunsCreateRequest,
    NodeRunsCreateResponse, Run, RunEventType, RunStartRequest, RunState,
};
use arp_types::time::now_rfc3339;
use arp_types::{ConstraintEnvelope, ErrorDetail, Extensions, JsonObject, NodeKind, NodeRunState};
use rand::Rng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::catalog::{NodeCatalog, NodeTypeInfo};
use crate::clients::CompositeExecutorClient;
use crate::config::Config;
use crate::constraints;
use crate::dispatch::{self, Admission};
use crate::policy::{self, Policy, PolicySubject};
use crate::runs::create::{self, validate_constraints};
use crate::runs::error::RunError;
use crate::runs::lifecycle::{self, Admit as _, Completion};
use crate::store::{Lease, Store, StoreError, now_ms};

/// Extension keys the coordinator owns on Runs and NodeRuns.
/// The longest `run_id` a client may choose (ids are keys, log fields and notification payloads).
pub const MAX_RUN_ID_BYTES: usize = 256;

pub mod ext {
    pub const CONSTRAINTS: &str = "jarvis.constraints";
    pub const BINDING_DECISION: &str = "jarvis.binding_decision";
    pub const CANDIDATE_SET_ID: &str = "jarvis.candidate_set_id";
    pub const IDEMPOTENCY_KEY: &str = "jarvis.idempotency_key";
    pub const DECOMPOSITION_ROUNDS: &str = "jarvis.decomposition_rounds";
    pub const COMPLETION_ERROR: &str = "jarvis.completion_error";
    pub const ALL: [&str; 6] = [
        CONSTRAINTS,
        BINDING_DECISION,
        CANDIDATE_SET_ID,
        IDEMPOTENCY_KEY,
        DECOMPOSITION_ROUNDS,
        COMPLETION_ERROR,
    ];
}

/// Everything the API handlers and the dispatcher share.
#[derive(Debug)]
pub struct Coordinator {
    pub store: Store,
    pub config: Config,
    pub catalog: NodeCatalog,
    pub policy: Policy,
    pub atomic: Option<Arc<crate::executors::AtomicExecutors>>,
    pub composite: Option<CompositeExecutorClient>,
    /// Where composite executors call back.
    pub public_url: String,
    pub watchers: Arc<crate::events::RunWatchers>,
    /// Who holds the leases this process takes (one id per process).
    pub lease_owner: Arc<str>,
}

impl Coordinator {
    pub async fn start_run(self: &Arc<Self>, req: RunStartRequest) -> Result<Run, RunError> {
        if let Some(id) = &req.run_id {
            if id.trim().is_empty() {
                return Err(RunError::InvalidRequest("run_id: must not be empty".into()));
            }
            if id.len() > MAX_RUN_ID_BYTES || id.chars().any(char::is_control) {
                return Err(RunError::InvalidRequest(format!(
                    "run_id: at most {MAX_RUN_ID_BYTES} bytes, without control characters"
                )));
            }
        }
        validate_constraints(req.constraints.as_ref())?;
        let run_id = req.run_id.clone().unwrap_or_else(|| new_id("run"));
        let root_id = new_id("node_run");
        // Starting a run never waits on another service: what the catalog does
        // not know yet, dispatch resolves (kind and the node type's constraints).
        let info = self.catalog.lookup_cached(&req.root_node_type_ref);
        let root_constraints =
            constraints::merge([req.constraints.as_ref(), info.constraints.as_ref()]);
        let subject = || PolicySubject {
            run_id: &run_id,
            node_run_id: &root_id,
            node_type_ref: &req.root_node_type_ref,
            run_context: req.run_context.as_ref(),
        };
        let decision = self.policy.decide("run.start", subject()).await;
        let allowed = policy::allows(&decision);
        // When the root's kind is known, its candidates allow it and the execute
        // checkpoint needs no PDP call, this transaction also begins the root's
        // dispatch (`policy_decided`, `running`), as the dispatcher would right after
        // the commit: one commit fewer per run. With a PDP the dispatcher keeps that
        // checkpoint, so a POST waits on one PDP call at most.
        let admission = match info.kind {
            Some(kind)
                if allowed
                    && self.config.auto_dispatch
                    && self.policy.pdp.is_none()
                    && dispatch::candidate_violation(
                        root_constraints.as_ref(),
                        &req.root_node_type_ref.node_type_id,
                    )
                    .is_none() =>
            {
                let decision = self
                    .policy
                    .decide(dispatch::ACTION_EXECUTE, subject())
                    .await;
                Some(Admission::new(
                    self,
                    kind,
                    root_constraints.clone(),
                    decision,
                ))
            }
            _ => None,
        };
        // A root refused at its execute checkpoint fails in this transaction: nothing to dispatch.
        let refusal = admission.as_ref().and_then(Admission::refusal);
        let deadline_at = self.deadline_for(root_constraints.as_ref());
        let lease = (allowed && self.config.auto_dispatch && refusal.is_none())
            .then(|| (self.lease_owner.clone(), self.config.lease));
        let now = now_rfc3339();
        let client_extensions = strip_owned(req.extensions.clone());

        let run = Run {
            run_id: run_id.clone(),
            state: RunState::Running,
            root_node_run_id: root_id.clone(),
            run_context: req.run_context.clone(),
            started_at: Some(now.clone()),
            ended_at: None,
            extensions: extensions_with(
                client_extensions.as_ref(),
                [(ext::CONSTRAINTS, to_value(&req.constraints))],
            ),
        };
        let mut root = NodeRun {
            node_run_id: root_id.clone(),
            run_id: run_id.clone(),
            node_type_ref: req.root_node_type_ref.clone(),
            kind: info.kind,
            parent_node_run_id: None,
            state: NodeRunState::Queued,
            created_at: Some(now),
            started_at: None,
            ended_at: None,
            inputs: Some(req.input),
            outputs: None,
            output_artifacts: None,
            executor_binding: None,
            evaluation_result: None,
            recovery_actions: None,
            extensions: extensions_with(
                client_extensions.as_ref(),
                [(ext::CONSTRAINTS, to_value(&root_constraints))],
            ),
        };

        if let Some(admission) = admission.as_ref().filter(|_| refusal.is_none()) {
            lifecycle::mark_running(&mut root, admission.kind(), admission.binding());
        }

        let run = self
            .store
            .write(move |tx| -> Result<_, RunError> {
                if !tx.insert_run(&run)? {
                    return Err(RunError::RunAlreadyExists(run.run_id.clone()));
                }
                tx.append_event(
                    &run.run_id,
                    None,
                    RunEventType::RunStarted,
                    Some(obj([("root_node_run_id", json!(root_id))])),
                )?;
                let lease = lease.map(|(owner, duration)| Lease::from_now(&owner, duration));
                tx.insert_node_run(&root, 0, deadline_at, lease.as_ref())?;
                tx.append_event(
                    &run.run_id,
                    Some(&root_id),
                    RunEventType::NodeRunAssigned,
                    Some(obj([("root", json!(true))])),
                )?;
                tx.append_event(
                    &run.run_id,
                    Some(&root_id),
                    RunEventType::PolicyDecided,
                    Some(policy::event_data("run.start", &decision)),
                )?;
                if let Some(admission) = &admission {
                    admission.record_decision(tx, &root)?;
                }
                let error = if allowed {
                    refusal
                } else {
                    Some(ErrorDetail::new(
                        "policy_denied",
                        "Run start denied by policy",
                    ))
                };
                match error {
                    None => Ok(run),
                    Some(error) => {
                        lifecycle::complete(tx, root, Completion::failed(error))?;
                        Ok(tx.run(&run.run_id)?.ok_or(StoreError::Closed)?)
                    }
                }
            })
            .await?;
        Ok(run)
    }

    pub async fn get_run(&self, run_id: &str) -> Result<Run, RunError> {
        self.store
            .run(run_id)
            .await?
            .ok_or_else(|| RunError::RunNotFound(run_id.to_owned()))
    }

    /// `run_not_found` unless the run exists (without reading its body).
    pub async fn ensure_run(&self, run_id: &str) -> Result<(), RunError> {
        match self.store.run_terminal(run_id).await? {
            Some(_) => Ok(()),
            None => Err(RunError::RunNotFound(run_id.to_owned())),
        }
    }

    pub async fn get_node_run(&self, node_run_id: &str) -> Result<NodeRun, RunError> {
        let row = self.store.node_run(node_run_id).await?;
        row.map(|r| r.node_run)
            .ok_or_else(|| RunError::NodeRunNotFound(node_run_id.to_owned()))
    }

    pub async fn cancel_run(&self, run_id: String) -> Result<Run, RunError> {
        self.store
            .write(move |tx| lifecycle::cancel_run(tx, &run_id))
            .await
    }

    pub async fn create_node_runs(
        self: &Arc<Self>,
        req: NodeRunsCreateRequest,
    ) -> Result<NodeRunsCreateResponse, RunError> {
        if req.node_runs.is_empty() {
            return Err(RunError::InvalidRequest(
                "node_runs: must contain at least 1 item".into(),
            ));
        }
        for spec in &req.node_runs {
            validate_constraints(spec.constraints.as_ref())?;
        }
        // Cheap checks first so a bad request costs no catalog lookups; the
        // transaction below checks everything again against committed state.
        let run = self.get_run(&req.run_id).await?;
        let parent = self
            .store
            .node_run(&req.parent_node_run_id)
            .await?
            .ok_or_else(|| RunError::ParentNotFound(req.parent_node_run_id.clone()))?;
        if parent.node_run.run_id != run.run_id {
            return Err(RunError::ParentMismatch);
        }
        let parent_kind = match parent.node_run.kind {
            Some(kind) => Some(kind),
            None => {
                self.catalog
                    .lookup(&parent.node_run.node_type_ref)
                    .await
                    .kind
            }
        };
        if parent_kind != Some(NodeKind::Composite) {
            return Err(RunError::ParentNotComposite);
        }
        // Together, so a source that hangs costs the request one bounded wait, not one per child.
        let lookups = req
            .node_runs
            .iter()
            .map(|s| self.catalog.lookup(&s.node_type_ref));
        let infos: Vec<NodeTypeInfo> = futures_util::future::join_all(lookups).await;
        let lease = self
            .config
            .auto_dispatch
            .then(|| (self.lease_owner.clone(), self.config.lease));
        let default_timeout = self.config.node_run_timeout;

        self.store
            .write(move |tx| {
                create::create_node_runs(tx, req, parent_kind, infos, lease, default_timeout)
            })
            .await
    }

    pub async fn complete_node_run(
        &self,
        node_run_id: String,
        req: NodeRunCompleteRequest,
    ) -> Result<(), RunError> {
        self.store
            .write(move |tx| -> Result<_, RunError> {
                let row = lifecycle::open_node_run(tx, &node_run_id)?;
                let completion = Completion {
                    state: req.state.into(),
                    outputs: req.outputs,
                    output_artifacts: req.output_artifacts,
                    error: req.error,
                };
                Ok(lifecycle::complete(tx, row.node_run, completion)?)
            })
            .await
    }

    pub async fn report_evaluation(
        &self,
        node_run_id: String,
        req: NodeRunEvaluationReportRequest,
    ) -> Result<(), RunError> {
        if let Err((path, msg)) = req.evaluation_result.validate() {
            return Err(RunError::InvalidRequest(format!("{path}: {msg}")));
        }
        self.store
            .write(move |tx| -> Result<_, RunError> {
                let row = lifecycle::open_node_run(tx, &node_run_id)?;
                lifecycle::evaluate(tx, row.node_run, req.evaluation_result, req.recovery_action)?;
                Ok(())
            })
            .await
    }

    /// Fails an open NodeRun (no-op if it already ended); its executor is told to stop
    /// after the commit if it was running.
    pub async fn fail_node_run(
        &self,
        node_run_id: &str,
        error: ErrorDetail,
    ) -> Result<(), StoreError> {
        let id = node_run_id.to_owned();
        self.store
            .write(move |tx| lifecycle::fail(tx, &id, error))
            .await
    }

    /// A NodeRun's deadline: its `max_wall_time_ms`, else the configured default, from now.
    pub fn deadline_for(&self, constraints: Option<&ConstraintEnvelope>) -> i64 {
        create::deadline_for(constraints, self.config.node_run_timeout)
    }
}

/// The constraints the coordinator stored on a Run or NodeRun.
pub fn constraints_of(extensions: Option<&Extensions>) -> Option<ConstraintEnvelope> {
    let value = extensions?.get(ext::CONSTRAINTS)?;
    match serde_json::from_value(value.clone()) {
        Ok(c) => Some(c),
        Err(err) => {
            tracing::error!(error = %err, "stored constraints are invalid; ignoring them");
            None
        }
    }
}

/// `base` (minus keys the coordinator owns, so a client cannot forge them) plus
/// `entries` whose value is not null; `None` if the result is empty.
pub fn extensions_with<const N: usize>(
    base: Option<&Extensions>,
    entries: [(&str, Value); N],
) -> Option<Extensions> {
    let mut map = base.map(|e| e.as_map().clone()).unwrap_or_default();
    for (key, value) in entries {
        if value.is_null() {
            map.remove(key);
        } else {
            map.insert(key.to_owned(), value);
        }
    }
    Extensions::new(map).ok().filter(|e| !e.is_empty())
}

/// Removes coordinator-owned keys from client-supplied extensions.
pub fn strip_owned(extensions: Option<Extensions>) -> Option<Extensions> {
    let mut map = extensions?.into_map();
    for key in ext::ALL {
        map.remove(key);
    }
    Extensions::new(map).ok().filter(|e| !e.is_empty())
}

pub(crate) fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

pub(crate) fn to_object<T: serde::Serialize>(value: &T) -> JsonObject {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        _ => JsonObject::new(),
    }
}

pub(crate) fn obj<const N: usize>(entries: [(&str, Value); N]) -> JsonObject {
    entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// `<prefix>_<32 hex>`: 12 hex digits of the current time in ms, then 80 random bits
/// (the layout of a UUIDv7). Ids made later sort later, so the rows and index entries
/// of new runs land on the last pages of each B-tree, where one commit of many runs
/// writes a few pages; random ids would scatter every run over pages of its own.
pub fn new_id(prefix: &str) -> String {
    let ms = (now_ms() as u64) & 0xFFFF_FFFF_FFFF;
    let random = rand::rng().random::<u128>() & ((1 << 80) - 1);
    format!("{prefix}_{ms:012x}{random:020x}")
}

/// The Python coordinator's deterministic id: `node_run_` + the first 32 hex
/// digits of sha256("{run_id}:{parent_node_run_id}:{idempotency_key}").
pub fn idempotent_node_run_id(
    run_id: &str,
    parent_node_run_id: &str,
    idempotency_key: &str,
) -> String {
    let digest =
        Sha256::digest(format!("{run_id}:{parent_node_run_id}:{idempotency_key}").as_bytes());
    let mut hex = String::with_capacity(32);
    for byte in &digest[..16] {
        hex.push_str(&format!("{byte:02x}"));
    }
    format!("node_run_{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_have_32_hex_digits_and_sort_by_creation_time() {
        let first = new_id("run");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = new_id("run");
        for id in [&first, &second] {
            let hex = id.strip_prefix("run_").unwrap();
            assert_eq!(hex.len(), 32, "{id}");
            assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
        assert!(first < second, "{first} then {second}");
        assert_ne!(new_id("run"), new_id("run"));
    }

    #[test]
    fn idempotent_ids_match_the_python_coordinator() {
        // python: "node_run_" + hashlib.sha256(b"run_1:node_run_p:k1").hexdigest()[:32]
        assert_eq!(
            idempotent_node_run_id("run_1", "node_run_p", "k1"),
            "node_run_55a279293b109e93f7ad28b362dbd182"
        );
    }

    #[test]
    fn owned_extension_keys_are_stripped_and_nulls_dropped() {
        let client: Extensions =
            serde_json::from_value(json!({"jarvis.constraints": {"x": 1}, "acme.tag": "t"}))
                .unwrap();
        let stripped = strip_owned(Some(client));
        let merged = extensions_with(
            stripped.as_ref(),
            [(ext::CONSTRAINTS, Value::Null), ("jarvis.other", json!(1))],
        );
        assert_eq!(
            serde_json::to_value(merged).unwrap(),
            json!({"acme.tag": "t", "jarvis.other": 1})
        );
    }
}
