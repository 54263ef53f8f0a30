//! The JWKS cache: verification keys by `kid`, refreshed in the background when old and on an
//! unknown `kid` at most once per cooldown; every fetch is bounded by a timeout, a wait on one by 1 s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use reqwest::Url;
use tokio::sync::watch;

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

/// How long a token with an unknown `kid` waits for the JWKS fetch it started or joined.
const MISS_WAIT: Duration = Duration::from_secs(1);

struct RefreshState {
    /// Resolved through discovery on first use, then kept.
    jwks_uri: Option<Url>,
    /// A fetch is running; others join it instead of starting their own.
    in_flight: bool,
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
    /// Held only to decide on or record a fetch, never across one.
    refresh: Mutex<RefreshState>,
    /// Bumped whenever a fetch ends, for requests waiting on it.
    fetch_ended: watch::Sender<u64>,
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
            refresh: Mutex::new(RefreshState {
                jwks_uri: None,
                in_flight: false,
                last_attempt: None,
                last_failure: None,
            }),
            fetch_ended: watch::channel(0).0,
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

    fn refresh_state(&self) -> std::sync::MutexGuard<'_, RefreshState> {
        self.refresh.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Which key set is current; changes whenever keys are (re)loaded.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Number of JWKS fetches attempted so far (for diagnostics and tests).
    pub(crate) fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The key for a token's `kid` and `alg`. A known key never waits on a fetch (a stale set
    /// is refreshed in the background); an unknown one waits at most [`MISS_WAIT`] for one.
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

    /// Loads the key set now (or waits for the fetch in flight); a service may call this at
    /// start to warm the cache.
    pub(crate) async fn prefetch(self: &Arc<Self>) -> Result<(), KeyLookupError> {
        let mut ended = self.fetch_ended.subscribe();
        {
            let mut state = self.refresh_state();
            if !state.in_flight {
                self.start_fetch(&mut state);
            }
        }
        let _ = ended.changed().await;
        match &self.refresh_state().last_failure {
            Some(reason) => Err(KeyLookupError::Unavailable(reason.clone())),
            None => Ok(()),
        }
    }

    /// A miss may mean a rotated key: fetch again unless another request did so since `seen`,
    /// or the last attempt is younger than the cooldown (which bounds the load unknown `kid`s
    /// can put on the IdP and makes a dead IdP cost nothing per request). A fetch in flight is
    /// joined, and waited for at most [`MISS_WAIT`].
    async fn refresh_after_miss(
        self: &Arc<Self>,
        seen: &Arc<KeySet>,
    ) -> Result<(), KeyLookupError> {
        // Subscribed before deciding, so a fetch that ends in between still wakes us.
        let mut ended = self.fetch_ended.subscribe();
        {
            let mut state = self.refresh_state();
            if !Arc::ptr_eq(seen, &self.snapshot()) {
                return Ok(());
            }
            if !state.in_flight {
                if let Some(at) = state.last_attempt
                    && at.elapsed() < self.cooldown
                {
                    return match &state.last_failure {
                        Some(reason) => Err(KeyLookupError::Unavailable(reason.clone())),
                        None => Ok(()),
                    };
                }
                self.start_fetch(&mut state);
            }
        }
        if tokio::time::timeout(MISS_WAIT, ended.changed())
            .await
            .is_err()
        {
            return Err(KeyLookupError::Unavailable(format!(
                "no JWKS answer within {MISS_WAIT:?}"
            )));
        }
        match &self.refresh_state().last_failure {
            Some(reason) if Arc::ptr_eq(seen, &self.snapshot()) => {
                Err(KeyLookupError::Unavailable(reason.clone()))
            }
            _ => Ok(()),
        }
    }

    fn refresh_in_background(self: &Arc<Self>) {
        let mut state = self.refresh_state();
        let stale = self
            .snapshot()
            .fetched_at
            .is_none_or(|at| at.elapsed() >= self.ttl);
        if stale && !state.in_flight {
            self.start_fetch(&mut state);
        }
    }

    /// Starts the one fetch allowed at a time. It runs in a task of its own so that a request
    /// that stops waiting (or goes away) leaves it to finish for the next one.
    fn start_fetch(self: &Arc<Self>, state: &mut RefreshState) {
        state.in_flight = true;
        state.last_attempt = Some(Instant::now());
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let known_uri = state.jwks_uri.clone();
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let (uri, result) = store.fetch(known_uri).await;
            {
                let mut state = store.refresh_state();
                state.in_flight = false;
                if uri.is_some() {
                    state.jwks_uri = uri;
                }
                match result {
                    Ok(set) => {
                        tracing::debug!(
                            keys = set.by_kid.len() + set.without_kid.len(),
                            "JWKS loaded"
                        );
                        *store.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                        store.generation.fetch_add(1, Ordering::AcqRel);
                        state.last_failure = None;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "JWKS fetch failed; keeping the cached keys");
                        state.last_failure = Some(error.to_string());
                    }
                }
            }
            store.fetch_ended.send_modify(|n| *n = n.wrapping_add(1));
        });
    }

    /// Fetches the key set; also returns the JWKS URI when discovery had to find it.
    async fn fetch(&self, known_uri: Option<Url>) -> (Option<Url>, Result<KeySet, FetchError>) {
        let uri = match (known_uri, &self.source) {
            (Some(uri), _) => uri,
            (None, KeySource::Jwks(uri)) => uri.clone(),
            (None, KeySource::Discovery(discovery)) => {
                match discovery::discover(&self.http, discovery, "jwks_uri", |d| d.jwks_uri).await {
                    Ok(uri) => uri,
                    Err(error) => return (None, Err(error)),
                }
            }
        };
        let result = discovery::get_json::<JwkSet>(&self.http, &uri)
            .await
            .map(KeySet::from_jwks);
        (Some(uri), result)
    }
}
