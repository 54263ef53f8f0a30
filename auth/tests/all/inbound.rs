//! Inbound: the auth layer in front of a real app, against a real IdP, over real HTTP.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::{Json, Router};
use jarvis_auth::{AuthMode, AuthSettings, Authenticator};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::net::TcpListener;

use crate::support::{Idp, call, call_bearer, keys, now, protected_app, raw_token, serve};

async fn setup() -> (Idp, String) {
    let idp = Idp::start(&["key-a"]).await;
    let auth = Authenticator::new(idp.settings(&[])).unwrap();
    let base = protected_app(&auth).await;
    (idp, base)
}

#[tokio::test]
async fn valid_token_passes_and_keys_are_cached() {
    let (idp, base) = setup().await;
    let token = keys()[0].sign(&idp.claims());
    for _ in 0..5 {
        call_bearer(&base, &token).await.assert_ok_as("user-42");
    }
    // Scheme is case-insensitive, as in the reference.
    call(&base, "/v1/whoami", Some(&format!("bearer {token}")))
        .await
        .assert_ok_as("user-42");
    assert_eq!(
        idp.state
            .discovery_hits
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(
        idp.jwks_hits(),
        1,
        "keys are fetched once and then served from the cache"
    );
}

#[tokio::test]
async fn missing_header_is_refused() {
    let (_idp, base) = setup().await;
    call(&base, "/v1/whoami", None)
        .await
        .assert_unauthorized("invalid_request", "Missing Authorization header");
}

#[tokio::test]
async fn wrong_scheme_or_shape_is_refused() {
    let (idp, base) = setup().await;
    let token = keys()[0].sign(&idp.claims());
    for header in [
        format!("Basic {token}"),
        format!("Token {token}"),
        "Bearer".to_owned(),
        format!("Bearer {token} extra"),
        token.clone(),
    ] {
        call(&base, "/v1/whoami", Some(&header))
            .await
            .assert_unauthorized("invalid_request", "Invalid Authorization header");
    }
    call_bearer(&base, "not-a-jwt")
        .await
        .assert_unauthorized("invalid_token", "Invalid token");
}

#[tokio::test]
async fn expiry_honours_the_clock_skew() {
    let (idp, base) = setup().await;
    let mut claims = idp.claims();
    claims["exp"] = json!(now() - 120);
    call_bearer(&base, &keys()[0].sign(&claims))
        .await
        .assert_unauthorized("invalid_token", "Token expired");
    // Expired 20 s ago is within the default 60 s skew.
    claims["exp"] = json!(now() - 20);
    call_bearer(&base, &keys()[0].sign(&claims))
        .await
        .assert_ok_as("user-42");
    // A token without `exp` is refused.
    claims.as_object_mut().unwrap().remove("exp");
    call_bearer(&base, &keys()[0].sign(&claims))
        .await
        .assert_unauthorized("invalid_token", "Invalid token");
}

#[tokio::test]
async fn not_yet_valid_is_refused() {
    let (idp, base) = setup().await;
    let mut claims = idp.claims();
    claims["nbf"] = json!(now() + 600);
    call_bearer(&base, &keys()[0].sign(&claims))
        .await
        .assert_unauthorized("invalid_token", "Token not yet valid");
    claims["nbf"] = json!(now() + 20);
    call_bearer(&base, &keys()[0].sign(&claims))
        .await
        .assert_ok_as("user-42");
}

#[tokio::test]
async fn wrong_or_missing_issuer_is_refused() {
    let (idp, base) = setup().await;
    let mut claims = idp.claims();
    claims["iss"] = json!("http://127.0.0.1:1/realms/other");
    call_bearer(&base, &keys()[0].sign(&claims))
        .await
        .assert_unauthorized("invalid_token", "Invalid token issuer");
    claims.as_object_mut().unwrap().remove("iss");
    call_bearer(&base, &keys()[0].sign(&claims))
        .await
        .assert_unauthorized("invalid_token", "Invalid token");
}

#[tokio::test]
async fn wrong_or_missing_audience_is_refused() {
    let (idp, base) = setup().await;
    let mut claims = idp.claims();
    claims["aud"] = json!("arp-jarvis-pdp");
    call_bearer(&base, &keys()[0].sign(&claims))
        .await
        .assert_unauthorized("invalid_token", "Invalid token audience");
    claims.as_object_mut().unwrap().remove("aud");
    call_bearer(&base, &keys()[0].sign(&claims))
        .await
        .assert_unauthorized("invalid_token", "Invalid token");
    claims["aud"] = json!(["account", crate::support::AUDIENCE]);
    call_bearer(&base, &keys()[0].sign(&claims))
        .await
        .assert_ok_as("user-42");
}

#[tokio::test]
async fn bad_signature_is_refused() {
    let (idp, base) = setup().await;
    // Signed by key-c while claiming key-a's kid.
    let forged = keys()[2].sign_as("key-a", &idp.claims());
    call_bearer(&base, &forged)
        .await
        .assert_unauthorized("invalid_token", "Invalid token");
    // A genuine token whose payload was swapped for another subject's.
    let genuine = keys()[0].sign(&idp.claims());
    let mut other = idp.claims();
    other["sub"] = json!("admin");
    let other = keys()[0].sign(&other);
    let parts: Vec<&str> = genuine.split('.').collect();
    let other_payload = other.split('.').nth(1).unwrap();
    let tampered = format!("{}.{}.{}", parts[0], other_payload, parts[2]);
    call_bearer(&base, &tampered)
        .await
        .assert_unauthorized("invalid_token", "Invalid token");
    call_bearer(&base, &genuine).await.assert_ok_as("user-42");
}

#[tokio::test]
async fn unknown_kid_refreshes_once_per_cooldown_and_follows_rotation() {
    let idp = Idp::start(&["key-a"]).await;
    // Long enough that the burst below fits inside it even on a loaded machine.
    let cooldown = [("ARP_AUTH_JWKS_REFRESH_COOLDOWN_SECONDS", "2")];
    let base = protected_app(&Authenticator::new(idp.settings(&cooldown)).unwrap()).await;
    call_bearer(&base, &keys()[0].sign(&idp.claims()))
        .await
        .assert_ok_as("user-42");
    assert_eq!(idp.jwks_hits(), 1);

    // The IdP rotates to key-b after the cooldown.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    idp.publish(&["key-a", "key-b"]);
    call_bearer(&base, &keys()[1].sign(&idp.claims()))
        .await
        .assert_ok_as("user-42");
    assert_eq!(idp.jwks_hits(), 2, "an unknown kid triggers one refresh");

    // A burst of tokens with a kid nobody publishes costs no fetch within the cooldown.
    let unknown = keys()[2].sign(&idp.claims());
    for _ in 0..5 {
        call_bearer(&base, &unknown)
            .await
            .assert_unauthorized("invalid_token", "Invalid token");
    }
    assert_eq!(idp.jwks_hits(), 2, "refreshes are rate-limited");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    call_bearer(&base, &unknown)
        .await
        .assert_unauthorized("invalid_token", "Invalid token");
    assert_eq!(
        idp.jwks_hits(),
        3,
        "after the cooldown an unknown kid may refresh again"
    );

    // Keys already known keep working without fetching.
    call_bearer(&base, &keys()[0].sign(&idp.claims()))
        .await
        .assert_ok_as("user-42");
    call_bearer(&base, &keys()[1].sign(&idp.claims()))
        .await
        .assert_ok_as("user-42");
    assert_eq!(idp.jwks_hits(), 3);
}

#[tokio::test]
async fn alg_none_is_refused() {
    let (idp, base) = setup().await;
    for alg in ["none", "None", "NONE"] {
        let token = raw_token(
            &json!({"alg": alg, "typ": "JWT", "kid": "key-a"}),
            &idp.claims(),
            b"",
        );
        call_bearer(&base, &token)
            .await
            .assert_unauthorized("invalid_token", "Invalid token");
        // Some libraries also accept a token ending in a bare dot.
        let bare = token.trim_end_matches('.').to_owned() + ".";
        call_bearer(&base, &bare)
            .await
            .assert_unauthorized("invalid_token", "Invalid token");
    }
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let (idp, base) = setup().await;
    let key = &keys()[0];
    // The classic key-confusion attack: HMAC keyed with the public key the JWKS publishes.
    for secret in [key.public_pem.as_bytes(), key.public_pem.trim().as_bytes()] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("key-a".to_owned());
        let token = jsonwebtoken::encode(&header, &idp.claims(), &EncodingKey::from_secret(secret))
            .unwrap();
        call_bearer(&base, &token)
            .await
            .assert_unauthorized("invalid_token", "Invalid token");
    }
    // And HMAC cannot be switched on: settings refuse it.
    let err = AuthSettings::from_vars([
        ("ARP_AUTH_JWKS_URI", idp.jwks_uri().as_str()),
        ("ARP_AUTH_ALGORITHMS", "RS256,HS256"),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("HMAC"), "{err}");
}

#[tokio::test]
async fn jwks_endpoint_refusing_connections_answers_401_promptly() {
    let idp = Idp::start(&["key-a"]).await;
    // A port that was just closed: connection refused.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut settings = idp.settings(&[]);
    settings.jwks_uri = Some(format!("http://{dead}/certs"));
    let auth = Authenticator::new(settings).unwrap();
    let base = protected_app(&auth).await;
    let token = keys()[0].sign(&idp.claims());
    let started = Instant::now();
    call_bearer(&base, &token)
        .await
        .assert_unauthorized("invalid_token", "Unable to fetch JWKS");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn jwks_endpoint_that_hangs_costs_one_bounded_wait() {
    let idp = Idp::start(&["key-a"]).await;
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket);
        }
    });
    let mut settings = idp.settings(&[("ARP_AUTH_JWKS_TIMEOUT_SECONDS", "0.3")]);
    settings.jwks_uri = Some(format!("http://{hung}/certs"));
    settings.jwks_refresh_cooldown = Duration::from_secs(30);
    let auth = Authenticator::new(settings).unwrap();
    let base = protected_app(&auth).await;
    let token = keys()[0].sign(&idp.claims());

    let started = Instant::now();
    call_bearer(&base, &token)
        .await
        .assert_unauthorized("invalid_token", "Unable to fetch JWKS");
    let first = started.elapsed();
    assert!(
        first >= Duration::from_millis(250) && first < Duration::from_secs(3),
        "{first:?}"
    );

    // Within the cooldown a dead IdP costs nothing: ten concurrent requests, no new fetch
    // (each would be another connection to the hung port and another 0.3 s wait).
    let calls = (0..10).map(|_| call_bearer(&base, &token));
    for reply in futures_util::future::join_all(calls).await {
        reply.assert_unauthorized("invalid_token", "Unable to fetch JWKS");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(auth.jwks_fetch_count(), 1);
}

