//! The HTTP surface: echo, request validation and error envelopes.

use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn echo_succeeds_through_the_builtin_component() {
    let t = start(config(), &[]).await;
    let result = t
        .result(&request(
            "nr-echo",
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "hi"}),
        ))
        .await;
    assert_outcome(&result, "succeeded", None);
    assert_eq!(result["outputs"], json!({"echo": "hi"}));
    assert_eq!(result["node_run_id"], "nr-echo");
    assert_eq!(
        t.invocations(),
        1,
        "echo must run as a component, not a native shortcut"
    );
}

/// The built-in echo's memory starts within one host page and grows as the
/// inputs need: small and large inputs, in turn, reuse the same sandbox slots.
#[tokio::test]
async fn echo_returns_small_and_large_inputs_whole() {
    let t = start(config(), &[]).await;
    for (i, len) in [3, 5_000, 300_000, 3, 70_000].into_iter().enumerate() {
        let echo: String = "é漢x".chars().cycle().take(len).collect();
        let result = t
            .result(&request(
                &format!("nr-echo-{i}"),
                "jarvis.core.echo",
                "0.3.8",
                json!({ "echo": echo }),
            ))
            .await;
        assert_outcome(&result, "succeeded", None);
        assert_eq!(result["outputs"]["echo"], echo, "echo of {len} chars");
    }
}

#[tokio::test]
async fn health_version_and_node_types() {
    let t = start(config(), &[]).await;
    let health: Value = t
        .client
        .get(t.url("/v1/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let version: Value = t
        .client
        .get(t.url("/v1/version"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(version["service_name"], "jarvis-atomic-executor");
    assert_eq!(version["supported_api_versions"], json!(["v1"]));
    let types: Value = t
        .client
        .get(t.url("/v1/node-types"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let echo = &types.as_array().unwrap()[0];
    assert_eq!(echo["node_type_id"], "jarvis.core.echo");
    assert_eq!(echo["kind"], "atomic");
    assert_eq!(echo["extensions"]["jarvis.side_effect"], "read");
}

#[tokio::test]
async fn unknown_node_fails_with_unknown_node_type() {
    let t = start(config(), &[]).await;
    let result = t
        .result(&request("nr-1", "no.such.node", "1.0.0", json!({})))
        .await;
    assert_outcome(&result, "failed", Some("unknown_node_type"));
}

#[tokio::test]
async fn invalid_inputs_fail_with_details() {
    let t = start(config(), &[]).await;
    for (i, inputs) in [
        json!({"echo": 5}),
        json!({}),
        json!({"echo": "x", "extra": 1}),
    ]
    .into_iter()
    .enumerate()
    {
        let result = t
            .result(&request(
                &format!("nr-{i}"),
                "jarvis.core.echo",
                "0.3.8",
                inputs,
            ))
            .await;
        assert_outcome(&result, "failed", Some("invalid_inputs"));
        assert!(
            !result["error"]["details"]["errors"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{result}"
        );
    }
    assert_eq!(
        t.invocations(),
        0,
        "invalid inputs must not reach the guest"
    );
}

#[tokio::test]
async fn malformed_requests_are_400_invalid_request() {
    let t = start(config(), &[]).await;
    let url = t.url("/v1/atomic-node-runs:execute");
    let cases: [(&str, &str); 6] = [
        ("{not json", "$"),
        ("{}", "$"),
        (
            r#"{"node_run_id":"a","run_id":"r","node_type_ref":{"node_type_id":"x"},"inputs":{}}"#,
            "node_type_ref",
        ),
        (
            r#"{"node_run_id":"a","run_id":"r","node_type_ref":{"node_type_id":"x","version":"1"},"inputs":[]}"#,
            "inputs",
        ),
        (
            r#"{"node_run_id":"a","run_id":"r","node_type_ref":{"node_type_id":"x","version":"1"},"inputs":{},"surprise":1}"#,
            "surprise",
        ),
        (
            r#"{"node_run_id":"a","run_id":"r","node_type_ref":{"node_type_id":"x","version":"1"},"inputs":{},"constraints":{"budgets":{"max_wall_time_ms":-1}}}"#,
            "constraints.budgets.max_wall_time_ms",
        ),
    ];
    for (body, path) in cases {
        let resp = t
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let envelope: Value = resp.json().await.unwrap();
        assert_eq!(envelope["error"]["code"], "invalid_request", "{body}");
        assert_eq!(
            envelope["error"]["details"]["errors"][0]["path"], path,
            "{body}: {envelope}"
        );
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_get_envelopes() {
    let t = start(config(), &[]).await;
    let resp = t.client.get(t.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );
    let resp = t
        .client
        .get(t.url("/v1/atomic-node-runs:execute"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "method_not_allowed"
    );
    let resp = t
        .client
        .post(t.url("/v1/atomic-node-runs/x:explode"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn cancel_of_unknown_or_finished_ids_is_204() {
    let t = start(config(), &[]).await;
    let (status, _) = t
        .post("/v1/atomic-node-runs/never-seen:cancel", &json!({}))
        .await;
    assert_eq!(status, 204);
    t.result(&request(
        "nr-done",
        "jarvis.core.echo",
        "0.3.8",
        json!({"echo": "x"}),
    ))
    .await;
    for _ in 0..2 {
        let (status, _) = t
            .post("/v1/atomic-node-runs/nr-done:cancel", &json!({}))
            .await;
        assert_eq!(status, 204);
    }
    // Canceling a finished run changes nothing: a retry still gets the result.
    let again = t
        .result(&request(
            "nr-done",
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "x"}),
        ))
        .await;
    assert_outcome(&again, "succeeded", None);
}

#[tokio::test]
async fn authentication_guards_execute_but_not_health() {
    // Required mode; the key set would come from a port nobody listens on, so
    // no token can be accepted — what matters here is the wiring.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = config();
    cfg.auth = jarvis_auth::AuthSettings::from_vars([
        ("ARP_AUTH_MODE", "required"),
        (
            "ARP_AUTH_JWKS_URI",
            format!("http://{closed}/jwks").as_str(),
        ),
    ])
    .unwrap();
    let t = start(cfg, &[]).await;
    let resp = t
        .client
        .post(t.url("/v1/atomic-node-runs:execute"))
        .json(&request(
            "nr-1",
            "jarvis.core.echo",
            "0.3.8",
            json!({"echo": "x"}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "unauthorized"
    );
    assert_eq!(t.invocations(), 0);
    let health = t.client.get(t.url("/v1/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}
