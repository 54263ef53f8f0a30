//! Hostile pack declarations: every one is refused at load, cheaply, and the rest still served.

use std::time::{Duration, Instant};

use jarvis_atomic_executor::packs::load::describe_budget;
use jarvis_atomic_executor::packs::spec::PackLimits;
use jarvis_atomic_executor::wasmtime_wat;
use jarvis_atomic_executor::watpack::{WatNode, WatPack, describe};
use serde_json::{Value, json};

use crate::support::*;

const ECHO: &str = "(call $ok_inputs (local.get $call))";

/// `anyOf` chains of two identical `$ref`s per level: `depth` levels validate
/// 2^depth branches for one value that matches none.
fn ref_bomb(depth: usize) -> Value {
    let mut defs = serde_json::Map::new();
    for level in 0..depth {
        let next = format!("#/$defs/n{}", level + 1);
        defs.insert(
            format!("n{level}"),
            json!({"anyOf": [{"$ref": next}, {"$ref": next}]}),
        );
    }
    defs.insert(format!("n{depth}"), json!({"type": "string"}));
    json!({"type": "object", "properties": {"x": {"$ref": "#/$defs/n0"}}, "$defs": defs})
}

fn node_with(name: &str, input: &Value, output: &Value) -> Vec<u8> {
    let id = format!("test.{name}");
    pack_with(
        WatPack::new(&id, "1.0.0"),
        WatNode {
            input_schema: input.to_string(),
            output_schema: output.to_string(),
            ..WatNode::new(&id, "1.0.0")
        },
        ECHO,
    )
}

fn reason(t: &TestServer, file: &str) -> String {
    let skipped = t.server.service.executor.registry().skipped();
    skipped
        .iter()
        .find(|(f, _)| f == file)
        .map(|(_, reason)| reason.clone())
        .unwrap_or_else(|| panic!("{file} was not skipped: {skipped:?}"))
}

