//! The coordinator's API without an atomic executor: create_node_runs checks, idempotency,
//! structural limits under concurrency, state guards, cancel, policy and event streams.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::{
    COMPOSITE_TYPE, CompositeMode, Coordinator, Options, TestCompositeExecutor, TestDb,
    assert_gapless, types,
};

const WAIT: Duration = Duration::from_secs(10);

/// A coordinator whose composite root is held open by the test composite executor.
async fn held(constraints: Value) -> (Coordinator, TestCompositeExecutor, Value) {
    let ce = TestCompositeExecutor::start(CompositeMode::Hold).await;
    let coord = Coordinator::start(Options {
        composite_executor_url: Some(ce.url.clone()),
        ..Options::default()
    })
    .await;
    let extra = if constraints.is_null() {
        json!({})
    } else {
        json!({"constraints": constraints})
    };
    let run = coord.start_run(COMPOSITE_TYPE, "1", json!({}), extra).await;
    let root = run["root_node_run_id"].as_str().unwrap().to_owned();
    coord.wait_node_state(&root, "running", WAIT).await;
    // `running` can be recorded with the POST, before the dispatcher's begin call.
    let waiting = std::time::Instant::now();
    let begin = loop {
        if let Some(begin) = ce.begins().into_iter().find(|b| b.node_run_id == root) {
            break begin;
        }
        assert!(waiting.elapsed() < WAIT, "begin never reached the executor");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(
        begin.coordinator_endpoint, coord.url,
        "coordinator_endpoint is where the coordinator listens"
    );
    (coord, ce, run)
}

fn child(node_type_id: &str, inputs: Value) -> Value {
    json!({"node_type_ref": {"node_type_id": node_type_id, "version": "1"}, "inputs": inputs})
}

async fn create(
    coord: &Coordinator,
    run_id: &str,
    parent: &str,
    specs: Vec<Value>,
) -> (StatusCode, Value) {
    coord
        .post(
            "/v1/node-runs",
            json!({"run_id": run_id, "parent_node_run_id": parent, "node_runs": specs}),
        )
        .await
}

#[tokio::test]
async fn create_node_runs_answers_every_error_code_in_reference_order() {
    let (coord, _ce, run) = held(json!({"structural": {"max_children_per_composite": 2}})).await;
    let run_id = run["run_id"].as_str().unwrap();
    let root = run["root_node_run_id"].as_str().unwrap();
    let other = coord
        .start_run(COMPOSITE_TYPE, "1", json!({}), json!({}))
        .await;
    let other_root = other["root_node_run_id"].as_str().unwrap();

    let (s, e) = create(
        &coord,
        "run_missing",
        "node_run_missing",
        vec![child("atomic.t", json!({}))],
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("run_not_found"))
    );

    let (s, e) = create(
        &coord,
        run_id,
        "node_run_missing",
        vec![child("atomic.t", json!({}))],
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("parent_node_run_not_found"))
    );

    let (s, e) = create(
        &coord,
        run_id,
        other_root,
        vec![child("atomic.t", json!({}))],
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("parent_node_run_mismatch"))
    );

    let (s, created) = create(&coord, run_id, root, vec![child("atomic.t", json!({}))]).await;
    assert_eq!(s, StatusCode::OK, "{created}");
    let atomic_child = created["node_runs"][0]["node_run_id"].as_str().unwrap();
    assert_eq!(created["node_runs"][0]["kind"], "atomic");
    let (s, e) = create(
        &coord,
        run_id,
        atomic_child,
        vec![child("atomic.t", json!({}))],
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("parent_node_run_invalid"))
    );

    // One child exists and the limit is 2: two more violate it, and write nothing.
    // (The child has no executor to go to: let its dispatch finish first.)
    coord.wait_node_state(atomic_child, "failed", WAIT).await;
    let before = coord.events(run_id).await;
    let (s, e) = create(
        &coord,
        run_id,
        root,
        vec![child("atomic.t", json!({})), child("atomic.t", json!({}))],
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("constraint_violation")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_children_per_composite")
    );
    assert_eq!(
        coord.events(run_id).await,
        before,
        "a rejected request must write no event"
    );

    let (s, e) = coord
        .post(
            "/v1/node-runs",
            json!({"run_id": run_id, "parent_node_run_id": root, "node_runs": []}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
}

#[tokio::test]
async fn depth_total_and_rounds_limits_are_enforced() {
    let limits = json!({"structural": {"max_depth": 1, "max_total_nodes_per_run": 4, "max_decomposition_rounds_per_node": 2}});
    let (coord, _ce, run) = held(limits).await;
    let run_id = run["run_id"].as_str().unwrap();
    let root = run["root_node_run_id"].as_str().unwrap();

    let (s, c) = create(&coord, run_id, root, vec![child(COMPOSITE_TYPE, json!({}))]).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    let composite_child = c["node_runs"][0]["node_run_id"].as_str().unwrap();
    let (s, e) = create(
        &coord,
        run_id,
        composite_child,
        vec![child("atomic.t", json!({}))],
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_depth"),
        "{e}"
    );

    let (s, _) = create(&coord, run_id, root, vec![child("atomic.t", json!({}))]).await;
    assert_eq!(s, StatusCode::OK);
    // Third round from the same parent.
    let (s, e) = create(&coord, run_id, root, vec![child("atomic.t", json!({}))]).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_decomposition_rounds_per_node"),
        "{e}"
    );
}

