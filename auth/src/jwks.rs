//! The JWKS cache: verification keys by `kid`, refreshed in the background when old and on an
//! unknown `kid` at most once per cooldown, with every fetch bounded by a timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use reqwest::Url;

use crate::discovery::{self, FetchError};
use crate::settings::KeySource;

/// A verification key from the JWKS, ready for `jsonwebtoken::decode`.
pub(crate) struct VerificationKey {
    pub(crate) key: DecodingKey,
    family: AlgorithmFamily,
    /// The JWK's own `alg`, when it names one: then only that algorithm may use the key.
    alg: Option<Algorithm>,
}

impl VerificationKey {
    /// Whether a token signed with `alg` may be checked with this key. The family test is what
    /// stops an RSA public key from ever being used as an HMAC secret.
    fn accepts(&self, alg: Algorithm) -> bool {
        self.family == alg.family() && self.alg.is_none_or(|own| own == alg)
    }
}

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<VerificationKey>>,
    without_kid: Vec<Arc<VerificationKey>>,
    fetched_at: Option<Instant>,
}

impl KeySet {
    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<VerificationKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).filter(|k| k.accepts(alg)).cloned(),
            // A token without `kid` is only unambiguous when exactly one key could sign it.
            None => {
                let mut candidates = self
                    .by_kid
                    .values()
                    .chain(&self.without_kid)
                    .filter(|k| k.accepts(alg));
                match (candidates.next(), candidates.next()) {
                    (Some(only), None) => Some(only.clone()),
                    _ => None,
                }
            }
        }
    }

    fn from_jwks(jwks: JwkSet) -> Self {
        let mut set = KeySet {
            fetched_at: Some(Instant::now()),
            ..KeySet::default()
        };
        for jwk in jwks.keys {
            if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
                continue;
            }
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
                AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
                AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
                // Symmetric or unknown key types never verify tokens here.
                _ => continue,
            };
            let alg = match jwk.common.key_algorithm.map(Algorithm::try_from) {
                None => None,
                Some(Ok(alg)) => Some(alg),
                // A JWK bound to an algorithm we cannot use (e.g. RSA-OAEP) is skipped.
                Some(Err(_)) => continue,
            };
            let key = match DecodingKey::from_jwk(&jwk) {
                Ok(key) => key,
                Err(error) => {
                    tracing::warn!(kid = ?jwk.common.key_id, %error, "skipping unusable JWK");
                    continue;
                }
            };
            let key = Arc::new(VerificationKey { key, family, alg });
            match jwk.common.key_id {
                Some(kid) => {
                    set.by_kid.insert(kid, key);
                }
                None => set.without_kid.push(key),
            }
        }
        set
    }
}

/// Why no key could be found for a token.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum KeyLookupError {
    #[error("no key in the JWKS matches kid {kid:?} and alg {alg:?}")]
    Unknown { kid: Option<String>, alg: Algorithm },
    #[error("JWKS unavailable: {0}")]
    Unavailable(String),
}

struct RefreshState {
    /// Resolved through discovery on first use, then kept.
    jwks_uri: Option<Url>,
    last_attempt: Option<Instant>,
    last_failure: Option<String>,
}

pub(crate) struct KeyStore {
    http: reqwest::Client,
    source: KeySource,
    ttl: Duration,
    cooldown: Duration,
    /// Read on every request: a short read lock and an `Arc` clone, no network.
    current: RwLock<Arc<KeySet>>,
    /// Held across a fetch so concurrent requests wait for one fetch instead of each making one.
    refresh: tokio::sync::Mutex<RefreshState>,
    background_refresh: AtomicBool,
    fetches: AtomicU64,
    /// Bumped whenever a new key set replaces the old, so results verified with the old one
    /// can be told apart.
    generation: AtomicU64,
}

