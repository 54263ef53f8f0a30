//! The grants file: config values and secrets reach only the pack granted
//! them, and a pinned pack whose file differs is refused.

use std::sync::Arc;

use jarvis_atomic_executor::grants::Grants;
use jarvis_atomic_executor::grants::file::to_hex;
use jarvis_atomic_executor::watpack::{WatNode, WatPack};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::{LoggedExecutor, assert_outcome, config, pack_with, request, start};

const SECRET: &str = "s3cr3t-7f1c2b9e";

/// A pack `test.<name>` whose node answers with the config value `key`
/// (read by `config.get`, or `config.get-secret` if `secret`) verbatim as
/// its outputs, or fails `absent` if it reads `none`.
fn reading_pack(name: &str, key: &str, secret: bool) -> Vec<u8> {
    let mut pack = WatPack::new(&format!("test.{name}"), "1.0.0").with_config();
    let (key_ptr, key_len) = pack.data(key.as_bytes());
    let (code_ptr, code_len) = pack.data(b"absent");
    let (msg_ptr, msg_len) = pack.data(b"not granted");
    let func = if secret {
        "$config_secret"
    } else {
        "$config_get"
    };
    pack_with(
        pack,
        WatNode::new(&format!("test.{name}"), "1.0.0"),
        &format!(
            "(call {func} (i32.const {key_ptr}) (i32.const {key_len}) (i32.const 256))
             (if (result i32) (i32.load8_u (i32.const 256))
               (then (call $ok (i32.load (i32.const 260)) (i32.load (i32.const 264))))
               (else (call $err (i32.const {code_ptr}) (i32.const {code_len})
                                (i32.const {msg_ptr}) (i32.const {msg_len}))))"
        ),
    )
}

