//! What a pack declares it needs (`jarvis:node/needs`): a node whose needs
//! the grants file does not cover is not served, and says why; the pack's
//! other nodes are; a malformed declaration skips the pack.

use std::sync::Arc;

use jarvis_atomic_executor::grants::Grants;
use jarvis_atomic_executor::watpack::{WatNeeds, WatNode, WatPack};
use serde_json::{Value, json};

use crate::support::{LoggedExecutor, TestServer, assert_outcome, config, request, start};

const ECHO: &str = "(call $ok_inputs (local.get $call))";
const SECRET: &str = "s3cr3t-needs-4e1a";

/// `test.needy`: `.host` needs `https://api.example.com`, `.config` the
/// config key `region`, `.secret` the secret `token`, `.free` nothing; each
/// echoes its inputs.
fn needy() -> Vec<u8> {
    let mut pack = WatPack::new("test.needy", "1.0.0").with_needs(vec![
        WatNeeds::new("test.needy.host").host("https://api.example.com"),
        WatNeeds::new("test.needy.config").config("region"),
        WatNeeds::new("test.needy.secret").secret("token"),
    ]);
    for node in ["host", "config", "secret", "free"] {
        pack = pack.node(WatNode::new(&format!("test.needy.{node}"), "1.0.0"));
    }
    jarvis_atomic_executor::wasmtime_wat(&pack.to_wat(ECHO)).unwrap()
}

/// A one-node pack `test.<name>` whose `needs` answers `needs`.
fn declaring(name: &str, needs: Vec<WatNeeds>) -> Vec<u8> {
    let pack = WatPack::new(&format!("test.{name}"), "1.0.0")
        .with_needs(needs)
        .node(WatNode::new(&format!("test.{name}"), "1.0.0"));
    jarvis_atomic_executor::wasmtime_wat(&pack.to_wat(ECHO)).unwrap()
}

fn grants(text: &str) -> Arc<Grants> {
    Arc::new(Grants::parse(text, &|_| Some(SECRET.to_owned())).unwrap())
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

/// The health check named `name`, if any.
fn check<'a>(health: &'a Value, name: &str) -> Option<&'a Value> {
    health["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
}

