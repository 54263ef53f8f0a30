//! `jarvis.web.fetch` of the built jarvis.core pack against real HTTP
//! servers on 127.0.0.1:0: the reference's behaviour (arp-jarvis-atomic-nodes
//! 0.3.8 `http_nodes.py`) for valid calls and each validation error, and the
//! host's checks of every outbound request (grants, blocklist, addresses,
//! redirects, caps, budget, deadline).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use jarvis_atomic_executor::grants::{Grants, HttpEnv};
use serde_json::{Value, json};

use crate::support::*;

const VERSION: &str = "0.3.8";

/// A local HTTP server that counts the requests it receives.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start() -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .fallback(any(upstream))
            .with_state(hits.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, hits }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port())
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// `/hello`: a fixed body with a repeated header; `/echo`: what it received,
/// as JSON; `/redirect?to=URL&status=N`; `/big?n=N`: N bytes; `/slow?ms=N`:
/// the head after N ms.
async fn upstream(
    State(hits): State<Arc<AtomicUsize>>,
    method: Method,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    match uri.path() {
        "/hello" => {
            let mut response = (
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "hello, pack",
            )
                .into_response();
            for value in ["one", "two"] {
                response
                    .headers_mut()
                    .append("x-multi", header::HeaderValue::from_static(value));
            }
            response
        }
        "/echo" => {
            let headers: BTreeMap<String, String> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            axum::Json(json!({
                "method": method.as_str(),
                "query": uri.query(),
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            }))
            .into_response()
        }
        "/redirect" => {
            let status = query.get("status").map_or(302, |s| s.parse().unwrap());
            let to = query.get("to").cloned().unwrap_or_default();
            (
                StatusCode::from_u16(status).unwrap(),
                [(header::LOCATION, to)],
            )
                .into_response()
        }
        "/big" => {
            let n: usize = query["n"].parse().unwrap();
            vec![b'x'; n].into_response()
        }
        "/slow" => {
            let ms: u64 = query["ms"].parse().unwrap();
            tokio::time::sleep(Duration::from_millis(ms)).await;
            "late".into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The executor serving the core pack with a grants file and the
/// `JARVIS_ATOMIC_HTTP_*` values.
async fn core_with(grants: &str, env: HttpEnv) -> Option<TestServer> {
    let pack = built_pack("jarvis.core.wasm")?;
    let grants = Grants::parse(grants, &|_| None)
        .unwrap()
        .with_http_env(&env)
        .unwrap();
    Some(serve(&[pack], |c| c.grants = Arc::new(grants)).await)
}

fn allowing(hosts: &str) -> HttpEnv {
    HttpEnv {
        allowed_hosts: Some(hosts.to_owned()),
        ..HttpEnv::default()
    }
}

/// The node's inputs: every property the schema requires, `null` unless set.
fn fetch(url: &str, set: Value) -> Value {
    let mut inputs = json!({
        "url": url, "method": null, "headers": null, "params": null, "json": null,
        "body": null, "timeout_seconds": null, "max_bytes": null, "follow_redirects": null,
    });
    for (k, v) in set.as_object().unwrap() {
        inputs[k] = v.clone();
    }
    inputs
}

impl TestServer {
    async fn fetch(&self, id: &str, inputs: Value) -> Value {
        self.result(&request(id, "jarvis.web.fetch", VERSION, inputs))
            .await
    }
}

fn body_of(result: &Value) -> Vec<u8> {
    let text = result["outputs"]["content_base64"].as_str().unwrap();
    // The reference's standard base64 with padding; decoded by hand to keep
    // the test's dependencies small.
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for byte in text.bytes().filter(|b| *b != b'=') {
        let v = alphabet.iter().position(|a| *a == byte).unwrap() as u32;
        bits = bits << 6 | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out
}

fn echoed(result: &Value) -> Value {
    assert_outcome(result, "succeeded", None);
    serde_json::from_slice(&body_of(result)).unwrap()
}

#[tokio::test]
async fn a_granted_destination_answers_with_status_sorted_headers_body_and_final_url() {
    let up = Upstream::start().await;
    let env = allowing(&format!("127.0.0.1:{}", up.port()));
    let Some(t) = core_with("", env).await else {
        return;
    };
    let result = t
        .fetch("nr-fetch-ok", fetch(&up.url("/hello"), json!({})))
        .await;
    assert_outcome(&result, "succeeded", None);
    let out = &result["outputs"];
    assert_eq!(out["status_code"], 200, "{result}");
    assert_eq!(out["final_url"], up.url("/hello"));
    assert_eq!(out["content_type"], "text/plain; charset=utf-8");
    assert_eq!(out["content_bytes"], 11);
    assert_eq!(body_of(&result), b"hello, pack");
    let headers = out["headers"].as_array().unwrap();
    let keys: Vec<&str> = headers.iter().map(|h| h["key"].as_str().unwrap()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "headers are sorted by name");
    assert!(
        headers.contains(&json!({"key": "x-multi", "value": "one, two"})),
        "{result}"
    );
    assert!(
        headers.contains(&json!({"key": "content-length", "value": "11"})),
        "{result}"
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_post_sends_params_headers_and_compact_json_and_a_body_wins_over_json() {
    let up = Upstream::start().await;
    let env = allowing(&format!("127.0.0.1:{}", up.port()));
    let Some(t) = core_with("", env).await else {
        return;
    };
    let inputs = fetch(
        &up.url("/echo?a=1"),
        json!({
            "method": "post",
            "headers": [{"key": "X-Token", "value": "t1"}, {"key": "X-Token", "value": "t2"}],
            "params": [{"key": "q", "value": "a b&c"}],
            "json": "{\"z\": 1, \"a\": [true, null]}",
        }),
    );
    let result = t.fetch("nr-fetch-post", inputs).await;
    let seen = echoed(&result);
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["query"], "a=1&q=a+b%26c");
    assert_eq!(seen["body"], "{\"z\":1,\"a\":[true,null]}");
    assert_eq!(seen["headers"]["content-type"], "application/json");
    assert_eq!(
        seen["headers"]["x-token"], "t2",
        "a later key replaces an earlier one"
    );
    assert_eq!(
        result["outputs"]["final_url"],
        up.url("/echo?a=1&q=a+b%26c")
    );

    let inputs = fetch(
        &up.url("/echo"),
        json!({"method": "PUT", "json": "{\"ignored\": true}", "body": "raw text"}),
    );
    let seen = echoed(&t.fetch("nr-fetch-put", inputs).await);
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["body"], "raw text");
    assert!(seen["headers"].get("content-type").is_none(), "{seen}");
}

/// Each validation error of the reference, with its message, before any
/// request is made; inputs the schema refuses never reach the node.
#[tokio::test]
async fn each_validation_error_is_the_references_handler_error() {
    let up = Upstream::start().await;
    let env = HttpEnv {
        allowed_hosts: Some(format!("127.0.0.1:{},blocked.example", up.port())),
        blocked_hosts: Some("blocked.example".into()),
        ..HttpEnv::default()
    };
    let Some(t) = core_with("", env).await else {
        return;
    };
    let ok = up.url("/hello");
    let cases = [
        (
            fetch("ftp://127.0.0.1/x", json!({})),
            "url scheme must be http or https",
        ),
        (
            fetch("127.0.0.1/x", json!({})),
            "url scheme must be http or https",
        ),
        (fetch("http:///x", json!({})), "url must include a hostname"),
        (fetch("http://example.com/", json!({})), "host not allowed"),
        (fetch("http://blocked.example/", json!({})), "host blocked"),
        (
            fetch(&ok, json!({"method": "TRACE"})),
            "method TRACE not allowed",
        ),
        (
            fetch(&ok, json!({"method": "fetch"})),
            "method FETCH not allowed",
        ),
        (
            fetch(&ok, json!({"json": "{nope"})),
            "json must be valid JSON",
        ),
        (
            fetch(&ok, json!({"max_bytes": 1.0})),
            "max_bytes must be an integer",
        ),
    ];
    for (i, (inputs, message)) in cases.into_iter().enumerate() {
        let result = t
            .fetch(&format!("nr-fetch-invalid-{i}"), inputs.clone())
            .await;
        assert_outcome(&result, "failed", Some("handler_error"));
        assert_eq!(result["error"]["message"], message, "{inputs}");
    }
    for (i, inputs) in [
        json!({"url": ok}),
        fetch(&ok, json!({"method": 5})),
        fetch(&ok, json!({"headers": [{"key": "a"}]})),
        fetch(&ok, json!({"max_bytes": "1"})),
        fetch(&ok, json!({"extra": 1})),
    ]
    .into_iter()
    .enumerate()
    {
        let result = t.fetch(&format!("nr-fetch-schema-{i}"), inputs).await;
        assert_outcome(&result, "failed", Some("invalid_inputs"));
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn a_host_neither_granted_nor_allowed_is_denied_by_the_host() {
    let up = Upstream::start().await;
    let other = Upstream::start().await;
    let grants = format!(
        "[packs.\"jarvis.core\"]\nallow = [\"http://127.0.0.1:{}\"]\n",
        up.port()
    );
    let Some(t) = core_with(&grants, HttpEnv::default()).await else {
        return;
    };
    let result = t
        .fetch("nr-fetch-ungranted", fetch(&other.url("/hello"), json!({})))
        .await;
    assert_outcome(&result, "failed", Some("http_denied"));
    assert_eq!(other.hits(), 0);

    // Without any grant or allowed host nothing is reachable.
    let Some(t) = core_with("", HttpEnv::default()).await else {
        return;
    };
    let result = t
        .fetch("nr-fetch-nothing", fetch(&up.url("/hello"), json!({})))
        .await;
    assert_outcome(&result, "failed", Some("http_denied"));
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn the_blocklist_wins_over_the_allowlist_and_the_grants_even_at_a_redirect_hop() {
    let up = Upstream::start().await;
    let target = Upstream::start().await;
    let env = HttpEnv {
        allowed_hosts: Some(format!("127.0.0.1:{}", up.port())),
        blocked_hosts: Some(format!("127.0.0.1:{}", target.port())),
        ..HttpEnv::default()
    };
    let grants = format!(
        "[packs.\"jarvis.core\"]\nallow = [\"http://127.0.0.1:{}\"]\n",
        target.port()
    );
    let Some(t) = core_with(&grants, env).await else {
        return;
    };
    let result = t
        .fetch("nr-fetch-blocked", fetch(&target.url("/hello"), json!({})))
        .await;
    assert_outcome(&result, "failed", Some("handler_error"));
    assert_eq!(result["error"]["message"], "host not allowed");

    let hop = up.url(&format!("/redirect?to={}", target.url("/hello")));
    let result = t
        .fetch(
            "nr-fetch-blocked-hop",
            fetch(&hop, json!({"follow_redirects": true})),
        )
        .await;
    assert_outcome(&result, "failed", Some("http_denied"));
    assert_eq!(up.hits(), 1);
    assert_eq!(target.hits(), 0, "the blocked server saw no request");
}

#[tokio::test]
async fn a_redirect_to_an_ungranted_or_private_destination_is_refused_at_the_hop() {
    let up = Upstream::start().await;
    let target = Upstream::start().await;
    // The target's port is granted by wildcard only: public addresses only.
    let grants = format!(
        "[packs.\"jarvis.core\"]\nallow = [\"http://127.0.0.1:{}\", \"http://*:{}\"]\n",
        up.port(),
        target.port()
    );
    let Some(t) = core_with(&grants, HttpEnv::default()).await else {
        return;
    };

    let private = up.url(&format!("/redirect?to={}", target.url("/hello")));
    let result = t
        .fetch(
            "nr-fetch-hop-private",
            fetch(&private, json!({"follow_redirects": true})),
        )
        .await;
    assert_outcome(&result, "failed", Some("http_address_not_public"));

    let ungranted = up.url("/redirect?to=http://127.0.0.1:9/hello&status=307");
    let result = t
        .fetch(
            "nr-fetch-hop-ungranted",
            fetch(&ungranted, json!({"follow_redirects": true})),
        )
        .await;
    assert_outcome(&result, "failed", Some("http_denied"));
    assert_eq!(target.hits(), 0, "the redirect target saw no request");

    // Not following, the redirect itself is the answer.
    let result = t
        .fetch("nr-fetch-hop-kept", fetch(&private, json!({})))
        .await;
    assert_outcome(&result, "succeeded", None);
    assert_eq!(result["outputs"]["status_code"], 302);
    assert_eq!(result["outputs"]["final_url"], private);
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn loopback_or_a_name_resolving_to_it_is_refused_unless_the_grant_names_the_host() {
    let up = Upstream::start().await;
    let grants = format!(
        "[packs.\"jarvis.core\"]\nallow = [\"http://*:{}\"]\n",
        up.port()
    );
    let Some(t) = core_with(&grants, HttpEnv::default()).await else {
        return;
    };
    for (i, url) in [
        up.url("/hello"),
        format!("http://localhost:{}/hello", up.port()),
        format!("http://[::ffff:127.0.0.1]:{}/hello", up.port()),
        format!("http://0x7f.1:{}/hello", up.port()),
    ]
    .iter()
    .enumerate()
    {
        let result = t
            .fetch(&format!("nr-fetch-loop-{i}"), fetch(url, json!({})))
            .await;
        assert_outcome(&result, "failed", Some("http_address_not_public"));
    }
    assert_eq!(up.hits(), 0);

    let grants = format!(
        "[packs.\"jarvis.core\"]\nallow = [\"http://localhost:{}\"]\n",
        up.port()
    );
    let Some(t) = core_with(&grants, HttpEnv::default()).await else {
        return;
    };
    let url = format!("http://localhost:{}/hello", up.port());
    let result = t.fetch("nr-fetch-named", fetch(&url, json!({}))).await;
    assert_outcome(&result, "succeeded", None);
}

#[tokio::test]
async fn a_body_over_the_grants_cap_or_over_max_bytes_fails() {
    let up = Upstream::start().await;
    let grants = format!(
        "[packs.\"jarvis.core\"]\nallow = [\"http://127.0.0.1:{}\"]\nmax_response_bytes = 1000\n",
        up.port()
    );
    let Some(t) = core_with(&grants, HttpEnv::default()).await else {
        return;
    };
    let result = t
        .fetch("nr-fetch-cap", fetch(&up.url("/big?n=200000"), json!({})))
        .await;
    assert_outcome(&result, "failed", Some("http_response_too_large"));

    let inputs = fetch(&up.url("/big?n=500"), json!({"max_bytes": 100}));
    let result = t.fetch("nr-fetch-max-bytes", inputs).await;
    assert_outcome(&result, "failed", Some("handler_error"));
    assert_eq!(result["error"]["message"], "response too large");

    let inputs = fetch(&up.url("/big?n=100"), json!({"max_bytes": 100}));
    let result = t.fetch("nr-fetch-at-max-bytes", inputs).await;
    assert_outcome(&result, "succeeded", None);
    assert_eq!(result["outputs"]["content_bytes"], 100);
}

#[tokio::test]
async fn a_slow_server_is_answered_at_the_executions_deadline() {
    let up = Upstream::start().await;
    let Some(t) = core_with("", allowing(&format!("127.0.0.1:{}", up.port()))).await else {
        return;
    };
    let mut body = request(
        "nr-fetch-slow",
        "jarvis.web.fetch",
        VERSION,
        fetch(&up.url("/slow?ms=5000"), json!({"timeout_seconds": 30})),
    );
    body["constraints"] = json!({"budgets": {"max_wall_time_ms": 1000}});
    let started = Instant::now();
    let result = t.result(&body).await;
    let took = started.elapsed();
    assert_outcome(&result, "failed", Some("timeout"));
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(1400),
        "answered after {took:?}, not at the 1 s deadline"
    );
}

#[tokio::test]
async fn the_call_past_max_external_calls_fails() {
    let up = Upstream::start().await;
    let Some(t) = core_with("", allowing(&format!("127.0.0.1:{}", up.port()))).await else {
        return;
    };
    let hop = up.url(&format!("/redirect?to={}", up.url("/hello")));
    let mut body = request(
        "nr-fetch-budget",
        "jarvis.web.fetch",
        VERSION,
        fetch(&hop, json!({"follow_redirects": true})),
    );
    body["constraints"] = json!({"budgets": {"max_external_calls": 1}});
    let result = t.result(&body).await;
    assert_outcome(&result, "failed", Some("http_call_budget_exceeded"));
    assert_eq!(up.hits(), 1);

    body["node_run_id"] = json!("nr-fetch-budget-2");
    body["constraints"] = json!({"budgets": {"max_external_calls": 2}});
    let result = t.result(&body).await;
    assert_outcome(&result, "succeeded", None);
    assert_eq!(result["outputs"]["final_url"], up.url("/hello"));
}
