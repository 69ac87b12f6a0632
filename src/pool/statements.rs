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
    /// Name → (text size, stamp: the pool's plan clock when it was prepared, see
    /// `Pool::plan_tick`).
    live: LruCache<Arc<str>, (usize, u64)>,
    bytes: usize,
    to_close: Vec<(Arc<str>, usize, u64)>,
    /// Statements that may still exist on the server but must not be used (their plan went
    /// stale, or a Parse replacing them was skipped): closed at the next unit or right before
    /// they are prepared again, and never revived (unlike `to_close`).
    retired: Vec<Arc<str>>,
}

impl Default for ServerStatements {
    fn default() -> Self {
        ServerStatements {
            live: LruCache::unbounded(),
            bytes: 0,
            to_close: Vec::new(),
            retired: Vec::new(),
        }
    }
}

impl ServerStatements {
    /// The stamp of the statement if it exists on the server (and mark it used).
    pub fn stamp_of(&mut self, name: &str) -> Option<u64> {
        if let Some((_, stamp)) = self.live.get(name) {
            return Some(*stamp);
        }
        let i = self.to_close.iter().position(|(n, _, _)| &**n == name)?;
        let (n, size, stamp) = self.to_close.swap_remove(i);
        self.insert(n, size, stamp);
        Some(stamp)
    }

    /// Whether the statement exists on the server (and mark it used).
    pub fn contains(&mut self, name: &str) -> bool {
        self.stamp_of(name).is_some()
    }

    /// A statement of `size` bytes of text was prepared at `stamp`; older ones may be queued
    /// for Close.
    pub fn insert(&mut self, name: Arc<str>, size: usize, stamp: u64) {
        if let Some((old, _)) = self.live.put(name, (size, stamp)) {
            self.bytes = self.bytes.saturating_sub(old);
        }
        self.bytes += size;
        while self.live.len() > MAX_STATEMENTS
            || (self.bytes > MAX_TEXT_BYTES && self.live.len() > 1)
        {
            let Some((n, (s, stamp))) = self.live.pop_lru() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(s);
            self.to_close.push((n, s, stamp));
        }
    }

    /// The server dropped every statement (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.live.clear();
        self.bytes = 0;
        self.to_close.clear();
        self.retired.clear();
    }

    /// The statement must not be used again (its plan went stale, or a Parse of it was skipped
    /// and an older copy may remain): close it at the next unit (or right before it is prepared
    /// again) and never revive it.
    pub fn retire(&mut self, name: &str) {
        let name = if let Some((n, (size, _))) = self.live.pop_entry(name) {
            self.bytes = self.bytes.saturating_sub(size);
            n
        } else if let Some(i) = self.to_close.iter().position(|(n, _, _)| &**n == name) {
            self.to_close.swap_remove(i).0
        } else if self.retired.iter().any(|n| &**n == name) {
            return;
        } else {
            Arc::from(name)
        };
        self.retired.push(name);
    }

    /// A statement that drops them all (DISCARD ALL, DEALLOCATE ALL) was sent; the server may
    /// still skip it (after an error in the same extended unit) or fail it: every statement
    /// may or may not exist now, so all are retired (closed before they are prepared again).
    pub fn retire_all(&mut self) {
        let live: Vec<Arc<str>> = self.live.iter().map(|(n, _)| Arc::clone(n)).collect();
        self.live.clear();
        self.bytes = 0;
        self.retired.extend(live);
        self.retired
            .extend(self.to_close.drain(..).map(|(n, _, _)| n));
    }

    /// The stamp of the live statement `name` (without marking it used).
    pub fn peek_stamp(&self, name: &str) -> Option<u64> {
        self.live.peek(name).map(|(_, stamp)| *stamp)
    }

    /// Forget `name` before it is prepared again: whether the server may still have a copy
    /// (live, waiting to be closed, or retired), which the caller closes first.
    pub fn take_copy(&mut self, name: &str) -> bool {
        if let Some((size, _)) = self.live.pop(name) {
            self.bytes = self.bytes.saturating_sub(size);
            return true;
        }
        if let Some(i) = self.to_close.iter().position(|(n, _, _)| &**n == name) {
            self.to_close.swap_remove(i);
            return true;
        }
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
        let mut names: Vec<Arc<str>> = self.to_close.drain(..).map(|(n, _, _)| n).collect();
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
            s.insert(Arc::from(format!("rg_{i}")), 10, 1);
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
        s.insert(Arc::from("rg_a"), 10, 1);
        s.insert(Arc::from("rg_b"), 10, 2);
        assert_eq!(s.peek_stamp("rg_b"), Some(2));
        s.retire("rg_a");
        assert!(!s.contains("rg_a"));
        assert!(s.contains("rg_b"));
        assert_eq!(s.take_to_close(), [Arc::from("rg_a")]);
        assert!(s.take_to_close().is_empty());
        // a Parse that may have left an older copy behind: closed before the next one
        s.retire("rg_unknown");
        assert!(s.take_copy("rg_unknown"));
        assert!(!s.take_copy("rg_unknown"));
        s.retire("rg_b");
        assert!(s.take_copy("rg_b"));
        // after DISCARD ALL (which may have been skipped): none live, all closed first
        s.insert(Arc::from("rg_c"), 10, 3);
        s.retire_all();
        assert!(!s.contains("rg_c"));
        assert!(s.take_copy("rg_c"));
        assert!(s.take_to_close().is_empty());
    }

    #[test]
    fn a_copy_prepared_again_is_closed_first() {
        let mut s = ServerStatements::default();
        assert!(!s.take_copy("rg_a"), "never prepared: nothing to close");
        s.insert(Arc::from("rg_a"), 10, 1);
        assert!(s.take_copy("rg_a"));
        s.insert(Arc::from("rg_a"), 10, 5);
        assert_eq!(s.stamp_of("rg_a"), Some(5));
    }

    #[test]
    fn bounded_in_bytes() {
        let mut s = ServerStatements::default();
        for i in 0..40 {
            s.insert(Arc::from(format!("rg_{i}")), 1 << 20, 1);
        }
        assert!(s.len() <= MAX_TEXT_BYTES >> 20);
        assert_eq!(s.take_to_close().len(), 40 - s.len());
    }
}
