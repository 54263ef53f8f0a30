//! Executors as the coordinator's tests need them: a real atomic executor behind a
//! real HTTP proxy that records what it is asked to execute, can hold each execute
//! call, and can stop answering altogether; and a port that accepts and never answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, Uri};
use axum::response::IntoResponse;
use jarvis_atomic_executor::RunningServer;
use jarvis_atomic_executor::config::Config as ExecutorConfig;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Execute requests the proxy received: (node_run_id, body), in order, repeats included.
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

pub struct ExecutorProxy {
    /// The proxy's URL: what coordinators are given.
    pub url: String,
    pub server: RunningServer,
    frozen: watch::Sender<bool>,
    seen: Seen,
}

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    delay: Duration,
    frozen: watch::Receiver<bool>,
    seen: Seen,
    http: reqwest::Client,
}

impl ExecutorProxy {
    /// A test executor (built-in echo only) behind a proxy that holds each execute call for `delay`.
    pub async fn start(delay: Duration) -> Self {
        let server = RunningServer::spawn(&ExecutorConfig::for_tests())
            .await
            .unwrap();
        Self::in_front_of(server, delay).await
    }

    /// A proxy in front of `server` that holds each execute call for `delay`.
    pub async fn in_front_of(server: RunningServer, delay: Duration) -> Self {
        let (frozen, watching) = watch::channel(false);
        let seen = Seen::default();
        let state = ProxyState {
            upstream: server.url(),
            delay,
            frozen: watching,
            seen: seen.clone(),
            http: reqwest::Client::new(),
        };
        let app = Router::new().fallback(forward).with_state(state);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            url,
            server,
            frozen,
            seen,
        }
    }

    /// Loads a pack into the executor behind the proxy.
    pub async fn load_pack(&self, file: &str, bytes: &[u8]) {
        self.server
            .service
            .executor
            .registry()
            .load_bytes(file, bytes)
            .await
            .unwrap();
    }

    /// From now on every request, health probes included, waits, and so do answers
    /// on their way back: as an executor stopped with SIGSTOP would.
    pub fn stop_answering(&self) {
        self.frozen.send_replace(true);
    }

    pub fn answer_again(&self) {
        self.frozen.send_replace(false);
    }

    /// The execute requests received: (node_run_id, body).
    pub fn seen(&self) -> Vec<(String, Value)> {
        self.seen.lock().unwrap().clone()
    }

    /// The `node_run_id`s of the execute calls received, in order, repeats included.
    pub fn executed(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(id, _)| id.clone())
            .collect()
    }
}

async fn forward(
    State(proxy): State<ProxyState>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> axum::response::Response {
    if uri.path().ends_with(":execute") {
        let request: Value = serde_json::from_slice(&body).unwrap();
        let id = request["node_run_id"].as_str().unwrap().to_owned();
        proxy.seen.lock().unwrap().push((id, request));
        tokio::time::sleep(proxy.delay).await;
    }
    let mut frozen = proxy.frozen.clone();
    let _ = frozen.wait_for(|f| !*f).await;
    let Ok(upstream) = proxy
        .http
        .request(method, format!("{}{}", proxy.upstream, uri))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    else {
        return axum::http::StatusCode::BAD_GATEWAY.into_response();
    };
    let status = upstream.status();
    let text = upstream.text().await.unwrap_or_default();
    let _ = frozen.wait_for(|f| !*f).await;
    (status, [("content-type", "application/json")], text).into_response()
}

/// Accepts connections and never answers, like an executor stopped with SIGSTOP.
pub struct HungExecutor {
    pub port: u16,
    pub url: String,
    accepting: tokio::task::JoinHandle<()>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl HungExecutor {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let sink = held.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                sink.lock().unwrap().push(stream);
            }
        });
        Self {
            port,
            url: format!("http://127.0.0.1:{port}"),
            accepting,
            held,
        }
    }

    /// Closes the port and every connection it held, as a killed process would.
    pub async fn stop(mut self) -> u16 {
        self.accepting.abort();
        let _ = (&mut self.accepting).await;
        self.held.lock().unwrap().clear();
        self.port
    }
}

impl Drop for HungExecutor {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}
