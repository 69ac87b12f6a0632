//! Failed-login throttling per client address: after `burst` failures within `window`, further
//! attempts from that address are refused at once, before any token is looked at, so a flood of
//! bad logins costs no signature checks. Memory is bounded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most addresses remembered; beyond it, expired entries go first, then the oldest window.
const MAX_ADDRESSES: usize = 100_000;

pub struct LoginThrottle {
    burst: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl LoginThrottle {
    pub fn new(burst: u32, window: Duration) -> Self {
        LoginThrottle {
            burst,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a login from `ip` may proceed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        if self.burst == 0 {
            return true;
        }
        let Ok(map) = self.failures.lock() else {
            return true;
        };
        match map.get(&ip) {
            Some((count, since)) => *count < self.burst || since.elapsed() >= self.window,
            None => true,
        }
    }

    pub fn failed(&self, ip: IpAddr) {
        if self.burst == 0 {
            return;
        }
        let Ok(mut map) = self.failures.lock() else {
            return;
        };
        let now = Instant::now();
        let entry = map.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= self.window {
            *entry = (0, now);
        }
        entry.0 = entry.0.saturating_add(1);
        if map.len() > MAX_ADDRESSES {
            let window = self.window;
            map.retain(|_, (_, since)| now.duration_since(*since) < window);
            if map.len() > MAX_ADDRESSES
                && let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(ip, _)| *ip)
            {
                map.remove(&oldest);
            }
        }
    }

    pub fn succeeded(&self, ip: IpAddr) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_after_the_burst_until_the_window_passes() {
        let t = LoginThrottle::new(3, Duration::from_millis(50));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(t.allows(ip));
            t.failed(ip);
        }
        assert!(!t.allows(ip));
        assert!(t.allows(other));
        std::thread::sleep(Duration::from_millis(60));
        assert!(t.allows(ip));
        t.failed(ip);
        assert!(t.allows(ip));
        t.succeeded(ip);
        assert!(t.allows(ip));
        assert!(LoginThrottle::new(0, Duration::ZERO).allows(ip));
    }
}
