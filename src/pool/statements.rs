//! rlsgate's own prepared statements on one server connection, bounded: the least recently
//! used are closed once a connection holds too many (or too much text), so no client can grow
//! a backend without limit by preparing statements.
//!
//! An evicted statement is not closed at once (a Close in the middle of a client's unit could
//! be skipped after an error, leaving the server and rlsgate in disagreement): it waits in
//! `to_close` until the next unit starts, where nothing can skip it. Until then it still exists
//! on the server and is revived if it is needed again.

use std::sync::Arc;

use lru::LruCache;

/// Most of rlsgate's statements one server connection holds.
pub const MAX_STATEMENTS: usize = 1_000;
/// Most statement text (bytes) one server connection holds.
pub const MAX_TEXT_BYTES: usize = 16 << 20;

pub struct ServerStatements {
    live: LruCache<Arc<str>, usize>,
    bytes: usize,
    to_close: Vec<(Arc<str>, usize)>,
}

impl Default for ServerStatements {
    fn default() -> Self {
        ServerStatements {
            live: LruCache::unbounded(),
            bytes: 0,
            to_close: Vec::new(),
        }
    }
}

impl ServerStatements {
    /// Whether the statement exists on the server (and mark it used).
    pub fn contains(&mut self, name: &str) -> bool {
        if self.live.get(name).is_some() {
            return true;
        }
        match self.to_close.iter().position(|(n, _)| &**n == name) {
            Some(i) => {
                let (n, size) = self.to_close.swap_remove(i);
                self.insert(n, size);
                true
            }
            None => false,
        }
    }

    /// A statement of `size` bytes of text was prepared; older ones may be queued for Close.
    pub fn insert(&mut self, name: Arc<str>, size: usize) {
        if let Some(old) = self.live.put(name, size) {
            self.bytes = self.bytes.saturating_sub(old);
        }
        self.bytes += size;
        while self.live.len() > MAX_STATEMENTS
            || (self.bytes > MAX_TEXT_BYTES && self.live.len() > 1)
        {
            let Some((n, s)) = self.live.pop_lru() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(s);
            self.to_close.push((n, s));
        }
    }

    /// The Parse did not happen: the server does not have it.
    pub fn remove(&mut self, name: &str) {
        if let Some(s) = self.live.pop(name) {
            self.bytes = self.bytes.saturating_sub(s);
        }
    }

    /// The server dropped every statement (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.live.clear();
        self.bytes = 0;
        self.to_close.clear();
    }

    /// Statements to Close at the start of the next unit.
    pub fn take_to_close(&mut self) -> Vec<Arc<str>> {
        self.to_close.drain(..).map(|(n, _)| n).collect()
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_and_revives_until_closed() {
        let mut s = ServerStatements::default();
        for i in 0..MAX_STATEMENTS + 2 {
            s.insert(Arc::from(format!("rg_{i}")), 10);
            if i == 0 {
                continue;
            }
            // keep rg_0 hot
            assert!(s.contains("rg_0"));
        }
        assert_eq!(s.len(), MAX_STATEMENTS);
        assert!(s.contains("rg_0"));
        // rg_1 and rg_2 were evicted but not yet closed: revived on use
        assert!(s.contains("rg_1"));
        let closing = s.take_to_close();
        assert!(!closing.iter().any(|n| &**n == "rg_0"));
        assert!(!closing.is_empty());
        for n in &closing {
            assert!(!s.contains(n), "{n} was closed");
        }
    }

    #[test]
    fn bounded_in_bytes() {
        let mut s = ServerStatements::default();
        for i in 0..40 {
            s.insert(Arc::from(format!("rg_{i}")), 1 << 20);
        }
        assert!(s.len() <= MAX_TEXT_BYTES >> 20);
        assert_eq!(s.take_to_close().len(), 40 - s.len());
    }
}
