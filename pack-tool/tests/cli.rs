//! `jarvis-pack list|inspect|check` against WAT packs, and against a running executor
//! loading the same files: the verdicts must be the executor's own.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use jarvis_atomic_executor::config::Config;
use jarvis_atomic_executor::watpack::{WatNeeds, WatNode, WatPack};
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
        .env_remove("JARVIS_GRANTS_FILE")
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

/// `test.needy`: `test.needy.fetch` needs a host and a secret, `test.needy.plain`
/// nothing, and both the config key `region` (declared for `*`).
fn needy() -> Vec<u8> {
    let mut pack = WatPack::new("test.needy", "1.0.0")
        .with_byte_pages()
        .with_needs(vec![
            WatNeeds::new("*").config("region"),
            WatNeeds::new("test.needy.fetch")
                .host("https://api.example.com")
                .secret("token"),
        ]);
    let (ptr, len) = pack.data(b"{}");
    let pack = pack
        .node(WatNode::new("test.needy.fetch", "1.0.0"))
        .node(WatNode::new("test.needy.plain", "1.0.0"));
    wasmtime_wat(&pack.to_wat(&format!("(call $ok (i32.const {ptr}) (i32.const {len}))"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_node_its_grants_would_not_serve_with_the_executors_reason() {
    let dir = tempfile::tempdir().unwrap();
    let packs = dir.path().join("packs");
    std::fs::create_dir(&packs).unwrap();
    std::fs::write(packs.join("needy.wasm"), needy()).unwrap();
    // Grants `region` to the pack and a wider host to `fetch`, but not its secret.
    let grants = dir.path().join("grants.toml");
    std::fs::write(
        &grants,
        r#"
        [packs."test.needy"]
        config = { region = "eu" }
        [packs."test.needy".nodes."test.needy.fetch"]
        allow = ["https://*.example.com"]
        "#,
    )
    .unwrap();

    // Without grants: nothing is granted, and check says what would have to be.
    let path = packs.clone();
    let bare = tokio::task::spawn_blocking(move || jarvis_pack(&["check"], &path))
        .await
        .unwrap();
    assert_eq!(bare.status.code(), Some(1), "{bare:?}");
    let out = stdout(&bare);
    assert!(
        out.contains("needy.wasm: partly served as test.needy 1.0.0: 0 of 2 node(s)"),
        "{out}"
    );
    assert!(
        out.contains(
            r#"not served: test.needy.fetch 1.0.0: needs what it is not granted: host "https://api.example.com", config key "region", secret "token""#
        ),
        "{out}"
    );
    assert!(
        out.contains(r#"not served: test.needy.plain 1.0.0: needs what it is not granted: config key "region""#),
        "{out}"
    );
    assert!(out.contains("no grants file"), "{out}");

    // With the operator's grants: only the secret is missing, as the executor says.
    let (path, file) = (packs.clone(), grants.clone());
    let granted = tokio::task::spawn_blocking(move || {
        let file = file.to_str().unwrap().to_owned();
        jarvis_pack(&["check", "--grants", &file], &path)
    })
    .await
    .unwrap();
    assert_eq!(granted.status.code(), Some(1), "{granted:?}");
    let out = stdout(&granted);
    assert!(
        out.contains("needy.wasm: partly served as test.needy 1.0.0: 1 of 2 node(s)"),
        "{out}"
    );

    let mut config = Config::for_tests();
    config.packs_dir = Some(packs.clone());
    config.grants =
        std::sync::Arc::new(jarvis_atomic_executor::grants::Grants::load(&grants).unwrap());
    let server = RunningServer::spawn(&config).await.unwrap();
    let registry = server.service.executor.registry().clone();
    registry
        .wait_loaded(tokio::time::Instant::now() + Duration::from_secs(60))
        .await;
    let health: Value = reqwest::get(format!("{}/v1/health", server.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let check = health["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "node:test.needy.fetch@1.0.0")
        .unwrap_or_else(|| panic!("no check for the node: {health}"));
    let reason = check["details"]["reason"].as_str().unwrap();
    assert_eq!(reason, r#"needs what it is not granted: secret "token""#);
    assert!(
        out.contains(&format!("not served: test.needy.fetch 1.0.0: {reason}")),
        "{out}"
    );
    assert!(out.contains("with the grants of"), "{out}");

    // inspect names the node not served and shows every node's needs.
    let (path, file) = (packs.clone(), grants.clone());
    let text = tokio::task::spawn_blocking(move || {
        let file = file.to_str().unwrap().to_owned();
        jarvis_pack(&["inspect", "--grants", &file], &path)
    })
    .await
    .unwrap();
    assert_eq!(text.status.code(), Some(1), "{text:?}");
    let text = stdout(&text);
    assert!(
        text.contains("verdict  PART: the executor would serve 1 of its 2 node(s)"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "node     test.needy.fetch 1.0.0 NOT SERVED: {reason}"
        )),
        "{text}"
    );
    assert!(
        text.contains("needs          host https://api.example.com, config region, secret token"),
        "{text}"
    );
    assert!(text.contains("needs          config region"), "{text}");

    // inspect --json lists what each node declares, served or not.
    let (path, file) = (packs.clone(), grants.clone());
    let inspect = tokio::task::spawn_blocking(move || {
        let file = file.to_str().unwrap().to_owned();
        jarvis_pack(&["inspect", "--json", "--grants", &file], &path)
    })
    .await
    .unwrap();
    let reports: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let pack = &reports[0]["pack"];
    assert_eq!(
        pack["nodes"][0]["node_type_id"], "test.needy.plain",
        "{pack}"
    );
    assert_eq!(
        pack["not_served"][0]["missing"][0], r#"secret "token""#,
        "{pack}"
    );
    let fetch = pack["needs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_type_id"] == "test.needy.fetch")
        .unwrap();
    assert_eq!(fetch["hosts"][0], "https://api.example.com", "{pack}");
    assert_eq!(fetch["config"][0], "region", "{pack}");
    assert_eq!(fetch["secrets"][0], "token", "{pack}");
}

/// A component of `world` built from the WIT directory `wit` by
/// wit-component, every function a trap: its exports have exactly the types
/// the WIT gives them.
fn component_from_wit(wit: &Path, world: &str) -> Vec<u8> {
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_dir(wit).unwrap();
    let world = resolve.select_world(&[package], Some(world)).unwrap();
    let mut module = wit_component::dummy_module(
        &resolve,
        world,
        wit_parser::ManglingAndAbi::Legacy(wit_parser::LiftLowerAbi::Sync),
    );
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
        false,
    )
    .unwrap();
    jarvis_pack::componentize(&module).unwrap()
}

/// Copies the WIT directory (with any `deps/`) to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn the_host_reads_needs_exactly_as_the_wit_declares_it() {
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
    // Both exports pass their type checks; the trap is `describe`'s.
    let reason = jarvis_pack::check(&component_from_wit(&wit, "node-pack-with-needs"))
        .unwrap_err()
        .0;
    assert!(reason.starts_with("describe failed"), "{reason}");

    // The same world with a field of `node-needs` renamed is refused before
    // anything is called.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&wit, dir.path());
    let file = dir.path().join("node-pack.wit");
    let text = std::fs::read_to_string(&file).unwrap();
    let swapped = text.replacen(
        "        config: list<string>,\n",
        "        secrets-first: list<string>,\n",
        1,
    );
    assert_ne!(swapped, text, "the WIT's node-needs record moved");
    std::fs::write(&file, swapped).unwrap();
    let reason = jarvis_pack::check(&component_from_wit(dir.path(), "node-pack-with-needs"))
        .unwrap_err()
        .0;
    assert!(
        reason.starts_with("needs: the jarvis:node/needs@0.1.0 export does not match the WIT"),
        "{reason}"
    );
}
