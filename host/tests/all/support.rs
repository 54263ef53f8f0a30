//! Test support: real executors on 127.0.0.1:0 with WAT packs in a temp dir.

use std::cell::RefCell;
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use jarvis_atomic_executor::config::Config;
use jarvis_atomic_executor::watpack::{WatNode, WatPack};
use jarvis_atomic_executor::{RunningServer, wasmtime_wat};
use serde_json::{Value, json};

pub(crate) struct TestServer {
    pub server: RunningServer,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
    /// Its test's share of the machine (see [`start_alone`]).
    _share: Arc<Share>,
}

/// The tests of this binary run in parallel, and a few assert how promptly
/// the API answers while guests saturate the CPU: those run alone.
static MACHINE: LazyLock<Arc<tokio::sync::RwLock<()>>> = LazyLock::new(Default::default);

/// A test's hold on [`MACHINE`]: shared by every test server a test starts,
/// or alone.
enum Share {
    Shared(#[allow(dead_code)] tokio::sync::OwnedRwLockReadGuard<()>),
    Alone(#[allow(dead_code)] tokio::sync::OwnedRwLockWriteGuard<()>),
}

thread_local! {
    /// The share the test on this thread holds (a test's body runs on its
    /// own thread): a second server in the same test must not queue for the
    /// lock behind a waiting `start_alone`, which waits for the first.
    static HELD: RefCell<Weak<Share>> = const { RefCell::new(Weak::new()) };
}

async fn shared() -> Arc<Share> {
    if let Some(held) = HELD.with(|h| h.borrow().upgrade()) {
        return held;
    }
    let share = Arc::new(Share::Shared(MACHINE.clone().read_owned().await));
    HELD.with(|h| *h.borrow_mut() = Arc::downgrade(&share));
    share
}

/// Config with small, test-friendly limits.
pub(crate) fn config() -> Config {
    let mut config = Config::for_tests();
    config.executor.max_concurrency = 8;
    config.executor.max_queue = 8;
    config.runtime.max_instances = 8;
    config.runtime.max_memory_bytes = 16 << 20;
    config.executor.default_timeout = Duration::from_secs(5);
    config
}

/// Starts a server whose packs directory holds `files` (name, bytes) and
/// waits until every pack is loaded or skipped.
pub(crate) async fn start(config: Config, files: &[(&str, Vec<u8>)]) -> TestServer {
    let share = shared().await;
    start_holding(share, config, files).await
}

/// As [`start`], once no other test of this binary runs a server, and none
/// starts one until this one is dropped: for tests that time the API while
/// guests saturate the CPU.
pub(crate) async fn start_alone(config: Config, files: &[(&str, Vec<u8>)]) -> TestServer {
    let share = Arc::new(Share::Alone(MACHINE.clone().write_owned().await));
    start_holding(share, config, files).await
}

async fn start_holding(
    share: Arc<Share>,
    mut config: Config,
    files: &[(&str, Vec<u8>)],
) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    config.packs_dir = Some(dir.path().to_path_buf());
    let server = RunningServer::spawn(&config).await.unwrap();
    let registry = server.service.executor.registry().clone();
    registry
        .wait_loaded(tokio::time::Instant::now() + Duration::from_secs(30))
        .await;
    assert_eq!(registry.pending(), 0, "packs still loading after 30 s");
    TestServer {
        server,
        client: reqwest::Client::new(),
        _dir: dir,
        _share: share,
    }
}

/// A pack of one node, `test.<name>` at version 1.0.0, whose `invoke` body is `body`.
pub(crate) fn pack(name: &str, body: &str) -> Vec<u8> {
    pack_with(
        WatPack::new(&format!("test.{name}"), "1.0.0"),
        WatNode::new(&format!("test.{name}"), "1.0.0"),
        body,
    )
}

pub(crate) fn pack_with(pack: WatPack, node: WatNode, body: &str) -> Vec<u8> {
    wasmtime_wat(&pack.node(node).to_wat(body)).unwrap()
}

/// A pack whose node returns the static string `text` as its outputs.
pub(crate) fn returning(name: &str, text: &str) -> Vec<u8> {
    let mut pack = WatPack::new(&format!("test.{name}"), "1.0.0");
    let (ptr, len) = pack.data(text.as_bytes());
    pack_with(
        pack,
        WatNode::new(&format!("test.{name}"), "1.0.0"),
        &format!("(call $ok (i32.const {ptr}) (i32.const {len}))"),
    )
}

pub(crate) const SPIN: &str = "(loop $spin (br $spin)) (unreachable)";

pub(crate) fn request(node_run_id: &str, node: &str, version: &str, inputs: Value) -> Value {
    json!({
        "node_run_id": node_run_id,
        "run_id": "run-1",
        "node_type_ref": { "node_type_id": node, "version": version },
        "inputs": inputs,
    })
}

impl TestServer {
    /// The packs directory the server watches.
    pub(crate) fn packs_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        send(self.client.clone(), self.url(path), body.clone()).await
    }

