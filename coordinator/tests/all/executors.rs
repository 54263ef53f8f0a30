//! Several atomic executors behind one coordinator: routing by listing, failover, recovery, hangs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use jarvis_atomic_executor::RunningServer;
use jarvis_atomic_executor::config::Config as ExecutorConfig;
use jarvis_atomic_executor::watpack::{WatNode, WatPack};
use serde_json::{Value, json};

use crate::proxy::{ExecutorProxy, HungExecutor};
use crate::support::{Coordinator, Options, types, wait_until};

const WAIT: Duration = Duration::from_secs(60);

/// A real executor serving the built-in echo and the given WAT nodes, behind a recording proxy.
struct Executor;

impl Executor {
    async fn start(nodes: &[&str]) -> ExecutorProxy {
        let server = RunningServer::spawn(&ExecutorConfig::for_tests())
            .await
            .unwrap();
        for node in nodes {
            server
                .service
                .executor
                .registry()
                .load_bytes(&format!("{node}.wasm"), &pack(node))
                .await
                .unwrap();
        }
        ExecutorProxy::in_front_of(server, Duration::ZERO).await
    }
}

/// A pack with one node that returns its inputs.
fn pack(node_type_id: &str) -> Vec<u8> {
    let wat = WatPack::new(&node_type_id.replace('.', "-"), "1.0.0")
        .node(WatNode::new(node_type_id, "1.0.0"))
        .to_wat("(call $ok_inputs (local.get $call))");
    jarvis_atomic_executor::wasmtime_wat(&wat).unwrap()
}

fn spin_pack() -> Vec<u8> {
    let wat = WatPack::new("jarvis-test-spin", "1.0.0")
        .node(WatNode::new("jarvis.test.spin", "1.0.0"))
        .to_wat("(loop $forever (br $forever)) (unreachable)");
    jarvis_atomic_executor::wasmtime_wat(&wat).unwrap()
}

fn over(executors: &[&str]) -> Options {
    Options {
        atomic_executor_url: Some(executors.join(",")),
        ..Options::default()
    }
}

/// Starts `n` echo runs, at most `clients` at a time, calling `after(i)` once run `i` is
/// acknowledged; returns (run_id, echo) of each.
async fn start_echoes(
    coord: &Arc<Coordinator>,
    n: usize,
    clients: usize,
    after: impl Fn(usize) + Send + Sync + 'static,
) -> Vec<(String, String)> {
    let permits = Arc::new(tokio::sync::Semaphore::new(clients));
    let after = Arc::new(after);
    let acknowledged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await.unwrap();
        let (coord, after, acknowledged) = (coord.clone(), after.clone(), acknowledged.clone());
        tasks.spawn(async move {
            let echo = format!("e{i}");
            let run = coord
                .start_run(
                    "jarvis.core.echo",
                    "0.3.8",
                    json!({"echo": echo}),
                    json!({}),
                )
                .await;
            drop(permit);
            after(acknowledged.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1);
            (run["run_id"].as_str().unwrap().to_owned(), echo)
        });
    }
    let mut runs = Vec::new();
    while let Some(run) = tasks.join_next().await {
        runs.push(run.unwrap());
    }
    runs
}

/// Every run succeeded with its own output and one execution recorded; returns their root ids.
async fn assert_all_succeeded(coord: &Coordinator, runs: &[(String, String)]) -> HashSet<String> {
    let mut roots = HashSet::new();
    for (run_id, echo) in runs {
        let done = coord.wait_terminal(run_id, WAIT).await;
        let root_id = done["root_node_run_id"].as_str().unwrap();
        let root = coord.node_run(root_id).await;
        assert_eq!(done["state"], "succeeded", "{root}");
        assert_eq!(root["outputs"], json!({"echo": echo}));
        let events = coord.events(run_id).await;
        let executed = types(&events)
            .iter()
            .filter(|t| *t == "atomic_executed")
            .count();
        assert_eq!(executed, 1, "{:?}", types(&events));
        roots.insert(root_id.to_owned());
    }
    roots
}

fn rotation(coord: &Coordinator) -> Vec<(String, bool)> {
    coord
        .core
        .as_ref()
        .unwrap()
        .atomic
        .as_ref()
        .unwrap()
        .in_rotation()
}

fn in_rotation(coord: &Coordinator, url: &str) -> bool {
    rotation(coord).iter().any(|(u, up)| u == url && *up)
}