async fn outcome(t: &TestServer, node: &str) -> Value {
    t.result(&request(
        &format!("nr-{node}"),
        &format!("test.needy.{node}"),
        "1.0.0",
        json!({ "x": 1 }),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_needing_an_ungranted_host_config_key_or_secret_is_not_served_and_health_says_why() {
    let mut config = config();
    // Grants the pack something, just not what its nodes need: a host on
    // another port, another key, another secret.
    config.grants = grants(
        r#"
        [packs."test.needy"]
        allow = ["https://api.example.com:8443"]
        config = { zone = "a" }
        secrets = { other = { env = "OTHER" } }
        "#,
    );
    let t = start(config, &[("needy.wasm", needy())]).await;

    for node in ["host", "config", "secret"] {
        assert_outcome(
            &outcome(&t, node).await,
            "failed",
            Some("unknown_node_type"),
        );
    }
    let free = outcome(&t, "free").await;
    assert_outcome(&free, "succeeded", None);
    assert_eq!(free["outputs"], json!({ "x": 1 }));

    let health = health(&t).await;
    assert_eq!(health["status"], "degraded", "{health}");
    for (node, missing) in [
        ("host", r#"host "https://api.example.com""#),
        ("config", r#"config key "region""#),
        ("secret", r#"secret "token""#),
    ] {
        let check = check(&health, &format!("node:test.needy.{node}@1.0.0"))
            .unwrap_or_else(|| panic!("no check for {node}: {health}"));
        assert_eq!(check["status"], "degraded", "{check}");
        assert_eq!(check["details"]["file"], "needy.wasm", "{check}");
        assert_eq!(
            check["details"]["reason"],
            format!("needs what it is not granted: {missing}"),
            "{check}"
        );
        assert!(
            check["message"].as_str().unwrap().contains(&format!(
                "test.needy.{node} 1.0.0 of needy.wasm is not served"
            )),
            "{check}"
        );
    }
    assert!(check(&health, "node:test.needy.free@1.0.0").is_none());
    // The file itself loaded: no pack failure.
    assert!(check(&health, "pack:needy.wasm").is_none(), "{health}");
    assert!(!health.to_string().contains(SECRET), "{health}");

    let catalogue: Value = t
        .client
        .get(t.url("/v1/node-types"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = catalogue
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node_type_id"].as_str())
        .filter(|id| id.starts_with("test."))
        .collect();
    assert_eq!(ids, ["test.needy.free"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granting_what_the_nodes_need_serves_them() {
    let mut config = config();
    // A wildcard covers the declared host; per-node tables grant the rest.
    config.grants = grants(
        r#"
        [packs."test.needy"]
        allow = ["https://*.example.com"]
        [packs."test.needy".nodes."test.needy.config"]
        config = { region = "eu" }
        [packs."test.needy".nodes."test.needy.secret"]
        secrets = { token = { env = "TOKEN" } }
        "#,
    );
    let t = start(config, &[("needy.wasm", needy())]).await;
    for node in ["host", "config", "secret", "free"] {
        assert_outcome(&outcome(&t, node).await, "succeeded", None);
    }
    let health = health(&t).await;
    assert_eq!(health["status"], "ok", "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_declaring_no_needs_loads_as_before() {
    // No `needs` export at all, and one answering an empty list; no grants file.
    let plain = WatPack::new("test.plain", "1.0.0").node(WatNode::new("test.plain", "1.0.0"));
    let plain = jarvis_atomic_executor::wasmtime_wat(&plain.to_wat(ECHO)).unwrap();
    let t = start(
        config(),
        &[
            ("plain.wasm", plain),
            ("empty.wasm", declaring("empty", vec![])),
            (
                "nothing.wasm",
                declaring("nothing", vec![WatNeeds::new("*")]),
            ),
        ],
    )
    .await;
    for node in ["test.plain", "test.empty", "test.nothing"] {
        let result = t
            .result(&request(&format!("nr-{node}"), node, "1.0.0", json!({})))
            .await;
        assert_outcome(&result, "succeeded", None);
    }
    assert_eq!(health(&t).await["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_needs_answer_skips_the_pack_with_its_reason() {
    let long = "k".repeat(257);
    let mut too_many = WatNeeds::new("test.many");
    for i in 0..65 {
        too_many = too_many.config(&format!("key{i}"));
    }
    // More text than the copy budget of a pack of 2 nodes and 4 KiB: two
    // entries of 64 keys of 256 bytes.
    let mut huge = Vec::new();
    for id in ["*", "test.huge"] {
        let mut entry = WatNeeds::new(id);
        for i in 0..64 {
            entry = entry.config(&format!("{i:0>256}"));
        }
        huge.push(entry);
    }
    let files = [
        (
            "unknown.wasm",
            declaring("unknown", vec![WatNeeds::new("test.other")]),
            r#"needs: "test.other" is not a node the pack describes"#,
        ),
        (
            "twice.wasm",
            declaring(
                "twice",
                vec![WatNeeds::new("test.twice"), WatNeeds::new("test.twice")],
            ),
            r#"needs: "test.twice" has two entries"#,
        ),
        (
            "pattern.wasm",
            declaring(
                "pattern",
                vec![WatNeeds::new("test.pattern").host("https://api.example.com/v1")],
            ),
            "needs: \"test.pattern\": hosts: destination \"https://api.example.com/v1\": only scheme://host[:port]",
        ),
        (
            "long.wasm",
            declaring("long", vec![WatNeeds::new("test.long").secret(&long)]),
            "needs: \"test.long\": secrets is 257 bytes, more than 256",
        ),
        (
            "many.wasm",
            declaring("many", vec![too_many]),
            "needs: \"test.many\": config: 65 entries, more than the limit of 64",
        ),
        (
            "huge.wasm",
            declaring("huge", huge),
            "needs: the answer is more than",
        ),
    ];
    let mut config = config();
    config.pack_limits.max_nodes = 2;
    config.pack_limits.max_describe_bytes = 4096;
    let t = start(
        config,
        &files
            .iter()
            .map(|(file, bytes, _)| (*file, bytes.clone()))
            .collect::<Vec<_>>(),
    )
    .await;
    let health = health(&t).await;
    for (file, _, reason) in &files {
        let check = check(&health, &format!("pack:{file}"))
            .unwrap_or_else(|| panic!("no check for {file}: {health}"));
        let got = check["details"]["reason"].as_str().unwrap();
        assert!(got.starts_with(reason), "{file}: {got}");
        let node = format!("test.{}", file.trim_end_matches(".wasm"));
        let result = t
            .result(&request(&format!("nr-{file}"), &node, "1.0.0", json!({})))
            .await;
        assert_outcome(&result, "failed", Some("unknown_node_type"));
    }
}

/// The executor binary, with a grants file holding a secret: the node not
/// served for want of another secret is logged with its reason, and no line
/// carries the granted secret's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_says_which_node_is_not_served_and_why_and_never_a_secrets_value() {
    let dir = tempfile::tempdir().unwrap();
    let packs = dir.path().join("packs");
    std::fs::create_dir(&packs).unwrap();
    std::fs::write(packs.join("needy.wasm"), needy()).unwrap();
    let grants = dir.path().join("grants.toml");
    std::fs::write(
        &grants,
        "[packs.\"test.needy\"]\nsecrets = { other = { env = \"TEST_NEEDS_SECRET\" } }\n",
    )
    .unwrap();
    let mut executor = LoggedExecutor::start(&packs, |command| {
        command
            .arg("--grants")
            .arg(&grants)
            .env("TEST_NEEDS_SECRET", SECRET)
            .env("RUST_LOG", "info,jarvis_atomic_executor=trace");
    });
    executor.wait_for("pack loaded");
    let lines = executor.finish();
    let refusal = lines
        .iter()
        .find(|l| l.contains("pack node not served") && l.contains("test.needy.secret"))
        .unwrap_or_else(|| panic!("no refusal of test.needy.secret in {lines:#?}"));
    assert!(refusal.contains("WARN"), "{refusal}");
    assert!(refusal.contains("needy.wasm"), "{refusal}");
    assert!(
        refusal.contains("not granted: secret") && refusal.contains("token"),
        "{refusal}"
    );
    for line in &lines {
        assert!(!line.contains(SECRET), "{line}");
    }
}
