//! Inbound bearer-token verification: [`Authenticator`] turns an `Authorization` header into a
//! [`Principal`] or an [`AuthError`] that answers 401 the way arp-standard-server does.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use crate::discovery::http_client;
use crate::jwks::{KeyLookupError, KeyStore};
use crate::middleware::AuthLayer;
use crate::principal::{Principal, PrincipalKind};
use crate::settings::{AuthMode, AuthSettings, SettingsError};
use crate::token_cache::{VerifiedTokens, unix_now};

/// Why a request was not authenticated. `Display` is the detail for logs; clients get
/// [`AuthError::client_message`] only.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("no Authorization header")]
    MissingHeader,
    #[error("Authorization header is not `Bearer <token>`")]
    InvalidHeader,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("token issuer does not match")]
    InvalidIssuer,
    #[error("token audience does not match")]
    InvalidAudience,
    #[error("{0}")]
    JwksUnavailable(String),
    #[error("invalid token: {0}")]
    InvalidToken(String),
}

impl AuthError {
    /// The `message` of the `unauthorized` ErrorEnvelope; the reference's strings.
    pub fn client_message(&self) -> &'static str {
        match self {
            Self::MissingHeader => "Missing Authorization header",
            Self::InvalidHeader => "Invalid Authorization header",
            Self::Expired => "Token expired",
            Self::NotYetValid => "Token not yet valid",
            Self::InvalidIssuer => "Invalid token issuer",
            Self::InvalidAudience => "Invalid token audience",
            Self::JwksUnavailable(_) => "Unable to fetch JWKS",
            Self::InvalidToken(_) => "Invalid token",
        }
    }

    /// The RFC 6750 `error` of the `WWW-Authenticate` challenge.
    pub fn bearer_error(&self) -> &'static str {
        match self {
            Self::MissingHeader | Self::InvalidHeader => "invalid_request",
            _ => "invalid_token",
        }
    }

    /// `Bearer error="…", error_description="…"`, byte for byte the reference's header.
    pub fn www_authenticate(&self) -> &'static str {
        match self {
            Self::MissingHeader => {
                r#"Bearer error="invalid_request", error_description="Missing Authorization header""#
            }
            Self::InvalidHeader => {
                r#"Bearer error="invalid_request", error_description="Invalid Authorization header""#
            }
            Self::Expired => r#"Bearer error="invalid_token", error_description="Token expired""#,
            Self::NotYetValid => {
                r#"Bearer error="invalid_token", error_description="Token not yet valid""#
            }
            Self::InvalidIssuer => {
                r#"Bearer error="invalid_token", error_description="Invalid token issuer""#
            }
            Self::InvalidAudience => {
                r#"Bearer error="invalid_token", error_description="Invalid token audience""#
            }
            Self::JwksUnavailable(_) => {
                r#"Bearer error="invalid_token", error_description="Unable to fetch JWKS""#
            }
            Self::InvalidToken(_) => {
                r#"Bearer error="invalid_token", error_description="Invalid token""#
            }
        }
    }
}

/// Verifies inbound requests. Build once at start; cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Authenticator {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) mode: AuthMode,
    exempt_paths: Box<[Box<str>]>,
    keys: Option<Arc<KeyStore>>,
    /// One per accepted algorithm: jsonwebtoken wants every algorithm of a `Validation` to be
    /// of the key's family, so a mixed `ARP_AUTH_ALGORITHMS` needs one each.
    validations: Box<[(Algorithm, Validation)]>,
    pub(crate) dev: Principal,
    anonymous: Principal,
    verified: VerifiedTokens,
    settings: AuthSettings,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("settings", &self.inner.settings)
            .finish()
    }
}