#[tokio::test]
async fn exempt_paths_are_open_and_others_are_not() {
    let (_idp, base) = setup().await;
    let health = call(&base, "/v1/health", None).await;
    assert_eq!((health.status, health.body.as_str()), (200, "healthy"));
    let version = call(&base, "/v1/version", Some("Basic garbage")).await;
    assert_eq!(version.status, 200);
    call(&base, "/v1/whoami", None)
        .await
        .assert_unauthorized("invalid_request", "Missing Authorization header");
}

#[tokio::test]
async fn custom_exempt_paths_replace_the_defaults() {
    let idp = Idp::start(&["key-a"]).await;
    let auth =
        Authenticator::new(idp.settings(&[("ARP_AUTH_EXEMPT_PATHS", "/v1/whoami")])).unwrap();
    let base = protected_app(&auth).await;
    // Exempt routes run without a principal; the extractor then reports a wiring error.
    assert_eq!(call(&base, "/v1/whoami", None).await.status, 500);
    call(&base, "/v1/health", None)
        .await
        .assert_unauthorized("invalid_request", "Missing Authorization header");
}

#[tokio::test]
async fn disabled_mode_lets_everyone_in_as_the_dev_subject() {
    let auth = Authenticator::new(
        AuthSettings::from_vars([("ARP_AUTH_PROFILE", "dev-insecure")]).unwrap(),
    )
    .unwrap();
    assert_eq!(auth.settings().mode, AuthMode::Disabled);
    let base = protected_app(&auth).await;
    call(&base, "/v1/whoami", None).await.assert_ok_as("dev");
    call(&base, "/v1/whoami", Some("Bearer whatever"))
        .await
        .assert_ok_as("dev");
}

