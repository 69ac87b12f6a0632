//! The guard: classifies each statement with the real Postgres grammar (`pg_query`) into a
//! [`Verdict`] plus what the session needs to know (transaction control, statements that cannot
//! run in a transaction block, session state). Pure: no I/O.
//!
//! Verdicts are cached by exact text. Texts that differ only in inline values (`… WHERE id =
//! 42`, as many applications send them) also share a verdict through their shape, the text
//! with each literal replaced by a parameter ([`normalize`], [`shape`]): a shape whose own
//! verdict is a plain allow answers for all its texts without parsing them.

mod cache;
mod classify;
mod normalize;
mod pinned;
pub mod policy;
pub mod protected;
mod search;
mod session_effects;
pub mod set_sql;
mod shape;
pub(crate) mod tree;

use std::sync::{Arc, Mutex};

use cache::{Cost, TextCache};
pub use classify::{Analysis, Denial, SessionReset, Statement, TxEffect, Verdict};
use protected::ProtectedSet;
pub use session_effects::{Deallocate, ReauthArg, SettingChange, reauth_call, reauth_token};
use shape::Shape;

use crate::config::GuardConfig;

/// Options that change verdicts.
#[derive(Debug, Clone)]
pub struct GuardOptions {
    pub protected: ProtectedSet,
    pub allow_do_blocks: bool,
    pub allow_create_function: bool,
    pub allow_large_objects: bool,
    pub allow_notifications: bool,
}

/// Texts longer than this are classified one at a time, process-wide, on a thread that serves
/// no other client (peak memory is several hundred bytes per byte of text).
const LARGE_TEXT: usize = 64 * 1024;
static LARGE_CLASSIFICATION: Mutex<()> = Mutex::new(());

/// The share of `[guard] verdict_cache_size` / `verdict_cache_bytes` the shape cache gets (one
/// part in this many); the verdict cache gets the rest. Shapes are far fewer than texts.
const SHAPE_SHARE: usize = 4;

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

impl Cost for Arc<Analysis> {
    fn cost(&self) -> usize {
        std::mem::size_of::<Analysis>() + self.statements.len() * std::mem::size_of::<Statement>()
    }
}

/// The shape key of `sql` (the text with each plain literal replaced by `$1`, `$2`, …), when the
/// lexer reads it (for tests that write other values in).
#[doc(hidden)]
pub fn shape_key(sql: &str) -> Option<String> {
    normalize::normalize(sql).map(|n| n.key().to_string())
}

/// How [`Guard::analyze`] came to its answer (for tests and benchmarks).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The verdict cache held the exact text.
    ExactText,
    /// The text's shape vouched for it; the text itself was not parsed.
    Shape,
    /// The text was classified in full.
    Classified,
}

