//! Several coordinator processes on one PostgreSQL database, dispatching to several
//! executors: shared runs and work, live streams across processes, takeover after kill -9.
//!
//! Always on PostgreSQL (`JARVIS_TEST_POSTGRES_URL`, default the local server):
//! sharing a database between processes is what it is for.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jarvis_run_coordinator::config::Database;
use serde_json::{Value, json};

use crate::proxy::ExecutorProxy;
use crate::support::{
    Coordinator, Options, Process, TestDb, assert_gapless, free_port, spin_pack, wait_healthy,
    wait_until,
};

const WAIT: Duration = Duration::from_secs(60);

/// Two executors behind recording proxies (each execute call held `delay`), both
/// serving echo and the spinning test node.
async fn executors(delay: Duration) -> (ExecutorProxy, ExecutorProxy) {
    let mut pair = Vec::new();
    for _ in 0..2 {
        let proxy = ExecutorProxy::start(delay).await;
        proxy.load_pack("spin.wasm", &spin_pack()).await;
        pair.push(proxy);
    }
    let second = pair.pop().unwrap();
    (pair.pop().unwrap(), second)
}

/// A coordinator process on `db` dispatching to both executors.
async fn coordinator(db: &TestDb, executors: &str) -> (Process, Coordinator) {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let process = Process::spawn(db, port, executors);
    wait_healthy(&url).await;
    (process, Coordinator::attach(&url))
}

fn echo(i: usize) -> Value {
    json!({
        "root_node_type_ref": {"node_type_id": "jarvis.core.echo", "version": "0.3.8"},
        "input": {"echo": format!("e{i}")},
    })
}

