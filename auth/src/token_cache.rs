//! Tokens already verified, so a caller that reuses its token (the coordinator keeps one per
//! audience for minutes) pays the RSA check once instead of on every request.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::principal::Principal;

struct Verified {
    principal: Principal,
    /// `exp` + leeway, in Unix seconds: the token is refused from then on, cached or not.
    expires_unix: u64,
    /// Re-verify at the latest by then, so a key dropped from the JWKS stops working.
    recheck_at: Instant,
    /// The key set the signature was checked against.
    key_generation: u64,
}

pub(crate) struct VerifiedTokens {
    capacity: usize,
    entries: RwLock<HashMap<Box<str>, Verified>>,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl VerifiedTokens {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// The principal of `token` if it was verified against the current key set and is
    /// still within its lifetime.
    pub(crate) fn get(&self, token: &str, key_generation: u64) -> Option<Principal> {
        if self.capacity == 0 {
            return None;
        }
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let hit = entries.get(token)?;
        (hit.key_generation == key_generation
            && Instant::now() < hit.recheck_at
            && unix_now() <= hit.expires_unix)
            .then(|| hit.principal.clone())
    }

    pub(crate) fn insert(
        &self,
        token: &str,
        principal: Principal,
        expires_unix: u64,
        recheck_at: Instant,
        key_generation: u64,
    ) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity {
            let now = unix_now();
            let instant = Instant::now();
            entries.retain(|_, v| now <= v.expires_unix && instant < v.recheck_at);
            // Still full of live tokens: start over rather than track recency on the hot path.
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(
            token.into(),
            Verified {
                principal,
                expires_unix,
                recheck_at,
                key_generation,
            },
        );
    }
}