#[tokio::test]
async fn total_nodes_limit_counts_the_root() {
    let (coord, _ce, run) = held(json!({"structural": {"max_total_nodes_per_run": 3}})).await;
    let (run_id, root) = (
        run["run_id"].as_str().unwrap(),
        run["root_node_run_id"].as_str().unwrap(),
    );
    let three = vec![
        child("atomic.t", json!({})),
        child("atomic.t", json!({})),
        child("atomic.t", json!({})),
    ];
    let (s, e) = create(&coord, run_id, root, three).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_total_nodes_per_run"),
        "{e}"
    );
    let (s, _) = create(
        &coord,
        run_id,
        root,
        vec![child("atomic.t", json!({})), child("atomic.t", json!({}))],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn idempotent_replay_returns_the_same_node_runs_and_a_changed_spec_conflicts() {
    let (coord, _ce, run) = held(Value::Null).await;
    let (run_id, root) = (
        run["run_id"].as_str().unwrap(),
        run["root_node_run_id"].as_str().unwrap(),
    );
    let spec = |echo: &str| json!({"node_type_ref": {"node_type_id": "atomic.t", "version": "1"}, "inputs": {"echo": echo}, "idempotency_key": "k1"});
    let (s, first) = create(&coord, run_id, root, vec![spec("a")]).await;
    assert_eq!(s, StatusCode::OK, "{first}");
    let id = first["node_runs"][0]["node_run_id"].as_str().unwrap();
    let digest = Sha256::digest(format!("{run_id}:{root}:k1").as_bytes());
    let expected: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        id,
        format!("node_run_{expected}"),
        "same deterministic id as the Python coordinator"
    );
    assert_eq!(
        first["node_runs"][0]["extensions"]["jarvis.idempotency_key"],
        "k1"
    );

    let events_before = coord.events(run_id).await;
    let (s, replay) = create(&coord, run_id, root, vec![spec("a")]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(replay["node_runs"][0]["node_run_id"], id);
    let decomposed = |events: &[Value]| {
        types(events)
            .iter()
            .filter(|t| *t == "composite_decomposed")
            .count()
    };
    // A replay creates nothing and so writes no composite_decomposed event.
    assert_eq!(
        decomposed(&coord.events(run_id).await),
        decomposed(&events_before)
    );

    let (s, e) = create(&coord, run_id, root, vec![spec("b")]).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_conflict"))
    );
    let mut other_type = spec("a");
    other_type["node_type_ref"]["node_type_id"] = json!("atomic.u");
    let (s, e) = create(&coord, run_id, root, vec![other_type]).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_conflict"))
    );
}

