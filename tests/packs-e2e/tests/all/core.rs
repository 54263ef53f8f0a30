//! The jarvis.core pack, built from `nodepacks/core`, against the behaviour of
//! the Python reference (arp-jarvis-atomic-nodes 0.3.8) recorded in
//! `reference/core_cases.json`: same schemas, same outputs, same error codes.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::support::*;

const VERSION: &str = "0.3.8";

fn reference() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/reference/core_cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn core_server() -> Option<TestServer> {
    let pack = built_pack("jarvis.core.wasm")?;
    Some(serve(&[pack], |_| {}).await)
}

#[tokio::test]
async fn node_types_have_the_reference_schemas() {
    let Some(t) = core_server().await else { return };
    let reference = reference();
    let nodes = reference["nodes"].as_object().unwrap();
    assert_eq!(nodes.len(), 5);
    for (id, expected) in nodes {
        let served = t.node_type(id).await;
        assert_eq!(served["version"], VERSION, "{served}");
        assert_eq!(served["input_schema"], expected["input_schema"], "{id}");
        assert_eq!(served["output_schema"], expected["output_schema"], "{id}");
        assert_eq!(served["description"], expected["description"], "{id}");
    }
}

/// Every recorded case: inputs the schema rejects are `invalid_inputs` (the
/// executor validates first), the reference's exceptions are `handler_error`
/// with the exception's message, and its outputs are ours.
#[tokio::test]
async fn every_case_behaves_like_the_reference() {
    let Some(t) = core_server().await else { return };
    let reference = reference();
    let cases = reference["cases"].as_array().unwrap();
    for (i, case) in cases.iter().enumerate() {
        let node = case["node_type_id"].as_str().unwrap();
        let inputs = &case["inputs"];
        let result = t
            .result(&request(
                &format!("nr-core-{i}"),
                node,
                VERSION,
                inputs.clone(),
            ))
            .await;
        let context = format!("{node} {inputs} → {result}");
        let python = &case["python"];
        if case["schema_valid"] == false {
            assert_outcome(&result, "failed", Some("invalid_inputs"));
        } else if let Some(message) = python["error"].as_str() {
            assert_outcome(&result, "failed", Some("handler_error"));
            let ours = result["error"]["message"].as_str().unwrap();
            assert!(
                ours.contains(message),
                "message should say {message:?}: {context}"
            );
        } else if case["deterministic"] == true {
            assert_outcome(&result, "succeeded", None);
            assert_eq!(result["outputs"], python["outputs"], "{context}");
        } else {
            assert_outcome(&result, "succeeded", None);
            check_nondeterministic(node, &result["outputs"], &python["outputs"]);
        }
    }
}

fn check_nondeterministic(node: &str, ours: &Value, python: &Value) {
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(ours), keys(python), "{node}: {ours}");
    match node {
        "jarvis.core.uuid4" => assert_uuid4(ours["uuid4"].as_str().unwrap()),
        "jarvis.core.time.now" => assert_recent_isoformat(ours["time"].as_str().unwrap()),
        other => panic!("no check for {other}"),
    }
}

/// `str(uuid.uuid4())`: lowercase hyphenated, version 4, RFC 4122 variant.
#[track_caller]
fn assert_uuid4(text: &str) {
    let groups: Vec<&str> = text.split('-').collect();
    let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    assert_eq!(lengths, [8, 4, 4, 4, 12], "{text}");
    assert!(
        text.chars()
            .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "{text}"
    );
    assert!(groups[2].starts_with('4'), "version 4: {text}");
    assert!(
        groups[3].starts_with(['8', '9', 'a', 'b']),
        "variant: {text}"
    );
}

/// `datetime.now(timezone.utc).isoformat()`, and now.
#[track_caller]
fn assert_recent_isoformat(text: &str) {
    let (main, offset) = text.split_at(text.len() - 6);
    assert_eq!(offset, "+00:00", "{text}");
    let (seconds_part, micros) = match main.split_once('.') {
        Some((s, f)) => {
            assert_eq!(f.len(), 6, "microseconds: {text}");
            assert_ne!(f, "000000", "Python omits zero microseconds: {text}");
            (s, f.parse::<u64>().unwrap())
        }
        None => (main, 0),
    };
    let b = seconds_part.as_bytes();
    assert_eq!(b.len(), 19, "{text}");
    assert!(b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' && b[16] == b':');
    let num = |r: std::ops::Range<usize>| seconds_part[r].parse::<i64>().unwrap();
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    let (hh, mm, ss) = (num(11..13), num(14..16), num(17..19));
    // Days from the civil date (Howard Hinnant's algorithm), to compare with the clock.
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let stamp = (days * 86_400 + hh * 3600 + mm * 60 + ss) as f64 + micros as f64 / 1e6;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - stamp).abs() < 30.0, "{text} is not now ({now})");
}

