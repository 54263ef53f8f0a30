//! Outbound OAuth2 client credentials: one cached token per target audience, fetched once by
//! however many callers want it at the same time, renewed shortly before it expires.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arp_types::ErrorEnvelope;
use axum::http::HeaderValue;
use reqwest::Url;
use serde_json::Value;

use crate::discovery::{self, error_chain, http_client, read_limited};
use crate::settings::{AuthMode, Env, SettingsError, discovery_url, http_url, process_env};

/// Lifetime assumed when a token response has no `expires_in`.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Renew at most this long before expiry, so a token never expires in flight.
const MAX_RENEW_MARGIN: Duration = Duration::from_secs(30);

/// The services the coordinator calls, with the audience variables and defaults of
/// jarvis_run_coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetService {
    RunStore,
    EventStream,
    ArtifactStore,
    AtomicExecutor,
    CompositeExecutor,
    Selection,
    NodeRegistry,
    Pdp,
}

impl TargetService {
    pub const ALL: [Self; 8] = [
        Self::RunStore,
        Self::EventStream,
        Self::ArtifactStore,
        Self::AtomicExecutor,
        Self::CompositeExecutor,
        Self::Selection,
        Self::NodeRegistry,
        Self::Pdp,
    ];

    /// The variable that overrides the audience.
    pub fn audience_var(self) -> &'static str {
        match self {
            Self::RunStore => "JARVIS_RUN_STORE_AUDIENCE",
            Self::EventStream => "JARVIS_EVENT_STREAM_AUDIENCE",
            Self::ArtifactStore => "JARVIS_ARTIFACT_STORE_AUDIENCE",
            Self::AtomicExecutor => "JARVIS_ATOMIC_EXECUTOR_AUDIENCE",
            Self::CompositeExecutor => "JARVIS_COMPOSITE_EXECUTOR_AUDIENCE",
            Self::Selection => "JARVIS_SELECTION_AUDIENCE",
            Self::NodeRegistry => "JARVIS_NODE_REGISTRY_AUDIENCE",
            Self::Pdp => "JARVIS_PDP_AUDIENCE",
        }
    }

    pub fn default_audience(self) -> &'static str {
        match self {
            Self::RunStore => "arp-jarvis-runstore",
            Self::EventStream => "arp-jarvis-eventstream",
            Self::ArtifactStore => "arp-jarvis-artifactstore",
            Self::AtomicExecutor => "arp-jarvis-atomicexecutor",
            Self::CompositeExecutor => "arp-jarvis-compositeexecutor",
            Self::Selection => "arp-jarvis-selection",
            Self::NodeRegistry => "arp-jarvis-noderegistry",
            Self::Pdp => "arp-jarvis-pdp",
        }
    }

    /// Human name used in error messages ("Node Registry token request failed").
    pub fn label(self) -> &'static str {
        match self {
            Self::RunStore => "Run Store",
            Self::EventStream => "Event Stream",
            Self::ArtifactStore => "Artifact Store",
            Self::AtomicExecutor => "Atomic Executor",
            Self::CompositeExecutor => "Composite Executor",
            Self::Selection => "Selection",
            Self::NodeRegistry => "Node Registry",
            Self::Pdp => "PDP",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why no token could be had. Clone: everyone who waited on the same failed fetch gets it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    #[error("token endpoint answered HTTP {status} (error {error:?}: {description:?})")]
    Rejected {
        status: u16,
        error: Option<String>,
        description: Option<String>,
    },
    #[error("token endpoint gave an unusable response: {0}")]
    BadResponse(String),
}

impl TokenError {
    /// The stable ARP error code the reference coordinator answers with.
    pub const CODE: &'static str = "token_request_failed";

    /// The envelope for the coordinator's own client, `{label} token request failed` as in the
    /// reference; the detail stays in the logs. Answer it with HTTP 502.
    pub fn envelope(&self, target: TargetService) -> ErrorEnvelope {
        ErrorEnvelope::new(
            Self::CODE,
            format!("{} token request failed", target.label()),
        )
    }
}

/// Outbound auth as the coordinator needs it: `Authorization` values per target service, or
/// none at all when auth is disabled (`dev-insecure`).
#[derive(Debug, Clone)]
pub struct OutboundAuth {
    tokens: Option<TokenProvider>,
    audiences: Arc<[String; 8]>,
}