pub struct Guard {
    options: GuardOptions,
    /// `[guard] max_statement_bytes`: longer texts are refused unread.
    max_statement_bytes: usize,
    /// Analyses by exact text.
    verdicts: TextCache<Arc<Analysis>>,
    /// Shapes by key (see [`shape`]).
    shapes: TextCache<Shape>,
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
            allow_notifications: config.allow_notifications,
        };
        let shape_entries = (config.verdict_cache_size / SHAPE_SHARE).max(1);
        let shape_bytes = config.verdict_cache_bytes / SHAPE_SHARE;
        Guard {
            options,
            max_statement_bytes: config.max_statement_bytes,
            verdicts: TextCache::new(
                config
                    .verdict_cache_size
                    .saturating_sub(shape_entries)
                    .max(1),
                config.verdict_cache_bytes - shape_bytes,
            ),
            shapes: TextCache::new(shape_entries, shape_bytes),
        }
    }

    /// Classify `sql` (one or more statements), from the caches when seen before.
    pub fn analyze(&self, sql: &str) -> Arc<Analysis> {
        self.analyze_routed(sql).0
    }

    /// [`Guard::analyze`], and which way it answered.
    #[doc(hidden)]
    pub fn analyze_routed(&self, sql: &str) -> (Arc<Analysis>, Route) {
        if let Some(hit) = self.verdicts.get(sql) {
            return (hit, Route::ExactText);
        }
        if sql.len() <= self.max_statement_bytes
            && let Some(answer) = self.by_shape(sql)
        {
            // Not kept by exact text: texts with inline values rarely repeat, and would push out
            // the ones that do (parameterized statements of the extended protocol).
            return answer;
        }
        let analysis = Arc::new(if sql.len() > self.max_statement_bytes {
            classify::too_long(sql.len(), self.max_statement_bytes)
        } else if sql.len() > LARGE_TEXT {
            classify_large(|| classify::analyze(sql, &self.options))
        } else {
            classify::analyze(sql, &self.options)
        });
        self.verdicts.put(sql, Arc::clone(&analysis));
        (analysis, Route::Classified)
    }

    /// The analysis of `sql` through its shape: from the shape's template, or classified in full
    /// when it is the first text of its shape. `None` when the text has no shape the lexer
    /// reads, or its shape vouches for nothing.
    fn by_shape(&self, sql: &str) -> Option<(Arc<Analysis>, Route)> {
        let normalized = normalize::normalize(sql)?;
        match self.shapes.get(normalized.shape()) {
            Some(Shape::Template(template)) => {
                Some((Arc::new(shape::answer(&template, sql)), Route::Shape))
            }
            Some(Shape::FullParse) => None,
            None => {
                let (shape, analysis) = Shape::learn(&normalized, sql, &self.options);
                let analysis = analysis.map(Arc::new);
                if let (Shape::FullParse, Some(a)) = (&shape, &analysis) {
                    self.verdicts.put(sql, Arc::clone(a));
                }
                self.shapes.put(normalized.shape(), shape);
                analysis.map(|a| (a, Route::Classified))
            }
        }
    }

    /// Bytes the verdict and shape caches hold now (estimate).
    pub fn cache_bytes(&self) -> usize {
        self.verdicts.bytes() + self.shapes.bytes()
    }

    /// Classify without the caches (benchmarks, and tests comparing against the caches).
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

    #[test]
    fn texts_of_an_allowed_shape_are_answered_without_parsing() {
        let g = guard(32 << 20);
        // the first text of a shape is classified in full, the others are answered by it
        let (first, route) =
            g.analyze_routed("SELECT abalance FROM pgbench_accounts WHERE aid = 1");
        assert_eq!(route, Route::Classified);
        assert!(!first.is_denied());
        for aid in [2, 12345, 999_999_999] {
            // (the leading spaces and comment are part of the shape)
            let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid}");
            assert_eq!(g.analyze_routed(&sql).1, Route::Shape, "{sql}");
            let sql = format!("  SELECT abalance FROM pgbench_accounts WHERE aid = {aid} -- x");
            let (a, route) = g.analyze_routed(&sql);
            let want = if aid == 2 {
                Route::Classified
            } else {
                Route::Shape
            };
            assert_eq!(route, want, "{sql}");
            assert_eq!(*a, g.analyze_uncached(&sql), "{sql}");
            assert_eq!((a.statements[0].start, a.statements[0].end), (2, sql.len()));
        }
        // a number too large for an integer is another token: another shape
        let sql = "  SELECT abalance FROM pgbench_accounts WHERE aid = 9999999999 -- x";
        assert_eq!(g.analyze_routed(sql).1, Route::Classified);
        // not kept by exact text
        assert_eq!(
            g.analyze_routed("SELECT abalance FROM pgbench_accounts WHERE aid = 1")
                .1,
            Route::Shape
        );
    }

    #[test]
    fn shapes_that_are_not_a_plain_allow_classify_each_text() {
        let g = guard(32 << 20);
        for sql in [
            // denied with a parameter: each text is judged by its own literal
            "SELECT set_config('statement_timeout', '1000', false)",
            "SELECT set_config('app.current_store_id', 'south', true)",
            "SELECT query_to_xml('select 1', true, true, '')",
            // session state, transaction control, settings: not a plain allow
            "SELECT pg_advisory_lock(42)",
            "CREATE TEMP TABLE t AS SELECT 1",
            // no parameter allowed there: the shape does not parse
            "NOTIFY c, 'payload'",
            "COMMENT ON TABLE t IS 'x'",
            // libpg_query's grammar takes `$n` in SET (Postgres' does not): judged by the
            // value, so never a template (SET LOCAL is transaction-block sensitive; the
            // session form a setting change)
            "SET LOCAL search_path = 'pg_temp'",
            "SET LOCAL statement_timeout = 1000",
            "SET statement_timeout = 1000",
            "SET TIME ZONE 'UTC'",
        ] {
            let (a, route) = g.analyze_routed(sql);
            assert_eq!(route, Route::Classified, "{sql}");
            assert_eq!(*a, g.analyze_uncached(sql), "{sql}");
            // kept by exact text, as before shapes
            assert_eq!(g.analyze_routed(sql).1, Route::ExactText, "{sql}");
            // another text of the shape is classified too
            assert_eq!(
                g.analyze_routed(&format!("{sql} ")).1,
                Route::Classified,
                "{sql}"
            );
        }
    }

    /// libpg_query reads `SET LOCAL name = $1` (Postgres does not), and the guard allows that
    /// key with nothing to track; but the value decides whether the session gets a temporary
    /// schema on its search path. Transaction-block sensitive statements never make a template.
    #[test]
    fn a_set_local_value_is_judged_on_every_text() {
        let g = guard(32 << 20);
        let first = g.analyze("SET LOCAL search_path = 'public'");
        assert_eq!(first.session_state, None);
        let a = g.analyze("SET LOCAL search_path = 'pg_temp'");
        assert_eq!(a.session_state, Some("temporary object"));
    }

    /// A number where libpg_query reads a parameter but Postgres only a string (a typed literal,
    /// EXTRACT's field) is a syntax error, also after a string there made a template.
    #[test]
    fn a_number_where_only_a_string_parses_is_denied() {
        let g = guard(32 << 20);
        for (ok, bad) in [
            ("SELECT date '2024-01-01'", "SELECT date 20240101"),
            ("SELECT interval '2' day", "SELECT interval 2 day"),
            (
                "SELECT extract('year' FROM now())",
                "SELECT extract(2024 FROM now())",
            ),
        ] {
            for _ in 0..3 {
                assert!(!g.analyze(ok).is_denied(), "{ok}");
            }
            let a = g.analyze(bad);
            assert!(
                matches!(&a.verdict, Verdict::Deny(d) if d.sqlstate == "42601"),
                "{bad}: {:?}",
                a.verdict
            );
        }
    }
}
