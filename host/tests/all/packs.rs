//! Loading the packs directory: versions side by side, broken files skipped.

use jarvis_atomic_executor::wasmtime_wat;
use jarvis_atomic_executor::watpack::{WatNode, WatPack};
use serde_json::{Value, json};

use crate::support::*;

fn versioned(version: &str) -> Vec<u8> {
    let mut wat = WatPack::new("test.versions", version);
    let answer = format!(r#"{{"version":"{version}"}}"#);
    let (ptr, len) = wat.data(answer.as_bytes());
    pack_with(
        wat,
        WatNode::new("test.versioned", version),
        &format!("(call $ok (i32.const {ptr}) (i32.const {len}))"),
    )
}

#[tokio::test]
async fn versions_are_served_side_by_side() {
    let t = start(
        config(),
        &[
            ("v1.wasm", versioned("1.0.0")),
            ("v2.wasm", versioned("2.0.0")),
        ],
    )
    .await;
    for version in ["1.0.0", "2.0.0"] {
        let result = t
            .result(&request(
                &format!("nr-{version}"),
                "test.versioned",
                version,
                json!({}),
            ))
            .await;
        assert_outcome(&result, "succeeded", None);
        assert_eq!(result["outputs"]["version"], version);
    }
    let result = t
        .result(&request("nr-3", "test.versioned", "3.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some("unknown_node_version"));
    assert_eq!(
        result["error"]["details"]["available"],
        json!(["1.0.0", "2.0.0"])
    );
}

#[tokio::test]
async fn broken_files_are_skipped_and_the_rest_served() {
    let describe_traps = wasmtime_wat(
        &WatPack::new("test.bad", "1.0.0")
            .node(WatNode::new("test.bad-describe", "1.0.0"))
            .with_describe("unreachable")
            .to_wat("(call $ok_inputs (local.get $call))"),
    )
    .unwrap();
    let bad_schema = pack_with(
        WatPack::new("test.bad-schema", "1.0.0"),
        WatNode {
            input_schema: "{not json".into(),
            ..WatNode::new("test.bad-schema", "1.0.0")
        },
        "(call $ok_inputs (local.get $call))",
    );
    let wants_wasi = wasmtime_wat(
        r#"(component (import "wasi:cli/environment@0.2.0" (instance (export "get-arguments" (func (result (list string)))))))"#,
    )
    .unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "a-good.wasm",
            pack("good", "(call $ok_inputs (local.get $call))"),
        ),
        ("garbage.wasm", b"this is not wasm at all".to_vec()),
        ("core-module.wasm", wasmtime_wat("(module)").unwrap()),
        ("empty-component.wasm", wasmtime_wat("(component)").unwrap()),
        ("wants-wasi.wasm", wants_wasi),
        ("describe-traps.wasm", describe_traps),
        ("bad-schema.wasm", bad_schema),
        ("z-duplicate.wasm", pack("good", "(unreachable)")),
        ("notes.txt", b"ignored: not a .wasm".to_vec()),
    ];
    let t = start(config(), &files).await;
    let types: Value = t
        .client
        .get(t.url("/v1/node-types"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = types
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_type_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["jarvis.core.echo", "test.good"]);
    // The good pack (first by name) serves test.good, not the duplicate that traps.
    let result = t
        .result(&request("nr-1", "test.good", "1.0.0", json!({"a": 1})))
        .await;
    assert_outcome(&result, "succeeded", None);
    assert_eq!(result["outputs"], json!({"a": 1}));
}

#[tokio::test]
async fn a_missing_packs_directory_still_serves_the_builtin() {
    let mut cfg = config();
    cfg.packs_dir = Some("/nonexistent/packs".into());
    let server = jarvis_atomic_executor::RunningServer::spawn(&cfg)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let result: Value = client
        .post(format!("{}/v1/atomic-node-runs:execute", server.url()))
        .json(&request(
            "nr-1",
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "x"}),
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_outcome(&result, "succeeded", None);
}

#[tokio::test]
async fn a_pack_may_replace_the_builtin_echo() {
    let mut wat = WatPack::new("jarvis.core", "0.3.8");
    let (ptr, len) = wat.data(br#"{"echo":"from the pack"}"#);
    let node = WatNode::new("jarvis.core.echo", "0.3.8");
    let t = start(
        config(),
        &[(
            "core.wasm",
            pack_with(
                wat,
                node,
                &format!("(call $ok (i32.const {ptr}) (i32.const {len}))"),
            ),
        )],
    )
    .await;
    let result = t
        .result(&request(
            "nr-1",
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "x"}),
        ))
        .await;
    assert_eq!(result["outputs"]["echo"], "from the pack");
}