#[tokio::test]
async fn optional_mode_admits_anonymous_but_not_bad_tokens() {
    let idp = Idp::start(&["key-a"]).await;
    let auth = Authenticator::new(idp.settings(&[("ARP_AUTH_MODE", "optional")])).unwrap();
    let base = protected_app(&auth).await;
    call(&base, "/v1/whoami", None)
        .await
        .assert_ok_as("anonymous");
    call_bearer(&base, &keys()[0].sign(&idp.claims()))
        .await
        .assert_ok_as("user-42");
    call_bearer(&base, "garbage")
        .await
        .assert_unauthorized("invalid_token", "Invalid token");
}

#[tokio::test]
async fn explicit_jwks_uri_skips_discovery() {
    let idp = Idp::start(&["key-a"]).await;
    let auth = Authenticator::new(idp.settings(&[("ARP_AUTH_JWKS_URI", &idp.jwks_uri())])).unwrap();
    auth.prefetch_keys().await.unwrap();
    let base = protected_app(&auth).await;
    call_bearer(&base, &keys()[0].sign(&idp.claims()))
        .await
        .assert_ok_as("user-42");
    assert_eq!(
        idp.state
            .discovery_hits
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(idp.jwks_hits(), 1);
}

#[tokio::test]
async fn starting_against_a_dead_idp_is_not_fatal() {
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let settings = AuthSettings::from_vars([
        ("ARP_AUTH_ISSUER", format!("http://{dead}/realms/x")),
        ("ARP_AUTH_AUDIENCE", "svc".to_owned()),
    ])
    .unwrap();
    let auth = Authenticator::new(settings).unwrap();
    let error = auth.prefetch_keys().await.unwrap_err();
    assert_eq!(error.client_message(), "Unable to fetch JWKS");
}

#[tokio::test]
async fn a_cached_token_still_expires() {
    let idp = Idp::start(&["key-a"]).await;
    let auth = Authenticator::new(idp.settings(&[("ARP_AUTH_CLOCK_SKEW_SECONDS", "0")])).unwrap();
    let base = protected_app(&auth).await;
    let key = &keys()[0];
    let mut claims = idp.claims();
    let exp = now() + 3;
    claims["exp"] = json!(exp);
    let token = key.sign(&claims);
    call_bearer(&base, &token).await.assert_ok_as("user-42");
    call_bearer(&base, &token).await.assert_ok_as("user-42");
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    call_bearer(&base, &token)
        .await
        .assert_unauthorized("invalid_token", "Token expired");
}

#[tokio::test]
async fn a_cached_token_dies_with_its_key() {
    let (idp, base) = setup().await;
    let token_a = keys()[0].sign(&idp.claims());
    call_bearer(&base, &token_a).await.assert_ok_as("user-42");
    // The IdP retires key-a; a token with a new kid makes the service reload the set.
    tokio::time::sleep(Duration::from_millis(600)).await;
    idp.publish(&["key-b"]);
    call_bearer(&base, &keys()[1].sign(&idp.claims()))
        .await
        .assert_ok_as("user-42");
    assert_eq!(idp.jwks_hits(), 2);
    call_bearer(&base, &token_a)
        .await
        .assert_unauthorized("invalid_token", "Invalid token");
}

#[tokio::test]
async fn an_unknown_kid_waits_at_most_a_second_on_a_hung_jwks_and_known_keys_not_at_all() {
    let idp = Idp::start(&["key-a"]).await;
    // Serves key-a until told to hang, then accepts requests and never answers them.
    let hang = Arc::new(AtomicBool::new(false));
    let flag = hang.clone();
    let jwk = keys()[0].jwk.clone();
    let certs = get(move || {
        let (flag, jwk) = (flag.clone(), jwk.clone());
        async move {
            if flag.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            Json(JwkSet { keys: vec![jwk] })
        }
    });
    let addr = serve(Router::new().route("/certs", certs)).await;
    // The default 5 s fetch timeout; the test IdP's 0.5 s cooldown.
    let mut settings = idp.settings(&[]);
    settings.jwks_uri = Some(format!("http://{addr}/certs"));
    let auth = Authenticator::new(settings).unwrap();
    let base = protected_app(&auth).await;
    // Distinct tokens, so none is answered from the verified-token cache.
    let signed_with_key_a = |n: u32| {
        let mut claims = idp.claims();
        claims["jti"] = json!(n);
        keys()[0].sign(&claims)
    };
    call_bearer(&base, &signed_with_key_a(0))
        .await
        .assert_ok_as("user-42");

    hang.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let unknown = keys()[2].sign(&idp.claims());
    let started = Instant::now();
    call_bearer(&base, &unknown)
        .await
        .assert_unauthorized("invalid_token", "Unable to fetch JWKS");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(2),
        "{waited:?}"
    );

    // The fetch still hangs (for up to 5 s): a known key does not wait on it.
    let started = Instant::now();
    call_bearer(&base, &signed_with_key_a(1))
        .await
        .assert_ok_as("user-42");
    let known = started.elapsed();
    assert!(known < Duration::from_millis(500), "{known:?}");
    // Another unknown kid joins the fetch in flight instead of starting one.
    call_bearer(&base, &unknown)
        .await
        .assert_unauthorized("invalid_token", "Unable to fetch JWKS");
    assert_eq!(auth.jwks_fetch_count(), 2);
}
