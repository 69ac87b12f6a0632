//! Instruction counts of uncached classification, for callgrind (wall-clock benchmarks are too
//! noisy on shared machines). Runs one case `GUARD_IR_N` times (default 100):
//!
//! ```text
//! cargo bench --bench guard_ir --no-run
//! GUARD_IR_CASE=select GUARD_IR_N=0   valgrind --tool=callgrind target/release/deps/guard_ir-…
//! GUARD_IR_CASE=select GUARD_IR_N=100 valgrind --tool=callgrind target/release/deps/guard_ir-…
//! ```
//! (difference / 100 = instructions per classification). Cases: select, set_protected,
//! join_186b, query_to_xml, long_1kb.

use rlsgate::config::GuardConfig;
use rlsgate::guard::Guard;
use std::hint::black_box;

#[path = "common/cases.rs"]
mod cases;
use cases::CASES;

fn main() {
    let case = std::env::var("GUARD_IR_CASE").unwrap_or_else(|_| "select".into());
    let n: usize = std::env::var("GUARD_IR_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let Some((_, sql)) = CASES.iter().find(|(name, _)| *name == case) else {
        eprintln!("unknown case {case}");
        std::process::exit(2);
    };
    let guard = Guard::new(&GuardConfig::default());
    // one classification outside the count (lazy initialisation in the parser)
    black_box(guard.analyze_uncached(sql));
    for _ in 0..n {
        black_box(guard.analyze_uncached(black_box(sql)));
    }
}
