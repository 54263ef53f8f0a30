//! Peer services as other ARP implementations write them: extra fields, plain extension keys, hangs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path as AxPath, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use jarvis_atomic_executor::RunningServer;
use jarvis_atomic_executor::config::Config as ExecutorConfig;
use jarvis_run_coordinator::Server;
use jarvis_run_coordinator::config::Config;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::proxy::HungExecutor;
use crate::support::{
    COMPOSITE_TYPE, CompositeMode, Coordinator, Options, TestCompositeExecutor, TestDb, config,
    json_response,
};

const WAIT: Duration = Duration::from_secs(30);

/// A coordinator built from the test config with `edit` applied; stops when dropped.
struct Started {
    coord: Coordinator,
    _stop: oneshot::Sender<()>,
    _db: TestDb,
}

async fn start(opts: Options, edit: impl FnOnce(&mut Config)) -> Started {
    let db = TestDb::new().await;
    let mut config = config(&db, &opts);
    edit(&mut config);
    let server = Server::bind(config).await.unwrap();
    let url = format!("http://{}", server.addr);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    Started {
        coord: Coordinator::attach(&url),
        _stop: stop,
        _db: db,
    }
}

/// How the stand-in answers `:execute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Execute {
    /// Echo the inputs, with fields and extension keys the spec does not have.
    EchoWithExtras,
    /// A `state` that is no NodeRun state.
    UnknownState,
}

#[derive(Debug)]
struct StandIn {
    decision: &'static str,
    reason_code: &'static str,
    execute: Execute,
}

/// One server answering as a PDP, a Node Registry, an Atomic and a Composite
/// Executor would, each answer carrying unknown fields and plain extension keys.
async fn stand_in(decision: &'static str, reason_code: &'static str, execute: Execute) -> String {
    let state = Arc::new(StandIn {
        decision,
        reason_code,
        execute,
    });
    let app = Router::new()
        .route("/v1/node-types", get(listing))
        .route("/v1/node-types/{id}", get(registry_node_type))
        .route("/v1/atomic-node-runs:execute", post(execute_node))
        .route("/v1/composite-node-runs:begin", post(begin))
        .route("/v1/policy:decide", post(decide))
        .with_state(state);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

async fn listing() -> axum::response::Response {
    let plain = json!({"owner": "team-a"});
    json_response(
        StatusCode::OK,
        json!([
            {"node_type_id": "acme.echo", "version": "1", "kind": "atomic", "vendor": {"tier": 2},
             "extensions": plain, "constraints": {"gates": {"side_effect_class": "read", "future_gate": 1}, "future": {}}},
            {"node_type_id": "acme.plan", "version": "1", "kind": "composite", "extensions": plain},
        ]),
    )
}

async fn registry_node_type(
    AxPath(id): AxPath<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    if id != "acme.registered" {
        let err = json!({"error": {"code": "node_type_not_found", "message": id, "trace": "x"}});
        return json_response(StatusCode::NOT_FOUND, err);
    }
    json_response(
        StatusCode::OK,
        json!({"node_type_id": id, "version": query.get("version"), "kind": "atomic",
               "registered_at": "2026-01-01", "extensions": {"owner": "team-a"}}),
    )
}

async fn execute_node(
    State(s): State<Arc<StandIn>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let req: Value = serde_json::from_slice(&body).unwrap();
    let body = match s.execute {
        Execute::EchoWithExtras => json!({
            "node_run_id": req["node_run_id"], "state": "succeeded", "outputs": req["inputs"],
            "duration_ms": 1, "extensions": {"runtime": "python", "acme.kept": true},
        }),
        Execute::UnknownState => json!({"node_run_id": req["node_run_id"], "state": "finished"}),
    };
    json_response(StatusCode::OK, body)
}

async fn begin() -> axum::response::Response {
    json_response(
        StatusCode::OK,
        json!({"accepted": true, "queued_at": "now", "extensions": {"worker": "w1"}}),
    )
}

async fn decide(State(s): State<Arc<StandIn>>) -> axum::response::Response {
    // What arp-jarvis-pdp 0.3.8 answers: extension keys without a dot.
    json_response(
        StatusCode::OK,
        json!({"decision": s.decision, "reason_code": s.reason_code,
               "extensions": {"policy_hash": "9f2c", "policy_version": "3"},
               "evaluated_rules": ["r1"]}),
    )
}

fn all_peers(url: &str) -> impl FnOnce(&mut Config) {
    let url = url.to_owned();
    move |c: &mut Config| {
        c.atomic_executor_urls = vec![url.clone()];
        c.composite_executor_url = Some(url.clone());
        c.node_registry_url = Some(url.clone());
        c.pdp_url = Some(url);
    }
}

fn policy_events(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["type"] == "policy_decided")
        .map(|e| &e["data"])
        .collect()
}

