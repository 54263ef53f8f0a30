//! Hot reload: packs added, replaced, broken or removed in a running server's directory.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jarvis_atomic_executor::config::Config;
use jarvis_atomic_executor::watpack::{WatNode, WatPack};
use serde_json::{Value, json};

use crate::support::{TestServer, assert_outcome, config, pack_with, request, returning, start};

/// How long a change may take to be served: the settle time below plus a
/// scan, with room for a slow, shared machine.
const RELOAD_LIMIT: Duration = Duration::from_secs(10);

fn reload_config() -> Config {
    let mut config = config();
    config.watch.settle = Duration::from_millis(200);
    config.watch.rescan = Duration::from_secs(1);
    config
}

/// Writes `bytes` under a temporary name, then renames it into place, as
/// deployment tools do: the pack appears complete in one step.
fn install(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.partial"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A pack whose `test.<name>` node sleeps `ms` milliseconds, then returns `text`.
fn sleeping(name: &str, ms: u64, text: &str) -> Vec<u8> {
    let mut pack = WatPack::new(&format!("test.{name}"), "1.0.0").with_sleep();
    let (ptr, len) = pack.data(text.as_bytes());
    pack_with(
        pack,
        WatNode::new(&format!("test.{name}"), "1.0.0"),
        &format!("(call $sleep (i64.const {ms})) (call $ok (i32.const {ptr}) (i32.const {len}))"),
    )
}

fn next_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("nr-reload-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Executes `test.<name>` 1.0.0 once and returns the result.
async fn run(t: &TestServer, name: &str) -> Value {
    t.result(&request(
        &next_id(),
        &format!("test.{name}"),
        "1.0.0",
        json!({}),
    ))
    .await
}

/// Executes `test.<name>` until `done` holds for the result, within [`RELOAD_LIMIT`].
async fn run_until(t: &TestServer, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let result = run(t, name).await;
        if done(&result) {
            return result;
        }
        assert!(
            started.elapsed() < RELOAD_LIMIT,
            "not reloaded after {RELOAD_LIMIT:?}: {result}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn health(t: &TestServer) -> Value {
    t.client
        .get(t.url("/v1/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn health_until(t: &TestServer, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let health = health(t).await;
        if done(&health) {
            return health;
        }
        assert!(started.elapsed() < RELOAD_LIMIT, "health stays {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn outputs_are(expected: Value) -> impl Fn(&Value) -> bool {
    move |result| result["state"] == "succeeded" && result["outputs"] == expected
}

fn is_unknown(result: &Value) -> bool {
    result["error"]["code"] == "unknown_node_type"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_dropped_in_serves_without_a_restart() {
    let t = start(reload_config(), &[]).await;
    assert_outcome(&run(&t, "fresh").await, "failed", Some("unknown_node_type"));
    let dropped = Instant::now();
    install(
        t.packs_dir(),
        "fresh.wasm",
        &returning("fresh", r#"{"v":1}"#),
    );
    run_until(&t, "fresh", outputs_are(json!({"v": 1}))).await;
    eprintln!("served {:?} after the drop", dropped.elapsed());
    let types = t.client.get(t.url("/v1/node-types")).send().await.unwrap();
    let types: Value = types.json().await.unwrap();
    assert!(
        types
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node_type_id"] == "test.fresh"),
        "the catalogue lists the new node: {types}"
    );
    assert_eq!(health(&t).await["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_pack_serves_new_requests_while_a_call_on_the_old_one_completes() {
    let t = start(
        reload_config(),
        &[("swap.wasm", sleeping("swap", 1500, r#"{"v":1}"#))],
    )
    .await;
    let long = t.spawn_execute(request(&next_id(), "test.swap", "1.0.0", json!({})));
    // The long call has entered the old pack before it is replaced.
    let started = Instant::now();
    while t.invocations() == 0 {
        assert!(
            started.elapsed() < RELOAD_LIMIT,
            "the long call never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    install(
        t.packs_dir(),
        "swap.wasm",
        &sleeping("swap", 0, r#"{"v":2}"#),
    );
    run_until(&t, "swap", outputs_are(json!({"v": 2}))).await;
    let (status, old) = long.await.unwrap();
    assert_eq!(status, 200, "{old}");
    assert_outcome(&old, "succeeded", None);
    assert_eq!(
        old["outputs"],
        json!({"v": 1}),
        "finished on the old version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_replacement_keeps_the_old_version_serving_and_degrades_health() {
    let t = start(
        reload_config(),
        &[("keep.wasm", returning("keep", r#"{"v":1}"#))],
    )
    .await;
    assert_eq!(health(&t).await["status"], "ok");
    install(
        t.packs_dir(),
        "keep.wasm",
        b"\0asm but not really a component",
    );
    let degraded = health_until(&t, |h| h["status"] == "degraded").await;
    let check = degraded["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["status"] == "degraded")
        .unwrap();
    assert_eq!(check["details"]["file"], "keep.wasm", "{degraded}");
    assert!(
        check["message"]
            .as_str()
            .unwrap()
            .contains("not a valid WebAssembly component"),
        "{degraded}"
    );
    assert_eq!(run(&t, "keep").await["outputs"], json!({"v": 1}));

    // Fixed: the new version serves and health is ok again.
    install(t.packs_dir(), "keep.wasm", &returning("keep", r#"{"v":2}"#));
    run_until(&t, "keep", outputs_are(json!({"v": 2}))).await;
    health_until(&t, |h| h["status"] == "ok").await;

    // Broken again, then removed: nothing serves and nothing is reported.
    install(t.packs_dir(), "keep.wasm", b"garbage");
    health_until(&t, |h| h["status"] == "degraded").await;
    std::fs::remove_file(t.packs_dir().join("keep.wasm")).unwrap();
    health_until(&t, |h| h["status"] == "ok").await;
    run_until(&t, "keep", is_unknown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_pack_is_no_longer_served() {
    let t = start(
        reload_config(),
        &[("gone.wasm", returning("gone", r#"{"v":1}"#))],
    )
    .await;
    assert_outcome(&run(&t, "gone").await, "succeeded", None);
    std::fs::remove_file(t.packs_dir().join("gone.wasm")).unwrap();
    let result = run_until(&t, "gone", is_unknown).await;
    assert_outcome(&result, "failed", Some("unknown_node_type"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_slowly_in_pieces_is_loaded_once_complete_and_never_reported_broken() {
    let mut cfg = reload_config();
    // Far longer than the pauses between pieces, however slow the machine.
    cfg.watch.settle = Duration::from_millis(1000);
    let t = start(cfg, &[]).await;
    let bytes = returning("slow", r#"{"v":1}"#);
    let path = t.packs_dir().join("slow.wasm");
    let mut file = std::fs::File::create(&path).unwrap();
    let registry = t.server.service.executor.registry().clone();
    // Pieces land faster than the settle time, the whole well beyond it.
    for piece in bytes.chunks(bytes.len().div_ceil(16)) {
        std::io::Write::write_all(&mut file, piece).unwrap();
        file.sync_all().unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(registry.skipped(), [], "a partial file was loaded");
        assert_eq!(health(&t).await["status"], "ok");
    }
    drop(file);
    run_until(&t, "slow", outputs_are(json!({"v": 1}))).await;
    assert_eq!(registry.skipped(), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_winner_of_a_duplicate_brings_the_shadowed_pack_back() {
    let t = start(
        reload_config(),
        &[
            ("a-first.wasm", returning("dup", r#"{"from":"a"}"#)),
            ("b-second.wasm", returning("dup", r#"{"from":"b"}"#)),
        ],
    )
    .await;
    assert_eq!(run(&t, "dup").await["outputs"], json!({"from": "a"}));
    // Shadowed is not broken.
    assert_eq!(health(&t).await["status"], "ok");
    std::fs::remove_file(t.packs_dir().join("a-first.wasm")).unwrap();
    run_until(&t, "dup", outputs_are(json!({"from": "b"}))).await;
    // And back: the winner returns.
    install(
        t.packs_dir(),
        "a-first.wasm",
        &returning("dup", r#"{"from":"a2"}"#),
    );
    run_until(&t, "dup", outputs_are(json!({"from": "a2"}))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_rescan_finds_changes_without_a_watcher_event() {
    // A directory created after start cannot be watched: only the rescan sees it.
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("later");
    let mut cfg = reload_config();
    cfg.packs_dir = Some(dir.clone());
    let server = jarvis_atomic_executor::RunningServer::spawn(&cfg)
        .await
        .unwrap();
    std::fs::create_dir(&dir).unwrap();
    install(&dir, "late.wasm", &returning("late", r#"{"v":1}"#));
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let result: Value = client
            .post(format!("{}/v1/atomic-node-runs:execute", server.url()))
            .json(&request(&next_id(), "test.late", "1.0.0", json!({})))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if result["state"] == "succeeded" {
            break;
        }
        assert!(started.elapsed() < RELOAD_LIMIT, "{result}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_watcher() {
    let mut t = start(reload_config(), &[]).await;
    t.server.service.shutdown().await;
    install(
        t.packs_dir(),
        "after.wasm",
        &returning("after", r#"{"v":1}"#),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_outcome(&run(&t, "after").await, "failed", Some("unknown_node_type"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_file_over_the_size_limit_is_skipped_unread() {
    let mut cfg = reload_config();
    let good = returning("big", r#"{"v":1}"#);
    cfg.watch.max_file_bytes = good.len() as u64 - 1;
    let t = start(cfg, &[("big.wasm", good)]).await;
    let skipped = t.server.service.executor.registry().skipped();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(
        skipped[0].1.contains("larger than the limit"),
        "{skipped:?}"
    );
    assert_eq!(health(&t).await["status"], "degraded");
    assert_outcome(&run(&t, "big").await, "failed", Some("unknown_node_type"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_event_loads_a_pack_long_before_the_next_rescan() {
    let mut cfg = reload_config();
    cfg.watch.rescan = Duration::from_secs(3600);
    let t = start(cfg, &[]).await;
    install(
        t.packs_dir(),
        "evented.wasm",
        &returning("evented", r#"{"v":1}"#),
    );
    run_until(&t, "evented", outputs_are(json!({"v": 1}))).await;
}

/// The files named by `/v1/health`'s failed-pack checks.
fn failed_files(health: &Value) -> Vec<String> {
    health["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("pack:"))
        .map(|c| c["details"]["file"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_names_each_failed_file_until_it_is_fixed_or_removed() {
    let good = returning("fine", r#"{"v":1}"#);
    let t = start(
        reload_config(),
        &[
            ("broken-a.wasm", b"not wasm".to_vec()),
            ("broken-b.wasm", wat_component("(component)")),
            ("fine.wasm", good.clone()),
        ],
    )
    .await;
    let health = health(&t).await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(failed_files(&health), ["broken-a.wasm", "broken-b.wasm"]);

    // Broken, then put back byte for byte: the loaded version is current again.
    install(t.packs_dir(), "fine.wasm", b"oops");
    health_until(&t, |h| failed_files(h).len() == 3).await;
    install(t.packs_dir(), "fine.wasm", &good);
    health_until(&t, |h| failed_files(h).len() == 2).await;

    std::fs::remove_file(t.packs_dir().join("broken-a.wasm")).unwrap();
    let health = health_until(&t, |h| failed_files(h).len() == 1).await;
    assert_eq!(failed_files(&health), ["broken-b.wasm"]);
    install(
        t.packs_dir(),
        "broken-b.wasm",
        &returning("fixed", r#"{"v":1}"#),
    );
    health_until(&t, |h| h["status"] == "ok").await;
    assert_eq!(run(&t, "fixed").await["outputs"], json!({"v": 1}));
    assert_eq!(run(&t, "fine").await["outputs"], json!({"v": 1}));
}

fn wat_component(text: &str) -> Vec<u8> {
    jarvis_atomic_executor::wasmtime_wat(text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_abandons_a_pack_whose_describe_never_returns() {
    let spins = wat_component(
        &WatPack::new("test.spin", "1.0.0")
            .node(WatNode::new("test.spin", "1.0.0"))
            .with_describe("(loop $forever (br $forever))")
            .to_wat("(unreachable)"),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spin.wasm"), spins).unwrap();
    let mut cfg = reload_config();
    cfg.packs_dir = Some(dir.path().to_path_buf());
    let mut server = jarvis_atomic_executor::RunningServer::spawn(&cfg)
        .await
        .unwrap();
    let registry = server.service.executor.registry().clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(registry.pending(), 1, "describe is still spinning");
    let started = Instant::now();
    server.service.shutdown().await;
    // The describe limit is 10 s: shutdown does not wait for it.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_eq!(registry.pending(), 0, "an abandoned load is not pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_replaced_again_and_again_under_load_fails_no_request() {
    const CLIENTS: usize = 12;
    const REPLACEMENTS: u64 = 8;
    let t = start(
        reload_config(),
        &[("load.wasm", returning("load", r#"{"v":0}"#))],
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, url, stop) = (
                t.client.clone(),
                t.url("/v1/atomic-node-runs:execute"),
                stop.clone(),
            );
            tokio::spawn(async move {
                // Versions this client saw, in order, and what went wrong.
                let (mut seen, mut failures) = (Vec::new(), Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let body = request(&next_id(), "test.load", "1.0.0", json!({}));
                    match client.post(&url).json(&body).send().await {
                        Ok(resp) if resp.status() == 200 => {
                            let result: Value = resp.json().await.unwrap_or(Value::Null);
                            match result["outputs"]["v"].as_u64() {
                                Some(v) if result["state"] == "succeeded" => seen.push(v),
                                _ => failures.push(result.to_string()),
                            }
                        }
                        Ok(resp) => failures.push(format!("HTTP {}", resp.status())),
                        Err(e) => failures.push(format!("socket: {e}")),
                    }
                }
                (seen, failures)
            })
        })
        .collect();
    for v in 1..=REPLACEMENTS {
        install(
            t.packs_dir(),
            "load.wasm",
            &returning("load", &format!(r#"{{"v":{v}}}"#)),
        );
        run_until(&t, "load", outputs_are(json!({ "v": v }))).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let (seen, failures) = client.await.unwrap();
        assert!(failures.is_empty(), "failed requests: {failures:?}");
        // A request sees the old pack or the new one, and never an older
        // one after a newer.
        assert!(seen.is_sorted(), "versions went back: {seen:?}");
        total += seen.len();
    }
    assert!(total >= CLIENTS, "the load did run: {total} requests");
}