    /// Sends an execute request from a task of its own, so the test can act
    /// while it runs; the handle yields its status and JSON body.
    pub(crate) fn spawn_execute(&self, body: Value) -> tokio::task::JoinHandle<(u16, Value)> {
        tokio::spawn(send(
            self.client.clone(),
            self.url("/v1/atomic-node-runs:execute"),
            body,
        ))
    }

    pub(crate) async fn execute(&self, body: &Value) -> (u16, Value) {
        self.post("/v1/atomic-node-runs:execute", body).await
    }

    /// Executes and expects a 200 result; returns it.
    pub(crate) async fn result(&self, body: &Value) -> Value {
        let (status, result) = self.execute(body).await;
        assert_eq!(status, 200, "{result}");
        result
    }

    pub(crate) fn invocations(&self) -> u64 {
        self.server.service.executor.invocations()
    }
}

/// Asserts `result` is terminal with `state` and, if failed, `code`.
#[track_caller]
pub(crate) fn assert_outcome(result: &Value, state: &str, code: Option<&str>) {
    assert_eq!(result["state"], state, "{result}");
    assert_eq!(result["error"]["code"].as_str(), code, "{result}");
    assert!(
        result["started_at"].is_string() && result["ended_at"].is_string(),
        "{result}"
    );
    if state == "succeeded" {
        assert!(result.get("error").is_none(), "{result}");
    } else {
        assert!(
            result.get("outputs").is_none(),
            "absent outputs must be omitted: {result}"
        );
    }
}

async fn send(client: reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let resp = client.post(url).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        },
    )
}

/// The built executor binary as a child process, every line it writes (stdout
/// and stderr) collected, for tests about what it logs.
pub(crate) struct LoggedExecutor {
    child: std::process::Child,
    lines_rx: std::sync::mpsc::Receiver<String>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// Every line read so far.
    pub lines: Vec<String>,
}

impl LoggedExecutor {
    /// Starts the binary on port 0 serving `packs`, with `configure` adding
    /// arguments and environment (`ARP_AUTH_PROFILE=dev-insecure` is set).
    pub(crate) fn start(
        packs: &std::path::Path,
        configure: impl FnOnce(&mut std::process::Command),
    ) -> Self {
        use std::io::BufRead as _;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_jarvis-atomic-executor"));
        command
            .args(["--port", "0", "--no-compile-cache", "--packs"])
            .arg(packs)
            .env("ARP_AUTH_PROFILE", "dev-insecure")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        configure(&mut command);
        let mut child = command.spawn().unwrap();
        let (tx, lines_rx) = std::sync::mpsc::channel::<String>();
        let streams: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        let readers = streams
            .into_iter()
            .map(|stream| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in std::io::BufReader::new(stream).lines() {
                        let Ok(line) = line else { break };
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        Self {
            child,
            lines_rx,
            readers,
            lines: Vec::new(),
        }
    }

    /// Reads lines until one contains `what` (30 s at most, then panics with
    /// every line read).
    pub(crate) fn wait_for(&mut self, what: &str) -> &str {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = self.lines.iter().position(|l| l.contains(what)) {
                return &self.lines[i];
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines_rx.recv_timeout(left) {
                Ok(line) => self.lines.push(line),
                Err(_) => panic!("no log line with {what:?} in {:#?}", self.lines),
            }
        }
    }

    /// The address from the `listening` line, once it is written.
    pub(crate) fn addr(&mut self) -> String {
        self.wait_for("listening")
            .split(|c: char| c == '"' || c == '=' || c.is_whitespace())
            .find(|w| w.starts_with("127.0.0.1:"))
            .expect("the listening line names its address")
            .to_owned()
    }

    /// The process's id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process and returns every line it wrote.
    pub(crate) fn finish(mut self) -> Vec<String> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        self.lines.extend(self.lines_rx.try_iter());
        self.lines
    }
}
