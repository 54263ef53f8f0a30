//! End to end with the real atomic executor (`jarvis-atomic-executor`) on port 0.

use std::time::Duration;

use axum::http::StatusCode;
use jarvis_atomic_executor::RunningServer;
use jarvis_atomic_executor::config::Config as ExecutorConfig;
use serde_json::{Value, json};

use crate::support::{
    COMPOSITE_TYPE, CompositeMode, Coordinator, Options, Process, TestCompositeExecutor, TestDb,
    assert_gapless, client, free_port, spin_pack, types, wait_healthy, wait_until,
};

const WAIT: Duration = Duration::from_secs(30);

async fn executor() -> RunningServer {
    RunningServer::spawn(&ExecutorConfig::for_tests())
        .await
        .unwrap()
}

async fn executor_on(port: u16) -> RunningServer {
    let mut config = ExecutorConfig::for_tests();
    config.port = port;
    RunningServer::spawn(&config).await.unwrap()
}

fn with_executor(url: String) -> Options {
    Options {
        atomic_executor_url: Some(url),
        ..Options::default()
    }
}

#[tokio::test]
async fn atomic_echo_root_run_succeeds_with_its_outputs() {
    let ex = executor().await;
    let coord = Coordinator::start(with_executor(ex.url())).await;
    let run = coord
        .start_run(
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "hello"}),
            json!({}),
        )
        .await;
    let run_id = run["run_id"].as_str().unwrap();
    let events = tokio::time::timeout(WAIT, coord.follow_events(run_id))
        .await
        .unwrap();
    assert_gapless(&events);
    assert_eq!(
        types(&events),
        [
            "run_started",
            "node_run_assigned",
            "policy_decided",
            "policy_decided",
            "node_evaluated",
            "atomic_executed",
            "run_completed"
        ]
    );
    let (_, done) = coord.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(done["state"], "succeeded");
    let root = coord
        .node_run(run["root_node_run_id"].as_str().unwrap())
        .await;
    assert_eq!(root["outputs"], json!({"echo": "hello"}));
    assert_eq!(
        root["kind"], "atomic",
        "kind comes from the executor's GET /v1/node-types"
    );
    assert_eq!(root["executor_binding"]["endpoint"], json!(ex.url()));
}

