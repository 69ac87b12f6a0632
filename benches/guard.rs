//! Classifier cost: cached verdicts (the steady state), uncached parses, and statements whose
//! inline values change every time (`varying/…`).
//! Run: `cargo bench --bench guard`.

use criterion::{Criterion, criterion_group, criterion_main};
use rlsgate::config::GuardConfig;
use rlsgate::guard::Guard;
use std::hint::black_box;

#[path = "common/cases.rs"]
mod cases;
use cases::{CASES, LITERAL_CASES, with_literal};

fn classify(c: &mut Criterion) {
    let guard = Guard::new(&GuardConfig::default());
    let mut g = c.benchmark_group("guard");
    for &(name, sql) in CASES {
        guard.analyze(sql);
        g.bench_function(format!("cached/{name}"), |b| {
            b.iter(|| guard.analyze(black_box(sql)))
        });
        g.bench_function(format!("uncached/{name}"), |b| {
            b.iter(|| guard.analyze_uncached(black_box(sql)))
        });
    }
    // Inline values: a new text every time, the same statement but for one number.
    for &(name, template) in LITERAL_CASES {
        let mut i = 0usize;
        g.bench_function(format!("varying/{name}"), |b| {
            b.iter_batched(
                || {
                    i += 1;
                    with_literal(template, i)
                },
                |sql| guard.analyze(black_box(&sql)),
                criterion::BatchSize::SmallInput,
            )
        });
        let sql = with_literal(template, 12345);
        guard.analyze(&sql);
        g.bench_function(format!("cached/{name}"), |b| {
            b.iter(|| guard.analyze(black_box(&sql)))
        });
        g.bench_function(format!("uncached/{name}"), |b| {
            b.iter(|| guard.analyze_uncached(black_box(&sql)))
        });
    }
    g.finish();
}

fn framing(c: &mut Criterion) {
    use bytes::BytesMut;
    use rlsgate::protocol::frame::try_read_frame;
    let mut one = BytesMut::new();
    rlsgate::protocol::frontend::write_query(CASES[0].1, &mut one).unwrap();
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
