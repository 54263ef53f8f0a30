//! Load figure: atomic echo runs end to end (POST /v1/runs → run terminal) per second.
//!
//! Starts the real atomic executor and `BENCH_COORDINATORS` coordinators in this
//! process on 127.0.0.1:0, then keeps `BENCH_CONCURRENCY` clients busy: each posts a
//! `jarvis.core.echo` run (client i to coordinator i mod n) and follows its NDJSON
//! event stream until the coordinator closes it (the run is terminal). Run with
//! `cargo bench --workspace --bench runs_per_second` (or `scripts/bench-coordinators.sh`).
//! Environment: BENCH_RUNS (default 20000), BENCH_CONCURRENCY (default 128),
//! BENCH_DATABASE `sqlite` (default: a file in a temp dir; one coordinator) or
//! `postgres` (a fresh database on the server at JARVIS_TEST_POSTGRES_URL, default
//! postgres://postgres@127.0.0.1:5432/test, dropped afterwards), BENCH_COORDINATORS
//! (default 1; PostgreSQL only for more).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use jarvis_atomic_executor::RunningServer;
use jarvis_run_coordinator::Server;
use jarvis_run_coordinator::config::{Config, Database, Durability};
use serde_json::{Value, json};

// As the binaries: the allocator is part of the per-run cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total = env_usize("BENCH_RUNS", 20_000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 128);
    let executor =
        RunningServer::spawn(&jarvis_atomic_executor::config::Config::for_tests()).await?;
    let dir = tempfile::tempdir()?;
    // As the binary: `flush` unless JARVIS_RUN_COORDINATOR_DURABILITY says `fast`.
    let durability: Durability = std::env::var("JARVIS_RUN_COORDINATOR_DURABILITY")
        .ok()
        .map(|v| v.parse().map_err(anyhow::Error::msg))
        .transpose()?
        .unwrap_or_default();
    eprintln!("durability: {durability:?}");
    let coordinators = env_usize("BENCH_COORDINATORS", 1).max(1);
    let backend = std::env::var("BENCH_DATABASE").unwrap_or_else(|_| "sqlite".into());
    let postgres = match backend.as_str() {
        "sqlite" if coordinators == 1 => None,
        "sqlite" => anyhow::bail!("several coordinators need BENCH_DATABASE=postgres"),
        "postgres" => Some(BenchDb::create().await?),
        other => anyhow::bail!("BENCH_DATABASE: sqlite or postgres, not {other}"),
    };
    eprintln!("database: {backend}, coordinators: {coordinators}");
    let mut urls = Vec::new();
    for _ in 0..coordinators {
        let mut config = Config::for_tests(&dir.path().join("bench.sqlite3"));
        if let Some(db) = &postgres {
            config.database = Database::Postgres(db.url.clone());
        }
        config.atomic_executor_urls = vec![executor.url()];
        config.dispatch_concurrency = 1024;
        config.durability = durability;
        let server = Server::bind(config).await?;
        urls.push(format!("http://{}", server.addr));
        tokio::spawn(server.serve(std::future::pending()));
    }

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency * 2)
        .tcp_nodelay(true)
        .build()?;
    let body = json!({"root_node_type_ref": {"node_type_id": "jarvis.core.echo", "version": "0.3.8"}, "input": {"echo": "bench"}});
    // Warm-up: connections, the executor's node listing, database pages.
    for url in &urls {
        run_once(&http, url, &body).await?;
    }

    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|i| {
            let (http, url, body, next, failed) = (
                http.clone(),
                urls[i % urls.len()].clone(),
                body.clone(),
                next.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    match run_once(&http, &url, &body).await {
                        Ok(true) => {}
                        Ok(false) | Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    let elapsed = started.elapsed();
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "runs_per_second: {backend}, {coordinators} coordinator(s), {total} atomic echo runs, concurrency {concurrency}: {:.2}s, {:.0} runs/s, {failed} not succeeded",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    if let Some(db) = postgres {
        db.drop_database().await?;
    }
    Ok(())
}

/// A fresh PostgreSQL database for one bench run.
struct BenchDb {
    admin: String,
    name: String,
    url: String,
}

impl BenchDb {
    async fn create() -> anyhow::Result<Self> {
        let admin = std::env::var("JARVIS_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("jarvis_bench_{}", std::process::id());
        Self::admin(&admin, &format!("CREATE DATABASE {name}")).await?;
        let mut url = url::Url::parse(&admin)?;
        url.set_path(&name);
        Ok(Self {
            admin,
            name,
            url: url.to_string(),
        })
    }

    async fn drop_database(self) -> anyhow::Result<()> {
        Self::admin(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        )
        .await
    }

    async fn admin(url: &str, sql: &str) -> anyhow::Result<()> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(connection);
        client.batch_execute(sql).await?;
        drop(client);
        let _ = driver.await;
        Ok(())
    }
}

/// One run end to end; `Ok(true)` if it succeeded.
async fn run_once(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<bool> {
    let run: Value = http
        .post(format!("{url}/v1/runs"))
        .json(body)
        .send()
        .await?
        .json()
        .await?;
    let run_id = run["run_id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no run_id: {run}"))?;
    let events = http
        .get(format!("{url}/v1/runs/{run_id}/events"))
        .send()
        .await?
        .text()
        .await?;
    let last = events.lines().last().unwrap_or_default();
    Ok(last.contains(r#""type":"run_completed""#) && last.contains(r#""state":"succeeded""#))
}