#[tokio::test]
async fn executor_errors_are_recorded_with_the_executors_code() {
    let ex = executor().await;
    let coord = Coordinator::start(with_executor(ex.url())).await;
    // The echo's input schema requires `echo`: the executor answers a terminal failure.
    let run = coord
        .start_run("jarvis.core.echo", "0.3.8", json!({"wrong": 1}), json!({}))
        .await;
    let done = coord
        .wait_terminal(run["run_id"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(done["state"], "failed");
    let root = coord
        .node_run(run["root_node_run_id"].as_str().unwrap())
        .await;
    let code = root["extensions"]["jarvis.completion_error"]["code"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        !code.is_empty() && code != "atomic_executor_unavailable",
        "{root}"
    );
}

#[tokio::test]
async fn composite_root_runs_three_echo_children_through_a_composite_executor() {
    let ex = executor().await;
    let ce = TestCompositeExecutor::start(CompositeMode::FanOutEcho).await;
    let opts = Options {
        atomic_executor_url: Some(ex.url()),
        composite_executor_url: Some(ce.url.clone()),
        ..Options::default()
    };
    let coord = Coordinator::start(opts).await;
    let run = coord
        .start_run(COMPOSITE_TYPE, "1", json!({}), json!({}))
        .await;
    let run_id = run["run_id"].as_str().unwrap();
    let events = tokio::time::timeout(WAIT, coord.follow_events(run_id))
        .await
        .unwrap();
    assert_gapless(&events);
    let (_, done) = coord.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(done["state"], "succeeded", "{events:#?}");
    let root = coord
        .node_run(run["root_node_run_id"].as_str().unwrap())
        .await;
    assert_eq!(
        root["outputs"]["children"],
        json!([{"echo": "child-0"}, {"echo": "child-1"}, {"echo": "child-2"}])
    );
    let t = types(&events);
    assert_eq!(t.iter().filter(|t| *t == "composite_decomposed").count(), 1);
    assert_eq!(t.iter().filter(|t| *t == "atomic_executed").count(), 3);
    assert_eq!(t.last().unwrap(), "run_completed");
    assert_eq!(ce.begins()[0].coordinator_endpoint, coord.url);
}

/// A pack whose node never returns: only cancellation (or its time limit) stops it.
#[tokio::test]
async fn cancel_run_stops_a_spinning_guest_in_the_executor() {
    let ex = executor().await;
    ex.service
        .executor
        .registry()
        .load_bytes("spin.wasm", &spin_pack())
        .await
        .unwrap();
    let coord = Coordinator::start(with_executor(ex.url())).await;
    let run = coord
        .start_run("jarvis.test.spin", "1.0.0", json!({}), json!({}))
        .await;
    let (run_id, root) = (
        run["run_id"].as_str().unwrap(),
        run["root_node_run_id"].as_str().unwrap(),
    );
    coord.wait_node_state(root, "running", WAIT).await;
    wait_until("the guest never started", WAIT, || {
        ex.service.executor.running() > 0
    })
    .await;

    let (s, canceled) = coord
        .post(&format!("/v1/runs/{run_id}:cancel"), Value::Null)
        .await;
    assert_eq!(
        (s, canceled["state"].as_str()),
        (StatusCode::OK, Some("canceled"))
    );
    wait_until(
        "the spinning guest was not stopped",
        Duration::from_secs(5),
        || ex.service.executor.running() == 0,
    )
    .await;
    assert_eq!(coord.node_run(root).await["state"], "canceled");
    // The executor's late `canceled` result does not reopen or rewrite anything.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = coord.events(run_id).await;
    assert_gapless(&events);
    assert_eq!(events.last().unwrap()["type"], "run_completed");
}

#[tokio::test]
async fn a_root_of_a_known_kind_is_running_when_its_post_is_answered() {
    let ex = executor().await;
    ex.service
        .executor
        .registry()
        .load_bytes("spin.wasm", &spin_pack())
        .await
        .unwrap();
    let coord = Coordinator::start(with_executor(ex.url())).await;
    // The first run teaches the catalog the node's kind (dispatch looks it up).
    let first = coord
        .start_run("jarvis.test.spin", "1.0.0", json!({}), json!({}))
        .await;
    coord
        .wait_node_state(first["root_node_run_id"].as_str().unwrap(), "running", WAIT)
        .await;

    let run = coord
        .start_run("jarvis.test.spin", "1.0.0", json!({}), json!({}))
        .await;
    let (run_id, root_id) = (
        run["run_id"].as_str().unwrap(),
        run["root_node_run_id"].as_str().unwrap(),
    );
    // Read at once: the POST's own commit began the root's dispatch.
    let root = coord.node_run(root_id).await;
    assert_eq!(root["state"], "running");
    assert_eq!(root["executor_binding"]["endpoint"], json!(ex.url()));
    let events = coord.events(run_id).await;
    assert_eq!(
        types(&events)[..4],
        [
            "run_started",
            "node_run_assigned",
            "policy_decided",
            "policy_decided"
        ]
    );
    assert_eq!(events[3]["data"]["action"], "node.run.execute");

    // Both guests running before the cancels, so no cancel overtakes its execute call.
    wait_until("the second guest never started", WAIT, || {
        ex.service.executor.running() >= 2
    })
    .await;
    for run_id in [first["run_id"].as_str().unwrap(), run_id] {
        let (s, _) = coord
            .post(&format!("/v1/runs/{run_id}:cancel"), Value::Null)
            .await;
        assert_eq!(s, StatusCode::OK);
    }
    wait_until("the spinning guests were not stopped", WAIT, || {
        ex.service.executor.running() == 0
    })
    .await;
    let events = coord.events(run_id).await;
    assert_gapless(&events);
    let decisions = types(&events)
        .iter()
        .filter(|t| *t == "policy_decided")
        .count();
    assert_eq!(decisions, 2, "one per checkpoint: {events:?}");
}

#[tokio::test]
async fn an_executor_that_is_down_then_up_gets_the_retry() {
    let port = free_port();
    let coord = Coordinator::start(with_executor(format!("http://127.0.0.1:{port}"))).await;
    let run = coord
        .start_run(
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "late"}),
            json!({}),
        )
        .await;
    let run_id = run["run_id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, waiting) = coord.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(
        waiting["state"], "running",
        "connection refused is retried, not failed"
    );

    let _ex = executor_on(port).await;
    let done = coord.wait_terminal(run_id, WAIT).await;
    assert_eq!(done["state"], "succeeded");
    let root = coord
        .node_run(run["root_node_run_id"].as_str().unwrap())
        .await;
    assert_eq!(root["outputs"], json!({"echo": "late"}));
}

