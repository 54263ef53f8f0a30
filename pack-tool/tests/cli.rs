//! `jarvis-pack list|inspect|check` against WAT packs, and against a running executor
//! loading the same files: the verdicts must be the executor's own.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use jarvis_atomic_executor::config::Config;
use jarvis_atomic_executor::watpack::{WatNode, WatPack};
use jarvis_atomic_executor::{RunningServer, wasmtime_wat};
use serde_json::Value;

/// A pack `test.<name>` whose nodes are `nodes`, each returning `{}`.
fn pack(name: &str, nodes: Vec<WatNode>) -> Vec<u8> {
    // Byte-sized pages: the memory is sized to the answer, however many nodes.
    let mut pack = WatPack::new(&format!("test.{name}"), "1.0.0").with_byte_pages();
    let (ptr, len) = pack.data(b"{}");
    for node in nodes {
        pack = pack.node(node);
    }
    wasmtime_wat(&pack.to_wat(&format!("(call $ok (i32.const {ptr}) (i32.const {len}))"))).unwrap()
}

fn valid() -> Vec<u8> {
    let mut node = WatNode::new("test.valid.greet", "1.2.0");
    node.side_effect = 1;
    node.max_wall_time_ms = Some(1500);
    node.input_schema =
        r#"{"type":"object","properties":{"name":{"type":"string"}},"required":["name"]}"#.into();
    pack("valid", vec![node])
}

fn remote_ref() -> Vec<u8> {
    let mut node = WatNode::new("test.remote.node", "1.0.0");
    node.input_schema = r#"{"$ref":"https://example.com/schema.json"}"#.into();
    pack("remote", vec![node])
}

fn too_many_nodes() -> Vec<u8> {
    let nodes = (0..1001)
        .map(|i| WatNode::new(&format!("test.many.n{i}"), "1.0.0"))
        .collect();
    pack("many", nodes)
}

fn jarvis_pack(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jarvis-pack"))
        .args(args)
        .arg(dir)
        // The executor's limits come from the environment: test its defaults.
        .env_remove("JARVIS_MAX_NODES_PER_PACK")
        .env_remove("JARVIS_MAX_PACK_FILE_MIB")
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn a_valid_pack_is_served_and_inspect_shows_its_nodes_needs_and_hash() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid();
    std::fs::write(dir.path().join("valid.wasm"), &bytes).unwrap();
    // Not a pack file for the executor, so not for the tool either.
    std::fs::write(dir.path().join("notes.txt"), b"not a pack").unwrap();

    let check = jarvis_pack(&["check"], dir.path());
    assert!(check.status.success(), "{check:?}");
    assert!(
        stdout(&check).contains("valid.wasm: ok: served as test.valid 1.0.0 with 1 node(s)"),
        "{}",
        stdout(&check)
    );

    let inspect = jarvis_pack(&["inspect", "--json"], dir.path());
    assert!(inspect.status.success(), "{inspect:?}");
    let reports: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let [report] = reports.as_array().unwrap().as_slice() else {
        panic!("one report expected: {reports}");
    };
    assert_eq!(report["size"], bytes.len());
    assert_eq!(report["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(report["skip_reason"], Value::Null);
    assert_eq!(report["pack"]["pack_id"], "test.valid");
    let node = &report["pack"]["nodes"][0];
    assert_eq!(node["node_type_id"], "test.valid.greet");
    assert_eq!(node["version"], "1.2.0");
    assert_eq!(node["extensions"]["jarvis.side_effect"], "write");
    assert_eq!(node["constraints"]["budgets"]["max_wall_time_ms"], 1500);
    assert_eq!(node["input_schema"]["required"][0], "name");

    let text = jarvis_pack(&["inspect"], dir.path());
    let text = stdout(&text);
    assert!(text.contains("verdict  ok"), "{text}");
    assert!(text.contains("node     test.valid.greet 1.2.0"), "{text}");
    assert!(text.contains("max wall time  1500 ms"), "{text}");

    let list = jarvis_pack(&["list"], dir.path());
    assert!(list.status.success(), "{list:?}");
    assert_eq!(stdout(&list).lines().count(), 1, "{}", stdout(&list));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verdicts_are_the_skip_reasons_of_a_running_executor() {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("valid.wasm", valid()),
        ("remote-ref.wasm", remote_ref()),
        ("many-nodes.wasm", too_many_nodes()),
        ("garbage.wasm", b"\0asm but not really".to_vec()),
    ];
    for (name, bytes) in &files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }

    let mut config = Config::for_tests();
    config.packs_dir = Some(dir.path().to_path_buf());
    let server = RunningServer::spawn(&config).await.unwrap();
    let registry = server.service.executor.registry().clone();
    registry
        .wait_loaded(tokio::time::Instant::now() + Duration::from_secs(60))
        .await;
    assert_eq!(registry.pending(), 0, "packs still loading after 60 s");
    let health: Value = reqwest::get(format!("{}/v1/health", server.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let executor_reason = |file: &str| -> String {
        let checks = health["checks"].as_array().unwrap();
        let check = checks
            .iter()
            .find(|c| c["name"] == format!("pack:{file}"))
            .unwrap_or_else(|| panic!("no health check for {file}: {health}"));
        check["details"]["reason"].as_str().unwrap().to_owned()
    };

    let path = dir.path().to_path_buf();
    let check = tokio::task::spawn_blocking(move || jarvis_pack(&["check"], &path))
        .await
        .unwrap();
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    let out = stdout(&check);
    let verdict = |file: &str| -> String {
        let prefix = format!("{}: ", dir.path().join(file).display());
        let line = out
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no verdict for {file}: {out}"));
        line[prefix.len()..].to_owned()
    };

    assert!(verdict("valid.wasm").starts_with("ok: "), "{out}");
    for file in ["remote-ref.wasm", "many-nodes.wasm", "garbage.wasm"] {
        let reason = executor_reason(file);
        assert_eq!(verdict(file), format!("skipped: {reason}"), "{file}");
    }
    assert!(
        executor_reason("remote-ref.wasm").contains("points outside the schema"),
        "{health}"
    );
    assert!(
        executor_reason("many-nodes.wasm").contains("1001 nodes, more than the limit of 1000"),
        "{health}"
    );
}
