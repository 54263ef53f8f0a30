//! A real identity provider on 127.0.0.1:0 (discovery, JWKS, token endpoint) with RSA keys
//! generated in the test, and a tiny protected app served over real HTTP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jarvis_auth::{AuthSettings, Authenticator, Principal};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub(crate) const AUDIENCE: &str = "arp-jarvis-atomicexecutor";
pub(crate) const CLIENT_ID: &str = "arp-jarvis-runcoordinator";
pub(crate) const CLIENT_SECRET: &str = "s3cret";

/// An RSA signing key with its `kid`.
pub(crate) struct TestKey {
    pub(crate) kid: &'static str,
    pub(crate) encoding: EncodingKey,
    pub(crate) jwk: Jwk,
    pub(crate) public_pem: String,
}

impl TestKey {
    fn generate(kid: &'static str) -> Self {
        let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let der = private.to_pkcs1_der().unwrap();
        let encoding = EncodingKey::from_rsa_der(der.as_bytes());
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        let public_pem = private
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        Self {
            kid,
            encoding,
            jwk,
            public_pem,
        }
    }

    /// A compact RS256 JWS over `claims`.
    pub(crate) fn sign(&self, claims: &Value) -> String {
        self.sign_as(self.kid, claims)
    }

    /// Signed with this key but claiming to be `kid`.
    pub(crate) fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

/// Keys are generated once per test binary: RSA key generation is the slow part.
pub(crate) fn keys() -> &'static [TestKey; 3] {
    static KEYS: OnceLock<[TestKey; 3]> = OnceLock::new();
    KEYS.get_or_init(|| {
        [
            TestKey::generate("key-a"),
            TestKey::generate("key-b"),
            TestKey::generate("key-c"),
        ]
    })
}

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `alg` + raw JSON header and claims, base64url-joined with `signature` (for hand-made tokens).
pub(crate) fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    format!(
        "{}.{}.{}",
        part(header),
        part(claims),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// The identity provider; `issuer()` is a Keycloak-style realm URL under it.
pub(crate) struct Idp {
    pub(crate) state: Arc<IdpState>,
}

pub(crate) struct IdpState {
    issuer: OnceLock<String>,
    /// The key ids the JWKS currently publishes.
    pub(crate) published: Mutex<Vec<&'static str>>,
    pub(crate) jwks_hits: AtomicU64,
    pub(crate) token_hits: AtomicU64,
    pub(crate) discovery_hits: AtomicU64,
    pub(crate) token_lifetime: AtomicU64,
    pub(crate) token_forms: Mutex<Vec<HashMap<String, String>>>,
}

impl Idp {
    pub(crate) async fn start(published: &[&'static str]) -> Self {
        let state = Arc::new(IdpState {
            issuer: OnceLock::new(),
            published: Mutex::new(published.to_vec()),
            jwks_hits: AtomicU64::new(0),
            token_hits: AtomicU64::new(0),
            discovery_hits: AtomicU64::new(0),
            token_lifetime: AtomicU64::new(300),
            token_forms: Mutex::new(Vec::new()),
        });
        let realm = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/protocol/openid-connect/certs", get(jwks))
            .route("/protocol/openid-connect/token", post(token))
            .with_state(state.clone());
        let app = Router::new().nest("/realms/test", realm);
        let addr = serve(app).await;
        state
            .issuer
            .set(format!("http://{addr}/realms/test"))
            .unwrap();
        Self { state }
    }

    pub(crate) fn issuer(&self) -> String {
        self.state.issuer.get().unwrap().clone()
    }

    pub(crate) fn jwks_uri(&self) -> String {
        format!("{}/protocol/openid-connect/certs", self.issuer())
    }

    pub(crate) fn publish(&self, kids: &[&'static str]) {
        *self.state.published.lock().unwrap() = kids.to_vec();
    }

    pub(crate) fn jwks_hits(&self) -> u64 {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }

    pub(crate) fn token_hits(&self) -> u64 {
        self.state.token_hits.load(Ordering::SeqCst)
    }

    /// Claims that pass every check of [`Idp::settings`].
    pub(crate) fn claims(&self) -> Value {
        json!({
            "iss": self.issuer(),
            "aud": AUDIENCE,
            "sub": "user-42",
            "exp": now() + 300,
            "iat": now(),
        })
    }

    /// Required mode, issuer discovery, audience set; short cooldown so tests stay quick.
    pub(crate) fn settings(&self, extra: &[(&str, &str)]) -> AuthSettings {
        let mut vars = vec![
            ("ARP_AUTH_PROFILE".to_owned(), "enterprise".to_owned()),
            ("ARP_AUTH_ISSUER".to_owned(), self.issuer()),
            ("ARP_AUTH_AUDIENCE".to_owned(), AUDIENCE.to_owned()),
            (
                "ARP_AUTH_JWKS_REFRESH_COOLDOWN_SECONDS".to_owned(),
                "0.5".to_owned(),
            ),
        ];
        vars.extend(extra.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())));
        AuthSettings::from_vars(vars).unwrap()
    }
}

async fn discovery(State(state): State<Arc<IdpState>>) -> Json<Value> {
    state.discovery_hits.fetch_add(1, Ordering::SeqCst);
    let issuer = state.issuer.get().unwrap();
    Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/protocol/openid-connect/certs"),
        "token_endpoint": format!("{issuer}/protocol/openid-connect/token"),
    }))
}