fn grants(text: &str) -> Arc<Grants> {
    Arc::new(Grants::parse(text, &|_| None).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_value_and_a_secret_reach_only_the_pack_granted_them() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("token");
    std::fs::write(&secret_file, format!("{{\"token\":\"{SECRET}\"}}\n")).unwrap();
    let mut config = config();
    config.grants = grants(&format!(
        r#"
        [packs."test.granted"]
        config = {{ answer = '{{"region":"eu"}}' }}
        secrets = {{ token = {{ file = {secret_file:?} }} }}

        [packs."test.granted-secret"]
        config = {{ answer = '{{"region":"eu"}}' }}
        secrets = {{ token = {{ file = {secret_file:?} }} }}
        "#
    ));
    let t = start(
        config,
        &[
            ("granted.wasm", reading_pack("granted", "answer", false)),
            (
                "granted-secret.wasm",
                reading_pack("granted-secret", "token", true),
            ),
            ("stranger.wasm", reading_pack("stranger", "answer", false)),
            (
                "stranger-secret.wasm",
                reading_pack("stranger-secret", "token", true),
            ),
        ],
    )
    .await;

    let result = t
        .result(&request("nr-1", "test.granted", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "succeeded", None);
    assert_eq!(result["outputs"], json!({ "region": "eu" }));

    let result = t
        .result(&request("nr-2", "test.granted-secret", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "succeeded", None);
    assert_eq!(result["outputs"], json!({ "token": SECRET }));

    for (i, node) in ["test.stranger", "test.stranger-secret"]
        .into_iter()
        .enumerate()
    {
        let result = t
            .result(&request(&format!("nr-s{i}"), node, "1.0.0", json!({})))
            .await;
        assert_outcome(&result, "failed", Some("absent"));
    }

    // Nothing the executor serves carries the secret.
    for path in ["/v1/node-types", "/v1/health"] {
        let body = t
            .client
            .get(t.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!body.contains(SECRET), "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_pack_was_not_granted_reads_as_absent() {
    let mut config = config();
    config.grants = grants(
        r#"
        [packs."test.asks"]
        config = { answer = '{"region":"eu"}' }
        "#,
    );
    let t = start(
        config,
        &[("asks.wasm", reading_pack("asks", "other", false))],
    )
    .await;
    let result = t
        .result(&request("nr-1", "test.asks", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some("absent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_table_grants_that_node_alone() {
    let mut pack = WatPack::new("test.two", "1.0.0").with_config();
    let (key_ptr, key_len) = pack.data(b"answer");
    let (code_ptr, code_len) = pack.data(b"absent");
    let body = format!(
        "(call $config_get (i32.const {key_ptr}) (i32.const {key_len}) (i32.const 256))
         (if (result i32) (i32.load8_u (i32.const 256))
           (then (call $ok (i32.load (i32.const 260)) (i32.load (i32.const 264))))
           (else (call $err (i32.const {code_ptr}) (i32.const {code_len})
                            (i32.const {code_ptr}) (i32.const {code_len}))))"
    );
    let pack = pack
        .node(WatNode::new("test.two.a", "1.0.0"))
        .node(WatNode::new("test.two.b", "1.0.0"));
    let bytes = jarvis_atomic_executor::wasmtime_wat(&pack.to_wat(&body)).unwrap();
    let mut config = config();
    config.grants = grants(
        r#"
        [packs."test.two".nodes."test.two.a"]
        config = { answer = '{"for":"a"}' }
        "#,
    );
    let t = start(config, &[("two.wasm", bytes)]).await;
    let a = t
        .result(&request("nr-a", "test.two.a", "1.0.0", json!({})))
        .await;
    assert_eq!(a["outputs"], json!({ "for": "a" }), "{a}");
    let b = t
        .result(&request("nr-b", "test.two.b", "1.0.0", json!({})))
        .await;
    assert_outcome(&b, "failed", Some("absent"));
}

async fn health(t: &crate::support::TestServer) -> Value {
    t.client
        .get(t.url("/v1/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_whose_file_differs_from_its_pin_is_refused() {
    let pinned = reading_pack("pinned", "answer", false);
    let other = reading_pack("other", "answer", false);
    let mut config = config();
    config.grants = grants(&format!(
        r#"
        [packs."test.pinned"]
        sha256 = "{}"
        [packs."test.other"]
        sha256 = "{}"
        "#,
        to_hex(&Sha256::digest(&pinned)),
        // Pinned to the other file's hash: this file does not match.
        to_hex(&Sha256::digest(&pinned)),
    ));
    let t = start(
        config,
        &[("pinned.wasm", pinned), ("other.wasm", other.clone())],
    )
    .await;

    // The matching pack is served (and, granted nothing, reads `none`).
    let result = t
        .result(&request("nr-1", "test.pinned", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some("absent"));

    let result = t
        .result(&request("nr-2", "test.other", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some("unknown_node_type"));
    let health = health(&t).await;
    let text = health.to_string();
    assert!(text.contains("other.wasm"), "{health}");
    assert!(
        text.contains(&format!(
            "the file's sha256 is {}",
            to_hex(&Sha256::digest(&other))
        )),
        "{health}"
    );
    assert_ne!(health["status"], "ok", "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executor_refuses_to_start_on_a_bad_grants_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.toml");
    std::fs::write(&path, "[packs.p]\nallow = [\"api.example.com\"]\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_jarvis-atomic-executor"))
        .args(["--port", "0", "--no-compile-cache", "--grants"])
        .arg(&path)
        .env("ARP_AUTH_PROFILE", "dev-insecure")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("JARVIS_GRANTS_FILE"), "{stderr}");
    assert!(stderr.contains("scheme://host"), "{stderr}");
}

/// The executor binary logging its own events at trace level, with a secret from its environment
/// that a node reads: no line it writes carries the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_read_by_a_node_never_reaches_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let packs = dir.path().join("packs");
    std::fs::create_dir(&packs).unwrap();
    std::fs::write(
        packs.join("reader.wasm"),
        reading_pack("reader", "token", true),
    )
    .unwrap();
    let grants = dir.path().join("grants.toml");
    std::fs::write(
        &grants,
        "[packs.\"test.reader\"]\nsecrets = { token = { env = \"TEST_READER_TOKEN\" } }\n",
    )
    .unwrap();
    let mut executor = LoggedExecutor::start(&packs, |command| {
        command
            .arg("--grants")
            .arg(&grants)
            .env("TEST_READER_TOKEN", format!("{{\"token\":\"{SECRET}\"}}"))
            // Everything of ours at debug, where successes are logged.
            .env("RUST_LOG", "info,jarvis_atomic_executor=trace,pack=trace");
    });
    let addr = executor.addr();
    executor.wait_for("pack loaded");
    let result: Value = reqwest::Client::new()
        .post(format!("http://{addr}/v1/atomic-node-runs:execute"))
        .json(&request("nr-secret", "test.reader", "1.0.0", json!({})))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The node may return what it was granted; the host logs none of it.
    assert_eq!(result["outputs"], json!({ "token": SECRET }), "{result}");
    executor.wait_for("execution finished");
    let lines = executor.finish();
    for line in &lines {
        assert!(!line.contains(SECRET), "{line}");
    }
}