#[tokio::test]
async fn retries_stop_at_the_deadline_with_a_clear_code() {
    let port = free_port();
    let coord = Coordinator::start(with_executor(format!("http://127.0.0.1:{port}"))).await;
    let constraints = json!({"constraints": {"budgets": {"max_wall_time_ms": 800}}});
    let run = coord
        .start_run("atomic.never", "1", json!({}), constraints)
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
        "atomic_executor_unavailable"
    );
}

#[tokio::test]
async fn kill_9_mid_run_then_restart_finishes_every_run() {
    let ex = executor().await;
    ex.service
        .executor
        .registry()
        .load_bytes("spin.wasm", &spin_pack())
        .await
        .unwrap();
    let db = TestDb::new().await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut first = Process::spawn(&db, port, &ex.url());
    wait_healthy(&url).await;

    let http = client();
    let start = |node: &'static str, input: Value, constraints: Value| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let body = json!({"root_node_type_ref": {"node_type_id": node, "version": if node == "jarvis.core.echo" {"0.3.8"} else {"1.0.0"}}, "input": input, "constraints": constraints});
            let run: Value = http
                .post(format!("{url}/v1/runs"))
                .json(&body)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            run["run_id"].as_str().map(str::to_owned)
        }
    };
    // Spinning runs are surely mid-execution at the kill; their wall time ends them after the restart.
    let mut acknowledged = Vec::new();
    for _ in 0..3 {
        let spin = start(
            "jarvis.test.spin",
            json!({}),
            json!({"budgets": {"max_wall_time_ms": 3000}}),
        )
        .await;
        acknowledged.extend(spin);
    }
    let echoes: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(start(
                "jarvis.core.echo",
                json!({"echo": format!("e{i}")}),
                Value::Null,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    first.kill_9();
    for e in echoes {
        acknowledged.extend(e.await.unwrap());
    }
    assert!(
        acknowledged.len() >= 3,
        "some runs were acknowledged before the kill"
    );

    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _second = Process::spawn(&db, port, &ex.url());
    wait_healthy(&url).await;
    let coord = Coordinator::attach(&url);
    for run_id in &acknowledged {
        let done = coord.wait_terminal(run_id, WAIT).await;
        assert_ne!(done["state"], "running");
        let events = coord.events(run_id).await;
        assert_gapless(&events);
        assert_eq!(
            events.last().unwrap()["type"],
            "run_completed",
            "{events:#?}"
        );
        let decisions = events
            .iter()
            .filter(|e| e["type"] == "policy_decided" && e["data"]["action"] == "node.run.execute")
            .count();
        assert!(decisions <= 1, "policy decided twice: {events:#?}");
        let root = coord
            .node_run(done["root_node_run_id"].as_str().unwrap())
            .await;
        assert!(
            ["succeeded", "failed", "canceled"].contains(&root["state"].as_str().unwrap()),
            "{root}"
        );
    }
}
