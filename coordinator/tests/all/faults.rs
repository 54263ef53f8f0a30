//! The coordinator under real SQLite write failures: nothing acknowledged is stranded.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use jarvis_run_coordinator::config::Timing;
use jarvis_run_coordinator::store::WriteFault;
use serde_json::{Value, json};

use crate::proxy::ExecutorProxy;
use crate::support::{Coordinator, Options, TestDb, json_response, types};

/// A real PDP that allows everything after `delay`, so a dispatch's begin
/// transaction comes a known time after the run was acknowledged.
async fn slow_pdp(delay: Duration) -> String {
    let app = Router::new().route(
        "/v1/policy:decide",
        post(move || async move {
            tokio::time::sleep(delay).await;
            json_response(
                StatusCode::OK,
                json!({"decision": "allow", "reason_code": "test_allow"}),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn fast_options(executor_url: &str) -> Options {
    Options {
        atomic_executor_url: Some(executor_url.to_owned()),
        lease: Some(Duration::from_millis(900)),
        timing: Some(Timing {
            poll_interval: Duration::from_millis(100),
            deadline_grace: Duration::from_millis(500),
            ..Timing::default()
        }),
        ..Options::default()
    }
}

async fn start_echo(coord: &Coordinator, i: usize) -> (StatusCode, Value) {
    coord
        .post(
            "/v1/runs",
            json!({"root_node_type_ref": {"node_type_id": "jarvis.core.echo", "version": "0.3.8"},
                   "input": {"echo": format!("e{i}")}}),
        )
        .await
}

/// Every acknowledged run succeeded with its own output, decided policy once for its
/// root, and the executor saw one request body per `node_run_id`, however often sent.
async fn assert_all_succeeded(
    coord: &Coordinator,
    proxy: &ExecutorProxy,
    runs: &[(String, usize)],
    within: Duration,
) {
    for (run_id, i) in runs {
        let done = coord.wait_terminal(run_id, within).await;
        let root = coord
            .node_run(done["root_node_run_id"].as_str().unwrap())
            .await;
        assert_eq!(done["state"], "succeeded", "{root}");
        assert_eq!(root["outputs"], json!({"echo": format!("e{i}")}));
        let events = coord.events(run_id).await;
        let decisions = events
            .iter()
            .filter(|e| e["type"] == "policy_decided" && e["data"]["action"] == "node.run.execute")
            .count();
        assert_eq!(decisions, 1, "{:?}", types(&events));
        assert_eq!(events.last().unwrap()["type"], "run_completed");
    }
    let mut bodies: HashMap<String, Vec<Value>> = HashMap::new();
    for (id, body) in proxy.seen() {
        bodies.entry(id).or_default().push(body);
    }
    assert!(bodies.len() >= runs.len());
    for (id, sent) in bodies {
        assert!(
            sent.windows(2).all(|w| w[0] == w[1]),
            "{id} was re-sent with another body: {sent:#?}"
        );
    }
}

#[tokio::test]
async fn outcomes_that_arrive_while_writes_fail_are_recorded_after_recovery() {
    let proxy = ExecutorProxy::start(Duration::from_millis(500)).await;
    let coord = Coordinator::start(fast_options(&proxy.url)).await;
    let started = (0..20).map(|i| {
        let coord = &coord;
        async move { (i, start_echo(coord, i).await) }
    });
    let mut runs = Vec::new();
    for (i, (status, run)) in futures_util::future::join_all(started).await {
        assert_eq!(status, StatusCode::OK, "{run}");
        runs.push((run["run_id"].as_str().unwrap().to_owned(), i));
    }
    // The proxy holds the execute calls; their outcomes arrive into failing writes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    coord.store().inject_write_fault(WriteFault::ReadOnly);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = start_echo(&coord, 99).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"]["code"], "internal_error");
    // Longer than a lease: renewals fail too, and must not lead to a second dispatch.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (run_id, _) in &runs {
        let (_, waiting) = coord.get(&format!("/v1/runs/{run_id}")).await;
        assert_eq!(waiting["state"], "running", "nothing can be recorded yet");
    }

    coord.store().inject_write_fault(WriteFault::None);
    let recovered = Instant::now();
    assert_all_succeeded(&coord, &proxy, &runs, Duration::from_secs(5)).await;
    assert!(
        recovered.elapsed() < Duration::from_secs(5),
        "{:?}",
        recovered.elapsed()
    );
}

#[tokio::test]
async fn a_dispatch_whose_write_failed_is_taken_up_again_after_its_lease() {
    let proxy = ExecutorProxy::start(Duration::ZERO).await;
    let mut options = fast_options(&proxy.url);
    options.pdp_url = Some(slow_pdp(Duration::from_millis(300)).await);
    let coord = Coordinator::start(options).await;
    let started = (0..5).map(|i| {
        let coord = &coord;
        async move { (i, start_echo(coord, i).await) }
    });
    let mut runs = Vec::new();
    for (i, (status, run)) in futures_util::future::join_all(started).await {
        assert_eq!(status, StatusCode::OK, "{run}");
        runs.push((run["run_id"].as_str().unwrap().to_owned(), i));
    }
    // Each dispatch is waiting for the PDP; its begin transaction will fail.
    coord.store().inject_write_fault(WriteFault::ReadOnly);
    tokio::time::sleep(Duration::from_millis(800)).await;
    coord.store().inject_write_fault(WriteFault::None);
    let recovered = Instant::now();
    for (run_id, _) in &runs {
        let (_, run) = coord.get(&format!("/v1/runs/{run_id}")).await;
        assert_eq!(run["state"], "running");
    }
    // The lease (0.9 s) runs out and the poller dispatches again: seconds, not the deadline.
    assert_all_succeeded(&coord, &proxy, &runs, Duration::from_secs(5)).await;
    assert!(
        recovered.elapsed() < Duration::from_secs(5),
        "{:?}",
        recovered.elapsed()
    );
}

#[tokio::test]
async fn a_full_disk_fails_requests_cleanly_and_every_acknowledged_run_succeeds() {
    let proxy = ExecutorProxy::start(Duration::from_millis(50)).await;
    let coord = Coordinator::start(fast_options(&proxy.url)).await;
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        let phase = started.elapsed();
        if phase > Duration::from_millis(300) && phase < Duration::from_millis(1800) {
            coord.store().inject_write_fault(WriteFault::Full);
        } else {
            coord.store().inject_write_fault(WriteFault::None);
        }
        let batch: Vec<_> = (i..i + 8)
            .map(|n| {
                let coord = &coord;
                async move { (n, start_echo(coord, n).await) }
            })
            .collect();
        for (n, (status, run)) in futures_util::future::join_all(batch).await {
            if status == StatusCode::OK {
                acknowledged.push((run["run_id"].as_str().unwrap().to_owned(), n));
            } else {
                assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{run}");
                assert_eq!(run["error"]["code"], "internal_error");
                refused += 1;
            }
        }
        i += 8;
    }
    coord.store().inject_write_fault(WriteFault::None);
    assert!(refused > 0, "the full disk refused some runs");
    assert!(!acknowledged.is_empty());
    assert_all_succeeded(&coord, &proxy, &acknowledged, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_node_run_past_its_deadline_says_why() {
    // The executor holds the call past the deadline: it never answers in time.
    let proxy = ExecutorProxy::start(Duration::from_secs(30)).await;
    let coord = Coordinator::start(fast_options(&proxy.url)).await;
    let constraints = json!({"constraints": {"budgets": {"max_wall_time_ms": 300}}});
    let run = coord
        .start_run("jarvis.core.echo", "0.3.8", json!({"echo": 1}), constraints)
        .await;
    let error = deadline_error(&coord, &run).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("the executor did not answer"),
        "{error}"
    );
}

#[tokio::test]
async fn a_deadline_that_passed_while_no_coordinator_ran_says_so() {
    let db = TestDb::new().await;
    let mut options = fast_options("http://127.0.0.1:9");
    options.no_auto_dispatch = true;
    let first = Coordinator::start_at(&db, options.clone()).await;
    let constraints = json!({"constraints": {"budgets": {"max_wall_time_ms": 100}}});
    let run = first
        .start_run(
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "x"}),
            constraints,
        )
        .await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let second = Coordinator::start_at(&db, options).await;
    let error = deadline_error(&second, &run).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("the coordinator was not running at the deadline"),
        "{error}"
    );
    assert_eq!(error["details"]["state"], "queued", "{error}");
}

/// Waits for `run` to fail and returns its root NodeRun's error, which must be
/// `deadline_exceeded`.
async fn deadline_error(coord: &Coordinator, run: &Value) -> Value {
    let done = coord
        .wait_terminal(run["run_id"].as_str().unwrap(), Duration::from_secs(10))
        .await;
    assert_eq!(done["state"], "failed");
    let root = coord
        .node_run(run["root_node_run_id"].as_str().unwrap())
        .await;
    let error = root["extensions"]["jarvis.completion_error"].clone();
    assert_eq!(error["code"], "deadline_exceeded", "{error}");
    error
}
