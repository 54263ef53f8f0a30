//! Outbound: client-credentials tokens from a real token endpoint, cached per audience.

use std::time::{Duration, Instant};

use jarvis_auth::{
    Authenticator, OutboundAuth, SettingsError, TargetService, TokenEndpoint, TokenError,
    TokenProvider,
};
use tokio::net::TcpListener;

use crate::support::{CLIENT_ID, CLIENT_SECRET, Idp, call, protected_app};

fn outbound(idp: &Idp, extra: &[(&str, &str)]) -> OutboundAuth {
    let mut vars = vec![
        ("ARP_AUTH_PROFILE".to_owned(), "enterprise".to_owned()),
        ("ARP_AUTH_ISSUER".to_owned(), idp.issuer()),
        ("ARP_AUTH_CLIENT_ID".to_owned(), CLIENT_ID.to_owned()),
        (
            "ARP_AUTH_CLIENT_SECRET".to_owned(),
            CLIENT_SECRET.to_owned(),
        ),
    ];
    vars.extend(extra.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())));
    OutboundAuth::from_vars(vars).unwrap()
}

#[tokio::test]
async fn token_is_fetched_once_and_reused_per_audience() {
    let idp = Idp::start(&["key-a"]).await;
    let outbound = outbound(&idp, &[("JARVIS_PDP_AUDIENCE", "custom-pdp")]);

    // Sixteen concurrent callers for one audience: one token request.
    let calls = (0..16).map(|_| outbound.authorization(TargetService::AtomicExecutor));
    let headers: Vec<_> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|h| h.unwrap().unwrap())
        .collect();
    assert!(headers.iter().all(|h| *h == headers[0]));
    assert!(headers[0].is_sensitive());
    for _ in 0..10 {
        let again = outbound
            .authorization(TargetService::AtomicExecutor)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again, headers[0]);
    }
    assert_eq!(idp.token_hits(), 1);

    // Another audience gets its own token.
    outbound
        .authorization(TargetService::Pdp)
        .await
        .unwrap()
        .unwrap();
    outbound
        .authorization(TargetService::NodeRegistry)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(idp.token_hits(), 3);
    let forms = idp.state.token_forms.lock().unwrap().clone();
    let audiences: Vec<_> = forms.iter().map(|f| f["audience"].as_str()).collect();
    assert_eq!(
        audiences,
        [
            "arp-jarvis-atomicexecutor",
            "custom-pdp",
            "arp-jarvis-noderegistry"
        ]
    );
    assert!(
        forms
            .iter()
            .all(|f| f["grant_type"] == "client_credentials")
    );
    // The token endpoint came from the issuer's discovery document, read once.
    assert_eq!(
        idp.state
            .discovery_hits
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn outbound_token_is_accepted_by_the_inbound_layer() {
    let idp = Idp::start(&["key-a"]).await;
    let outbound = outbound(&idp, &[]);
    let executor = Authenticator::new(idp.settings(&[])).unwrap();
    let base = protected_app(&executor).await;
    let header = outbound
        .authorization(TargetService::AtomicExecutor)
        .await
        .unwrap()
        .unwrap();
    call(&base, "/v1/whoami", Some(header.to_str().unwrap()))
        .await
        .assert_ok_as(&format!("service-account-{CLIENT_ID}"));
    // A token for another audience is not accepted by the executor.
    let pdp = outbound
        .authorization(TargetService::Pdp)
        .await
        .unwrap()
        .unwrap();
    call(&base, "/v1/whoami", Some(pdp.to_str().unwrap()))
        .await
        .assert_unauthorized("invalid_token", "Invalid token audience");
}

#[tokio::test]
async fn token_is_renewed_shortly_before_expiry() {
    let idp = Idp::start(&["key-a"]).await;
    idp.state
        .token_lifetime
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let outbound = outbound(&idp, &[]);
    let first = outbound
        .authorization(TargetService::RunStore)
        .await
        .unwrap()
        .unwrap();
    let again = outbound
        .authorization(TargetService::RunStore)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first == again, idp.token_hits()), (true, 1));
    // Renewed a fifth of the lifetime early (0.4 s before its 2 s expiry).
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let renewed = outbound
        .authorization(TargetService::RunStore)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(renewed, first);
    assert_eq!(idp.token_hits(), 2);
}

#[tokio::test]
async fn rejected_credentials_fail_every_waiting_caller_with_one_request() {
    let idp = Idp::start(&["key-a"]).await;
    let outbound = outbound(&idp, &[("ARP_AUTH_CLIENT_SECRET", "wrong")]);
    let calls = (0..8).map(|_| outbound.authorization(TargetService::AtomicExecutor));
    for result in futures_util::future::join_all(calls).await {
        match result.unwrap_err() {
            TokenError::Rejected { status, error, .. } => {
                assert_eq!((status, error.as_deref()), (401, Some("invalid_client")));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(idp.token_hits(), 1);
    let envelope = TokenError::Unreachable(String::new()).envelope(TargetService::NodeRegistry);
    let json = serde_json::to_value(envelope).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"error": {"code": "token_request_failed",
            "message": "Node Registry token request failed"}})
    );
}

#[tokio::test]
async fn token_endpoint_down_fails_promptly() {
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let provider = TokenProvider::new(
        CLIENT_ID,
        CLIENT_SECRET,
        TokenEndpoint::Known(format!("http://{dead}/token").parse().unwrap()),
        Duration::from_secs(2),
    )
    .unwrap();
    let started = Instant::now();
    let error = provider.authorization("aud").await.unwrap_err();
    assert!(matches!(error, TokenError::Unreachable(_)), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The next call tries again: a token endpoint that comes back is used at once.
    assert!(provider.authorization("aud").await.is_err());
    assert_eq!(provider.request_count(), 2);
}

#[test]
fn dev_insecure_needs_no_credentials_and_sends_no_header() {
    let outbound = OutboundAuth::from_vars([("ARP_AUTH_PROFILE", "dev-insecure")]).unwrap();
    assert!(!outbound.is_enabled());
    let header = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(outbound.authorization(TargetService::AtomicExecutor))
        .unwrap();
    assert!(header.is_none());
    assert_eq!(
        outbound.audience(TargetService::Selection),
        "arp-jarvis-selection"
    );
}

#[test]
fn required_outbound_auth_names_what_to_set() {
    let err = OutboundAuth::from_vars([("PATH", "/bin")]).unwrap_err();
    assert_eq!(err, SettingsError::MissingClientCredentials);
    assert!(err.to_string().contains("ARP_AUTH_CLIENT_SECRET"));
    let err = OutboundAuth::from_vars([
        ("ARP_AUTH_PROFILE", "enterprise"),
        ("ARP_AUTH_CLIENT_ID", "x"),
        ("ARP_AUTH_CLIENT_SECRET", "y"),
    ])
    .unwrap_err();
    assert_eq!(err, SettingsError::MissingTokenEndpoint);
}