/// Posts a run; `None` if the coordinator did not acknowledge it.
async fn post_run(coord: &Coordinator, body: &Value) -> Option<Value> {
    let resp = coord
        .http
        .post(format!("{}/v1/runs", coord.url))
        .json(body)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

#[tokio::test]
async fn two_coordinators_share_runs_streams_and_cancels() {
    let db = TestDb::postgres().await;
    let (ex_a, ex_b) = executors(Duration::ZERO).await;
    let executors = format!("{},{}", ex_a.url, ex_b.url);
    // Started together on an empty database: the migrations are serialised.
    let ((_pa, a), (_pb, b)) =
        tokio::join!(coordinator(&db, &executors), coordinator(&db, &executors));

    // A run driven by `a`, followed live on `b`: the spinning node ends at its wall time.
    let spin = json!({
        "root_node_type_ref": {"node_type_id": "jarvis.test.spin", "version": "1.0.0"},
        "input": {},
        "constraints": {"budgets": {"max_wall_time_ms": 1500}},
    });
    let run = post_run(&a, &spin).await.unwrap();
    let run_id = run["run_id"].as_str().unwrap();
    let followed = b.follow_events(run_id).await;
    assert_gapless(&followed);
    assert_eq!(followed.last().unwrap()["type"], "run_completed");
    // Whichever coordinator answers, the run, its NodeRuns and its events are the same.
    let (_, on_a) = a.get(&format!("/v1/runs/{run_id}")).await;
    let (_, on_b) = b.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(on_a, on_b);
    assert_eq!(a.events(run_id).await, followed);
    let root = on_a["root_node_run_id"].as_str().unwrap();
    assert_eq!(a.node_run(root).await, b.node_run(root).await);

    // A cancel sent to `b` stops the guest `a` dispatched.
    let spin_long = json!({
        "root_node_type_ref": {"node_type_id": "jarvis.test.spin", "version": "1.0.0"},
        "input": {},
        "constraints": {"budgets": {"max_wall_time_ms": 60_000}},
    });
    let run = post_run(&a, &spin_long).await.unwrap();
    let run_id = run["run_id"].as_str().unwrap();
    let running = |p: &ExecutorProxy| p.server.service.executor.running();
    wait_until("the spinning node never started", WAIT, || {
        running(&ex_a) + running(&ex_b) > 0
    })
    .await;
    let (status, _) = b
        .post(&format!("/v1/runs/{run_id}:cancel"), json!({}))
        .await;
    assert!(status.is_success(), "{status}");
    let done = a.wait_terminal(run_id, WAIT).await;
    assert_eq!(done["state"], "canceled");
    wait_until(
        "the executor still runs the canceled node",
        Duration::from_secs(10),
        || running(&ex_a) + running(&ex_b) == 0,
    )
    .await;
}

#[tokio::test]
async fn a_thousand_runs_complete_when_one_of_two_coordinators_is_killed() {
    const RUNS: usize = 1000;
    const CLIENTS: usize = 32;
    let db = TestDb::postgres().await;
    // Held calls: at the kill, some of the killed coordinator's calls are in flight.
    let (ex_a, ex_b) = executors(Duration::from_millis(20)).await;
    let executors = format!("{},{}", ex_a.url, ex_b.url);
    let (mut victim_process, victim) = coordinator(&db, &executors).await;
    let (_survivor_process, survivor) = coordinator(&db, &executors).await;
    let (victim, survivor) = (Arc::new(victim), Arc::new(survivor));

    // Run i goes to coordinator i % 2; what the killed one does not acknowledge goes
    // to the survivor. Returns (run_id, root node_run_id, acknowledged by the victim).
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acknowledged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (next, acknowledged) = (next.clone(), acknowledged.clone());
        let (victim, survivor) = (victim.clone(), survivor.clone());
        clients.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= RUNS {
                    return mine;
                }
                let body = echo(i);
                let mut by_victim = i % 2 == 0;
                let mut run = None;
                if by_victim {
                    run = post_run(&victim, &body).await;
                }
                if run.is_none() {
                    by_victim = false;
                    run = post_run(&survivor, &body).await;
                }
                let run = run.expect("the survivor acknowledges every run");
                acknowledged.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                mine.push((
                    run["run_id"].as_str().unwrap().to_owned(),
                    run["root_node_run_id"].as_str().unwrap().to_owned(),
                    by_victim,
                    format!("e{i}"),
                ));
            }
        }));
    }
    let started = Instant::now();
    while acknowledged.load(std::sync::atomic::Ordering::SeqCst) < RUNS * 3 / 10 {
        assert!(started.elapsed() < WAIT, "runs are not being acknowledged");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    victim_process.kill_9();
    let mut runs = Vec::new();
    for client in clients {
        runs.extend(client.await.unwrap());
    }
    assert_eq!(runs.len(), RUNS);
    let by_victim = runs.iter().filter(|r| r.2).count();
    assert!(
        by_victim > 0,
        "the victim acknowledged runs before its death"
    );

    for (run_id, _, _, echoed) in &runs {
        let done = survivor.wait_terminal(run_id, WAIT).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        let events = survivor.events(run_id).await;
        assert_gapless(&events);
        assert_eq!(events.last().unwrap()["type"], "run_completed");
        let root = done["root_node_run_id"].as_str().unwrap();
        let node_run = survivor.node_run(root).await;
        assert_eq!(node_run["outputs"]["echo"], json!(echoed), "{node_run}");
    }

    // Executed twice only where the lease expired mid-execution: NodeRuns the killed
    // coordinator held; the repeat carried the same node_run_id.
    let mut calls: HashMap<String, usize> = HashMap::new();
    for id in ex_a.executed().into_iter().chain(ex_b.executed()) {
        *calls.entry(id).or_default() += 1;
    }
    let roots: HashMap<&str, bool> = runs.iter().map(|r| (r.1.as_str(), r.2)).collect();
    let executed: HashSet<&str> = calls.keys().map(String::as_str).collect();
    for root in roots.keys() {
        assert!(executed.contains(root), "{root} was never executed");
    }
    let repeated: Vec<_> = calls.iter().filter(|(_, n)| **n > 1).collect();
    for (id, _) in &repeated {
        // A run the killed coordinator committed but could not acknowledge is not
        // in `roots`: it was the killed one's too.
        assert!(
            roots.get(id.as_str()).copied().unwrap_or(true),
            "{id} was executed twice but its lease never expired"
        );
    }
    eprintln!(
        "{RUNS} runs in {:?}: {by_victim} acknowledged by the killed coordinator, {} executed twice",
        started.elapsed(),
        repeated.len()
    );
}