impl KeyStore {
    pub(crate) fn new(
        http: reqwest::Client,
        source: KeySource,
        ttl: Duration,
        cooldown: Duration,
    ) -> Self {
        Self {
            http,
            source,
            ttl,
            cooldown,
            current: RwLock::new(Arc::new(KeySet::default())),
            refresh: tokio::sync::Mutex::new(RefreshState {
                jwks_uri: None,
                last_attempt: None,
                last_failure: None,
            }),
            background_refresh: AtomicBool::new(false),
            fetches: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    fn snapshot(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Which key set is current; changes whenever keys are (re)loaded.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Number of JWKS fetches attempted so far (for diagnostics and tests).
    pub(crate) fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The key for a token's `kid` and `alg`, fetching the JWKS if it is unknown.
    pub(crate) async fn key_for(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<VerificationKey>, KeyLookupError> {
        let snapshot = self.snapshot();
        if let Some(key) = snapshot.find(kid, alg) {
            if snapshot
                .fetched_at
                .is_some_and(|at| at.elapsed() >= self.ttl)
            {
                self.refresh_in_background();
            }
            return Ok(key);
        }
        self.refresh_after_miss(&snapshot).await?;
        self.snapshot()
            .find(kid, alg)
            .ok_or_else(|| KeyLookupError::Unknown {
                kid: kid.map(str::to_owned),
                alg,
            })
    }

    /// Loads the key set now; a service may call this at start to warm the cache.
    pub(crate) async fn prefetch(&self) -> Result<(), KeyLookupError> {
        let mut state = self.refresh.lock().await;
        self.fetch_locked(&mut state).await
    }

    /// A miss may mean a rotated key: fetch again unless another request did so since `seen`,
    /// or the last attempt is younger than the cooldown (which bounds the load unknown `kid`s
    /// can put on the IdP and makes a dead IdP cost nothing per request).
    async fn refresh_after_miss(&self, seen: &Arc<KeySet>) -> Result<(), KeyLookupError> {
        let mut state = self.refresh.lock().await;
        if !Arc::ptr_eq(seen, &self.snapshot()) {
            return Ok(());
        }
        if let Some(at) = state.last_attempt
            && at.elapsed() < self.cooldown
        {
            return match &state.last_failure {
                Some(reason) => Err(KeyLookupError::Unavailable(reason.clone())),
                None => Ok(()),
            };
        }
        self.fetch_locked(&mut state).await
    }

    fn refresh_in_background(self: &Arc<Self>) {
        if self.background_refresh.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let mut state = store.refresh.lock().await;
            let stale = store
                .snapshot()
                .fetched_at
                .is_none_or(|at| at.elapsed() >= store.ttl);
            if stale && let Err(error) = store.fetch_locked(&mut state).await {
                tracing::warn!(%error, "background JWKS refresh failed; keeping the cached keys");
            }
            drop(state);
            store.background_refresh.store(false, Ordering::Release);
        });
    }

    async fn fetch_locked(&self, state: &mut RefreshState) -> Result<(), KeyLookupError> {
        state.last_attempt = Some(Instant::now());
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match self.fetch(state).await {
            Ok(set) => {
                tracing::debug!(
                    keys = set.by_kid.len() + set.without_kid.len(),
                    "JWKS loaded"
                );
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                self.generation.fetch_add(1, Ordering::AcqRel);
                state.last_failure = None;
                Ok(())
            }
            Err(error) => {
                tracing::warn!(%error, "JWKS fetch failed");
                let reason = error.to_string();
                state.last_failure = Some(reason.clone());
                Err(KeyLookupError::Unavailable(reason))
            }
        }
    }

    async fn fetch(&self, state: &mut RefreshState) -> Result<KeySet, FetchError> {
        let uri = match (&state.jwks_uri, &self.source) {
            (Some(uri), _) | (None, KeySource::Jwks(uri)) => uri.clone(),
            (None, KeySource::Discovery(discovery)) => {
                let uri =
                    discovery::discover(&self.http, discovery, "jwks_uri", |d| d.jwks_uri).await?;
                state.jwks_uri = Some(uri.clone());
                uri
            }
        };
        let jwks: JwkSet = discovery::get_json(&self.http, &uri).await?;
        Ok(KeySet::from_jwks(jwks))
    }
}
