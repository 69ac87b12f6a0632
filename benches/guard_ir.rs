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

const CASES: &[(&str, &str)] = &[
    (
        "select",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    ),
    ("set_protected", "SET app.current_store_id = 'south'"),
    (
        "join_186b",
        "SELECT c.name, sum(i.quantity * i.unit_price) AS total FROM customers c \
         JOIN sales_transactions t ON t.customer_id = c.customer_id \
         JOIN sales_items i ON i.transaction_id = t.transaction_id \
         WHERE t.created_at > now() - interval '7 days' GROUP BY c.name ORDER BY total DESC",
    ),
    (
        "query_to_xml",
        "SELECT query_to_xml('select set_config(''app.current_store_id'',''x'',true)', true, true, '')",
    ),
    (
        "long_1kb",
        "INSERT INTO customers (store_id, name, email, note) VALUES \
         ('north', 'a', 'a@example.com', 'first'), ('north', 'b', 'b@example.com', 'second'), \
         ('north', 'c', 'c@example.com', 'third'), ('north', 'd', 'd@example.com', 'fourth'), \
         ('north', 'e', 'e@example.com', 'fifth'), ('north', 'f', 'f@example.com', 'sixth'), \
         ('north', 'g', 'g@example.com', 'seventh'), ('north', 'h', 'h@example.com', 'eighth'), \
         ('north', 'i', 'i@example.com', 'ninth'), ('north', 'j', 'j@example.com', 'tenth'), \
         ('north', 'k', 'k@example.com', 'eleventh'), ('north', 'l', 'l@example.com', 'twelfth'), \
         ('north', 'm', 'm@example.com', 'thirteenth'), ('north', 'n', 'n@example.com', 'fourteenth') \
         ON CONFLICT DO NOTHING RETURNING id, store_id, name, email, note, created_at",
    ),
];

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