async fn served_ids(t: &TestServer) -> Vec<String> {
    let types: Value = t
        .client
        .get(t.url("/v1/node-types"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    types
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_type_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Health answers 200 within `limit`.
async fn assert_healthy(t: &TestServer, limit: Duration) {
    let started = Instant::now();
    let status = t
        .client
        .get(t.url("/v1/health"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < limit,
        "health took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ref_bomb_is_refused_as_input_and_as_output_schema() {
    let object = json!({"type": "object"});
    let t = start(
        config(),
        &[
            ("bomb-in.wasm", node_with("bomb-in", &ref_bomb(20), &object)),
            (
                "bomb-out.wasm",
                node_with("bomb-out", &object, &ref_bomb(20)),
            ),
            ("chain.wasm", node_with("chain", &object, &ref_bomb(5))),
        ],
    )
    .await;
    assert_eq!(
        reason(&t, "bomb-in.wasm"),
        r#"node "test.bomb-in": input-schema: more than 10000 subschemas with every $ref inlined"#
    );
    assert_eq!(
        reason(&t, "bomb-out.wasm"),
        r#"node "test.bomb-out": output-schema: more than 10000 subschemas with every $ref inlined"#
    );
    assert_eq!(served_ids(&t).await, ["jarvis.core.echo", "test.chain"]);
    // A short chain is fine, and checked quickly even when nothing matches.
    let started = Instant::now();
    let result = t
        .result(&request("nr-1", "test.chain", "1.0.0", json!({"x": 1})))
        .await;
    assert_outcome(&result, "failed", Some("invalid_outputs"));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_healthy(&t, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_may_not_reach_outside_themselves_or_use_backtracking_regexes() {
    let object = json!({"type": "object"});
    let cases = [
        ("remote", json!({"$ref": "https://example.com/s.json"})),
        ("file", json!({"$ref": "file:///etc/passwd"})),
        (
            "meta",
            json!({"$schema": "http://127.0.0.1:9/meta", "type": "object"}),
        ),
        (
            "recursive",
            json!({"anyOf": [{"$ref": "#"}, {"$ref": "#"}]}),
        ),
        (
            "lookahead",
            json!({"properties": {"x": {"pattern": "^(?=a)a+$"}}}),
        ),
    ];
    let files: Vec<(String, Vec<u8>)> = cases
        .iter()
        .map(|(name, schema)| (format!("{name}.wasm"), node_with(name, schema, &object)))
        .collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let t = start(config(), &files).await;
    assert_eq!(
        reason(&t, "remote.wasm"),
        r#"node "test.remote": input-schema: $ref "https://example.com/s.json" points outside the schema; only local references (#/...) are allowed"#
    );
    assert!(reason(&t, "file.wasm").contains("points outside the schema"));
    assert!(reason(&t, "meta.wasm").contains("input-schema: not a valid JSON Schema"));
    assert!(reason(&t, "recursive.wasm").ends_with(r##"$ref "#" is recursive"##));
    assert!(
        reason(&t, "lookahead.wasm").contains("input-schema: not a valid JSON Schema"),
        "{}",
        reason(&t, "lookahead.wasm")
    );
    assert_eq!(served_ids(&t).await, ["jarvis.core.echo"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backtracking_pattern_runs_in_linear_time() {
    let hostile = format!("{}!", "a".repeat(40));
    let strings = vec![hostile; 1000];
    let schema = json!({
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "string", "pattern": "^(a|aa)+$"}}}
    });
    let outputs = json!({ "items": strings }).to_string();
    let mut wat = WatPack::new("test.pattern", "1.0.0");
    let (ptr, len) = wat.data(outputs.as_bytes());
    let pack = pack_with(
        wat,
        WatNode {
            input_schema: schema.to_string(),
            output_schema: schema.to_string(),
            ..WatNode::new("test.pattern", "1.0.0")
        },
        &format!("(call $ok (i32.const {ptr}) (i32.const {len}))"),
    );
    let t = start(config(), &[("pattern.wasm", pack)]).await;

    // The pack's own output, on every call.
    let started = Instant::now();
    let result = t
        .result(&request("nr-1", "test.pattern", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some("invalid_outputs"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A caller's input, against the same pattern.
    let started = Instant::now();
    let result = t
        .result(&request(
            "nr-2",
            "test.pattern",
            "1.0.0",
            json!({ "items": strings }),
        ))
        .await;
    assert_outcome(&result, "failed", Some("invalid_inputs"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_healthy(&t, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_pack_may_reuse_its_answer_memory_once_describe_returned() {
    // The post-return overwrites every byte of static data, the answer's strings included.
    let wat = WatPack::new("test.reuse", "1.0.0")
        .node(WatNode::new("test.reuse", "1.0.0"))
        .with_describe_post_return(
            "(memory.fill (i32.const 1024) (i32.const 0xff) (i32.const 4096))",
        )
        .to_wat(ECHO);
    let t = start(config(), &[("reuse.wasm", wasmtime_wat(&wat).unwrap())]).await;
    assert_eq!(t.server.service.executor.registry().skipped(), []);
    assert_eq!(served_ids(&t).await, ["jarvis.core.echo", "test.reuse"]);
}

#[tokio::test]
async fn the_catalogue_is_one_body_prepared_when_packs_change() {
    let t = start(config(), &[("good.wasm", pack("good", ECHO))]).await;
    let registry = t.server.service.executor.registry();
    let (first, second) = (registry.catalogue(), registry.catalogue());
    assert_eq!(first.as_ptr(), second.as_ptr(), "a copy per request");
    let listed: Vec<Value> = serde_json::from_slice(&first).unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(served_ids(&t).await, ["jarvis.core.echo", "test.good"]);
    registry
        .load_bytes("more.wasm", &pack("more", ECHO))
        .await
        .unwrap();
    assert_ne!(registry.catalogue().as_ptr(), first.as_ptr());
    assert_eq!(
        served_ids(&t).await,
        ["jarvis.core.echo", "test.good", "test.more"]
    );
}

/// `describe` copies its one node record `copies` times into fresh memory
/// and answers with that list: a few megabytes of guest memory whichever
/// strings the records point at.
fn copies_of_the_node(copies: u32, node: WatNode, patch: &str) -> Vec<u8> {
    let bytes = copies * describe::NODE_SIZE;
    let pages = bytes.div_ceil(1 << 16) + 1;
    let prologue = format!(
        "{patch}
        (local.set $p (memory.grow (i32.const {pages})))
        (if (i32.lt_s (local.get $p) (i32.const 0)) (then unreachable))
        (local.set $p (i32.shl (local.get $p) (i32.const 16)))
        (local.set $i (i32.const 0))
        (loop $copy
          (memory.copy
            (i32.add (local.get $p) (i32.mul (local.get $i) (i32.const {size})))
            (i32.load offset={nodes_ptr} (local.get $info))
            (i32.const {size}))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $copy (i32.lt_u (local.get $i) (i32.const {copies}))))
        (i32.store offset={nodes_ptr} (local.get $info) (local.get $p))
        (i32.store offset={nodes_len} (local.get $info) (i32.const {copies}))",
        size = describe::NODE_SIZE,
        nodes_ptr = describe::NODES_PTR,
        nodes_len = describe::NODES_LEN,
    );
    let id = node.node_type_id.clone();
    wasmtime_wat(
        &WatPack::new(&id, "1.0.0")
            .node(node)
            .with_describe(&prologue)
            .to_wat(ECHO),
    )
    .unwrap()
}

/// Grows memory by `bytes` of `fill` and points the first node's input schema at it.
fn huge_input_schema(bytes: u32, fill: u8) -> String {
    let pages = bytes.div_ceil(1 << 16) + 1;
    format!(
        "(local.set $p (memory.grow (i32.const {pages})))
        (if (i32.lt_s (local.get $p) (i32.const 0)) (then unreachable))
        (local.set $p (i32.shl (local.get $p) (i32.const 16)))
        (memory.fill (local.get $p) (i32.const {fill}) (i32.const {bytes}))
        (local.set $i (i32.load offset={nodes_ptr} (local.get $info)))
        (i32.store offset={schema} (local.get $i) (local.get $p))
        (i32.store offset={schema_len} (local.get $i) (i32.const {bytes}))",
        nodes_ptr = describe::NODES_PTR,
        schema = describe::INPUT_SCHEMA,
        schema_len = describe::INPUT_SCHEMA + 4,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_of_100000_nodes_is_refused_before_it_is_copied() {
    let t = start(
        config(),
        &[
            (
                "many.wasm",
                copies_of_the_node(100_000, WatNode::new("test.many", "1.0.0"), ""),
            ),
            // 1,000 nodes whose schemas all point at one 200 KiB string: small
            // in guest memory, 200 MB if the host copied each.
            (
                "aliased.wasm",
                copies_of_the_node(
                    1000,
                    WatNode::new("test.aliased", "1.0.0"),
                    &huge_input_schema(200 << 10, b' '),
                ),
            ),
            (
                "over.wasm",
                copies_of_the_node(1001, WatNode::new("test.over", "1.0.0"), ""),
            ),
            ("good.wasm", pack("good", ECHO)),
        ],
    )
    .await;
    assert_eq!(
        reason(&t, "over.wasm"),
        "declares 1001 nodes, more than the limit of 1000"
    );
    let too_big = format!(
        "describe failed: the answer is more than {} bytes, the limit for 1000 nodes and 8388608 bytes of text",
        describe_budget(&PackLimits::default())
    );
    assert_eq!(reason(&t, "many.wasm"), too_big);
    assert_eq!(reason(&t, "aliased.wasm"), too_big);
    assert_eq!(served_ids(&t).await, ["jarvis.core.echo", "test.good"]);
    assert_healthy(&t, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_schema_is_refused_and_health_answers_while_it_loads() {
    let mut cfg = config();
    cfg.runtime.max_memory_bytes = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let big = copies_of_the_node(
        1,
        WatNode::new("test.big", "1.0.0"),
        &huge_input_schema(50 << 20, b'a'),
    );
    std::fs::write(dir.path().join("big.wasm"), big).unwrap();
    std::fs::write(dir.path().join("good.wasm"), pack("good", ECHO)).unwrap();
    cfg.packs_dir = Some(dir.path().to_path_buf());
    let server = jarvis_atomic_executor::RunningServer::spawn(&cfg)
        .await
        .unwrap();
    let registry = server.service.executor.registry().clone();
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    loop {
        let asked = Instant::now();
        let status = client
            .get(format!("{}/v1/health", server.url()))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
        slowest = slowest.max(asked.elapsed());
        if registry.pending() == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "still loading");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "health took {slowest:?}"
    );
    let skipped = registry.skipped();
    assert_eq!(
        skipped,
        [(
            "big.wasm".to_owned(),
            format!(
                "describe failed: the answer is more than {} bytes, the limit for 1000 nodes and 8388608 bytes of text",
                describe_budget(&PackLimits::default())
            )
        )]
    );
    let body = client
        .get(format!("{}/v1/node-types", server.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ids: Vec<String> = serde_json::from_str::<Vec<Value>>(&body)
        .unwrap()
        .iter()
        .map(|n| n["node_type_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["jarvis.core.echo", "test.good"]);
    assert!(body.len() < 4096, "{} bytes", body.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ids_and_texts_are_bounded_tokens() {
    let cases = [
        ("newline", WatNode::new("test.bad\nFORGED", "1.0.0")),
        ("version", WatNode::new("test.version", "1.0 0")),
        (
            "description",
            WatNode {
                description: "d".repeat(5000),
                ..WatNode::new("test.description", "1.0.0")
            },
        ),
        (
            "tags",
            WatNode {
                tags: vec!["t".into(); 33],
                ..WatNode::new("test.tags", "1.0.0")
            },
        ),
    ];
    let files: Vec<(String, Vec<u8>)> = cases
        .into_iter()
        .map(|(name, node)| {
            (
                format!("{name}.wasm"),
                pack_with(WatPack::new("test.p", "1"), node, ECHO),
            )
        })
        .collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let t = start(config(), &files).await;
    assert_eq!(
        reason(&t, "newline.wasm"),
        r#"node "test.bad\nFORGED": node-type-id "test.bad\nFORGED" has the character '\n', outside the allowed set"#
    );
    assert!(reason(&t, "version.wasm").ends_with("has the character ' ', outside the allowed set"));
    assert!(reason(&t, "description.wasm").ends_with("description is 5000 bytes, more than 4096"));
    assert!(reason(&t, "tags.wasm").ends_with("33 tags, more than the limit of 32"));
    assert_eq!(served_ids(&t).await, ["jarvis.core.echo"]);
}

/// A pack whose node logs `message` with one field `key`=`value`, then echoes.
fn logging_pack(message: &str, key: &str, value: &str) -> Vec<u8> {
    let mut wat = WatPack::new("test.logger", "1.0.0").with_log();
    let (msg, msg_len) = wat.data(message.as_bytes());
    let (k, k_len) = wat.data(key.as_bytes());
    let (v, v_len) = wat.data(value.as_bytes());
    let (at, _) = wat.data(&[]);
    wat.data(&vec![0; ((4 - at % 4) % 4) as usize]);
    let mut record = Vec::new();
    for word in [k, k_len, v, v_len] {
        record.extend_from_slice(&word.to_le_bytes());
    }
    let (fields, _) = wat.data(&record);
    pack_with(
        wat,
        WatNode::new("test.logger", "1.0.0"),
        &format!(
            "(call $log (i32.const 2) (i32.const {msg}) (i32.const {msg_len}) (i32.const {fields}) (i32.const 1))
             (call $ok_inputs (local.get $call))"
        ),
    )
}

const FORGED_MESSAGE: &str =
    "hello\n2026-01-01T00:00:00Z ERROR FORGED: admin logged in\r\u{1b}[2K\u{2028}FORGED";

/// Runs the executor binary with `LOG_FORMAT=format`, a logging pack and a
/// pack skipped for its node id; executes the logging node once and returns
/// every line the process wrote.
async fn run_binary(format: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("logger.wasm"),
        logging_pack(FORGED_MESSAGE, "key\nFORGED", "v\"\nFORGED x=\"y"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("bad-id.wasm"),
        pack_with(
            WatPack::new("test.bad", "1.0.0"),
            WatNode::new("test.bad\nFORGED", "1.0.0"),
            ECHO,
        ),
    )
    .unwrap();
    let mut executor = LoggedExecutor::start(dir.path(), |command| {
        command
            .env("LOG_FORMAT", format)
            .env("LOG_LEVEL", "info")
            .env_remove("RUST_LOG");
    });
    let addr = executor.addr();
    executor.wait_for("pack skipped");
    executor.wait_for("pack loaded");
    let result: Value = reqwest::Client::new()
        .post(format!("http://{addr}/v1/atomic-node-runs:execute"))
        .json(&request("nr-log", "test.logger", "1.0.0", json!({})))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_outcome(&result, "succeeded", None);
    executor.wait_for("hello");
    executor.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_text_cannot_forge_a_text_log_line() {
    let lines = run_binary("text").await;
    for line in &lines {
        // Every line is one event: it starts with its own timestamp.
        assert!(
            line.starts_with(|c: char| c.is_ascii_digit())
                && !line.starts_with("2026-01-01T00:00:00Z")
                && !line.contains(['\u{1b}', '\r', '\u{2028}']),
            "forged or raw line {line:?} in {lines:#?}"
        );
    }
    let guest = lines.iter().find(|l| l.contains("hello")).unwrap();
    assert!(
        guest.contains(
            r"hello\n2026-01-01T00:00:00Z ERROR FORGED: admin logged in\r\u{1b}[2K\u{2028}FORGED"
        ),
        "{guest}"
    );
    assert!(
        guest.contains(r#"key_FORGED="v\"\nFORGED x=\"y""#),
        "{guest}"
    );
    let skipped = lines.iter().find(|l| l.contains("pack skipped")).unwrap();
    assert!(skipped.contains(r#"test.bad\\nFORGED"#), "{skipped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_guest_text_as_data() {
    let lines = run_binary("json").await;
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let guest = events
        .iter()
        .find(|e| e["target"] == "pack")
        .expect("the guest's line");
    assert_eq!(guest["fields"]["message"], FORGED_MESSAGE);
    assert_eq!(guest["fields"]["node_run_id"], "nr-log");
    let fields: Value = serde_json::from_str(guest["fields"]["fields"].as_str().unwrap()).unwrap();
    assert_eq!(fields, json!({"key_FORGED": "v\"\nFORGED x=\"y"}));
    assert!(events.iter().any(|e| {
        e["fields"]["message"] == "pack skipped"
            && e["fields"]["reason"]
                .as_str()
                .unwrap()
                .contains(r#""test.bad\nFORGED""#)
    }));
}

#[test]
fn a_bad_log_format_stops_the_start_naming_the_variable() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_jarvis-atomic-executor"))
        .args(["--port", "0", "--no-compile-cache"])
        .env("LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("LOG_FORMAT must be `text` or `json`"),
        "{stderr}"
    );
}
