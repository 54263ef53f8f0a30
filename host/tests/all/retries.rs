//! Retries of the same NodeRun: attach while in flight, replay after, 409 on conflict.

use std::time::Duration;

use jarvis_atomic_executor::watpack::{WatNode, WatPack};
use serde_json::json;

use crate::limits::wait_until_running;
use crate::support::*;

/// A node that sleeps 300 ms, then returns its inputs.
fn slow() -> Vec<u8> {
    let body = "(call $sleep (i64.const 300)) (call $ok_inputs (local.get $call))";
    pack_with(
        WatPack::new("test.slow", "1.0.0").with_sleep(),
        WatNode::new("test.slow", "1.0.0"),
        body,
    )
}

#[tokio::test]
async fn duplicate_in_flight_attaches_and_runs_once() {
    let t = start(config(), &[("slow.wasm", slow())]).await;
    let body = request("nr-dup", "test.slow", "1.0.0", json!({"n": 1}));
    let calls: Vec<_> = (0..3).map(|_| t.spawn_execute(body.clone())).collect();
    let mut results = Vec::new();
    for c in calls {
        let (status, result) = c.await.unwrap();
        assert_eq!(status, 200, "{result}");
        results.push(result);
    }
    assert_outcome(&results[0], "succeeded", None);
    assert!(
        results.iter().all(|r| r == &results[0]),
        "attached calls must get the same result: {results:?}"
    );
    assert_eq!(t.invocations(), 1, "the node ran more than once");
}

#[tokio::test]
async fn retry_after_completion_gets_the_recorded_result() {
    let t = start(config(), &[("slow.wasm", slow())]).await;
    let body = request("nr-done", "test.slow", "1.0.0", json!({"n": 2}));
    let first = t.result(&body).await;
    let second = t.result(&body).await;
    assert_eq!(
        first, second,
        "same started_at/ended_at: the recorded result, not a new run"
    );
    assert_eq!(t.invocations(), 1);
}

#[tokio::test]
async fn a_dropped_connection_does_not_stop_the_execution() {
    let t = start(config(), &[("slow.wasm", slow())]).await;
    let body = request("nr-dropped", "test.slow", "1.0.0", json!({"n": 3}));
    let first = t.spawn_execute(body.clone());
    wait_until_running(&t, 1).await;
    first.abort(); // the caller goes away mid-execution
    tokio::time::sleep(Duration::from_millis(50)).await;
    let retry = t.result(&body).await;
    assert_outcome(&retry, "succeeded", None);
    assert_eq!(t.invocations(), 1, "the retry must attach, not run again");
}

#[tokio::test]
async fn same_id_with_a_different_body_is_409() {
    let t = start(config(), &[("slow.wasm", slow())]).await;
    t.result(&request("nr-x", "test.slow", "1.0.0", json!({"n": 1})))
        .await;
    let (status, envelope) = t
        .execute(&request("nr-x", "test.slow", "1.0.0", json!({"n": 2})))
        .await;
    assert_eq!(status, 409);
    assert_eq!(envelope["error"]["code"], "node_run_id_conflict");

    // Also while the first is still in flight.
    let inflight = t.spawn_execute(request("nr-y", "test.slow", "1.0.0", json!({"n": 1})));
    wait_until_running(&t, 1).await;
    let (status, _) = t
        .execute(&request(
            "nr-y",
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "x"}),
        ))
        .await;
    assert_eq!(status, 409);
    assert_eq!(inflight.await.unwrap().0, 200);
}

#[tokio::test]
async fn recorded_results_expire_after_the_retention_window() {
    let mut cfg = config();
    cfg.executor.retention = Duration::from_millis(100);
    let t = start(cfg, &[]).await;
    let body = request("nr-e", "jarvis.core.echo", "0.3.8", json!({"echo": "x"}));
    t.result(&body).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    t.result(&body).await;
    assert_eq!(t.invocations(), 2, "an expired record must not be replayed");
}

#[tokio::test]
async fn an_abandoned_execute_call_finishes_in_a_task_of_its_own() {
    let t = start(config(), &[("slow.wasm", slow())]).await;
    let executor = t.server.service.executor.clone();
    let body = request("nr-abandoned", "test.slow", "1.0.0", json!({"n": 4}));
    let parse = |body: &serde_json::Value| serde_json::from_value(body.clone()).unwrap();
    // The caller stops waiting while the guest sleeps: its future is dropped.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(50),
        executor.execute(parse(&body), "test"),
    )
    .await;
    assert!(abandoned.is_err(), "the slow node finished within 50 ms");
    assert_eq!(
        executor.running(),
        1,
        "the execution stopped with its caller"
    );
    let retry = executor
        .execute(parse(&body), "test")
        .await
        .expect("executed");
    let result: serde_json::Value = serde_json::from_slice(&retry.json).unwrap();
    assert_outcome(&result, "succeeded", None);
    assert_eq!(result["outputs"], json!({"n": 4}));
    assert_eq!(t.invocations(), 1, "the retry must attach, not run again");
    assert_eq!(executor.running(), 0);
}
