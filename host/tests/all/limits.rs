//! Hostile and failing guests: traps, node errors, bad outputs, time and
//! memory limits, cancellation and overload.

use std::time::{Duration, Instant};

use jarvis_atomic_executor::watpack::{WatNode, WatPack};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn node_error_keeps_the_nodes_code() {
    let mut wat = WatPack::new("test.err", "1.0.0");
    let (code, code_len) = wat.data(b"not_found");
    let (msg, msg_len) = wat.data(b"no such customer");
    let body = format!(
        "(call $err (i32.const {code}) (i32.const {code_len}) (i32.const {msg}) (i32.const {msg_len}))"
    );
    let t = start(
        config(),
        &[(
            "err.wasm",
            pack_with(wat, WatNode::new("test.err", "1.0.0"), &body),
        )],
    )
    .await;
    let result = t
        .result(&request("nr-1", "test.err", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some("not_found"));
    assert_eq!(result["error"]["message"], "no such customer");
}

#[tokio::test]
async fn trap_is_node_trapped_without_host_details() {
    let t = start(config(), &[("trap.wasm", pack("trap", "(unreachable)"))]).await;
    let result = t
        .result(&request("nr-1", "test.trap", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some("node_trapped"));
    // The trap's detail (wasm backtrace, host frames) stays in the host log.
    assert_eq!(
        result["error"]["message"],
        "the node crashed (WebAssembly trap)"
    );
    assert!(result["error"].get("details").is_none(), "{result}");
}

#[tokio::test]
async fn outputs_must_be_a_json_object_matching_the_schema() {
    let strict = WatNode {
        output_schema: r#"{"type":"object","required":["y"]}"#.into(),
        ..WatNode::new("test.schema", "1.0.0")
    };
    let mut schema_pack = WatPack::new("test.schema", "1.0.0");
    let (ptr, len) = schema_pack.data(br#"{"x":1}"#);
    let t = start(
        config(),
        &[
            ("array.wasm", returning("array", "[1,2]")),
            ("text.wasm", returning("text", "not json")),
            (
                "schema.wasm",
                pack_with(
                    schema_pack,
                    strict,
                    &format!("(call $ok (i32.const {ptr}) (i32.const {len}))"),
                ),
            ),
        ],
    )
    .await;
    for node in ["test.array", "test.text", "test.schema"] {
        let result = t
            .result(&request(&format!("nr-{node}"), node, "1.0.0", json!({})))
            .await;
        assert_outcome(&result, "failed", Some("invalid_outputs"));
    }
}

#[tokio::test]
async fn infinite_loop_times_out_at_the_default_limit() {
    let mut cfg = config();
    cfg.executor.default_timeout = Duration::from_millis(300);
    let t = start(cfg, &[("spin.wasm", pack("spin", SPIN))]).await;
    let began = Instant::now();
    let result = t
        .result(&request("nr-1", "test.spin", "1.0.0", json!({})))
        .await;
    let took = began.elapsed();
    assert_outcome(&result, "failed", Some("timeout"));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "took {took:?}"
    );
}

#[tokio::test]
async fn max_wall_time_ms_shorter_than_the_default_wins() {
    let t = start(config(), &[("spin.wasm", pack("spin", SPIN))]).await;
    let mut body = request("nr-1", "test.spin", "1.0.0", json!({}));
    body["constraints"] = json!({"budgets": {"max_wall_time_ms": 150}});
    let began = Instant::now();
    let result = t.result(&body).await;
    assert_outcome(&result, "failed", Some("timeout"));
    assert_eq!(result["error"]["details"]["limit_ms"], 150);
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "default of 5 s was used: {:?}",
        began.elapsed()
    );
}

#[tokio::test]
async fn node_declared_limit_applies() {
    let node = WatNode {
        max_wall_time_ms: Some(100),
        ..WatNode::new("test.short", "1.0.0")
    };
    let t = start(
        config(),
        &[(
            "short.wasm",
            pack_with(WatPack::new("test.short", "1.0.0"), node, SPIN),
        )],
    )
    .await;
    let began = Instant::now();
    let result = t
        .result(&request("nr-1", "test.short", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some("timeout"));
    assert!(began.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn sleeping_guest_is_stopped_at_its_deadline() {
    let wat = WatPack::new("test.nap", "1.0.0").with_sleep();
    let body = "(call $sleep (i64.const 60000)) (call $ok_inputs (local.get $call))";
    let t = start(
        config(),
        &[(
            "nap.wasm",
            pack_with(wat, WatNode::new("test.nap", "1.0.0"), body),
        )],
    )
    .await;
    let mut req = request("nr-1", "test.nap", "1.0.0", json!({}));
    req["constraints"] = json!({"budgets": {"max_wall_time_ms": 200}});
    let began = Instant::now();
    let result = t.result(&req).await;
    assert_outcome(&result, "failed", Some("timeout"));
    assert!(began.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn memory_bomb_hits_the_limit_and_the_service_survives() {
    let bomb = "(loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) (unreachable)";
    // The same with 1-byte pages (custom-page-sizes), growing 1 MiB at a time.
    let byte_bomb = "(loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 1048576)) (i32.const -1)))) (unreachable)";
    let byte_pages = pack_with(
        WatPack::new("test.bytebomb", "1.0.0").with_byte_pages(),
        WatNode::new("test.bytebomb", "1.0.0"),
        byte_bomb,
    );
    let t = start(
        config(),
        &[
            ("bomb.wasm", pack("bomb", bomb)),
            ("bytebomb.wasm", byte_pages),
        ],
    )
    .await;
    for (id, node) in [("nr-1", "test.bomb"), ("nr-1b", "test.bytebomb")] {
        let result = t.result(&request(id, node, "1.0.0", json!({}))).await;
        assert_outcome(&result, "failed", Some("memory_limit_exceeded"));
    }
    let echo = t
        .result(&request(
            "nr-2",
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "still here"}),
        ))
        .await;
    assert_outcome(&echo, "succeeded", None);
}

#[tokio::test]
async fn cancel_stops_a_spinning_guest() {
    let t = start(config(), &[("spin.wasm", pack("spin", SPIN))]).await;
    let began = Instant::now();
    let run = t.spawn_execute(request("nr-spin", "test.spin", "1.0.0", json!({})));
    wait_until_running(&t, 1).await;
    let (status, _) = t
        .post("/v1/atomic-node-runs/nr-spin:cancel", &json!({}))
        .await;
    assert_eq!(status, 204);
    let (status, result) = run.await.unwrap();
    assert_eq!(status, 200);
    assert_outcome(&result, "canceled", Some("canceled"));
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "cancel took {:?} (timeout is 5 s)",
        began.elapsed()
    );
}

#[tokio::test]
async fn overload_answers_503_with_retry_after() {
    let mut cfg = config();
    cfg.executor.max_concurrency = 1;
    cfg.executor.max_queue = 1;
    cfg.executor.queue_timeout = Duration::from_millis(200);
    cfg.executor.default_timeout = Duration::from_secs(3);
    let t = start(cfg, &[("spin.wasm", pack("spin", SPIN))]).await;
    let spinner = t.spawn_execute(request("nr-hold", "test.spin", "1.0.0", json!({})));
    wait_until_running(&t, 1).await;
    // One request may queue (and give up after 200 ms); the next is refused at once.
    let queued = {
        t.spawn_execute(request(
            "nr-queued",
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "x"}),
        ))
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let resp = t
        .client
        .post(t.url("/v1/atomic-node-runs:execute"))
        .json(&request(
            "nr-refused",
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "x"}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let envelope: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(envelope["error"]["code"], "overloaded");
    assert_eq!(envelope["error"]["retryable"], true);

    let queued = queued.await.unwrap();
    assert_eq!(
        queued.0, 503,
        "the queued request must give up after the queue timeout"
    );
    t.post("/v1/atomic-node-runs/nr-hold:cancel", &json!({}))
        .await;
    assert_eq!(spinner.await.unwrap().0, 200);
    // An overloaded NodeRun was not recorded: retrying it now runs it.
    let retried = t
        .result(&request(
            "nr-refused",
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "x"}),
        ))
        .await;
    assert_outcome(&retried, "succeeded", None);
}

#[tokio::test]
async fn health_answers_while_guests_spin() {
    let mut cfg = config();
    cfg.executor.default_timeout = Duration::from_secs(4);
    let t = start_alone(cfg, &[("spin.wasm", pack("spin", SPIN))]).await;
    let spinners: Vec<_> = (0..2)
        .map(|i| {
            t.spawn_execute(request(
                &format!("nr-spin-{i}"),
                "test.spin",
                "1.0.0",
                json!({}),
            ))
        })
        .collect();
    wait_until_running(&t, 2).await;
    let began = Instant::now();
    for _ in 0..5 {
        let resp = t.client.get(t.url("/v1/health")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "5 health checks took {took:?} while guests spin"
    );
    assert_eq!(
        t.server.service.executor.running(),
        2,
        "the guests must still be spinning"
    );
    for s in spinners {
        let (status, result) = s.await.unwrap();
        assert_eq!(status, 200);
        assert_outcome(&result, "failed", Some("timeout"));
    }
}

/// Waits until `n` executions hold a sandbox.
pub(crate) async fn wait_until_running(t: &TestServer, n: usize) {
    let began = Instant::now();
    while t.server.service.executor.running() < n {
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "executions never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