#[tokio::test]
async fn a_pdp_allow_with_plain_extension_keys_and_unknown_fields_lets_the_run_succeed() {
    let peer = stand_in("allow", "rule_allow", Execute::EchoWithExtras).await;
    let s = start(Options::default(), all_peers(&peer)).await;
    let run = s
        .coord
        .start_run("acme.echo", "1", json!({"x": 1}), json!({}))
        .await;
    let run_id = run["run_id"].as_str().unwrap();
    let done = s.coord.wait_terminal(run_id, WAIT).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let events = s.coord.events(run_id).await;
    for data in policy_events(&events) {
        assert_eq!(data["decision"], "allow", "{events:#?}");
        assert_eq!(data["reason_code"], "rule_allow", "the PDP's own reason");
    }
    let root = s
        .coord
        .node_run(run["root_node_run_id"].as_str().unwrap())
        .await;
    assert_eq!(
        root["outputs"],
        json!({"x": 1}),
        "the executor's answer is used"
    );
    assert_eq!(
        root["kind"], "atomic",
        "from the listing with unknown fields"
    );
    let constraints = &root["extensions"]["jarvis.constraints"];
    assert_eq!(constraints["gates"]["side_effect_class"], "read", "{root}");
}

#[tokio::test]
async fn a_pdp_deny_with_plain_extension_keys_denies_with_its_reason() {
    let peer = stand_in("deny", "rule_deny", Execute::EchoWithExtras).await;
    let s = start(Options::default(), all_peers(&peer)).await;
    let run = s
        .coord
        .start_run("acme.echo", "1", json!({}), json!({}))
        .await;
    let run_id = run["run_id"].as_str().unwrap();
    let done = s.coord.wait_terminal(run_id, WAIT).await;
    assert_eq!(done["state"], "failed");
    let events = s.coord.events(run_id).await;
    let decisions = policy_events(&events);
    assert_eq!(decisions[0]["decision"], "deny");
    assert_eq!(
        decisions[0]["reason_code"], "rule_deny",
        "not pdp_unavailable"
    );
    let root = s
        .coord
        .node_run(run["root_node_run_id"].as_str().unwrap())
        .await;
    assert_eq!(
        root["extensions"]["jarvis.completion_error"]["code"],
        "policy_denied"
    );
}

#[tokio::test]
async fn a_registry_answer_with_unknown_fields_tells_the_kind() {
    let peer = stand_in("allow", "rule_allow", Execute::EchoWithExtras).await;
    let s = start(Options::default(), all_peers(&peer)).await;
    // Not in the executors' listing: only the registry knows it is atomic.
    let run = s
        .coord
        .start_run("acme.registered", "2", json!({"y": 2}), json!({}))
        .await;
    let run_id = run["run_id"].as_str().unwrap();
    let done = s.coord.wait_terminal(run_id, WAIT).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let root = s
        .coord
        .node_run(run["root_node_run_id"].as_str().unwrap())
        .await;
    assert_eq!(root["kind"], "atomic");
    assert_eq!(root["outputs"], json!({"y": 2}));
}