#[tokio::test]
async fn uuid4_differs_every_call() {
    let Some(t) = core_server().await else { return };
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        let result = t
            .result(&request(
                &format!("nr-uuid-{i}"),
                "jarvis.core.uuid4",
                VERSION,
                json!({}),
            ))
            .await;
        assert_outcome(&result, "succeeded", None);
        assert!(seen.insert(result["outputs"]["uuid4"].as_str().unwrap().to_owned()));
    }
}

/// Inputs far larger than the pack's arena (448 KiB of initial heap): the SDK's
/// allocator hands over to the standard one mid-call, buffers growing across the
/// boundary keep their contents, and a later small call starts afresh.
#[tokio::test]
async fn inputs_larger_than_the_arena() {
    let Some(t) = core_server().await else { return };
    let text = "a".repeat(1_000_000);
    let inputs = json!({"content_base64": null, "text": text, "encoding": null});
    let result = t
        .result(&request(
            "nr-big-sha",
            "jarvis.core.hash.sha256",
            VERSION,
            inputs,
        ))
        .await;
    assert_outcome(&result, "succeeded", None);
    // The FIPS 180-2 test vector: one million 'a'.
    assert_eq!(
        result["outputs"]["sha256"],
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
    );
    let result = t
        .result(&request(
            "nr-big-echo",
            "jarvis.core.echo",
            VERSION,
            json!({"echo": text}),
        ))
        .await;
    assert_outcome(&result, "succeeded", None);
    assert!(
        result["outputs"]["echo"] == text.as_str(),
        "echo changed the text"
    );
    let result = t
        .result(&request(
            "nr-small-echo",
            "jarvis.core.echo",
            VERSION,
            json!({"echo": "hi"}),
        ))
        .await;
    assert_eq!(result["outputs"], json!({"echo": "hi"}));
}

#[tokio::test]
async fn sleep_waits_as_long_as_asked() {
    let Some(t) = core_server().await else { return };
    let started = Instant::now();
    let inputs = json!({"seconds": 0.3, "duration_seconds": null});
    let result = t
        .result(&request("nr-sleep", "jarvis.core.sleep", VERSION, inputs))
        .await;
    let elapsed = started.elapsed();
    assert_outcome(&result, "succeeded", None);
    assert_eq!(result["outputs"], json!({"slept_seconds": 0.3}));
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
}

/// 1,024 sleeps at once run side by side on a few threads: the host's timer
/// holds no thread while a guest waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sleeps_hold_no_threads() {
    let Some(pack) = built_pack("jarvis.core.wasm") else {
        return;
    };
    let t = serve(&[pack], |config| {
        config.executor.max_concurrency = 2048;
        config.executor.max_queue = 2048;
        config.runtime.max_instances = 2048;
    })
    .await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1100)
        .build()
        .unwrap();
    let url = t.url("/v1/atomic-node-runs:execute");
    // How many sleeps are in the executor at once, sampled while they run.
    let executor = t.server.service.executor.clone();
    let peak = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(executor.running());
            if peak > 0 && executor.running() == 0 {
                return peak;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let started = Instant::now();
    let calls = (0..1024).map(|i| {
        let client = client.clone();
        let url = url.clone();
        let body = request(
            &format!("nr-many-{i}"),
            "jarvis.core.sleep",
            VERSION,
            json!({"seconds": 1, "duration_seconds": null}),
        );
        tokio::spawn(async move { execute(&client, &url, &body).await })
    });
    let calls: Vec<_> = calls.collect();
    for call in calls {
        let result = call.await.unwrap();
        assert_outcome(&result, "succeeded", None);
    }
    let elapsed = started.elapsed();
    let peak = peak.await.unwrap();
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0);
    eprintln!(
        "1024 concurrent 1 s sleeps: {elapsed:?}, at most {peak} at once, {threads} threads in the test process"
    );
    // Most of the sleeps overlap, on far fewer threads than sleeps. (How close
    // to 1 s they finish is the HTTP benchmark's figure, not a test's.)
    assert!(peak >= 512, "only {peak} sleeps ran at once");
    assert!(threads < 200, "{threads} threads");
}
