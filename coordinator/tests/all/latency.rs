//! A client following a run's events live sees its end within milliseconds (no delayed-ACK floor).

use std::time::{Duration, Instant};

use jarvis_atomic_executor::RunningServer;
use jarvis_atomic_executor::config::Config as ExecutorConfig;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Coordinator, Options};

/// One keep-alive HTTP/1.1 connection, read by hand: no client library whose socket
/// options could hide a delayed-ACK floor. Like the benchmark's client, every request
/// reuses it, so the client's kernel delays its ACKs as on any busy connection.
struct Connection {
    stream: TcpStream,
    host: String,
    buf: Vec<u8>,
}

impl Connection {
    async fn open(url: &str) -> Self {
        let host = url.trim_start_matches("http://").to_owned();
        let stream = TcpStream::connect(&host).await.unwrap();
        Self {
            stream,
            host,
            buf: Vec::new(),
        }
    }

    /// Reads until `pattern` has arrived; returns everything up to and including it.
    async fn read_through(&mut self, pattern: &[u8]) -> Vec<u8> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(i) = self.buf.windows(pattern.len()).position(|w| w == pattern) {
                return self.buf.drain(..i + pattern.len()).collect();
            }
            let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut chunk))
                .await
                .expect("an answer within 30 s")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&self.buf));
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn start_echo_run(&mut self) -> String {
        let body = json!({
            "root_node_type_ref": {"node_type_id": "jarvis.core.echo", "version": "0.3.8"},
            "input": {"echo": "hi"},
        })
        .to_string();
        let request = format!(
            "POST /v1/runs HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.write_all(request.as_bytes()).await.unwrap();
        let head = String::from_utf8(self.read_through(b"\r\n\r\n").await).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("a content-length");
        while self.buf.len() < length {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let run: serde_json::Value = serde_json::from_slice(&self.buf[..length]).unwrap();
        self.buf.drain(..length);
        run["run_id"].as_str().unwrap().to_owned()
    }

    /// Follows the run's events; returns when the `run_completed` line arrives, then
    /// reads the stream's end so the connection can carry the next request.
    async fn follow_until_completed(&mut self, run_id: &str) -> Instant {
        let request = format!(
            "GET /v1/runs/{run_id}/events HTTP/1.1\r\nHost: {}\r\n\r\n",
            self.host
        );
        self.stream.write_all(request.as_bytes()).await.unwrap();
        self.read_through(b"\"run_completed\"").await;
        let seen = Instant::now();
        self.read_through(b"\r\n0\r\n\r\n").await;
        seen
    }
}

#[tokio::test]
async fn a_live_event_stream_shows_run_completed_within_milliseconds_of_the_post() {
    let executor = RunningServer::spawn(&ExecutorConfig::for_tests())
        .await
        .unwrap();
    let coord = Coordinator::start(Options {
        atomic_executor_url: Some(executor.url()),
        ..Options::default()
    })
    .await;
    let mut conn = Connection::open(&coord.url).await;
    // The first run warms the node-type listing and the connection pools.
    let run_id = conn.start_echo_run().await;
    conn.follow_until_completed(&run_id).await;
    let mut best = Duration::MAX;
    for _ in 0..10 {
        let run_id = conn.start_echo_run().await;
        let answered = Instant::now();
        best = best.min(conn.follow_until_completed(&run_id).await - answered);
    }
    // Each event written after the first waited for the client's delayed ACK
    // (40 ms) before TCP_NODELAY; the benchmark gives the real figure.
    assert!(best < Duration::from_millis(20), "best of 10: {best:?}");
}