#[tokio::test]
async fn a_composite_begin_answer_with_unknown_fields_is_accepted() {
    let peer = stand_in("allow", "rule_allow", Execute::EchoWithExtras).await;
    let s = start(Options::default(), all_peers(&peer)).await;
    let run = s
        .coord
        .start_run("acme.plan", "1", json!({}), json!({}))
        .await;
    let root_id = run["root_node_run_id"].as_str().unwrap();
    let root = s.coord.wait_node_state(root_id, "running", WAIT).await;
    assert_eq!(root["kind"], "composite");
    // Give a refused answer the time to fail the NodeRun before looking again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.coord.node_run(root_id).await["state"], "running");
}

#[tokio::test]
async fn an_executor_answer_we_cannot_use_fails_with_a_code_naming_it_and_the_field() {
    let peer = stand_in("allow", "rule_allow", Execute::UnknownState).await;
    let s = start(Options::default(), all_peers(&peer)).await;
    let run = s
        .coord
        .start_run("acme.echo", "1", json!({}), json!({}))
        .await;
    let done = s
        .coord
        .wait_terminal(run["run_id"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(done["state"], "failed");
    let root = s
        .coord
        .node_run(run["root_node_run_id"].as_str().unwrap())
        .await;
    let error = &root["extensions"]["jarvis.completion_error"];
    assert_eq!(error["code"], "atomic_executor_bad_response", "{root}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("`state`"), "{message}");
}

#[tokio::test]
async fn a_hung_executor_delays_no_post_and_runs_complete_once_it_recovers() {
    let hung = HungExecutor::start().await;
    let url = hung.url.clone();
    let s = start(
        Options {
            atomic_executor_url: Some(url),
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let mut echo_runs = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        // Unknown ids ask the executor again (once a second at most): they must not wait either.
        let node_type_id = if i % 2 == 0 {
            "jarvis.core.echo".to_owned()
        } else {
            format!("acme.unknown-{i}")
        };
        let started = Instant::now();
        let run = s
            .coord
            .start_run(
                &node_type_id,
                "0.3.8",
                json!({"echo": format!("run-{i}")}),
                json!({}),
            )
            .await;
        slowest = slowest.max(started.elapsed());
        if i % 2 == 0 {
            echo_runs.push(run["run_id"].as_str().unwrap().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Generous for a loaded machine; a POST waiting on the executor took seconds.
    assert!(
        slowest < Duration::from_millis(500),
        "slowest POST {slowest:?}"
    );

    let port = hung.stop().await;
    let mut config = ExecutorConfig::for_tests();
    config.port = port;
    let _executor = RunningServer::spawn(&config).await.unwrap();
    for run_id in echo_runs {
        let done = s.coord.wait_terminal(&run_id, WAIT).await;
        let root = s
            .coord
            .node_run(done["root_node_run_id"].as_str().unwrap())
            .await;
        assert_eq!(done["state"], "succeeded", "{root}");
    }
}

#[tokio::test]
async fn a_hung_atomic_executor_delays_neither_composite_runs_nor_their_children() {
    let hung = HungExecutor::start().await;
    let composite = TestCompositeExecutor::start(CompositeMode::Hold).await;
    let s = start(
        Options {
            atomic_executor_url: Some(hung.url.clone()),
            composite_executor_url: Some(composite.url.clone()),
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let run = s
        .coord
        .start_run(COMPOSITE_TYPE, "1", json!({}), json!({}))
        .await;
    let root_id = run["root_node_run_id"].as_str().unwrap();
    // Its kind comes from the composite executor's listing, not the hung one's (10 s timeout).
    s.coord
        .wait_node_state(root_id, "running", Duration::from_secs(5))
        .await;

    let children: Vec<Value> = (0..5)
        .map(|i| {
            json!({"node_type_ref": {"node_type_id": "jarvis.core.echo", "version": "0.3.8"},
                        "inputs": {"echo": format!("child-{i}")}})
        })
        .collect();
    let body =
        json!({"run_id": run["run_id"], "parent_node_run_id": root_id, "node_runs": children});
    let started = Instant::now();
    let (status, created) = s.coord.post("/v1/node-runs", body).await;
    let took = started.elapsed();
    assert!(status.is_success(), "{created}");
    // One bounded wait (1 s) for the listing, not one per child.
    assert!(took < Duration::from_millis(1800), "{took:?}");
    drop(hung);
}