async fn jwks(State(state): State<Arc<IdpState>>) -> Json<JwkSet> {
    state.jwks_hits.fetch_add(1, Ordering::SeqCst);
    let published = state.published.lock().unwrap().clone();
    let keys = keys()
        .iter()
        .filter(|k| published.contains(&k.kid))
        .map(|k| k.jwk.clone())
        .collect();
    Json(JwkSet { keys })
}

/// Client credentials: mints a real RS256 token for the requested audience with key-a.
async fn token(
    State(state): State<Arc<IdpState>>,
    Form(form): Form<HashMap<String, String>>,
) -> axum::response::Response {
    let n = state.token_hits.fetch_add(1, Ordering::SeqCst) + 1;
    state.token_forms.lock().unwrap().push(form.clone());
    let field = |k: &str| form.get(k).map(String::as_str);
    if field("grant_type") != Some("client_credentials")
        || field("client_id") != Some(CLIENT_ID)
        || field("client_secret") != Some(CLIENT_SECRET)
    {
        let body = json!({"error": "invalid_client", "error_description": "bad credentials"});
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    let lifetime = state.token_lifetime.load(Ordering::SeqCst);
    let claims = json!({
        "iss": state.issuer.get().unwrap(),
        "aud": field("audience"),
        "sub": format!("service-account-{CLIENT_ID}"),
        "exp": now() + lifetime as i64,
        "jti": n,
    });
    let access_token = keys()[0].sign(&claims);
    Json(json!({"access_token": access_token, "token_type": "Bearer", "expires_in": lifetime}))
        .into_response()
}

/// Serves `app` on 127.0.0.1:0 for the rest of the test.
pub(crate) async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// One protected route and the two default exempt ones, behind `auth`.
pub(crate) async fn protected_app(auth: &Authenticator) -> String {
    let app = Router::new()
        .route("/v1/health", get(|| async { "healthy" }))
        .route("/v1/version", get(|| async { "1" }))
        .route(
            "/v1/whoami",
            get(|p: Principal| async move { p.sub().to_owned() }),
        )
        .layer(auth.layer());
    format!("http://{}", serve(app).await)
}

/// What a request to the protected app got back.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) challenge: Option<String>,
    pub(crate) body: String,
}

impl Reply {
    /// Asserts a 401 with the reference's challenge and envelope for `message`.
    #[track_caller]
    pub(crate) fn assert_unauthorized(&self, error: &str, message: &str) {
        assert_eq!(self.status, 401, "{self:?}");
        let expected = format!(r#"Bearer error="{error}", error_description="{message}""#);
        assert_eq!(
            self.challenge.as_deref(),
            Some(expected.as_str()),
            "{self:?}"
        );
        let body: Value = serde_json::from_str(&self.body).unwrap();
        assert_eq!(
            body,
            json!({"error": {"code": "unauthorized", "message": message}})
        );
    }

    #[track_caller]
    pub(crate) fn assert_ok_as(&self, sub: &str) {
        assert_eq!((self.status, self.body.as_str()), (200, sub), "{self:?}");
    }
}

pub(crate) async fn call(base: &str, path: &str, authorization: Option<&str>) -> Reply {
    let mut request = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.unwrap();
    Reply {
        status: response.status().as_u16(),
        challenge: response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned()),
        body: response.text().await.unwrap(),
    }
}

pub(crate) async fn call_bearer(base: &str, token: &str) -> Reply {
    call(base, "/v1/whoami", Some(&format!("Bearer {token}"))).await
}
