//! Hostile guests against the executor's containment: giant outputs and
//! errors, invalid error codes, the retained-results budget, validation that
//! overruns its deadline, and hundreds of spinning guests while the API must
//! stay prompt and every deadline exact.

use std::time::{Duration, Instant};

use jarvis_atomic_executor::executor::{MAX_ERROR_CODE_BYTES, NODE_ERROR_INVALID_CODE};
use jarvis_atomic_executor::watpack::{WatNode, WatPack};
use serde_json::json;

use crate::limits::wait_until_running;
use crate::support::*;

/// An invoke body that grows memory by enough 64 KiB pages for `len` bytes,
/// fills them with `fill` and writes `prefix` at the start and `suffix` at
/// the end; then `finish` runs with the region's address as `$BASE` and its
/// length as `$LEN` (substituted).
fn region_body(len: u32, fill: u8, prefix: &[u8], suffix: &[u8], finish: &str) -> String {
    let pages = len.div_ceil(1 << 16) + 1;
    let base = format!("(i32.shl (i32.sub (memory.size) (i32.const {pages})) (i32.const 16))");
    let mut body = format!(
        "(if (i32.eq (memory.grow (i32.const {pages})) (i32.const -1)) (then unreachable))\n\
         (memory.fill {base} (i32.const {fill}) (i32.const {len}))\n"
    );
    let at = |offset: u32, bytes: &[u8], body: &mut String| {
        for (i, b) in bytes.iter().enumerate() {
            body.push_str(&format!(
                "(i32.store8 (i32.add {base} (i32.const {})) (i32.const {b}))\n",
                offset + i as u32
            ));
        }
    };
    at(0, prefix, &mut body);
    at(len - suffix.len() as u32, suffix, &mut body);
    body + &finish
        .replace("$BASE", &base)
        .replace("$LEN", &format!("(i32.const {len})"))
}

/// A node returning `{"s":"xxx…"}` of `len` bytes in all.
fn big_output(name: &str, len: u32) -> Vec<u8> {
    pack(
        name,
        &region_body(len, b'x', br#"{"s":""#, br#""}"#, "(call $ok $BASE $LEN)"),
    )
}

/// A config whose guests may hold `mib` MiB of memory.
fn roomy(mib: usize) -> jarvis_atomic_executor::config::Config {
    let mut cfg = config();
    cfg.runtime.max_memory_bytes = mib << 20;
    cfg
}

async fn assert_still_serving(t: &TestServer, id: &str) {
    let (status, _) = {
        let resp = t.client.get(t.url("/v1/health")).send().await.unwrap();
        (resp.status().as_u16(), ())
    };
    assert_eq!(status, 200);
    let echo = t
        .result(&request(
            id,
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "still here"}),
        ))
        .await;
    assert_outcome(&echo, "succeeded", None);
}