async fn wait_rotation(coord: &Coordinator, url: &str, up: bool, within: Duration) -> Duration {
    let started = Instant::now();
    while in_rotation(coord, url) != up {
        assert!(
            started.elapsed() < within,
            "{url} not {} within {within:?}: {:?}",
            if up { "in rotation" } else { "out of rotation" },
            rotation(coord)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn each_node_run_goes_to_an_executor_that_lists_its_node_type() {
    let alpha = Executor::start(&["jarvis.test.alpha"]).await;
    let beta = Executor::start(&["jarvis.test.beta"]).await;
    let coord = Coordinator::start(over(&[&alpha.url, &beta.url])).await;
    let mut expected: HashMap<String, &str> = HashMap::new();
    let mut bound_to = HashMap::new();
    for i in 0..12 {
        let node_type_id = ["jarvis.test.alpha", "jarvis.test.beta", "jarvis.core.echo"][i % 3];
        let run = coord
            .start_run(
                node_type_id,
                if i % 3 == 2 { "0.3.8" } else { "1.0.0" },
                json!({"echo": format!("r{i}")}),
                json!({}),
            )
            .await;
        let done = coord
            .wait_terminal(run["run_id"].as_str().unwrap(), WAIT)
            .await;
        let root = done["root_node_run_id"].as_str().unwrap().to_owned();
        let node_run = coord.node_run(&root).await;
        // A NodeRun sent to the other executor would fail there with `unknown_node_type`.
        assert_eq!(done["state"], "succeeded", "{node_run}");
        assert_eq!(node_run["outputs"], json!({"echo": format!("r{i}")}));
        expected.insert(root.clone(), node_type_id);
        bound_to.insert(root, node_run["executor_binding"]["endpoint"].clone());
    }
    let (on_alpha, on_beta) = (alpha.executed(), beta.executed());
    for id in &on_alpha {
        assert_ne!(expected[id], "jarvis.test.beta", "beta's node ran on alpha");
    }
    for id in &on_beta {
        assert_ne!(
            expected[id], "jarvis.test.alpha",
            "alpha's node ran on beta"
        );
    }
    assert_eq!(on_alpha.len() + on_beta.len(), 12, "each NodeRun sent once");
    // Each NodeRun names the executor that ran it.
    for (ids, url) in [(&on_alpha, &alpha.url), (&on_beta, &beta.url)] {
        for id in ids {
            assert_eq!(bound_to[id], json!(url), "{id}");
        }
    }
    // Both list the echo: its four runs are spread over both.
    let echoes_on = |seen: &[String]| {
        seen.iter()
            .filter(|id| expected[*id] == "jarvis.core.echo")
            .count()
    };
    assert!(
        echoes_on(&on_alpha) > 0 && echoes_on(&on_beta) > 0,
        "echo runs not spread: alpha {on_alpha:?}, beta {on_beta:?}"
    );
}

#[tokio::test]
async fn a_cancel_reaches_the_executor_that_has_the_node_run() {
    let plain = Executor::start(&[]).await;
    let spinner = Executor::start(&[]).await;
    spinner.load_pack("spin.wasm", &spin_pack()).await;
    let coord = Coordinator::start(over(&[&plain.url, &spinner.url])).await;
    let run = coord
        .start_run("jarvis.test.spin", "1.0.0", json!({}), json!({}))
        .await;
    let run_id = run["run_id"].as_str().unwrap();
    let running = || spinner.server.service.executor.running();
    wait_until("the guest never started", WAIT, || running() > 0).await;
    let (status, canceled) = coord
        .post(&format!("/v1/runs/{run_id}:cancel"), Value::Null)
        .await;
    assert_eq!(
        (status, canceled["state"].as_str()),
        (StatusCode::OK, Some("canceled"))
    );
    wait_until(
        "the spinning guest was not stopped",
        Duration::from_secs(5),
        || running() == 0,
    )
    .await;
    assert!(plain.executed().is_empty(), "{:?}", plain.executed());
}

#[tokio::test]
async fn when_one_of_two_executors_stops_answering_mid_load_every_run_completes_through_the_other()
{
    let steady = Executor::start(&[]).await;
    let stopping = Arc::new(Executor::start(&[]).await);
    let coord = Arc::new(Coordinator::start(over(&[&steady.url, &stopping.url])).await);
    let freeze = stopping.clone();
    let started = Instant::now();
    let runs = start_echoes(&coord, 200, 16, move |acknowledged| {
        if acknowledged == 60 {
            freeze.stop_answering();
        }
    })
    .await;
    let roots = assert_all_succeeded(&coord, &runs).await;
    let took = started.elapsed();

    let (on_steady, on_stopping) = (steady.executed(), stopping.executed());
    assert!(
        !on_stopping.is_empty(),
        "the stopping executor got no work before it stopped"
    );
    // Nothing was executed under another id: every id the executors saw is a root's.
    let seen: HashSet<&String> = on_steady.iter().chain(&on_stopping).collect();
    assert!(
        seen.iter().all(|id| roots.contains(*id)),
        "unknown node_run_id sent"
    );
    assert_eq!(seen.len(), 200);
    // Calls hung on the stopped executor went to the other under the same id.
    let resent = on_stopping
        .iter()
        .filter(|id| on_steady.contains(id))
        .count();
    assert!(resent >= 1, "no hung call was resent");
    assert!(
        !in_rotation(&coord, &stopping.url),
        "{:?}",
        rotation(&coord)
    );
    eprintln!(
        "200 runs in {took:?}; {} executed on the executor that stopped, {resent} of them resent",
        on_stopping.len()
    );
    stopping.answer_again();
}

#[tokio::test]
async fn an_executor_that_stops_answering_leaves_the_rotation_and_returns_when_it_answers_again() {
    let steady = Executor::start(&[]).await;
    let flaky = Executor::start(&[]).await;
    let coord = Arc::new(Coordinator::start(over(&[&steady.url, &flaky.url])).await);
    wait_rotation(&coord, &flaky.url, true, Duration::from_secs(5)).await;

    flaky.stop_answering();
    let out = wait_rotation(&coord, &flaky.url, false, Duration::from_secs(6)).await;
    let runs = start_echoes(&coord, 20, 4, |_| {}).await;
    assert_all_succeeded(&coord, &runs).await;
    let before = flaky.executed().len();

    flaky.answer_again();
    let back = wait_rotation(&coord, &flaky.url, true, Duration::from_secs(4)).await;
    let runs = start_echoes(&coord, 40, 4, |_| {}).await;
    assert_all_succeeded(&coord, &runs).await;
    let after = flaky.executed().len();
    assert!(after > before, "the recovered executor got no work");
    eprintln!("out of rotation after {out:?}, back {back:?} after answering again");
}

#[tokio::test]
async fn posts_answer_in_milliseconds_while_one_executor_hangs() {
    let hung = HungExecutor::start().await;
    let working = Executor::start(&[]).await;
    let coord = Arc::new(Coordinator::start(over(&[&hung.url, &working.url])).await);
    let mut latencies = Vec::new();
    let mut runs = Vec::new();
    for i in 0..60 {
        // Unknown ids make the listings be asked again: that must not wait either.
        let node_type_id = if i % 5 == 4 {
            format!("acme.unknown-{i}")
        } else {
            "jarvis.core.echo".to_owned()
        };
        let started = Instant::now();
        let run = coord
            .start_run(
                &node_type_id,
                "0.3.8",
                json!({"echo": format!("h{i}")}),
                json!({}),
            )
            .await;
        latencies.push(started.elapsed());
        if i % 5 != 4 {
            runs.push((run["run_id"].as_str().unwrap().to_owned(), format!("h{i}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    let (p50, max) = (latencies[latencies.len() / 2], *latencies.last().unwrap());
    eprintln!("POST /v1/runs with one executor hung: p50 {p50:?}, max {max:?}");
    // Generous for a loaded machine; a POST waiting on the hung executor took seconds.
    assert!(max < Duration::from_millis(500), "slowest POST {max:?}");
    // Each POST waits for its fsync (`flush`), tens of ms on a busy shared disk.
    assert!(p50 < Duration::from_millis(100), "p50 {p50:?}");
    let started = Instant::now();
    assert_all_succeeded(&coord, &runs).await;
    assert!(!in_rotation(&coord, &hung.url));
    eprintln!("runs done {:?} after the last POST", started.elapsed());
}

#[tokio::test]
async fn a_refused_connection_sends_the_node_run_to_the_next_executor_at_once() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let working = Executor::start(&[]).await;
    let coord = Arc::new(Coordinator::start(over(&[&dead, &working.url])).await);
    let started = Instant::now();
    let runs = start_echoes(&coord, 20, 1, |_| {}).await;
    assert_all_succeeded(&coord, &runs).await;
    // No backoff: each failed attempt on the dead one moved on to the working one.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(working.executed().len(), 20);
}
