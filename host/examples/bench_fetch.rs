//! Load generator of `scripts/bench-fetch.sh`: serves a small upstream on
//! 127.0.0.1:PORT and GETs it either directly with reqwest (the native
//! baseline) or through the executor's `jarvis.web.fetch`, then prints the
//! latency percentiles at one connection and the throughput at many.
//!
//!     bench_fetch --port 18095 --executor http://127.0.0.1:18084 [--requests 2000] [--seconds 10] [-c 64]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

struct Args {
    port: u16,
    executor: String,
    requests: usize,
    seconds: u64,
    connections: usize,
}

fn args() -> Args {
    let mut a = Args {
        port: 18095,
        executor: "http://127.0.0.1:18084".into(),
        requests: 2000,
        seconds: 10,
        connections: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().expect("every flag takes a value");
        match flag.as_str() {
            "--port" => a.port = value.parse().unwrap(),
            "--executor" => a.executor = value,
            "--requests" => a.requests = value.parse().unwrap(),
            "--seconds" => a.seconds = value.parse().unwrap(),
            "-c" => a.connections = value.parse().unwrap(),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

#[derive(Clone)]
enum Mode {
    Native(String),
    Pack { execute: String, url: String },
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Self::Native(_) => "native reqwest",
            Self::Pack { .. } => "jarvis.web.fetch",
        }
    }

    async fn once(&self, client: &reqwest::Client, n: u64) {
        match self {
            Self::Native(url) => {
                let r = client.get(url).send().await.unwrap();
                assert!(r.status().is_success());
                r.bytes().await.unwrap();
            }
            Self::Pack { execute, url } => {
                let body = json!({
                    "node_run_id": format!("bench-{n}"), "run_id": "bench",
                    "node_type_ref": {"node_type_id": "jarvis.web.fetch", "version": "0.3.8"},
                    "inputs": {"url": url, "method": null, "headers": null, "params": null,
                               "json": null, "body": null, "timeout_seconds": null,
                               "max_bytes": null, "follow_redirects": null},
                });
                let r = client.post(execute).json(&body).send().await.unwrap();
                let v: serde_json::Value = r.json().await.unwrap();
                assert_eq!(v["state"], "succeeded", "{v}");
            }
        }
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

async fn latency(mode: &Mode, requests: usize) -> (Duration, Duration) {
    let client = reqwest::Client::new();
    for _ in 0..50 {
        mode.once(&client, SEQ.fetch_add(1, Ordering::Relaxed))
            .await;
    }
    let mut times = Vec::with_capacity(requests);
    for _ in 0..requests {
        let start = Instant::now();
        mode.once(&client, SEQ.fetch_add(1, Ordering::Relaxed))
            .await;
        times.push(start.elapsed());
    }
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

async fn throughput(mode: &Mode, connections: usize, seconds: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (mode, done) = (mode.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while Instant::now() < until {
                mode.once(&client, SEQ.fetch_add(1, Ordering::Relaxed))
                    .await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let a = args();
    let app = axum::Router::new().route("/data", axum::routing::get(|| async { "x".repeat(512) }));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", a.port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = format!("http://127.0.0.1:{}/data", a.port);
    let modes = [
        Mode::Native(url.clone()),
        Mode::Pack {
            execute: format!("{}/v1/atomic-node-runs:execute", a.executor),
            url,
        },
    ];
    for mode in &modes {
        let (p50, p99) = latency(mode, a.requests).await;
        let rps = throughput(mode, a.connections, a.seconds).await;
        println!(
            "{:<18} 1 connection: p50 {:>8.3} ms  p99 {:>8.3} ms   {} connections: {:>8.0} req/s",
            mode.name(),
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            a.connections,
            rps
        );
    }
}
