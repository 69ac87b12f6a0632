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
    /// Name → (text size, plans epoch when prepared).
    live: LruCache<Arc<str>, (usize, u64)>,
    /// The plans epoch statements prepared now are stamped with (the connection's, set when a
    /// unit starts: see `Pool::plan_went_stale`).
    pub epoch: u64,
    bytes: usize,
    to_close: Vec<(Arc<str>, usize)>,
    /// Statements whose plan the server no longer accepts: closed at the next unit, and never
    /// revived (unlike `to_close`).
    retired: Vec<Arc<str>>,
}

impl Default for ServerStatements {
    fn default() -> Self {
        ServerStatements {
            live: LruCache::unbounded(),
            epoch: 0,
            bytes: 0,
            to_close: Vec::new(),
            retired: Vec::new(),
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
        if let Some((old, _)) = self.live.put(name, (size, self.epoch)) {
            self.bytes = self.bytes.saturating_sub(old);
        }
        self.bytes += size;
        while self.live.len() > MAX_STATEMENTS
            || (self.bytes > MAX_TEXT_BYTES && self.live.len() > 1)
        {
            let Some((n, (s, _))) = self.live.pop_lru() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(s);
            self.to_close.push((n, s));
        }
    }

    /// The Parse did not happen: the server does not have it.
    pub fn remove(&mut self, name: &str) {
        if let Some((s, _)) = self.live.pop(name) {
            self.bytes = self.bytes.saturating_sub(s);
        }
    }

    /// The server dropped every statement (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.live.clear();
        self.bytes = 0;
        self.to_close.clear();
        self.retired.clear();
    }

    /// The server no longer accepts the statement's plan: close it at the next unit (or right
    /// before it is prepared again) and never revive it.
    pub fn retire(&mut self, name: &Arc<str>) {
        if let Some((size, _)) = self.live.pop(name) {
            self.bytes = self.bytes.saturating_sub(size);
        } else if let Some(i) = self.to_close.iter().position(|(n, _)| n == name) {
            self.to_close.swap_remove(i);
        } else {
            return;
        }
        self.retired.push(Arc::clone(name));
    }

    /// The plans epoch the live statement `name` was prepared in.
    pub fn epoch_of(&self, name: &str) -> Option<u64> {
        self.live.peek(name).map(|(_, e)| *e)
    }

    /// Whether `name` was retired and not closed yet (forgetting it: the caller closes it now).
    pub fn take_retired(&mut self, name: &str) -> bool {
        match self.retired.iter().position(|n| &**n == name) {
            Some(i) => {
                self.retired.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Statements to Close at the start of the next unit.
    pub fn take_to_close(&mut self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self.to_close.drain(..).map(|(n, _)| n).collect();
        names.append(&mut self.retired);
        names
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
    fn retired_statements_are_closed_and_not_revived() {
        let mut s = ServerStatements::default();
        s.insert(Arc::from("rg_a"), 10);
        s.insert(Arc::from("rg_b"), 10);
        s.retire(&Arc::from("rg_a"));
        s.retire(&Arc::from("rg_unknown"));
        assert!(!s.contains("rg_a"));
        assert!(s.contains("rg_b"));
        assert_eq!(s.take_to_close(), [Arc::from("rg_a")]);
        assert!(s.take_to_close().is_empty());
        s.retire(&Arc::from("rg_b"));
        assert!(s.take_retired("rg_b"));
        assert!(!s.take_retired("rg_b"));
        assert!(s.take_to_close().is_empty());
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