impl Authenticator {
    /// [`AuthSettings::from_env`] then [`Authenticator::new`]: the one call a service makes.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::new(AuthSettings::from_env()?)
    }

    /// Validates `settings`. Touches no network: keys are fetched on first use (or by
    /// [`Authenticator::prefetch_keys`]), so a service starts even while its IdP is down.
    pub fn new(settings: AuthSettings) -> Result<Self, SettingsError> {
        settings.validate()?;
        let keys = match settings.mode {
            AuthMode::Disabled => None,
            AuthMode::Required | AuthMode::Optional => Some(Arc::new(KeyStore::new(
                http_client(settings.jwks_timeout)?,
                settings.key_source()?,
                settings.jwks_cache_ttl,
                settings.jwks_refresh_cooldown,
            ))),
        };
        let validations = settings
            .algorithms
            .iter()
            .map(|&alg| (alg, validation_for(&settings, alg)))
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                mode: settings.mode,
                exempt_paths: settings
                    .exempt_paths
                    .iter()
                    .map(|p| p.as_str().into())
                    .collect(),
                keys,
                validations,
                dev: Principal::synthetic(&settings.dev_subject, PrincipalKind::AuthDisabled),
                anonymous: Principal::synthetic(
                    &settings.anonymous_subject,
                    PrincipalKind::Anonymous,
                ),
                verified: VerifiedTokens::new(settings.verified_token_cache),
                settings,
            }),
        })
    }

    /// The tower layer for an axum `Router` (see the crate docs).
    pub fn layer(&self) -> AuthLayer {
        AuthLayer::new(self.clone())
    }

    pub fn settings(&self) -> &AuthSettings {
        &self.inner.settings
    }

    /// Loads the JWKS now instead of on the first request; failure is not fatal (the next
    /// request retries), so a service may log it and go on.
    pub async fn prefetch_keys(&self) -> Result<(), AuthError> {
        match &self.inner.keys {
            Some(keys) => keys.prefetch().await.map_err(key_error),
            None => Ok(()),
        }
    }

    /// JWKS fetches attempted so far.
    pub fn jwks_fetch_count(&self) -> u64 {
        self.inner.keys.as_ref().map_or(0, |k| k.fetch_count())
    }

    pub(crate) fn is_exempt(&self, path: &str) -> bool {
        self.inner.exempt_paths.iter().any(|p| **p == *path)
    }

    /// Applies the mode to a request's `Authorization` header value.
    pub async fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Principal, AuthError> {
        let inner = &self.inner;
        match (inner.mode, authorization) {
            (AuthMode::Disabled, _) => Ok(inner.dev.clone()),
            (AuthMode::Optional, None) => Ok(inner.anonymous.clone()),
            (AuthMode::Required, None) => Err(AuthError::MissingHeader),
            (_, Some(header)) => self.verify_bearer(bearer_token(header)?).await,
        }
    }

    /// Verifies a raw JWT (without the `Bearer ` prefix).
    pub async fn verify_bearer(&self, token: &str) -> Result<Principal, AuthError> {
        let inner = &self.inner;
        let keys = inner
            .keys
            .as_ref()
            .ok_or_else(|| AuthError::InvalidToken("auth is disabled".to_owned()))?;
        // Read before the key lookup: if that lookup reloads the keys, the entry stored below
        // is merely stale (one more full check later), never trusted past a key change.
        let key_generation = keys.generation();
        if let Some(principal) = inner.verified.get(token, key_generation) {
            return Ok(principal);
        }
        // `alg: none` (and any algorithm jsonwebtoken does not know) fails right here.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::InvalidToken(format!("header: {e}")))?;
        let (_, validation) = inner
            .validations
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .ok_or_else(|| {
                AuthError::InvalidToken(format!("algorithm {:?} not accepted", header.alg))
            })?;
        let key = keys
            .key_for(header.kid.as_deref(), header.alg)
            .await
            .map_err(key_error)?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation)
            .map_err(token_error)?;
        let sub = match data.claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            _ => return Err(AuthError::InvalidToken("no `sub` claim".to_owned())),
        };
        let expires_unix = data.claims.get("exp").and_then(Value::as_u64);
        let principal = Principal::from_claims(sub, data.claims);
        if let Some(exp) = expires_unix {
            let leeway = inner.settings.clock_skew.as_secs();
            // Never cache past the JWKS refresh age: a key the IdP drops must stop working.
            let recheck_at = Instant::now() + inner.settings.jwks_cache_ttl;
            // `nbf` needs no re-check: it has passed, and time only moves forward.
            if unix_now() <= exp.saturating_add(leeway) {
                let expires = exp.saturating_add(leeway);
                inner.verified.insert(
                    token,
                    principal.clone(),
                    expires,
                    recheck_at,
                    key_generation,
                );
            }
        }
        Ok(principal)
    }
}

/// `Bearer <token>`: scheme case-insensitive, exactly two parts, as the reference splits it.
fn bearer_token(header: &[u8]) -> Result<&str, AuthError> {
    let header = std::str::from_utf8(header).map_err(|_| AuthError::InvalidHeader)?;
    let mut parts = header.split_ascii_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(scheme), Some(token), None) if scheme.eq_ignore_ascii_case("bearer") => Ok(token),
        _ => Err(AuthError::InvalidHeader),
    }
}

fn validation_for(settings: &AuthSettings, alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = settings.clock_skew.as_secs();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    // `exp` is required (the reference accepts tokens without one; a bearer token that never
    // expires is not one we want to honour). `iss`/`aud` must be present when configured,
    // otherwise jsonwebtoken would skip their check on a token that simply omits them.
    let mut required = HashSet::from(["exp".to_owned()]);
    if let Some(issuer) = &settings.issuer {
        validation.set_issuer(&[issuer]);
        required.insert("iss".to_owned());
    }
    match &settings.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.insert("aud".to_owned());
        }
        // Like the reference: no configured audience, no audience check.
        None => validation.validate_aud = false,
    }
    validation.required_spec_claims = required;
    validation
}

fn key_error(error: KeyLookupError) -> AuthError {
    match error {
        KeyLookupError::Unavailable(reason) => AuthError::JwksUnavailable(reason),
        unknown @ KeyLookupError::Unknown { .. } => AuthError::InvalidToken(unknown.to_string()),
    }
}

fn token_error(error: jsonwebtoken::errors::Error) -> AuthError {
    match error.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::InvalidIssuer,
        ErrorKind::InvalidAudience => AuthError::InvalidAudience,
        _ => AuthError::InvalidToken(error.to_string()),
    }
}
