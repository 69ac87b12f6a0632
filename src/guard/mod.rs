//! The guard: classifies each statement with the real Postgres grammar (`pg_query`) into a
//! [`Verdict`] plus what the session needs to know (transaction control, statements that cannot
//! run in a transaction block, session state). Pure: no I/O. Verdicts are cached by exact text.

mod classify;
mod pinned;
pub mod policy;
pub mod protected;
mod search;
mod session_effects;
pub mod set_sql;
pub(crate) mod tree;

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

pub use classify::{Analysis, Denial, SessionReset, Statement, TxEffect, Verdict};
use protected::ProtectedSet;
pub use session_effects::{Deallocate, ReauthArg, SettingChange, reauth_call, reauth_token};

use crate::config::GuardConfig;

/// Options that change verdicts.
#[derive(Debug, Clone)]
pub struct GuardOptions {
    pub protected: ProtectedSet,
    pub allow_do_blocks: bool,
    pub allow_create_function: bool,
    pub allow_large_objects: bool,
}

/// Texts longer than this are classified every time instead of cached: they rarely repeat,
/// and a few of them would otherwise hold the cache's whole byte budget.
const MAX_CACHED_TEXT: usize = 64 * 1024;

/// Texts longer than this are classified one at a time, process-wide, on a thread that serves
/// no other client (peak memory is several hundred bytes per byte of text).
const LARGE_TEXT: usize = 64 * 1024;
static LARGE_CLASSIFICATION: Mutex<()> = Mutex::new(());

/// Run a large classification: one at a time; in a multi-threaded runtime the worker hands its
/// other clients to another thread first (`block_in_place`), so they are not held up.
fn classify_large<T>(work: impl FnOnce() -> T) -> T {
    let one_at_a_time = || {
        let _turn = LARGE_CLASSIFICATION
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        work()
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(one_at_a_time)
        }
        _ => one_at_a_time(),
    }
}

/// Verdicts by exact text, bounded in entries and in bytes.
struct Cache {
    entries: LruCache<Box<str>, Arc<Analysis>>,
    bytes: usize,
    max_bytes: usize,
}

impl Cache {
    fn cost(sql: &str, analysis: &Analysis) -> usize {
        // text + the analysis and its statements (an estimate; exactness is not needed)
        sql.len()
            + std::mem::size_of::<Analysis>()
            + analysis.statements.len() * std::mem::size_of::<classify::Statement>()
            + 64
    }

    fn put(&mut self, sql: &str, analysis: Arc<Analysis>) {
        let cost = Cache::cost(sql, &analysis);
        if sql.len() > MAX_CACHED_TEXT || cost > self.max_bytes {
            return;
        }
        if let Some((old_sql, old)) = self.entries.push(sql.into(), analysis) {
            self.bytes = self.bytes.saturating_sub(Cache::cost(&old_sql, &old));
        }
        self.bytes += cost;
        while self.bytes > self.max_bytes {
            match self.entries.pop_lru() {
                Some((old_sql, old)) => {
                    self.bytes = self.bytes.saturating_sub(Cache::cost(&old_sql, &old))
                }
                None => break,
            }
        }
    }
}

pub struct Guard {
    options: GuardOptions,
    /// `[guard] max_statement_bytes`: longer texts are refused unread.
    max_statement_bytes: usize,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Guard {
    pub fn new(config: &GuardConfig) -> Self {
        let options = GuardOptions {
            protected: ProtectedSet::new(&config.protected),
            allow_do_blocks: config.allow_do_blocks,
            allow_create_function: config.allow_create_function,
            allow_large_objects: config.allow_large_objects,
        };
        let size = NonZeroUsize::new(config.verdict_cache_size.max(1)).unwrap_or(NonZeroUsize::MIN);
        Guard {
            options,
            max_statement_bytes: config.max_statement_bytes,
            cache: Mutex::new(Cache {
                entries: LruCache::new(size),
                bytes: 0,
                max_bytes: config.verdict_cache_bytes,
            }),
        }
    }

    /// Classify `sql` (one or more statements), from the cache when seen before.
    pub fn analyze(&self, sql: &str) -> Arc<Analysis> {
        if let Ok(mut cache) = self.cache.lock()
            && let Some(hit) = cache.entries.get(sql)
        {
            return Arc::clone(hit);
        }
        let analysis = Arc::new(if sql.len() > self.max_statement_bytes {
            classify::too_long(sql.len(), self.max_statement_bytes)
        } else if sql.len() > LARGE_TEXT {
            classify_large(|| classify::analyze(sql, &self.options))
        } else {
            classify::analyze(sql, &self.options)
        });
        if let Ok(mut cache) = self.cache.lock() {
            cache.put(sql, Arc::clone(&analysis));
        }
        analysis
    }

    /// Bytes the verdict cache holds now (estimate).
    pub fn cache_bytes(&self) -> usize {
        self.cache.lock().map(|c| c.bytes).unwrap_or(0)
    }

    /// Classify without the cache (benchmarks).
    pub fn analyze_uncached(&self, sql: &str) -> Analysis {
        classify::analyze(sql, &self.options)
    }

    pub fn protected(&self) -> &ProtectedSet {
        &self.options.protected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(max_bytes: usize) -> Guard {
        Guard::new(&GuardConfig {
            verdict_cache_bytes: max_bytes,
            ..GuardConfig::default()
        })
    }

    #[test]
    fn long_texts_are_never_cached() {
        let g = guard(32 << 20);
        for i in 0..20 {
            let sql = format!("SELECT {i} AS n, '{}' AS pad", "x".repeat(200 << 10));
            assert!(!g.analyze(&sql).is_denied());
        }
        assert!(g.cache_bytes() < 64 * 1024, "{}", g.cache_bytes());
    }

    #[test]
    fn texts_over_max_statement_bytes_are_refused_unparsed() {
        let g = Guard::new(&GuardConfig {
            max_statement_bytes: 100 << 10,
            ..GuardConfig::default()
        });
        let sql = format!("SELECT '{}'", "x".repeat(100 << 10));
        let a = g.analyze(&sql);
        assert!(!a.parsed);
        match &a.verdict {
            Verdict::Deny(d) => assert_eq!(d.sqlstate, "54000"),
            other => panic!("{other:?}"),
        }
        assert!(
            !g.analyze(&format!("SELECT '{}'", "x".repeat(90 << 10)))
                .is_denied()
        );
    }

    #[test]
    fn the_cache_stays_within_its_byte_budget() {
        let budget = 1 << 20;
        let g = guard(budget);
        for i in 0..200 {
            let sql = format!("SELECT {i} AS n, '{}' AS pad", "y".repeat(30 * 1024));
            g.analyze(&sql);
            assert!(g.cache_bytes() <= budget, "{} after {i}", g.cache_bytes());
        }
        // and it still caches: the most recent text is a hit
        let last = format!("SELECT 199 AS n, '{}' AS pad", "y".repeat(30 * 1024));
        let a = g.analyze(&last);
        let b = g.analyze(&last);
        assert!(Arc::ptr_eq(&a, &b));
    }
}
