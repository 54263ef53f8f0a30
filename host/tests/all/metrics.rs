//! `GET /metrics`: what a running server counts after real executions,
//! failures, overload and a reload, and who may read it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use jarvis_atomic_executor::config::Config;
use jarvis_atomic_executor::watpack::{WatNode, WatPack};
use serde_json::{Value, json};

use crate::support::*;

/// How long the server may take to reach a state the test waits for.
const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// A scrape: each sample line's series (name and labels as written) and value.
type Samples = BTreeMap<String, f64>;

fn parse(text: &str) -> Samples {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

/// `name{k="v",...}` as the text format writes it.
fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

fn execution(node: &str, version: &str, state: &str, code: &str) -> String {
    series(
        "jarvis_executor_executions_total",
        &[
            ("node_type_id", node),
            ("version", version),
            ("state", state),
            ("code", code),
        ],
    )
}

fn duration(suffix: &str, node: &str, version: &str, state: &str) -> String {
    series(
        &format!("jarvis_executor_execution_duration_seconds_{suffix}"),
        &[
            ("node_type_id", node),
            ("version", version),
            ("state", state),
        ],
    )
}

/// The sum of every sample of the metric `name` (all its label sets).
fn total(samples: &Samples, name: &str) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| s.as_str() == name || s.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

#[track_caller]
fn assert_sample(samples: &Samples, series: &str, expected: f64) {
    assert_eq!(
        samples.get(series).copied(),
        Some(expected),
        "{series} in {samples:#?}"
    );
}

async fn scrape(t: &TestServer) -> Samples {
    let resp = t.client.get(t.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    parse(&resp.text().await.unwrap())
}

/// Scrapes until `done` holds, within [`WAIT_LIMIT`].
async fn scrape_until(t: &TestServer, what: &str, done: impl Fn(&Samples) -> bool) -> Samples {
    let started = Instant::now();
    loop {
        let samples = scrape(t).await;
        if done(&samples) {
            return samples;
        }
        assert!(
            started.elapsed() < WAIT_LIMIT,
            "{what}: not after {WAIT_LIMIT:?}: {samples:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn value(samples: &Samples, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(f64::NAN)
}

/// Writes `bytes` under a temporary name, then renames it into place.
fn install(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.partial"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A pack whose `test.fail` node returns the node error `not_found`.
fn failing() -> Vec<u8> {
    let mut wat = WatPack::new("test.fail", "1.0.0");
    let (code, code_len) = wat.data(b"not_found");
    let (msg, msg_len) = wat.data(b"no such thing");
    pack_with(
        wat,
        WatNode::new("test.fail", "1.0.0"),
        &format!(
            "(call $err (i32.const {code}) (i32.const {code_len}) (i32.const {msg}) (i32.const {msg_len}))"
        ),
    )
}

/// A pack whose `test.chatty` node logs `lines` lines, then returns its inputs.
fn chatty(lines: u32) -> Vec<u8> {
    let mut wat = WatPack::new("test.chatty", "1.0.0").with_log();
    let (msg, msg_len) = wat.data(b"hello");
    let log = format!(
        "(call $log (i32.const 2) (i32.const {msg}) (i32.const {msg_len}) (i32.const 0) (i32.const 0))"
    );
    pack_with(
        wat,
        WatNode::new("test.chatty", "1.0.0"),
        &format!(
            "{} (call $ok_inputs (local.get $call))",
            log.repeat(lines as usize)
        ),
    )
}

/// A pack whose `test.nap` node sleeps `ms` milliseconds, then returns `{}`.
fn napping(ms: u64) -> Vec<u8> {
    let mut wat = WatPack::new("test.nap", "1.0.0").with_sleep();
    let (ptr, len) = wat.data(b"{}");
    pack_with(
        wat,
        WatNode::new("test.nap", "1.0.0"),
        &format!("(call $sleep (i64.const {ms})) (call $ok (i32.const {ptr}) (i32.const {len}))"),
    )
}

async fn run(t: &TestServer, id: &str, node: &str, version: &str) -> Value {
    t.result(&request(id, node, version, json!({}))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_executions_failures_and_a_reload() {
    let mut config = config();
    config.watch.settle = Duration::from_millis(200);
    config.watch.rescan = Duration::from_secs(1);
    config.runtime.max_log_lines = 2;
    let t = start(
        config,
        &[
            ("ok.wasm", returning("ok", r#"{"v":1}"#)),
            ("fail.wasm", failing()),
            ("spin.wasm", pack("spin", SPIN)),
            ("chatty.wasm", chatty(5)),
        ],
    )
    .await;

    for i in 0..3 {
        let result = run(&t, &format!("nr-ok-{i}"), "test.ok", "1.0.0").await;
        assert_outcome(&result, "succeeded", None);
    }
    let result = run(&t, "nr-fail", "test.fail", "1.0.0").await;
    assert_outcome(&result, "failed", Some("not_found"));
    let mut spin = request("nr-spin", "test.spin", "1.0.0", json!({}));
    spin["constraints"] = json!({"budgets": {"max_wall_time_ms": 300}});
    assert_outcome(&t.result(&spin).await, "failed", Some("timeout"));
    let result = run(&t, "nr-chatty", "test.chatty", "1.0.0").await;
    assert_outcome(&result, "succeeded", None);
    let result = run(&t, "nr-nope", "test.nope", "1.0.0").await;
    assert_outcome(&result, "failed", Some("unknown_node_type"));
    let result = run(&t, "nr-old", "test.ok", "9.9.9").await;
    assert_outcome(&result, "failed", Some("unknown_node_version"));

    // A replaced pack counts as a reload; a broken file as a failure.
    install(t.packs_dir(), "ok.wasm", &returning("ok", r#"{"v":2}"#));
    scrape_until(&t, "reloaded", |s| {
        value(s, "jarvis_executor_pack_reloads_total") == 1.0
    })
    .await;
    let result = run(&t, "nr-ok-new", "test.ok", "1.0.0").await;
    assert_eq!(result["outputs"], json!({"v": 2}), "{result}");
    install(t.packs_dir(), "broken.wasm", b"not a component");
    // The spinning guest answered `timeout` stops at its next epoch check,
    // giving its slot back; its own end must not count again.
    let s = scrape_until(&t, "broken file counted, spinning guest stopped", |s| {
        // The counter and the gauge are two updates: wait for both.
        value(s, r#"jarvis_executor_pack_loads_total{result="failed"}"#) == 1.0
            && value(s, "jarvis_executor_pack_load_failures") == 1.0
            && value(s, "jarvis_executor_in_flight") == 0.0
    })
    .await;

    assert_sample(&s, &execution("test.ok", "1.0.0", "succeeded", ""), 4.0);
    assert_sample(
        &s,
        &execution("test.fail", "1.0.0", "failed", "not_found"),
        1.0,
    );
    assert_sample(
        &s,
        &execution("test.spin", "1.0.0", "failed", "timeout"),
        1.0,
    );
    assert_sample(&s, &execution("test.chatty", "1.0.0", "succeeded", ""), 1.0);
    assert_sample(
        &s,
        &execution("unknown", "unknown", "failed", "unknown_node_type"),
        1.0,
    );
    assert_sample(
        &s,
        &execution("unknown", "unknown", "failed", "unknown_node_version"),
        1.0,
    );
    // Nine executions, each counted once (the stopped spinner not again).
    assert_eq!(total(&s, "jarvis_executor_executions_total"), 9.0);

    assert_sample(&s, &duration("count", "test.ok", "1.0.0", "succeeded"), 4.0);
    assert_sample(&s, &duration("count", "test.spin", "1.0.0", "failed"), 1.0);
    assert_sample(&s, &duration("count", "unknown", "unknown", "failed"), 2.0);
    assert_eq!(
        total(&s, "jarvis_executor_execution_duration_seconds_count"),
        9.0
    );
    // The timeout came at the deadline, 300 ms after arrival, not before.
    assert!(value(&s, &duration("sum", "test.spin", "1.0.0", "failed")) >= 0.3);
    let spin_buckets: Vec<(&String, &f64)> = s
        .iter()
        .filter(|(k, _)| {
            k.starts_with("jarvis_executor_execution_duration_seconds_bucket{")
                && k.contains(r#"node_type_id="test.spin""#)
        })
        .collect();
    for (bucket, count) in &spin_buckets {
        let le: f64 = bucket
            .split("le=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map(|le| {
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                }
            })
            .unwrap();
        let expected = if le < 0.3 { 0.0 } else { 1.0 };
        assert_eq!(**count, expected, "{bucket}");
    }
    assert_eq!(spin_buckets.len(), 20, "{spin_buckets:?}");

    // Known nodes asked for a slot; unknown ones never got that far.
    assert_sample(&s, "jarvis_executor_queue_wait_seconds_count", 7.0);
    assert_sample(
        &s,
        r#"jarvis_executor_queue_wait_seconds_bucket{le="+Inf"}"#,
        7.0,
    );
    assert_sample(&s, "jarvis_executor_in_flight", 0.0);
    assert_sample(&s, "jarvis_executor_queue_depth", 0.0);
    assert_sample(
        &s,
        r#"jarvis_executor_rejections_total{reason="overloaded"}"#,
        0.0,
    );
    // Four files at start, one replaced.
    assert_sample(
        &s,
        r#"jarvis_executor_pack_loads_total{result="loaded"}"#,
        5.0,
    );
    assert_sample(
        &s,
        r#"jarvis_executor_pack_loads_total{result="failed"}"#,
        1.0,
    );
    assert_sample(&s, "jarvis_executor_pack_reloads_total", 1.0);
    assert_sample(&s, "jarvis_executor_pack_load_failures", 1.0);
    // Five lines logged against a budget of two.
    assert_sample(&s, "jarvis_executor_guest_log_lines_dropped_total", 3.0);
    assert_sample(
        &s,
        &format!(
            "jarvis_executor_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        ),
        1.0,
    );

    // Fixing the file clears the failure gauge; the failure stays counted.
    std::fs::remove_file(t.packs_dir().join("broken.wasm")).unwrap();
    let s = scrape_until(&t, "failure cleared", |s| {
        value(s, "jarvis_executor_pack_load_failures") == 0.0
    })
    .await;
    assert_sample(
        &s,
        r#"jarvis_executor_pack_loads_total{result="failed"}"#,
        1.0,
    );
    // Still nine: the stopped spinner's own ending, long past, did not count.
    assert_eq!(total(&s, "jarvis_executor_executions_total"), 9.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_slots_held_the_queue_and_overloaded_requests() {
    let mut config = config();
    config.executor.max_concurrency = 1;
    config.executor.max_queue = 1;
    config.executor.queue_timeout = Duration::from_secs(30);
    config.executor.default_timeout = Duration::from_secs(30);
    let t = start(config, &[("nap.wasm", napping(1000))]).await;

    let first = t.spawn_execute(request("nr-1", "test.nap", "1.0.0", json!({})));
    scrape_until(&t, "first call holds the slot", |s| {
        value(s, "jarvis_executor_in_flight") == 1.0
    })
    .await;
    let second = t.spawn_execute(request("nr-2", "test.nap", "1.0.0", json!({})));
    let s = scrape_until(&t, "second call queued", |s| {
        value(s, "jarvis_executor_queue_depth") == 1.0
    })
    .await;
    assert_sample(&s, "jarvis_executor_in_flight", 1.0);

    let (status, body) = t
        .execute(&request("nr-3", "test.nap", "1.0.0", json!({})))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "overloaded");

    for call in [first, second] {
        let (status, result) = call.await.unwrap();
        assert_eq!(status, 200, "{result}");
        assert_outcome(&result, "succeeded", None);
    }
    let s = scrape_until(&t, "slot given back", |s| {
        value(s, "jarvis_executor_in_flight") == 0.0
    })
    .await;
    assert_sample(
        &s,
        r#"jarvis_executor_rejections_total{reason="overloaded"}"#,
        1.0,
    );
    assert_sample(&s, "jarvis_executor_queue_depth", 0.0);
    // The refused request has no result, so it is no execution.
    assert_sample(&s, &execution("test.nap", "1.0.0", "succeeded", ""), 2.0);
    assert_eq!(total(&s, "jarvis_executor_executions_total"), 2.0);
    // All three asked for a slot; the second waited for the first's.
    assert_sample(&s, "jarvis_executor_queue_wait_seconds_count", 3.0);
    assert!(value(&s, "jarvis_executor_queue_wait_seconds_sum") > 0.0);
}

/// Authentication in required mode against a key set nobody serves: no
/// token can pass, so only exempt routes answer.
fn required_auth(mut config: Config) -> Config {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    config.auth = jarvis_auth::AuthSettings::from_vars([
        ("ARP_AUTH_MODE", "required"),
        (
            "ARP_AUTH_JWKS_URI",
            format!("http://{closed}/jwks").as_str(),
        ),
    ])
    .unwrap();
    config
}

#[tokio::test]
async fn metrics_answer_without_a_token_unless_told_to_require_one() {
    let t = start(required_auth(config()), &[]).await;
    let s = scrape(&t).await;
    assert!(s.contains_key("jarvis_executor_in_flight"), "{s:#?}");
    let execute = t
        .client
        .post(t.url("/v1/atomic-node-runs:execute"))
        .json(&request(
            "nr-1",
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "x"}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(execute.status(), 401);

    let mut config = required_auth(config());
    config.metrics_require_auth = true;
    let t = start(config, &[]).await;
    let resp = t.client.get(t.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let health = t.client.get(t.url("/v1/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}
