//! Failed-login throttling, aimed at what an attacker controls.
//!
//! Only refusals that someone without the signing key can cause count as failures: tokens that
//! are malformed or oversized, name an unknown key or a disallowed algorithm, or whose signature
//! does not verify. A token whose signature verifies is never refused by the throttle — an
//! expired or not-yet-valid token (or one with a wrong claim) gets its own error and is not
//! counted, so one client retrying an old token cannot lock out anyone.
//!
//! Failures are counted per [`ThrottleKey`]: the client address and the subject (`sub`) read
//! from the token's *unverified* payload, so the many clients of a sidecar, who all come from
//! 127.0.0.1, do not share one counter. Tokens whose payload cannot be read share one
//! "unreadable" bucket per address; tokens with a readable payload but no `sub` share another.
//! After `burst` failures within `window` the key is locked: a further token of that key whose
//! signature does not verify is refused with 53300 instead of 28000, and an unreadable token
//! (which can never log in) is refused without being checked at all.
//!
//! Memory is bounded: subjects are stored as 64-bit keyed hashes, and entries live in two
//! generations of at most `capacity / 2` each; a generation is dropped whole once it is a window
//! old or the newer one is full, so the map never holds more than `capacity` keys.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most keys remembered by default.
pub const MAX_KEYS: usize = 100_000;

/// Who a token claims to be, read from its payload without verifying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    Subject(String),
    /// The payload is readable JSON without a string `sub`.
    NoSubject,
    /// Not a readable JWT payload (or no token at all).
    Unreadable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Bucket {
    /// Keyed hash of `sub`.
    Subject(u64),
    NoSubject,
    Unreadable,
}

/// What failures are counted under: client address and claimed subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ThrottleKey {
    ip: IpAddr,
    bucket: Bucket,
}

impl ThrottleKey {
    /// A token of this key can never log in (its payload cannot be read), so a locked key may
    /// refuse it without any check.
    pub fn unreadable(&self) -> bool {
        self.bucket == Bucket::Unreadable
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    first: Instant,
}

struct Generations {
    current: HashMap<ThrottleKey, Entry>,
    previous: HashMap<ThrottleKey, Entry>,
    current_since: Instant,
}

pub struct LoginThrottle {
    burst: u32,
    window: Duration,
    capacity: usize,
    hasher: RandomState,
    state: Mutex<Generations>,
}

impl LoginThrottle {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self::with_capacity(burst, window, MAX_KEYS)
    }

    /// As [`LoginThrottle::new`], remembering at most `capacity` keys (at least 2).
    pub fn with_capacity(burst: u32, window: Duration, capacity: usize) -> Self {
        LoginThrottle {
            burst,
            window,
            capacity: capacity.max(2),
            hasher: RandomState::new(),
            state: Mutex::new(Generations {
                current: HashMap::new(),
                previous: HashMap::new(),
                current_since: Instant::now(),
            }),
        }
    }

    /// The key a login from `ip` claiming `claimed` is counted under.
    pub fn key(&self, ip: IpAddr, claimed: &Claimed) -> ThrottleKey {
        let bucket = match claimed {
            Claimed::Subject(sub) => Bucket::Subject(self.hasher.hash_one(sub.as_str())),
            Claimed::NoSubject => Bucket::NoSubject,
            Claimed::Unreadable => Bucket::Unreadable,
        };
        ThrottleKey {
            ip: ip.to_canonical(),
            bucket,
        }
    }

    /// Whether `key` has used up its failures for the current window.
    pub fn locked(&self, key: &ThrottleKey) -> bool {
        if self.burst == 0 {
            return false;
        }
        let Ok(mut g) = self.state.lock() else {
            return false;
        };
        let now = Instant::now();
        self.rotate(&mut g, now);
        let entry = g.current.get(key).or_else(|| g.previous.get(key));
        entry.is_some_and(|e| e.failures >= self.burst && now.duration_since(e.first) < self.window)
    }

    /// Count one attacker-controlled failure under `key`.
    pub fn failed(&self, key: ThrottleKey) {
        if self.burst == 0 {
            return;
        }
        let Ok(mut g) = self.state.lock() else {
            return;
        };
        let now = Instant::now();
        self.rotate(&mut g, now);
        let carried = g.previous.remove(&key);
        let mut entry = g
            .current
            .get(&key)
            .copied()
            .or(carried)
            .filter(|e| now.duration_since(e.first) < self.window)
            .unwrap_or(Entry {
                failures: 0,
                first: now,
            });
        entry.failures = entry.failures.saturating_add(1);
        if !g.current.contains_key(&key) && g.current.len() >= self.capacity / 2 {
            Self::start_generation(&mut g, now);
        }
        g.current.insert(key, entry);
    }

    /// Keys remembered now (at most the capacity).
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .map(|g| g.current.len() + g.previous.len())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drop the older generation once the newer one is a window old: everything in it is then
    /// at least a window old too, so no lock is lost early.
    fn rotate(&self, g: &mut Generations, now: Instant) {
        if now.duration_since(g.current_since) >= self.window {
            Self::start_generation(g, now);
        }
    }

    fn start_generation(g: &mut Generations, now: Instant) {
        g.previous = std::mem::take(&mut g.current);
        g.current_since = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(s: &str) -> Claimed {
        Claimed::Subject(s.to_string())
    }

    #[test]
    fn locks_a_key_after_the_burst_until_the_window_passes() {
        let t = LoginThrottle::new(3, Duration::from_millis(50));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mallory = t.key(ip, &sub("mallory"));
        for _ in 0..3 {
            assert!(!t.locked(&mallory));
            t.failed(mallory);
        }
        assert!(t.locked(&mallory));
        // other subjects and other addresses are not affected
        assert!(!t.locked(&t.key(ip, &sub("alice"))));
        assert!(!t.locked(&t.key(ip, &Claimed::Unreadable)));
        assert!(!t.locked(&t.key("10.0.0.2".parse().unwrap(), &sub("mallory"))));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!t.locked(&mallory));
        t.failed(mallory);
        assert!(!t.locked(&mallory));
        let off = LoginThrottle::new(0, Duration::ZERO);
        let k = off.key(ip, &Claimed::Unreadable);
        off.failed(k);
        assert!(!off.locked(&k));
    }

    #[test]
    fn ipv4_mapped_addresses_are_the_same_client() {
        let t = LoginThrottle::new(1, Duration::from_secs(60));
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        t.failed(t.key(mapped, &Claimed::Unreadable));
        assert!(t.locked(&t.key(v4, &Claimed::Unreadable)));
    }

    #[test]
    fn memory_is_bounded_and_recent_locks_survive() {
        let t = LoginThrottle::with_capacity(2, Duration::from_secs(60), 100);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let hot = t.key(ip, &sub("hot"));
        for i in 0..10_000 {
            t.failed(t.key(ip, &sub(&format!("spray-{i}"))));
            if i % 10 == 0 {
                t.failed(hot);
            }
            assert!(t.len() <= 100, "{} keys after {i}", t.len());
        }
        assert!(t.locked(&hot), "a key failing all along stays locked");
    }
}
