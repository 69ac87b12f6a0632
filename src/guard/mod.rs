//! The guard: classifies each statement with the real Postgres grammar (`pg_query`) into a
//! [`Verdict`] plus what the session needs to know (transaction control, statements that cannot
//! run in a transaction block, session state). Pure: no I/O. Verdicts are cached by exact text.

mod classify;
pub mod protected;
mod session_effects;
pub(crate) mod tree;

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

pub use classify::{Analysis, Denial, SessionReset, Statement, TxEffect, Verdict};
use protected::ProtectedSet;
pub use session_effects::{Deallocate, SettingChange, reauth_token};

use crate::config::GuardConfig;

/// Options that change verdicts.
#[derive(Debug, Clone)]
pub struct GuardOptions {
    pub protected: ProtectedSet,
    pub allow_do_blocks: bool,
    pub allow_create_function: bool,
}

pub struct Guard {
    options: GuardOptions,
    cache: Mutex<LruCache<Box<str>, Arc<Analysis>>>,
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
        };
        let size = NonZeroUsize::new(config.verdict_cache_size.max(1)).unwrap_or(NonZeroUsize::MIN);
        Guard {
            options,
            cache: Mutex::new(LruCache::new(size)),
        }
    }

    /// Classify `sql` (one or more statements), from the cache when seen before.
    pub fn analyze(&self, sql: &str) -> Arc<Analysis> {
        if let Ok(mut cache) = self.cache.lock()
            && let Some(hit) = cache.get(sql)
        {
            return Arc::clone(hit);
        }
        let analysis = Arc::new(classify::analyze(sql, &self.options));
        if let Ok(mut cache) = self.cache.lock() {
            cache.put(sql.into(), Arc::clone(&analysis));
        }
        analysis
    }

    /// Classify without the cache (benchmarks).
    pub fn analyze_uncached(&self, sql: &str) -> Analysis {
        classify::analyze(sql, &self.options)
    }

    pub fn protected(&self) -> &ProtectedSet {
        &self.options.protected
    }
}
