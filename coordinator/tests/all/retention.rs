//! Retention: terminal runs past the window go with their NodeRuns and events, and the file stops growing.

use std::path::Path;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use jarvis_atomic_executor::RunningServer;
use jarvis_atomic_executor::config::Config as ExecutorConfig;
use serde_json::json;

use crate::support::{
    COMPOSITE_TYPE, CompositeMode, Coordinator, Options, TestCompositeExecutor, TestDb,
};

async fn executor() -> RunningServer {
    RunningServer::spawn(&ExecutorConfig::for_tests())
        .await
        .unwrap()
}

/// Pages the database holds (what its file shrinks to at the next checkpoint).
fn used_pages(db: &Path) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn runs_past_the_window_disappear_with_their_node_runs_and_events() {
    let ex = executor().await;
    let composite = TestCompositeExecutor::start(CompositeMode::Hold).await;
    let coord = Coordinator::start(Options {
        atomic_executor_url: Some(ex.url()),
        composite_executor_url: Some(composite.url.clone()),
        retention: Some(Duration::from_millis(600)),
        ..Options::default()
    })
    .await;
    let mut done = Vec::new();
    for i in 0..5 {
        let run = coord
            .start_run(
                "jarvis.core.echo",
                "0.3.8",
                json!({"echo": format!("e{i}")}),
                json!({}),
            )
            .await;
        done.push(
            coord
                .wait_terminal(run["run_id"].as_str().unwrap(), Duration::from_secs(10))
                .await,
        );
    }
    // Not terminal: kept however old it gets.
    let open = coord
        .start_run(COMPOSITE_TYPE, "1", json!({}), json!({}))
        .await;
    let open_id = open["run_id"].as_str().unwrap();
    let (status, _) = coord
        .get(&format!("/v1/runs/{}", done[0]["run_id"].as_str().unwrap()))
        .await;
    assert_eq!(status, StatusCode::OK, "kept within the window");

    let deadline = Instant::now() + Duration::from_secs(10);
    for run in &done {
        let run_id = run["run_id"].as_str().unwrap();
        loop {
            let (status, body) = coord.get(&format!("/v1/runs/{run_id}")).await;
            if status == StatusCode::NOT_FOUND {
                assert_eq!(body["error"]["code"], "run_not_found");
                break;
            }
            assert!(Instant::now() < deadline, "{run_id} still kept: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, _) = coord
            .get(&format!(
                "/v1/node-runs/{}",
                run["root_node_run_id"].as_str().unwrap()
            ))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let events = coord
            .http
            .get(format!(
                "{}/v1/runs/{run_id}/events?follow=false",
                coord.url
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(events.status(), StatusCode::NOT_FOUND);
    }
    let (_, open_now) = coord.get(&format!("/v1/runs/{open_id}")).await;
    assert_eq!(open_now["state"], "running");
    assert!(!coord.events(open_id).await.is_empty());
}

#[tokio::test]
async fn under_steady_load_the_database_stops_growing() {
    let ex = executor().await;
    // The file's size is SQLite's; PostgreSQL reclaims space by autovacuum.
    let db = TestDb::sqlite();
    let coord = Coordinator::start_at(
        &db,
        Options {
            atomic_executor_url: Some(ex.url()),
            retention: Some(Duration::from_millis(300)),
            ..Options::default()
        },
    )
    .await;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut runs = 0;
    while started.elapsed() < Duration::from_secs(4) {
        let batch: Vec<_> = (0..8)
            .map(|i| {
                let coord = &coord;
                async move {
                    let run = coord
                        .start_run(
                            "jarvis.core.echo",
                            "0.3.8",
                            json!({"echo": format!("e{i}")}),
                            json!({}),
                        )
                        .await;
                    coord
                        .wait_terminal(run["run_id"].as_str().unwrap(), Duration::from_secs(10))
                        .await;
                }
            })
            .collect();
        futures_util::future::join_all(batch).await;
        runs += 8;
        samples.push((started.elapsed(), used_pages(db.sqlite_path())));
    }
    let at = |t: Duration| {
        samples
            .iter()
            .find(|(elapsed, _)| *elapsed >= t)
            .map(|s| s.1)
            .unwrap()
    };
    let (early, late) = (at(Duration::from_millis(1500)), samples.last().unwrap().1);
    // Without retention the file grows with every run (linearly: ~2.5× from 1.5 s to 4 s).
    assert!(
        late <= early + early / 4 + 16,
        "{runs} runs: {early} pages at 1.5 s, {late} at the end: {samples:?}"
    );
}