#[tokio::test]
async fn runs_complete_when_the_database_drops_every_connection_mid_load() {
    let db = TestDb::postgres().await;
    let ex = ExecutorProxy::start(Duration::from_millis(5)).await;
    let coord = Arc::new(
        Coordinator::start_at(
            &db,
            Options {
                atomic_executor_url: Some(ex.url.clone()),
                lease: Some(Duration::from_secs(2)),
                ..Options::default()
            },
        )
        .await,
    );
    let name = db.postgres_name().unwrap().to_owned();
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let coord = coord.clone();
            tokio::spawn(async move {
                let (mut acknowledged, mut refused) = (Vec::new(), 0);
                for i in 0..40 {
                    match post_run(&coord, &echo(c * 100 + i)).await {
                        Some(run) => acknowledged.push(run["run_id"].as_str().unwrap().to_owned()),
                        None => refused += 1,
                    }
                }
                (acknowledged, refused)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Every connection the coordinator has to its database (writer, readers, listener).
    TestDb::admin(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ))
    .await;
    let (mut runs, mut refused) = (Vec::new(), 0);
    for client in clients {
        let (acknowledged, n) = client.await.unwrap();
        runs.extend(acknowledged);
        refused += n;
    }
    // Refused at the moment of the cut, with an error: never acknowledged and lost.
    assert!(refused < 40, "{refused} of 320 posts refused");
    eprintln!(
        "connections cut at 150 ms: {} runs acknowledged, {refused} refused",
        runs.len()
    );
    for run_id in &runs {
        let done = coord.wait_terminal(run_id, WAIT).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_gapless(&coord.events(run_id).await);
    }
    // The store is whole again: a new run goes through.
    let run = post_run(&coord, &echo(9999)).await.unwrap();
    let done = coord
        .wait_terminal(run["run_id"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(done["state"], "succeeded");
}

#[tokio::test]
async fn a_database_written_by_a_newer_coordinator_is_refused() {
    let db = TestDb::postgres().await;
    drop(Coordinator::start_at(&db, Options::default()).await);
    let Database::Postgres(url) = &db.database else {
        unreachable!()
    };
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    client
        .batch_execute("UPDATE coordinator_schema SET version = version + 1")
        .await
        .unwrap();
    drop(client);
    let _ = driver.await;
    let err =
        jarvis_run_coordinator::Server::bind(crate::support::config(&db, &Options::default()))
            .await
            .unwrap_err();
    assert!(err.to_string().contains("schema version"), "{err}");
}

#[tokio::test]
async fn one_run_id_posted_to_two_coordinators_at_once_is_created_once() {
    let db = TestDb::postgres().await;
    let (a, b) = tokio::join!(
        Coordinator::start_at(&db, Options::default()),
        Coordinator::start_at(&db, Options::default())
    );
    for i in 0..20 {
        let mut body = echo(i);
        body["run_id"] = json!(format!("run_race_{i}"));
        let (on_a, on_b) = tokio::join!(
            a.post("/v1/runs", body.clone()),
            b.post("/v1/runs", body.clone())
        );
        let mut statuses = [on_a.0.as_u16(), on_b.0.as_u16()];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 409], "{on_a:?} {on_b:?}");
        let conflict = if on_a.0.as_u16() == 409 {
            &on_a.1
        } else {
            &on_b.1
        };
        assert_eq!(conflict["error"]["code"], "run_already_exists");
    }
}