#[tokio::test]
async fn outputs_over_the_cap_fail_invalid_outputs() {
    let t = start(
        roomy(128),
        &[
            ("big.wasm", big_output("big", 40 << 20)),
            ("fits.wasm", big_output("fits", 1 << 20)),
        ],
    )
    .await;
    let result = t
        .result(&request("nr-big", "test.big", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some("invalid_outputs"));
    assert_eq!(
        result["error"]["details"]["bytes"],
        40 << 20,
        "{}",
        result["error"]
    );
    assert_eq!(result["error"]["details"]["limit_bytes"], 4 << 20);
    // Under the cap, the same guest succeeds: the cap is what failed it.
    let fits = t
        .result(&request("nr-fits", "test.fits", "1.0.0", json!({})))
        .await;
    assert_outcome(&fits, "succeeded", None);
    assert_eq!(fits["outputs"]["s"].as_str().unwrap().len(), (1 << 20) - 8);
    assert_still_serving(&t, "nr-echo").await;
}

#[tokio::test]
async fn a_giant_node_error_message_is_truncated_to_the_cap() {
    let mut wat = WatPack::new("test.loud", "1.0.0");
    let (code, code_len) = wat.data(b"too_loud");
    let body = region_body(
        40 << 20,
        b'e',
        "é".as_bytes(),
        b"",
        &format!("(call $err (i32.const {code}) (i32.const {code_len}) $BASE $LEN)"),
    );
    let t = start(
        roomy(128),
        &[(
            "loud.wasm",
            pack_with(wat, WatNode::new("test.loud", "1.0.0"), &body),
        )],
    )
    .await;
    let result = t
        .result(&request("nr-loud", "test.loud", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some("too_loud"));
    let message = result["error"]["message"].as_str().unwrap();
    assert!(
        message.len() <= 64 << 10 && message.len() > 60 << 10,
        "{} bytes",
        message.len()
    );
    assert!(message.starts_with("éeee"));
    assert_eq!(
        result["error"]["details"]["executor"]["message_bytes"],
        40 << 20
    );
    assert_still_serving(&t, "nr-echo").await;
}

#[tokio::test]
async fn node_error_codes_outside_the_pattern_or_too_long_are_replaced() {
    // A 32 MiB code, and a short one with characters outside [a-z0-9_.].
    let mut wat = WatPack::new("test.huge", "1.0.0");
    let (msg, msg_len) = wat.data(b"huge code");
    let huge = region_body(
        32 << 20,
        b'a',
        b"\x1b[31m",
        b"",
        &format!("(call $err $BASE $LEN (i32.const {msg}) (i32.const {msg_len}))"),
    );
    let mut shouty = WatPack::new("test.shouty", "1.0.0");
    let (code, code_len) = shouty.data(b"Not Found!");
    let (msg2, msg2_len) = shouty.data(b"no");
    let shouty_body = format!(
        "(call $err (i32.const {code}) (i32.const {code_len}) (i32.const {msg2}) (i32.const {msg2_len}))"
    );
    let long = "a".repeat(MAX_ERROR_CODE_BYTES);
    let mut fine = WatPack::new("test.fine", "1.0.0");
    let (code3, code3_len) = fine.data(long.as_bytes());
    let fine_body = format!(
        "(call $err (i32.const {code3}) (i32.const {code3_len}) (i32.const {code3}) (i32.const 1))"
    );
    let t = start(
        roomy(128),
        &[
            (
                "huge.wasm",
                pack_with(wat, WatNode::new("test.huge", "1.0.0"), &huge),
            ),
            (
                "shouty.wasm",
                pack_with(shouty, WatNode::new("test.shouty", "1.0.0"), &shouty_body),
            ),
            (
                "fine.wasm",
                pack_with(fine, WatNode::new("test.fine", "1.0.0"), &fine_body),
            ),
        ],
    )
    .await;

    let result = t
        .result(&request("nr-huge", "test.huge", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some(NODE_ERROR_INVALID_CODE));
    assert_eq!(result["error"]["message"], "huge code");
    let executor = &result["error"]["details"]["executor"];
    assert_eq!(executor["code_bytes"], 32 << 20);
    // The preview is short and printable: the escape character is masked.
    assert_eq!(
        executor["code_preview"].as_str().unwrap(),
        format!("?[31m{}", "a".repeat(27))
    );
    assert!(result.to_string().len() < 4096, "the code was echoed");

    let result = t
        .result(&request("nr-shouty", "test.shouty", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some(NODE_ERROR_INVALID_CODE));
    assert_eq!(
        result["error"]["details"]["executor"]["code_preview"],
        "Not?Found!"
    );

    // A code of exactly the maximum length is the node's own.
    let result = t
        .result(&request("nr-fine", "test.fine", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some(long.as_str()));
    assert_still_serving(&t, "nr-echo").await;
}

#[tokio::test]
async fn retained_results_are_held_within_a_byte_budget() {
    let mut cfg = roomy(32);
    cfg.executor.retention_max_bytes = 3 << 20;
    let t = start(cfg, &[("mib.wasm", big_output("mib", 1 << 20))]).await;
    for i in 0..6 {
        let result = t
            .result(&request(&format!("nr-{i}"), "test.mib", "1.0.0", json!({})))
            .await;
        assert_outcome(&result, "succeeded", None);
        let (count, bytes) = t.server.service.executor.retained();
        assert!(
            bytes <= 3 << 20,
            "{bytes} bytes retained in {count} results"
        );
    }
    let (count, _) = t.server.service.executor.retained();
    assert_eq!(
        count, 2,
        "three 1 MiB results do not fit in 3 MiB with their envelopes"
    );
    assert_eq!(t.invocations(), 6);
    // The newest result is still retained: a retry gets it without a rerun.
    t.result(&request("nr-5", "test.mib", "1.0.0", json!({})))
        .await;
    assert_eq!(t.invocations(), 6);
    // The oldest was evicted: a retry runs the node again.
    t.result(&request("nr-0", "test.mib", "1.0.0", json!({})))
        .await;
    assert_eq!(t.invocations(), 7);
    assert_still_serving(&t, "nr-echo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_validation_runs_within_the_deadline_off_the_api_threads() {
    // 40,000 items checked against a 1,000-value enum: about 0.1 s in a
    // debug build on a quiet 2-core machine (more under load), several times
    // the 20 ms limit below, so the deadline passes while validation runs.
    // (The schema stays within the WAT pack's one 64 KiB page of memory.)
    let values: Vec<String> = (0..1000).map(|i| format!("{:0>40}", i)).collect();
    let schema = json!({
        "type": "object",
        "properties": { "items": { "type": "array", "items": { "enum": &values } } },
    });
    let node = WatNode {
        input_schema: schema.to_string(),
        ..WatNode::new("test.slow", "1.0.0")
    };
    let t = start(
        config(),
        &[(
            "slow.wasm",
            pack_with(
                WatPack::new("test.slow", "1.0.0"),
                node,
                "(call $ok_inputs (local.get $call))",
            ),
        )],
    )
    .await;
    // Valid items, each the last value: validation cannot stop early.
    let items: Vec<&String> = (0..40_000).map(|_| &values[999]).collect();
    let mut body = request("nr-slow", "test.slow", "1.0.0", json!({ "items": items }));
    body["constraints"] = json!({"budgets": {"max_wall_time_ms": 20}});
    let began = Instant::now();
    let run = t.spawn_execute(body);
    wait_until_running(&t, 1).await;
    let health = Instant::now();
    let resp = t.client.get(t.url("/v1/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        health.elapsed() < Duration::from_millis(100),
        "health took {:?} while a validation ran",
        health.elapsed()
    );
    let (status, result) = run.await.unwrap();
    let took = began.elapsed();
    assert_eq!(status, 200);
    assert_outcome(&result, "failed", Some("timeout"));
    assert!(
        took < Duration::from_millis(1000),
        "answered after {took:?}"
    );
    assert_eq!(t.invocations(), 0, "the guest ran after its deadline");
    // The validation keeps its slot until it ends, then gives it back.
    let released = Instant::now();
    while t.server.service.executor.running() > 0 {
        assert!(
            released.elapsed() < Duration::from_secs(10),
            "the slot of a timed-out validation was never given back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_still_serving(&t, "nr-after-slow").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_spinning_guests_neither_starve_health_nor_overrun_deadlines() {
    const SPINNERS: usize = 300;
    const LIMIT: Duration = Duration::from_millis(1500);
    let mut cfg = config();
    cfg.executor.max_concurrency = SPINNERS;
    cfg.executor.max_queue = SPINNERS;
    cfg.runtime.max_instances = SPINNERS as u32;
    cfg.executor.default_timeout = LIMIT;
    let t = start_alone(cfg, &[("spin.wasm", pack("spin", SPIN))]).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(SPINNERS)
        .build()
        .unwrap();
    let spinners: Vec<_> = (0..SPINNERS)
        .map(|i| {
            let client = client.clone();
            let url = t.url("/v1/atomic-node-runs:execute");
            let body = request(&format!("nr-spin-{i}"), "test.spin", "1.0.0", json!({}));
            tokio::spawn(async move {
                let began = Instant::now();
                let resp = client.post(url).json(&body).send().await.unwrap();
                let status = resp.status().as_u16();
                let result: serde_json::Value = resp.json().await.unwrap();
                (status, result, began.elapsed())
            })
        })
        .collect();
    wait_until_running(&t, SPINNERS / 2).await;
    let mut health = Vec::new();
    let polling = Instant::now();
    while polling.elapsed() < LIMIT - Duration::from_millis(300) {
        let began = Instant::now();
        let resp = t.client.get(t.url("/v1/health")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        health.push(began.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(t.server.service.executor.running() > SPINNERS / 2);
    let slowest = health.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_millis(100),
        "health answers over {} polls: slowest {slowest:?}",
        health.len()
    );
    for s in spinners {
        let (status, result, took) = s.await.unwrap();
        assert_eq!(status, 200, "{result}");
        assert_outcome(&result, "failed", Some("timeout"));
        // Counted from the server's own timestamps: the client's clock also
        // holds the wait for one of 300 connections.
        let ran = seconds_of_day(&result["ended_at"]) - seconds_of_day(&result["started_at"]);
        assert!(
            ran < (LIMIT + Duration::from_millis(100)).as_secs_f64(),
            "a spinning call was answered {ran} s after it started (limit {LIMIT:?})"
        );
        // The client's own clock also holds connecting and sending while 300
        // calls start at once on the test's two threads: only a loose bound.
        assert!(took >= LIMIT && took < LIMIT * 3, "{took:?}");
    }
    assert_still_serving(&t, "nr-echo").await;
}

/// Seconds since midnight of an RFC 3339 UTC timestamp (the tests run for
/// seconds, and a day's wrap is accounted for by the caller never spanning it).
fn seconds_of_day(timestamp: &serde_json::Value) -> f64 {
    let text = timestamp.as_str().unwrap();
    let time = text.split_once('T').unwrap().1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next().unwrap().parse().unwrap();
    let m: f64 = parts.next().unwrap().parse().unwrap();
    let s: f64 = parts.next().unwrap().parse().unwrap();
    h * 3600.0 + m * 60.0 + s
}

/// The process's `THP_enabled` (Linux `/proc/PID/status`): whether the kernel
/// may back its memory with transparent huge pages.
#[cfg(target_os = "linux")]
fn huge_pages_enabled(executor: &mut LoggedExecutor) -> String {
    executor.wait_for("listening");
    let status = std::fs::read_to_string(format!("/proc/{}/status", executor.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .expect("the kernel reports THP_enabled")
        .trim()
        .to_owned()
}

/// A fresh 2 MiB page is zeroed whole on the thread that first touches it,
/// which stalled the API's threads while a burst of calls arrived: the
/// executor turns transparent huge pages off unless told otherwise.
#[cfg(target_os = "linux")]
#[test]
fn the_executor_runs_without_transparent_huge_pages_unless_told() {
    let packs = tempfile::tempdir().unwrap();
    // The default, whatever the environment running the tests says.
    let mut default = LoggedExecutor::start(packs.path(), |command| {
        command.env_remove("JARVIS_TRANSPARENT_HUGE_PAGES");
    });
    let mut allowed = LoggedExecutor::start(packs.path(), |command| {
        command.env("JARVIS_TRANSPARENT_HUGE_PAGES", "true");
    });
    assert_eq!(huge_pages_enabled(&mut default), "0");
    assert_eq!(huge_pages_enabled(&mut allowed), "1");
    default.finish();
    allowed.finish();
}
