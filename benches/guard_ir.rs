//! Instruction counts of classification, for callgrind (wall-clock benchmarks are too noisy on
//! shared machines). Runs one case `GUARD_IR_N` times (default 100):
//!
//! ```text
//! cargo bench --bench guard_ir --no-run
//! GUARD_IR_CASE=select GUARD_IR_N=0   valgrind --tool=callgrind target/release/deps/guard_ir-…
//! GUARD_IR_CASE=select GUARD_IR_N=100 valgrind --tool=callgrind target/release/deps/guard_ir-…
//! ```
//! (difference / 100 = instructions per classification). Cases: select, set_protected,
//! join_186b, query_to_xml, long_1kb, and the inline-literal cases select_literal, orm_literal.
//!
//! `GUARD_IR_MODE` picks the path measured:
//! - `uncached` (default): a full classification every time (`Guard::analyze_uncached`);
//! - `cached`: `Guard::analyze` of the same text every time (a verdict-cache hit);
//! - `varying` (inline-literal cases only): `Guard::analyze` of the case with a different
//!   number each time, as an application inlining its values sends it. The texts are made
//!   before counting starts, the same 1000 whatever `GUARD_IR_N`, so they cancel out.

use rlsgate::config::GuardConfig;
use rlsgate::guard::Guard;
use std::hint::black_box;

#[path = "common/cases.rs"]
mod cases;
use cases::{CASES, LITERAL_CASES, with_literal};

/// Texts made for `varying` (an upper bound for `GUARD_IR_N`).
const VARYING_TEXTS: usize = 1000;

fn main() {
    let case = std::env::var("GUARD_IR_CASE").unwrap_or_else(|_| "select".into());
    let mode = std::env::var("GUARD_IR_MODE").unwrap_or_else(|_| "uncached".into());
    let n: usize = std::env::var("GUARD_IR_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let plain = CASES.iter().find(|(name, _)| *name == case).map(|c| c.1);
    let literal = LITERAL_CASES
        .iter()
        .find(|(name, _)| *name == case)
        .map(|c| c.1);
    let sql = match (plain, literal) {
        (Some(sql), _) => sql.to_string(),
        (None, Some(template)) => with_literal(template, 12345),
        (None, None) => {
            eprintln!("unknown case {case}");
            std::process::exit(2);
        }
    };
    let guard = Guard::new(&GuardConfig::default());
    // one classification outside the count (lazy initialisation in the parser, warm caches)
    black_box(guard.analyze_uncached(&sql));
    black_box(guard.analyze(&sql));
    match mode.as_str() {
        "uncached" => {
            for _ in 0..n {
                black_box(guard.analyze_uncached(black_box(&sql)));
            }
        }
        "cached" => {
            for _ in 0..n {
                black_box(guard.analyze(black_box(&sql)));
            }
        }
        "varying" => {
            let Some(template) = literal else {
                eprintln!("varying needs an inline-literal case");
                std::process::exit(2);
            };
            let texts: Vec<String> = (0..VARYING_TEXTS.max(n))
                .map(|i| with_literal(template, 100_000 + i))
                .collect();
            for sql in texts.iter().take(n) {
                black_box(guard.analyze(black_box(sql)));
            }
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}
