//! Test harness: coordinators on port 0, a test Composite Executor, HTTP helpers.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arp_types::composite::CompositeBeginRequest;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as AxPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use jarvis_atomic_executor::watpack::{WatNode, WatPack};
use jarvis_run_coordinator::Server;
use jarvis_run_coordinator::config::{Config, Database, LocalPolicy, Timing, parse_url_list};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// One URL or a comma-separated list, as `--atomic-executor-url` takes.
    pub atomic_executor_url: Option<String>,
    pub composite_executor_url: Option<String>,
    pub deny_by_default: bool,
    pub node_run_timeout: Option<Duration>,
    pub lease: Option<Duration>,
    pub retention: Option<Duration>,
    pub timing: Option<Timing>,
    pub pdp_url: Option<String>,
    /// `--auto-dispatch false`: NodeRuns stay queued.
    pub no_auto_dispatch: bool,
}

/// Where the suite's coordinators store runs: SQLite by default; with
/// `JARVIS_TEST_DATABASE=postgres`, PostgreSQL (see [`TestDb`]).
pub fn postgres_wanted() -> bool {
    std::env::var("JARVIS_TEST_DATABASE").is_ok_and(|v| v.eq_ignore_ascii_case("postgres"))
}

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("JARVIS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database of a test's own, dropped with it: a file in a temporary directory,
/// or (see [`postgres_wanted`]) a fresh PostgreSQL database, so tests run in parallel.
#[derive(Debug)]
pub struct TestDb {
    pub database: Database,
    _dir: tempfile::TempDir,
    /// The PostgreSQL database's name, to drop.
    postgres: Option<String>,
}

impl TestDb {
    /// The backend the suite runs on.
    pub async fn new() -> Self {
        if postgres_wanted() {
            Self::postgres().await
        } else {
            Self::sqlite()
        }
    }

    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            database: Database::Sqlite(dir.path().join("coordinator.sqlite3")),
            _dir: dir,
            postgres: None,
        }
    }

    /// A new, empty PostgreSQL database.
    pub async fn postgres() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "jarvis_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            rand_suffix()
        );
        let admin = postgres_admin_url();
        let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin}: {e}"));
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        drop(client);
        let _ = driver.await;
        let mut url = url::Url::parse(&admin).unwrap();
        url.set_path(&name);
        Self {
            database: Database::Postgres(url.to_string()),
            _dir: tempfile::tempdir().unwrap(),
            postgres: Some(name),
        }
    }

    /// The PostgreSQL database's name, if it is one.
    pub fn postgres_name(&self) -> Option<&str> {
        self.postgres.as_deref()
    }

    /// Runs `sql` on the PostgreSQL server as the test administrator.
    pub async fn admin(sql: &str) {
        let (client, connection) =
            tokio_postgres::connect(&postgres_admin_url(), tokio_postgres::NoTls)
                .await
                .unwrap();
        let driver = tokio::spawn(connection);
        client.batch_execute(sql).await.unwrap();
        drop(client);
        let _ = driver.await;
    }

    /// The SQLite file; panics on PostgreSQL.
    pub fn sqlite_path(&self) -> &Path {
        match &self.database {
            Database::Sqlite(path) => path,
            Database::Postgres(_) => panic!("not an SQLite database"),
        }
    }

    /// The coordinator binary's flags for this database.
    pub fn flags(&self) -> Vec<std::ffi::OsString> {
        match &self.database {
            Database::Sqlite(path) => vec!["--db".into(), path.into()],
            Database::Postgres(url) => vec!["--database-url".into(), url.into()],
        }
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) % 1_000_000
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.postgres.take() else {
            return;
        };
        // The synchronous client runs a runtime of its own: not on a runtime's thread.
        let admin = postgres_admin_url();
        let dropped = std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&admin, postgres::NoTls)?;
            client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop a test database: {dropped:?}");
        }
    }
}

pub fn config(db: &TestDb, opts: &Options) -> Config {
    let mut config = Config::for_tests(Path::new("unused"));
    config.database = db.database.clone();
    if let Some(urls) = &opts.atomic_executor_url {
        config.atomic_executor_urls = parse_url_list(urls).unwrap();
    }
    config.composite_executor_url = opts.composite_executor_url.clone();
    config.pdp_url = opts.pdp_url.clone();
    if opts.deny_by_default {
        config.policy = LocalPolicy::DenyAll;
    }
    config.auto_dispatch = !opts.no_auto_dispatch;
    if let Some(timeout) = opts.node_run_timeout {
        config.node_run_timeout = timeout;
    }
    if let Some(lease) = opts.lease {
        config.lease = lease;
    }
    config.retention = opts.retention;
    if let Some(timing) = opts.timing {
        config.timing = timing;
    }
    config
}