impl OutboundAuth {
    /// Reads `ARP_AUTH_*` and `JARVIS_*_AUDIENCE` from the process environment.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_vars(process_env())
    }

    /// Reads an explicit set of variables.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, SettingsError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let env = Env::new(vars);
        let (profile, mode) = env.profile_and_mode()?;
        let audiences = Arc::new(TargetService::ALL.map(|t| {
            env.get(t.audience_var())
                .unwrap_or(t.default_audience())
                .to_owned()
        }));
        if mode == AuthMode::Disabled {
            return Ok(Self {
                tokens: None,
                audiences,
            });
        }
        let (Some(client_id), Some(client_secret)) = (
            env.get("ARP_AUTH_CLIENT_ID"),
            env.get("ARP_AUTH_CLIENT_SECRET"),
        ) else {
            return Err(SettingsError::MissingClientCredentials);
        };
        let endpoint = match env.get("ARP_AUTH_TOKEN_ENDPOINT") {
            Some(url) => TokenEndpoint::Known(http_url("ARP_AUTH_TOKEN_ENDPOINT", url)?),
            None => TokenEndpoint::Discovery(
                discovery_url(
                    env.get("ARP_AUTH_OIDC_DISCOVERY_URL"),
                    env.issuer(profile).as_deref(),
                )?
                .ok_or(SettingsError::MissingTokenEndpoint)?,
            ),
        };
        let timeout = env.seconds("ARP_AUTH_TIMEOUT_SECS", 10.0)?;
        let tokens = TokenProvider::new(client_id, client_secret, endpoint, timeout)?;
        Ok(Self {
            tokens: Some(tokens),
            audiences,
        })
    }

    /// No tokens; every call goes out without `Authorization`.
    pub fn disabled() -> Self {
        Self {
            tokens: None,
            audiences: Arc::new(TargetService::ALL.map(|t| t.default_audience().to_owned())),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// The audience tokens for `target` are requested for.
    pub fn audience(&self, target: TargetService) -> &str {
        &self.audiences[target.index()]
    }

    /// The `Authorization` value for a call to `target`, `None` when auth is disabled.
    pub async fn authorization(
        &self,
        target: TargetService,
    ) -> Result<Option<HeaderValue>, TokenError> {
        match &self.tokens {
            Some(tokens) => tokens.authorization(self.audience(target)).await.map(Some),
            None => Ok(None),
        }
    }

    pub fn token_provider(&self) -> Option<&TokenProvider> {
        self.tokens.as_ref()
    }
}

/// Where tokens are requested.
#[derive(Debug, Clone)]
pub enum TokenEndpoint {
    /// `ARP_AUTH_TOKEN_ENDPOINT`.
    Known(Url),
    /// The `token_endpoint` of this discovery document (from `ARP_AUTH_OIDC_DISCOVERY_URL` or
    /// the issuer), read on first use.
    Discovery(Url),
}

/// OAuth2 client-credentials tokens, cached per audience. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct TokenProvider {
    inner: Arc<ProviderInner>,
}

struct ProviderInner {
    http: reqwest::Client,
    client_id: String,
    client_secret: String,
    endpoint: TokenEndpoint,
    resolved_endpoint: tokio::sync::OnceCell<Url>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    requests: AtomicU64,
}

impl std::fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenProvider")
            .field("client_id", &self.inner.client_id)
            .field("client_secret", &"<redacted>")
            .field("endpoint", &self.inner.endpoint)
            .finish()
    }
}

#[derive(Default)]
struct Slot {
    current: RwLock<Option<CachedToken>>,
    /// Held across a fetch: concurrent callers for one audience wait for one request.
    fetch: tokio::sync::Mutex<Option<TokenError>>,
    /// Finished fetches; a waiter that sees it move knows its answer is already there.
    attempts: AtomicU64,
}

#[derive(Clone)]
struct CachedToken {
    authorization: HeaderValue,
    renew_at: Instant,
}

impl Slot {
    fn fresh(&self) -> Option<HeaderValue> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current
            .as_ref()
            .filter(|t| Instant::now() < t.renew_at)
            .map(|t| t.authorization.clone())
    }
}

