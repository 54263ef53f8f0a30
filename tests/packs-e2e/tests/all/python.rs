//! The Python example pack (`nodepacks/python-example`, built with
//! componentize-py) loaded and run by the executor, and the executor serving
//! other packs while it compiles the big Python component.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jarvis_atomic_executor::grants::Grants;
use serde_json::json;

use crate::support::*;

const PACK: &str = "jarvis.example.py.wasm";
const VERSION: &str = "0.1.0";

#[tokio::test]
async fn python_nodes_run_in_the_executor() {
    let Some(pack) = built_pack(PACK) else { return };
    let t = serve(&[pack], |_| {}).await;

    let count = t.node_type("jarvis.example.py.word_count").await;
    assert_eq!(count["version"], VERSION);
    assert_eq!(count["input_schema"]["required"], json!(["text"]));

    let inputs = json!({"text": "one two three\nfour"});
    let result = t
        .result(&request(
            "nr-py-1",
            "jarvis.example.py.word_count",
            VERSION,
            inputs,
        ))
        .await;
    assert_outcome(&result, "succeeded", None);
    assert_eq!(
        result["outputs"],
        json!({"characters": 18, "words": 4, "lines": 2})
    );

    // A ValueError becomes handler_error, with the message kept.
    let result = t
        .result(&request(
            "nr-py-2",
            "jarvis.example.py.word_count",
            VERSION,
            json!({"text": "   "}),
        ))
        .await;
    assert_outcome(&result, "failed", Some("handler_error"));
    assert!(
        result["error"]["message"]
            .as_str()
            .unwrap()
            .contains("text must not be blank"),
        "{result}"
    );

    // Schema violations never reach Python.
    let result = t
        .result(&request(
            "nr-py-3",
            "jarvis.example.py.word_count",
            VERSION,
            json!({"text": 5}),
        ))
        .await;
    assert_outcome(&result, "failed", Some("invalid_inputs"));

    // The world's imports work from Python: timer, clock, random, log.
    let started = Instant::now();
    let result = t
        .result(&request(
            "nr-py-4",
            "jarvis.example.py.stamp",
            VERSION,
            json!({"label": "x", "wait_seconds": 0.2}),
        ))
        .await;
    assert_outcome(&result, "succeeded", None);
    assert!(started.elapsed() >= Duration::from_millis(200));
    let outputs = &result["outputs"];
    assert_eq!(outputs["label"], "x");
    assert!(
        outputs["at"].as_str().unwrap().ends_with("+00:00"),
        "{outputs}"
    );
    assert_eq!(outputs["nonce"].as_str().unwrap().len(), 16, "{outputs}");
}

/// Compiling the ~18 MB Python component takes many seconds; meanwhile the
/// executor keeps answering for the packs it already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiling_a_python_pack_does_not_stop_serving() {
    let (Some(python), Some(core)) = (built_pack(PACK), built_pack("jarvis.core.wasm")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&core, dir.path().join("jarvis.core.wasm")).unwrap();
    std::fs::copy(&python, dir.path().join(PACK)).unwrap();
    let mut config = jarvis_atomic_executor::config::Config::for_tests();
    config.packs_dir = Some(dir.path().to_path_buf());
    let server = jarvis_atomic_executor::RunningServer::spawn(&config)
        .await
        .unwrap();
    let registry = server.service.executor.registry().clone();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/atomic-node-runs:execute", server.url());

    let mut served_while_compiling = 0;
    let mut slowest = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut i = 0;
    while registry.pending() > 0 {
        assert!(Instant::now() < deadline, "packs still loading after 600 s");
        i += 1;
        let started = Instant::now();
        let body = request(
            &format!("nr-while-{i}"),
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "still here"}),
        );
        let result = execute(&client, &url, &body).await;
        if registry.pending() > 0 && result["state"] == "succeeded" {
            served_while_compiling += 1;
            slowest = slowest.max(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{served_while_compiling} echo calls served while the Python pack compiled; slowest {slowest:?}"
    );
    assert!(
        served_while_compiling >= 3,
        "only {served_while_compiling} calls served during the compile"
    );
    assert!(slowest < Duration::from_secs(1), "slowest call {slowest:?}");
}

/// The Python pack calls out through `wasi:http` (`ctx.fetch`): a server its
/// grant names answers it; a port it was not granted is refused by the host
/// before any connection, and the node fails with the host's code.
#[tokio::test]
async fn a_python_node_reaches_a_granted_server_and_is_refused_an_ungranted_one() {
    let Some(pack) = built_pack(PACK) else { return };
    let hits = Arc::new(AtomicUsize::new(0));
    let granted = upstream(hits.clone()).await;
    let other_hits = Arc::new(AtomicUsize::new(0));
    let other = upstream(other_hits.clone()).await;
    let grants = Grants::parse(
        &format!("[packs.\"jarvis.example.py\"]\nallow = [\"http://{granted}\"]\n"),
        &|_| None,
    )
    .unwrap();
    let t = serve(&[pack], |c| c.grants = Arc::new(grants)).await;

    let result = t
        .result(&request(
            "nr-py-fetch-1",
            "jarvis.example.py.fetch_text",
            VERSION,
            json!({"url": format!("http://{granted}/greeting?lang=py")}),
        ))
        .await;
    assert_outcome(&result, "succeeded", None);
    assert_eq!(
        result["outputs"],
        json!({"status": 200, "content_type": "text/plain; charset=utf-8", "text": "hello from upstream: /greeting?lang=py"})
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // Over the node's max_bytes: the body is refused, with our code.
    let result = t
        .result(&request(
            "nr-py-fetch-2",
            "jarvis.example.py.fetch_text",
            VERSION,
            json!({"url": format!("http://{granted}/greeting"), "max_bytes": 4}),
        ))
        .await;
    assert_outcome(&result, "failed", Some("http_response_too_large"));

    let result = t
        .result(&request(
            "nr-py-fetch-3",
            "jarvis.example.py.fetch_text",
            VERSION,
            json!({"url": format!("http://{other}/greeting")}),
        ))
        .await;
    assert_outcome(&result, "failed", Some("http_denied"));
    assert_eq!(
        other_hits.load(Ordering::SeqCst),
        0,
        "the host connected anyway"
    );
}

/// A server on 127.0.0.1:0 answering every path with its path and query.
async fn upstream(hits: Arc<AtomicUsize>) -> SocketAddr {
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; charset=utf-8",
                )],
                format!("hello from upstream: {uri}"),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}
