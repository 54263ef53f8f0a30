//! Finding the built packs and serving them from a real executor on 127.0.0.1:0.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jarvis_atomic_executor::RunningServer;
use jarvis_atomic_executor::config::Config;
use serde_json::{Value, json};

/// `nodepacks/`, where `build-all.sh` puts the built packs.
pub(crate) fn nodepacks_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nodepacks")
}

/// Whether a missing pack or toolchain fails the test instead of skipping it.
pub(crate) fn packs_required() -> bool {
    std::env::var_os("JARVIS_REQUIRE_PACKS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Skip (loudly) or fail when something the test needs is not there.
#[track_caller]
pub(crate) fn unavailable(what: &str) {
    if packs_required() {
        panic!("{what}, and JARVIS_REQUIRE_PACKS is set: run nodepacks/build-all.sh first");
    }
    eprintln!(
        "SKIPPED {}: {what} (run nodepacks/build-all.sh; set JARVIS_REQUIRE_PACKS=1 to fail instead)",
        std::thread::current().name().unwrap_or("test")
    );
}

/// The built pack `nodepacks/<file>`, or `None` after saying why the test is skipped.
#[track_caller]
pub(crate) fn built_pack(file: &str) -> Option<PathBuf> {
    let path = nodepacks_dir().join(file);
    if path.is_file() {
        Some(path)
    } else {
        unavailable(&format!("{} is not built", path.display()));
        None
    }
}

pub(crate) struct TestServer {
    pub(crate) server: RunningServer,
    pub(crate) client: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// An executor whose packs directory holds exactly `packs`, once they are loaded.
pub(crate) async fn serve(packs: &[PathBuf], configure: impl FnOnce(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    for pack in packs {
        std::fs::copy(pack, dir.path().join(pack.file_name().unwrap())).unwrap();
    }
    let mut config = Config::for_tests();
    config.executor.default_timeout = Duration::from_secs(10);
    configure(&mut config);
    config.packs_dir = Some(dir.path().to_path_buf());
    let server = RunningServer::spawn(&config).await.unwrap();
    let registry = server.service.executor.registry().clone();
    // Debug builds of the compiler take a while over an 18 MB Python component.
    registry
        .wait_loaded(tokio::time::Instant::now() + Duration::from_secs(600))
        .await;
    assert_eq!(registry.pending(), 0, "packs still loading after 600 s");
    TestServer {
        server,
        client: reqwest::Client::new(),
        _dir: dir,
    }
}

pub(crate) fn request(node_run_id: &str, node: &str, version: &str, inputs: Value) -> Value {
    json!({
        "node_run_id": node_run_id,
        "run_id": "run-packs-e2e",
        "node_type_ref": { "node_type_id": node, "version": version },
        "inputs": inputs,
    })
}

impl TestServer {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    /// Executes and expects a 200 result; returns it.
    pub(crate) async fn result(&self, body: &Value) -> Value {
        execute(
            &self.client,
            &self.url("/v1/atomic-node-runs:execute"),
            body,
        )
        .await
    }

    pub(crate) async fn node_types(&self) -> Vec<Value> {
        let types: Value = self
            .client
            .get(self.url("/v1/node-types"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        types.as_array().unwrap().clone()
    }

    pub(crate) async fn node_type(&self, id: &str) -> Value {
        let types = self.node_types().await;
        let found = types.iter().find(|t| t["node_type_id"] == id);
        found
            .unwrap_or_else(|| panic!("{id} not served: {types:?}"))
            .clone()
    }
}

/// Asserts `result` is terminal with `state` and, if failed, `code`.
#[track_caller]
pub(crate) fn assert_outcome(result: &Value, state: &str, code: Option<&str>) {
    assert_eq!(result["state"], state, "{result}");
    assert_eq!(result["error"]["code"].as_str(), code, "{result}");
    if state == "succeeded" {
        assert!(result.get("error").is_none(), "{result}");
    } else {
        assert!(result.get("outputs").is_none(), "{result}");
    }
}

/// Posts `body` to an execute `url` with `client`, expects a 200 result and returns it.
pub(crate) async fn execute(client: &reqwest::Client, url: &str, body: &Value) -> Value {
    let response = client.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let result: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{result}");
    result
}
