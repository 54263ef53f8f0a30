//! `jarvis-pack new` then `jarvis-pack build` gives a pack the executor runs,
//! in one go, with nothing edited in between.

use std::path::Path;

use jarvis_pack::{BuildOptions, Toolchain};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn a_scaffolded_pack_builds_and_runs() {
    let toolchain = match Toolchain::detect() {
        Ok(toolchain) => toolchain,
        Err(error) => return unavailable(&format!("no wasm toolchain: {error:#}")),
    };
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("acme-hello");
    jarvis_pack::scaffold(&dir, "acme.hello", &jarvis_pack::default_sdk_path()).unwrap();
    let packs = work.path().join("packs");
    let options = BuildOptions {
        out_dir: packs.clone(),
        toolchain,
        // Shares the std built for wasm with nodepacks/ builds.
        target_dir: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nodepacks/target")),
    };
    let built = tokio::task::spawn_blocking(move || jarvis_pack::build(&dir, &options))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(built.len(), 1);
    assert_eq!(built[0].path, packs.join("acme.hello.wasm"));
    assert_eq!(built[0].summary.nodes[0].node_type_id, "acme.hello.greet");

    let t = serve(&[built[0].path.clone()], |_| {}).await;
    let result = t
        .result(&request(
            "nr-hello-1",
            "acme.hello.greet",
            "0.1.0",
            json!({"name": "Ada"}),
        ))
        .await;
    assert_outcome(&result, "succeeded", None);
    assert_eq!(result["outputs"], json!({"greeting": "Hello, Ada!"}));

    let result = t
        .result(&request(
            "nr-hello-2",
            "acme.hello.greet",
            "0.1.0",
            json!({"name": " "}),
        ))
        .await;
    assert_outcome(&result, "failed", Some("handler_error"));
    assert_eq!(result["error"]["message"], "name must not be blank");
}
