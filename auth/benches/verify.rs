//! Per-request cost of the auth layer: no layer vs `disabled` vs a verified RS256 token with
//! the JWKS already cached (the steady state of a running service).

use std::hint::black_box;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::header::AUTHORIZATION;
use axum::routing::get;
use criterion::{Criterion, criterion_group, criterion_main};
use jarvis_auth::{AuthSettings, Authenticator, Principal};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use serde_json::json;
use tower::ServiceExt;

const AUDIENCE: &str = "arp-jarvis-atomicexecutor";

async fn whoami(principal: Option<Principal>) -> String {
    principal.map(|p| p.sub().to_owned()).unwrap_or_default()
}

fn app(auth: Option<&Authenticator>) -> Router {
    let app = Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/health", get(|| async {}));
    match auth {
        Some(auth) => app.layer(auth.layer()),
        None => app,
    }
}

fn request(path: &str, authorization: Option<&str>) -> Request {
    let mut builder = Request::builder().uri(path);
    if let Some(value) = authorization {
        builder = builder.header(AUTHORIZATION, value);
    }
    builder.body(Body::empty()).unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // A JWKS endpoint on 127.0.0.1:0 publishing one freshly generated RSA-2048 key.
    let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let encoding = EncodingKey::from_rsa_der(private.to_pkcs1_der().unwrap().as_bytes());
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("k1".to_owned());
    let jwks = JwkSet { keys: vec![jwk] };
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let jwks = serde_json::to_string(&jwks).unwrap();
        let idp = Router::new().route("/certs", get(move || async move { jwks }));
        tokio::spawn(async move { axum::serve(listener, idp).await.unwrap() });
        addr
    });
    let issuer = format!("http://{addr}/realms/bench");

    let required_with = |token_cache: &str| {
        let auth = Authenticator::new(
            AuthSettings::from_vars([
                ("ARP_AUTH_PROFILE", "enterprise".to_owned()),
                ("ARP_AUTH_JWKS_URI", format!("http://{addr}/certs")),
                ("ARP_AUTH_ISSUER", issuer.clone()),
                ("ARP_AUTH_AUDIENCE", AUDIENCE.to_owned()),
                ("ARP_AUTH_TOKEN_CACHE_SIZE", token_cache.to_owned()),
            ])
            .unwrap(),
        )
        .unwrap();
        rt.block_on(auth.prefetch_keys()).unwrap();
        auth
    };
    // Every request pays the RS256 signature check (a token seen for the first time).
    let required = required_with("0");
    // The steady state with a caller that reuses its token (as OutboundAuth does).
    let required_cached = required_with("4096");
    let disabled = Authenticator::new(
        AuthSettings::from_vars([("ARP_AUTH_PROFILE", "dev-insecure")]).unwrap(),
    )
    .unwrap();

    let now = jsonwebtoken::get_current_timestamp();
    let claims =
        json!({"iss": issuer, "aud": AUDIENCE, "sub": "bench", "exp": now + 3600, "iat": now});
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("k1".to_owned());
    let bearer = format!(
        "Bearer {}",
        jsonwebtoken::encode(&header, &claims, &encoding).unwrap()
    );
    let token = bearer.trim_start_matches("Bearer ").to_owned();

    let mut group = c.benchmark_group("request");
    let cases: [(&str, Router, &str, Option<&str>); 6] = [
        ("no_auth_layer", app(None), "/v1/whoami", None),
        ("mode_disabled", app(Some(&disabled)), "/v1/whoami", None),
        (
            "required_exempt_path",
            app(Some(&required)),
            "/v1/health",
            None,
        ),
        (
            "required_missing_header_401",
            app(Some(&required)),
            "/v1/whoami",
            None,
        ),
        (
            "required_rs256_full_verify",
            app(Some(&required)),
            "/v1/whoami",
            Some(&bearer),
        ),
        (
            "required_rs256_reused_token",
            app(Some(&required_cached)),
            "/v1/whoami",
            Some(&bearer),
        ),
    ];
    for (name, router, path, authorization) in cases {
        // Sanity: every case answers what it should before it is timed.
        let status = rt
            .block_on(router.clone().oneshot(request(path, authorization)))
            .unwrap()
            .status();
        let expected = if name.ends_with("401") { 401 } else { 200 };
        assert_eq!(status.as_u16(), expected, "{name}");
        group.bench_function(name, |b| {
            b.iter(|| {
                let response = rt
                    .block_on(router.clone().oneshot(request(path, authorization)))
                    .unwrap();
                black_box(response.status())
            })
        });
    }
    group.finish();

    c.bench_function("verify_bearer_rs256_full", |b| {
        b.iter(|| {
            rt.block_on(required.verify_bearer(black_box(&token)))
                .unwrap()
        })
    });
    c.bench_function("verify_bearer_rs256_reused", |b| {
        b.iter(|| {
            rt.block_on(required_cached.verify_bearer(black_box(&token)))
                .unwrap()
        })
    });
    assert_eq!(
        required.jwks_fetch_count(),
        1,
        "keys stayed cached throughout"
    );
    assert_eq!(
        required_cached.jwks_fetch_count(),
        1,
        "keys stayed cached throughout"
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