/// A coordinator served in-process; stops when dropped.
#[derive(Debug)]
pub struct Coordinator {
    pub url: String,
    pub http: reqwest::Client,
    /// The coordinator itself when it runs in this process (for its store's test hooks).
    pub core: Option<Arc<jarvis_run_coordinator::coordinator::Coordinator>>,
    _stop: oneshot::Sender<()>,
    _db: Option<TestDb>,
}

impl Coordinator {
    pub async fn start(opts: Options) -> Self {
        let db = TestDb::new().await;
        let mut c = Self::start_at(&db, opts).await;
        c._db = Some(db);
        c
    }

    /// A coordinator on `db`, which outlives it (for restarts, or several coordinators).
    pub async fn start_at(db: &TestDb, opts: Options) -> Self {
        let server = Server::bind(config(db, &opts)).await.unwrap();
        let url = format!("http://{}", server.addr);
        let core = Some(server.coordinator.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        Self {
            url,
            core,
            http: client(),
            _stop: stop,
            _db: None,
        }
    }

    /// A client of a coordinator running elsewhere (e.g. a child process).
    pub fn attach(url: &str) -> Self {
        let (stop, _) = oneshot::channel();
        Self {
            url: url.to_owned(),
            core: None,
            http: client(),
            _stop: stop,
            _db: None,
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
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

    /// The in-process coordinator's store.
    pub fn store(&self) -> &jarvis_run_coordinator::store::Store {
        &self.core.as_ref().expect("an in-process coordinator").store
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    /// All events of the run so far (no following).
    pub async fn events(&self, run_id: &str) -> Vec<Value> {
        let text = self
            .http
            .get(format!("{}/v1/runs/{run_id}/events?follow=false", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Follows the run's event stream until the coordinator closes it (the run is terminal).
    pub async fn follow_events(&self, run_id: &str) -> Vec<Value> {
        let resp = self
            .http
            .get(format!("{}/v1/runs/{run_id}/events", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
        let text = resp.text().await.unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub async fn start_run(
        &self,
        node_type_id: &str,
        version: &str,
        input: Value,
        extra: Value,
    ) -> Value {
        let mut body = json!({"root_node_type_ref": {"node_type_id": node_type_id, "version": version}, "input": input});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().cloned().unwrap_or_default());
        let (status, run) = self.post("/v1/runs", body).await;
        assert_eq!(status, StatusCode::OK, "{run}");
        run
    }

    /// Polls until the run is terminal; returns it.
    pub async fn wait_terminal(&self, run_id: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (_, run) = self.get(&format!("/v1/runs/{run_id}")).await;
            if ["succeeded", "failed", "canceled"].contains(&run["state"].as_str().unwrap_or("")) {
                return run;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {run_id} not terminal in time: {run}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn node_run(&self, id: &str) -> Value {
        let (status, nr) = self.get(&format!("/v1/node-runs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{nr}");
        nr
    }

    pub async fn wait_node_state(&self, id: &str, state: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let nr = self.node_run(id).await;
            if nr["state"] == state {
                return nr;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node run {id} not {state} in time: {nr}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls `done` every 10 ms until it holds; panics with `what` after `within`.
pub async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts seq runs 0, 1, 2, ... without gaps.
pub fn assert_gapless(events: &[Value]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], json!(i), "seq gap at {i}: {events:#?}");
    }
}

pub fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

/// What the test Composite Executor does with a begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompositeMode {
    /// Accept and do nothing: the test drives create_node_runs itself.
    Hold,
    /// Create three `jarvis.core.echo` children, wait for them, complete the parent.
    FanOutEcho,
}

#[derive(Debug, Default)]
pub struct CompositeLog {
    pub begins: Vec<CompositeBeginRequest>,
    pub cancels: Vec<String>,
}

/// A small real Composite Executor serving `composite-executor.openapi.yaml`'s begin and cancel.
#[derive(Debug)]
pub struct TestCompositeExecutor {
    pub url: String,
    pub log: Arc<Mutex<CompositeLog>>,
}

/// The node type the test Composite Executor serves (no `composite.` prefix: its kind comes
/// from the executor's `GET /v1/node-types`).
pub const COMPOSITE_TYPE: &str = "jarvis.test.fanout";

impl TestCompositeExecutor {
    pub async fn start(mode: CompositeMode) -> Self {
        let log = Arc::new(Mutex::new(CompositeLog::default()));
        let state = (mode, log.clone());
        let app = Router::new()
            .route("/v1/node-types", get(|| async {
                json_response(StatusCode::OK, json!([{"node_type_id": COMPOSITE_TYPE, "version": "1", "kind": "composite"}]))
            }))
            .route("/v1/composite-node-runs:begin", post(begin))
            .route("/v1/composite-node-runs/{segment}", post(cancel))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, log }
    }

    pub fn begins(&self) -> Vec<CompositeBeginRequest> {
        self.log.lock().unwrap().begins.clone()
    }

    pub fn cancels(&self) -> Vec<String> {
        self.log.lock().unwrap().cancels.clone()
    }
}

type CompositeState = (CompositeMode, Arc<Mutex<CompositeLog>>);

pub fn json_response(status: StatusCode, body: Value) -> axum::response::Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn begin(State((mode, log)): State<CompositeState>, body: Bytes) -> axum::response::Response {
    let req: CompositeBeginRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let err = json!({"error": {"code": "invalid_request", "message": e.to_string()}});
            return json_response(StatusCode::BAD_REQUEST, err);
        }
    };
    log.lock().unwrap().begins.push(req.clone());
    if mode == CompositeMode::FanOutEcho {
        tokio::spawn(fan_out(req));
    }
    json_response(StatusCode::OK, json!({"accepted": true}))
}

async fn cancel(
    State((_, log)): State<CompositeState>,
    AxPath(segment): AxPath<String>,
) -> StatusCode {
    match segment.strip_suffix(":cancel") {
        Some(id) => {
            log.lock().unwrap().cancels.push(id.to_owned());
            StatusCode::NO_CONTENT
        }
        None => StatusCode::NOT_FOUND,
    }
}

/// What a composite executor does: decompose, wait, complete.
async fn fan_out(req: CompositeBeginRequest) {
    let http = client();
    let base = req.coordinator_endpoint.clone();
    let specs: Vec<Value> = (0..3)
        .map(|i| {
            json!({
                "node_type_ref": {"node_type_id": "jarvis.core.echo", "version": "0.3.8"},
                "inputs": {"echo": format!("child-{i}")},
                "idempotency_key": format!("child-{i}"),
            })
        })
        .collect();
    let body =
        json!({"run_id": req.run_id, "parent_node_run_id": req.node_run_id, "node_runs": specs});
    let created: Value = http
        .post(format!("{base}/v1/node-runs"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<String> = created["node_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_run_id"].as_str().unwrap().to_owned())
        .collect();
    let mut outputs = Vec::new();
    let mut all_ok = true;
    for id in ids {
        loop {
            let nr: Value = http
                .get(format!("{base}/v1/node-runs/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match nr["state"].as_str().unwrap() {
                "succeeded" => {
                    outputs.push(nr["outputs"].clone());
                    break;
                }
                "failed" | "canceled" => {
                    all_ok = false;
                    outputs.push(nr["extensions"].clone());
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    let state = if all_ok { "succeeded" } else { "failed" };
    let complete = json!({"state": state, "outputs": {"children": outputs}});
    let resp = http
        .post(format!("{base}/v1/node-runs/{}:complete", req.node_run_id))
        .json(&complete)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The coordinator binary, killed with SIGKILL by `kill_9`.
pub struct Process(Child);

impl Process {
    pub fn spawn(db: &TestDb, port: u16, executor_url: &str) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_jarvis-run-coordinator"))
            // Short leases: NodeRuns the killed process held are taken up again in seconds.
            .args(["--lease-secs", "2", "--port", &port.to_string()])
            .args(db.flags())
            .env("JARVIS_ATOMIC_EXECUTOR_URL", executor_url)
            .env("JARVIS_POLICY_PROFILE", "dev-allow")
            // No tokens in this test: without it, auth is required and outbound
            // client credentials are demanded at start.
            .env("ARP_AUTH_PROFILE", "dev-insecure")
            .env("LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self(child)
    }

    pub fn kill_9(&mut self) {
        self.0.kill().unwrap(); // SIGKILL on Unix
        self.0.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn wait_healthy(url: &str) {
    let http = client();
    for _ in 0..200 {
        if http
            .get(format!("{url}/v1/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("coordinator at {url} did not come up");
}

/// A pack whose one node, `jarvis.test.spin` 1.0.0, loops until stopped.
pub fn spin_pack() -> Vec<u8> {
    let wat = WatPack::new("jarvis-test-spin", "1.0.0")
        .node(WatNode::new("jarvis.test.spin", "1.0.0"))
        .to_wat("(loop $forever (br $forever)) (unreachable)");
    jarvis_atomic_executor::wasmtime_wat(&wat).unwrap()
}
