//! A bounded map from statement text to what the guard made of it, least recently used out
//! first, bounded in entries and in bytes.
//!
//! Every statement of every client looks here first, so the map is split into shards, each
//! behind its own lock and picked by a hash of the text: clients on different threads rarely
//! wait for each other. Eviction is least-recently-used per shard (close enough to global LRU
//! for a cache this size). The hash is the cache maps' own (seeded per process, so no client
//! can aim its texts at one shard).

use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;

/// Texts longer than this are classified every time instead of cached: they rarely repeat,
/// and a few of them would otherwise hold the cache's whole byte budget.
const MAX_CACHED_TEXT: usize = 64 * 1024;

/// Most shards a cache is split into.
const SHARDS: usize = 16;

/// Fewest bytes a shard is given (small budgets get fewer shards): room for a few of the
/// longest texts, so that one of them does not empty a shard of everything else.
const MIN_SHARD_BYTES: usize = 4 * MAX_CACHED_TEXT;

/// Bookkeeping per entry on top of the text and the value (an estimate).
const ENTRY_OVERHEAD: usize = 64;

/// What a cached value costs in bytes besides its text (an estimate; exactness is not needed).
pub(super) trait Cost {
    fn cost(&self) -> usize;
}

pub(super) struct TextCache<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    hasher: lru::DefaultHasher,
}

struct Shard<V> {
    entries: LruCache<Box<str>, V>,
    bytes: usize,
    max_bytes: usize,
}

impl<V: Clone + Cost> TextCache<V> {
    /// At most `entries` entries and `max_bytes` bytes in all.
    pub fn new(entries: usize, max_bytes: usize) -> Self {
        let count = SHARDS
            .min(entries.max(1))
            .min((max_bytes / MIN_SHARD_BYTES).max(1));
        let per_shard = NonZeroUsize::new(entries / count).unwrap_or(NonZeroUsize::MIN);
        let shards = (0..count)
            .map(|_| {
                Mutex::new(Shard {
                    entries: LruCache::new(per_shard),
                    bytes: 0,
                    max_bytes: max_bytes / count,
                })
            })
            .collect();
        TextCache {
            shards,
            hasher: lru::DefaultHasher::default(),
        }
    }

    fn shard(&self, text: &str) -> &Mutex<Shard<V>> {
        // (the modulo keeps the index in range whatever the hash)
        let i = (self.hasher.hash_one(text) % self.shards.len() as u64) as usize;
        &self.shards[i]
    }

    pub fn get(&self, text: &str) -> Option<V> {
        let mut shard = self.shard(text).lock().ok()?;
        shard.entries.get(text).cloned()
    }

    pub fn put(&self, text: &str, value: V) {
        if text.len() > MAX_CACHED_TEXT {
            return;
        }
        if let Ok(mut shard) = self.shard(text).lock() {
            shard.put(text, value);
        }
    }

    /// Bytes held now (estimate).
    pub fn bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.bytes).unwrap_or(0))
            .sum()
    }
}

impl<V: Cost> Shard<V> {
    fn cost(text: &str, value: &V) -> usize {
        text.len() + value.cost() + ENTRY_OVERHEAD
    }

    fn put(&mut self, text: &str, value: V) {
        let cost = Shard::cost(text, &value);
        if cost > self.max_bytes {
            return;
        }
        if let Some((old_text, old)) = self.entries.push(text.into(), value) {
            self.bytes = self.bytes.saturating_sub(Shard::cost(&old_text, &old));
        }
        self.bytes += cost;
        while self.bytes > self.max_bytes {
            match self.entries.pop_lru() {
                Some((old_text, old)) => {
                    self.bytes = self.bytes.saturating_sub(Shard::cost(&old_text, &old))
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Blob(usize);

    impl Cost for Blob {
        fn cost(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn small_budgets_get_fewer_shards() {
        assert_eq!(
            TextCache::<Blob>::new(10_000, 32 << 20).shards.len(),
            SHARDS
        );
        assert_eq!(TextCache::<Blob>::new(3, 32 << 20).shards.len(), 3);
        assert_eq!(TextCache::<Blob>::new(10_000, 1 << 20).shards.len(), 4);
        assert_eq!(TextCache::<Blob>::new(10_000, 1000).shards.len(), 1);
        assert_eq!(TextCache::<Blob>::new(0, 0).shards.len(), 1);
    }

    #[test]
    fn entries_and_bytes_stay_bounded() {
        let c = TextCache::new(64, 1 << 20);
        for i in 0..1000 {
            c.put(&format!("text {i}"), Blob(1000));
            assert!(c.bytes() <= 1 << 20);
        }
        let held: usize = c
            .shards
            .iter()
            .map(|s| s.lock().unwrap().entries.len())
            .sum();
        assert!(held <= 64, "{held}");
        assert!(c.get("text 999").is_some());
        // a value larger than a shard's budget is not kept
        c.put("huge", Blob(1 << 20));
        assert!(c.get("huge").is_none());
        // replacing an entry does not count it twice
        let before = c.bytes();
        c.put("text 999", Blob(1000));
        assert_eq!(c.bytes(), before);
    }
}