impl TokenProvider {
    pub fn new(
        client_id: &str,
        client_secret: &str,
        endpoint: TokenEndpoint,
        timeout: Duration,
    ) -> Result<Self, SettingsError> {
        Ok(Self {
            inner: Arc::new(ProviderInner {
                http: http_client(timeout)?,
                client_id: client_id.to_owned(),
                client_secret: client_secret.to_owned(),
                endpoint,
                resolved_endpoint: tokio::sync::OnceCell::new(),
                slots: Mutex::new(HashMap::new()),
                requests: AtomicU64::new(0),
            }),
        })
    }

    /// Token requests sent so far (for diagnostics and tests).
    pub fn request_count(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// `Bearer <token>` for `audience`, from the cache unless it is about to expire.
    pub async fn authorization(&self, audience: &str) -> Result<HeaderValue, TokenError> {
        let slot = {
            let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.entry(audience.to_owned()).or_default().clone()
        };
        if let Some(header) = slot.fresh() {
            return Ok(header);
        }
        let attempts_seen = slot.attempts.load(Ordering::Acquire);
        let mut last_error = slot.fetch.lock().await;
        if let Some(header) = slot.fresh() {
            return Ok(header);
        }
        // Someone fetched while we waited and failed: share that answer instead of queueing
        // another full timeout behind it.
        if slot.attempts.load(Ordering::Acquire) != attempts_seen
            && let Some(error) = last_error.as_ref()
        {
            return Err(error.clone());
        }
        let outcome = self.fetch(audience).await;
        slot.attempts.fetch_add(1, Ordering::AcqRel);
        match outcome {
            Ok(token) => {
                let header = token.authorization.clone();
                *slot.current.write().unwrap_or_else(|e| e.into_inner()) = Some(token);
                *last_error = None;
                Ok(header)
            }
            Err(error) => {
                tracing::warn!(%error, audience, "client-credentials token request failed");
                *last_error = Some(error.clone());
                Err(error)
            }
        }
    }

    async fn endpoint(&self) -> Result<&Url, TokenError> {
        let inner = &self.inner;
        match &inner.endpoint {
            TokenEndpoint::Known(url) => Ok(url),
            TokenEndpoint::Discovery(discovery) => {
                inner
                    .resolved_endpoint
                    .get_or_try_init(|| async {
                        discovery::discover(&inner.http, discovery, "token_endpoint", |d| {
                            d.token_endpoint
                        })
                        .await
                        .map_err(|e| TokenError::Unreachable(e.to_string()))
                    })
                    .await
            }
        }
    }

    async fn fetch(&self, audience: &str) -> Result<CachedToken, TokenError> {
        let endpoint = self.endpoint().await?;
        let inner = &self.inner;
        inner.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let response = inner
            .http
            .post(endpoint.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", &inner.client_id),
                ("client_secret", &inner.client_secret),
                ("audience", audience),
            ])
            .send()
            .await
            .map_err(|e| TokenError::Unreachable(error_chain(&e)))?;
        let status = response.status();
        let body = read_limited(endpoint, response)
            .await
            .map_err(|e| TokenError::Unreachable(e.to_string()))?;
        let payload: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let text = |field: &str| {
            payload
                .get(field)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        if !status.is_success() {
            return Err(TokenError::Rejected {
                status: status.as_u16(),
                error: text("error"),
                description: text("error_description"),
            });
        }
        let access_token = text("access_token")
            .filter(|t| !t.is_empty())
            .ok_or_else(|| TokenError::BadResponse("no access_token".to_owned()))?;
        let mut authorization = HeaderValue::try_from(format!("Bearer {access_token}"))
            .map_err(|_| TokenError::BadResponse("access_token is not header-safe".to_owned()))?;
        authorization.set_sensitive(true);
        let lifetime = payload
            .get("expires_in")
            .and_then(|v| v.as_u64().or_else(|| v.as_str()?.trim().parse().ok()))
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        let margin = MAX_RENEW_MARGIN.min(lifetime / 5);
        Ok(CachedToken {
            authorization,
            renew_at: started + lifetime - margin,
        })
    }
}
