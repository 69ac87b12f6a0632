//! The guard on arbitrary UTF-8: never panics; text the guard could not parse is never allowed;
//! statement ranges and split points are char boundaries inside the text, in order.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rlsgate::config::GuardConfig;
use rlsgate::guard::{Guard, Verdict};

static GUARD: OnceLock<Guard> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let guard = GUARD.get_or_init(|| Guard::new(&GuardConfig::default()));
    let a = guard.analyze(sql);
    if !a.parsed {
        assert!(
            !matches!(a.verdict, Verdict::Allow),
            "unparsed text allowed: {sql:?}"
        );
    }
    // statement ranges slice the text (the session splits multi-statement texts at them)
    let mut prev = 0;
    for st in &a.statements {
        assert!(
            st.start <= st.end && st.end <= sql.len(),
            "range {}..{} in {sql:?}",
            st.start,
            st.end
        );
        assert!(st.start >= prev, "statements out of order in {sql:?}");
        assert!(
            sql.is_char_boundary(st.start) && sql.is_char_boundary(st.end),
            "range {}..{} not on char boundaries in {sql:?}",
            st.start,
            st.end
        );
        prev = st.end;
    }
    for at in a.split_points() {
        assert!(
            at <= sql.len() && sql.is_char_boundary(at),
            "split point {at} in {sql:?}"
        );
    }
    // the cached verdict equals a fresh one
    let b = guard.analyze_uncached(sql);
    assert_eq!(
        matches!(a.verdict, Verdict::Allow),
        matches!(b.verdict, Verdict::Allow),
        "cached and fresh verdicts differ for {sql:?}"
    );
});
