//! Tokens that verified, by their exact text. A client that logs in again with the same token
//! (a pool reconnecting, a script, `pgbench -C`) skips the header and claims decoding and the
//! signature check: about a quarter of a login's work.
//!
//! An entry is used only while
//! - the key the token's header selects now is the very key that verified it (a JWKS refresh
//!   that drops or replaces the key, or a reload, which builds a new validator, ends it), and
//! - its `exp` has not passed and its `nbf` has, without the leeway (a token inside the leeway
//!   takes the full check, which applies it).
//!
//! The claims are kept, not the identity: the identity is built again for each login (it
//! depends on the login's user name). Memory is bounded by [`MAX_BYTES`]; only tokens that
//! verified are stored, so nobody without a valid token can fill it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// What the entries may hold, counted as [`Cached::cost`].
pub(super) const MAX_BYTES: usize = 4 << 20;

/// A verified token: what the header said, the key that verified it, its claims.
pub(super) struct Cached {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub key: Arc<DecodingKey>,
    pub claims: Value,
    exp: u64,
    nbf: Option<u64>,
}

impl Cached {
    /// `None` when the time claims are not plain integers (the full check decides such tokens
    /// every time).
    pub fn new(
        alg: Algorithm,
        kid: Option<String>,
        key: Arc<DecodingKey>,
        claims: Value,
    ) -> Option<Self> {
        let exp = claims.get("exp")?.as_u64()?;
        let nbf = match claims.get("nbf") {
            None => None,
            Some(n) => Some(n.as_u64()?),
        };
        Some(Cached {
            alg,
            kid,
            key,
            claims,
            exp,
            nbf,
        })
    }

    /// Still valid at `now` (seconds since the epoch) without any leeway.
    fn current(&self, now: u64) -> bool {
        self.exp >= now && self.nbf.is_none_or(|nbf| nbf <= now)
    }

    /// Bytes an entry is counted for: the token text (the key of the map), the claims decoded
    /// from it (at most as large again, twice over for the JSON tree), and the entry itself.
    fn cost(token: &str) -> usize {
        3 * token.len() + 256
    }
}

#[derive(Default)]
pub(super) struct TokenCache {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Box<str>, Arc<Cached>>,
    bytes: usize,
}

impl TokenCache {
    /// The entry for this exact token text, if it is still within its time claims at `now`.
    pub fn get(&self, token: &str, now: u64) -> Option<Arc<Cached>> {
        // (a poisoned lock only costs the full check)
        let entries = self.entries.lock().ok()?;
        let cached = Arc::clone(entries.map.get(token)?);
        drop(entries);
        cached.current(now).then_some(cached)
    }

    /// Keep a token that verified. When full, entries past their `exp` go first, then all.
    pub fn insert(&self, token: &str, cached: Cached, now: u64) {
        let cost = Cached::cost(token);
        if cost > MAX_BYTES {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.bytes + cost > MAX_BYTES {
            entries.map.retain(|_, c| c.current(now));
            entries.bytes = entries.map.keys().map(|t| Cached::cost(t)).sum();
            if entries.bytes + cost > MAX_BYTES {
                entries.map.clear();
                entries.bytes = 0;
            }
        }
        if entries
            .map
            .insert(Box::from(token), Arc::new(cached))
            .is_none()
        {
            entries.bytes += cost;
        }
    }

    /// Forget a token (its key no longer selects it).
    pub fn remove(&self, token: &str) {
        if let Ok(mut entries) = self.entries.lock()
            && entries.map.remove(token).is_some()
        {
            entries.bytes -= Cached::cost(token);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.map.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cached(claims: Value) -> Option<Cached> {
        let key = Arc::new(DecodingKey::from_secret(b"k"));
        Cached::new(Algorithm::HS256, None, key, claims)
    }

    #[test]
    fn an_entry_holds_only_inside_its_time_claims_without_leeway() {
        let cache = TokenCache::default();
        cache.insert("t", cached(json!({"exp": 100, "nbf": 50})).unwrap(), 60);
        assert!(cache.get("t", 49).is_none(), "before nbf");
        assert!(cache.get("t", 50).is_some());
        assert!(cache.get("t", 100).is_some());
        assert!(cache.get("t", 101).is_none(), "after exp");
        assert!(cache.get("other", 60).is_none());
    }

    #[test]
    fn time_claims_that_are_not_plain_integers_are_not_kept() {
        assert!(cached(json!({"exp": 100.5})).is_none());
        assert!(cached(json!({"exp": "100"})).is_none());
        assert!(cached(json!({"nbf": 1})).is_none(), "no exp");
        assert!(cached(json!({"exp": 100, "nbf": -1})).is_none());
        assert!(cached(json!({"exp": 100})).is_some());
    }

    #[test]
    fn memory_stays_bounded_expired_entries_going_first() {
        let cache = TokenCache::default();
        let token = |i: usize| format!("{i:0>4000}");
        let per = Cached::cost(&token(0));
        let fit = MAX_BYTES / per;
        // the first half expires at 10, the rest at 1000
        for i in 0..fit {
            let exp = if i < fit / 2 { 10 } else { 1000 };
            cache.insert(&token(i), cached(json!({ "exp": exp })).unwrap(), 5);
        }
        assert_eq!(cache.len(), fit);
        // at 20 the next one makes room by dropping the expired half
        cache.insert(&token(fit), cached(json!({"exp": 1000})).unwrap(), 20);
        assert_eq!(cache.len(), fit - fit / 2 + 1);
        assert!(cache.get(&token(fit - 1), 20).is_some());
        // nothing expired: full means starting over
        for i in fit + 1..fit + 1 + fit / 2 + 1 {
            cache.insert(&token(i), cached(json!({"exp": 1000})).unwrap(), 20);
        }
        assert!(cache.len() <= fit);
        assert!(cache.entries.lock().unwrap().bytes <= MAX_BYTES);
        // a token too large to count is never kept
        let huge = "x".repeat(MAX_BYTES);
        cache.insert(&huge, cached(json!({"exp": 1000})).unwrap(), 20);
        assert!(cache.get(&huge, 20).is_none());
        cache.remove(&token(fit));
        assert!(cache.get(&token(fit), 20).is_none());
    }
}
