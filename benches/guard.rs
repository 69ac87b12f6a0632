//! Classifier cost: cached verdicts (the steady state) and uncached parses.
//! Run: `cargo bench --bench guard`.

use criterion::{Criterion, criterion_group, criterion_main};
use rlsgate::config::GuardConfig;
use rlsgate::guard::Guard;
use std::hint::black_box;

const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
const SET: &str = "SET app.current_store_id = 'south'";
const JOIN: &str = "SELECT c.name, sum(i.quantity * i.unit_price) AS total FROM customers c \
                    JOIN sales_transactions t ON t.customer_id = c.customer_id \
                    JOIN sales_items i ON i.transaction_id = t.transaction_id \
                    WHERE t.created_at > now() - interval '7 days' GROUP BY c.name ORDER BY total DESC";
/// A 1 KB statement (analysed on its own stack: see guard::classify).
const LONG: &str = "INSERT INTO customers (store_id, name, email, note) VALUES \
    ('north', 'a', 'a@example.com', 'first'), ('north', 'b', 'b@example.com', 'second'), \
    ('north', 'c', 'c@example.com', 'third'), ('north', 'd', 'd@example.com', 'fourth'), \
    ('north', 'e', 'e@example.com', 'fifth'), ('north', 'f', 'f@example.com', 'sixth'), \
    ('north', 'g', 'g@example.com', 'seventh'), ('north', 'h', 'h@example.com', 'eighth'), \
    ('north', 'i', 'i@example.com', 'ninth'), ('north', 'j', 'j@example.com', 'tenth'), \
    ('north', 'k', 'k@example.com', 'eleventh'), ('north', 'l', 'l@example.com', 'twelfth'), \
    ('north', 'm', 'm@example.com', 'thirteenth'), ('north', 'n', 'n@example.com', 'fourteenth') \
    ON CONFLICT DO NOTHING RETURNING id, store_id, name, email, note, created_at";
const NESTED: &str =
    "SELECT query_to_xml('select set_config(''app.current_store_id'',''x'',true)', true, true, '')";

fn classify(c: &mut Criterion) {
    let guard = Guard::new(&GuardConfig::default());
    let mut g = c.benchmark_group("guard");
    for (name, sql) in [
        ("select", SELECT),
        ("set_protected", SET),
        ("join_186b", JOIN),
        ("query_to_xml", NESTED),
        ("long_1kb", LONG),
    ] {
        guard.analyze(sql);
        g.bench_function(format!("cached/{name}"), |b| {
            b.iter(|| guard.analyze(black_box(sql)))
        });
        g.bench_function(format!("uncached/{name}"), |b| {
            b.iter(|| guard.analyze_uncached(black_box(sql)))
        });
    }
    g.finish();
}

fn framing(c: &mut Criterion) {
    use bytes::BytesMut;
    use rlsgate::protocol::frame::try_read_frame;
    let mut one = BytesMut::new();
    rlsgate::protocol::frontend::write_query(SELECT, &mut one).unwrap();
    let mut batch = BytesMut::new();
    for _ in 0..64 {
        batch.extend_from_slice(&one);
    }
    c.bench_function("framing/64_queries", |b| {
        b.iter(|| {
            let mut buf = batch.clone();
            let mut n = 0;
            while let Ok(Some(f)) = try_read_frame(&mut buf, 1 << 20) {
                n += f.bytes.len();
            }
            black_box(n)
        })
    });
}

criterion_group!(benches, classify, framing);
criterion_main!(benches);