#[tokio::test]
async fn concurrent_creates_never_exceed_max_children_per_composite() {
    let (coord, _ce, run) = held(json!({"structural": {"max_children_per_composite": 5}})).await;
    let (run_id, root) = (
        run["run_id"].as_str().unwrap().to_owned(),
        run["root_node_run_id"].as_str().unwrap().to_owned(),
    );
    let coord = std::sync::Arc::new(coord);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (coord, run_id, root) = (coord.clone(), run_id.clone(), root.clone());
            tokio::spawn(async move {
                create(
                    &coord,
                    &run_id,
                    &root,
                    vec![child("atomic.t", json!({"i": i}))],
                )
                .await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let (s, body) = t.await.unwrap();
        match s {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => assert_eq!(body["error"]["code"], "constraint_violation"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(ok, 5, "exactly the limit is created");
    let events = coord.events(&run_id).await;
    let assigned = events
        .iter()
        .filter(|e| {
            e["type"] == "node_run_assigned" && e["data"]["parent_node_run_id"] == json!(root)
        })
        .count();
    assert_eq!(assigned, 5);
    assert_gapless(&events);
}

#[tokio::test]
async fn complete_or_evaluate_a_terminal_node_run_is_409() {
    let (coord, _ce, run) = held(Value::Null).await;
    let (run_id, root) = (
        run["run_id"].as_str().unwrap(),
        run["root_node_run_id"].as_str().unwrap(),
    );
    let eval = json!({"evaluation_result": {"status": "success", "confidence": 0.9}, "recovery_action": {"type": "retry"}});
    let (s, _) = coord
        .post(&format!("/v1/node-runs/{root}:evaluation"), eval.clone())
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = coord
        .post(
            &format!("/v1/node-runs/{root}:complete"),
            json!({"state": "succeeded", "outputs": {"x": 1}}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let done = coord.wait_terminal(run_id, WAIT).await;
    assert_eq!(done["state"], "succeeded");
    assert!(done["ended_at"].is_string());

    let (s, e) = coord
        .post(
            &format!("/v1/node-runs/{root}:complete"),
            json!({"state": "failed"}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("node_run_already_terminal"))
    );
    let (s, e) = coord
        .post(&format!("/v1/node-runs/{root}:evaluation"), eval)
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("node_run_already_terminal"))
    );
    let (s, e) = coord
        .post(
            "/v1/node-runs/node_run_missing:complete",
            json!({"state": "failed"}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("node_run_not_found"))
    );

    let events = coord.events(run_id).await;
    assert_gapless(&events);
    assert_eq!(
        types(&events),
        [
            "run_started",
            "node_run_assigned",
            "policy_decided",
            "policy_decided",
            "node_evaluated",
            "recovery_applied",
            "run_completed"
        ]
    );
    assert_eq!(coord.node_run(root).await["outputs"], json!({"x": 1}));
}

#[tokio::test]
async fn cancel_cascades_to_every_open_node_run_and_blocks_new_work() {
    let (coord, ce, run) = held(Value::Null).await;
    let (run_id, root) = (
        run["run_id"].as_str().unwrap(),
        run["root_node_run_id"].as_str().unwrap(),
    );
    let (s, created) = create(
        &coord,
        run_id,
        root,
        vec![
            child(COMPOSITE_TYPE, json!({})),
            child(COMPOSITE_TYPE, json!({})),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let children: Vec<String> = created["node_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_run_id"].as_str().unwrap().to_owned())
        .collect();
    for c in &children {
        coord.wait_node_state(c, "running", WAIT).await;
    }

    let (s, canceled) = coord
        .post(&format!("/v1/runs/{run_id}:cancel"), json!(null))
        .await;
    assert_eq!(
        (s, canceled["state"].as_str()),
        (StatusCode::OK, Some("canceled"))
    );
    for id in children.iter().map(String::as_str).chain([root]) {
        assert_eq!(coord.node_run(id).await["state"], "canceled");
    }
    // The composite executor is told to stop each running NodeRun.
    let deadline = tokio::time::Instant::now() + WAIT;
    while ce.cancels().len() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut cancels = ce.cancels();
    cancels.sort();
    let mut expected: Vec<String> = children.iter().cloned().chain([root.to_owned()]).collect();
    expected.sort();
    assert_eq!(cancels, expected);

    let (s, e) = create(&coord, run_id, root, vec![child("atomic.t", json!({}))]).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("run_not_active"))
    );
    let (s, again) = coord
        .post(&format!("/v1/runs/{run_id}:cancel"), json!(null))
        .await;
    assert_eq!((s, again), (StatusCode::OK, canceled));

    let events = coord.events(run_id).await;
    assert_gapless(&events);
    let last = events.last().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["data"]["state"].as_str()),
        (Some("run_completed"), Some("canceled"))
    );
    assert!(
        last.get("node_run_id").is_none(),
        "run-level events omit node_run_id: {last}"
    );
}

#[tokio::test]
async fn policy_denies_by_default_without_a_pdp() {
    let coord = Coordinator::start(Options {
        deny_by_default: true,
        ..Options::default()
    })
    .await;
    let run = coord.start_run("atomic.t", "1", json!({}), json!({})).await;
    assert_eq!(run["state"], "failed");
    let root = coord
        .node_run(run["root_node_run_id"].as_str().unwrap())
        .await;
    assert_eq!(
        root["extensions"]["jarvis.completion_error"]["code"],
        "policy_denied"
    );
    let events = coord.events(run["run_id"].as_str().unwrap()).await;
    assert_eq!(
        events[2]["data"],
        json!({"action": "run.start", "decision": "deny", "reason_code": "policy_unconfigured", "message": "No PDP configured for policy enforcement"})
    );
    assert_eq!(
        types(&events),
        [
            "run_started",
            "node_run_assigned",
            "policy_decided",
            "atomic_executed",
            "run_completed"
        ]
    );
}

#[tokio::test]
async fn a_node_type_nobody_knows_fails_with_unknown_node_kind() {
    let coord = Coordinator::start(Options::default()).await;
    let run = coord
        .start_run("mystery.node", "1", json!({}), json!({}))
        .await;
    let done = coord
        .wait_terminal(run["run_id"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(done["state"], "failed");
    let root = coord
        .node_run(run["root_node_run_id"].as_str().unwrap())
        .await;
    assert_eq!(
        root["extensions"]["jarvis.completion_error"]["code"],
        "unknown_node_kind"
    );
}

#[tokio::test]
async fn event_stream_follows_live_and_resumes_after_a_seq() {
    let (coord, _ce, run) = held(Value::Null).await;
    let (run_id, root) = (
        run["run_id"].as_str().unwrap().to_owned(),
        run["root_node_run_id"].as_str().unwrap().to_owned(),
    );
    let coord = std::sync::Arc::new(coord);
    let follower = {
        let (coord, run_id) = (coord.clone(), run_id.clone());
        tokio::spawn(async move { coord.follow_events(&run_id).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !follower.is_finished(),
        "the stream stays open while the run is running"
    );
    let (s, created) = create(
        &coord,
        &run_id,
        &root,
        vec![child(COMPOSITE_TYPE, json!({}))],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let child_id = created["node_runs"][0]["node_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    coord.wait_node_state(&child_id, "running", WAIT).await;
    let (s, _) = coord
        .post(
            &format!("/v1/node-runs/{child_id}:complete"),
            json!({"state": "succeeded"}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = coord
        .post(
            &format!("/v1/node-runs/{root}:complete"),
            json!({"state": "succeeded"}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let streamed = tokio::time::timeout(WAIT, follower)
        .await
        .expect("stream ends when the run is terminal")
        .unwrap();
    assert_gapless(&streamed);
    assert_eq!(streamed.last().unwrap()["type"], "run_completed");
    assert_eq!(streamed, coord.events(&run_id).await);

    let resumed = coord
        .http
        .get(format!("{}/v1/runs/{run_id}/events?after_seq=2", coord.url))
        .send()
        .await
        .unwrap();
    let resumed: Vec<Value> = resumed
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(resumed, streamed[3..]);

    let node_stream = coord
        .http
        .get(format!("{}/v1/node-runs/{child_id}/events", coord.url))
        .send()
        .await
        .unwrap();
    let node_events: Vec<Value> = node_stream
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!node_events.is_empty());
    assert!(
        node_events
            .iter()
            .all(|e| e["node_run_id"] == json!(child_id)),
        "{node_events:#?}"
    );

    let (s, e) = coord
        .get(&format!("/v1/runs/{run_id}/events?after_seq=x"))
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let (s, e) = coord.get("/v1/runs/run_missing/events").await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("run_not_found"))
    );
}

#[tokio::test]
async fn runs_survive_a_restart_on_the_same_database() {
    let db = TestDb::new().await;
    let ce = TestCompositeExecutor::start(CompositeMode::Hold).await;
    let opts = Options {
        composite_executor_url: Some(ce.url.clone()),
        ..Options::default()
    };
    let first = Coordinator::start_at(&db, opts.clone()).await;
    let run = first
        .start_run(
            COMPOSITE_TYPE,
            "1",
            json!({"k": "v"}),
            json!({"extensions": {"acme.tag": "t"}}),
        )
        .await;
    let run_id = run["run_id"].as_str().unwrap();
    first
        .wait_node_state(run["root_node_run_id"].as_str().unwrap(), "running", WAIT)
        .await;
    let events = first.events(run_id).await;
    drop(first);

    let second = Coordinator::start_at(&db, opts).await;
    let (s, again) = second.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["extensions"]["acme.tag"], "t");
    assert_eq!(second.events(run_id).await[..events.len()], events[..]);
}

#[tokio::test]
async fn a_client_run_id_is_bounded_and_free_of_control_characters() {
    let coord = Coordinator::start(Options::default()).await;
    let body = |run_id: &str| {
        json!({
            "run_id": run_id,
            "root_node_type_ref": {"node_type_id": "jarvis.core.echo", "version": "0.3.8"},
            "input": {},
        })
    };
    for bad in ["x".repeat(257), "run\nforged".to_owned(), "  ".to_owned()] {
        let (s, e) = coord.post("/v1/runs", body(&bad)).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "{bad:?}"
        );
    }
    let (s, run) = coord.post("/v1/runs", body(&"x".repeat(256))).await;
    assert_eq!(s, StatusCode::OK, "{run}");
}
