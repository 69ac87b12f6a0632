//! A client's cancel request may arrive while the backend still runs rlsgate's own statements in
//! front of the client's: the sequence discard between tenants, the reset of another client's
//! settings, the tenant context. A cancel landing in one of those must never let the client's
//! statements run on the previous client's state, nor fail anyone else's statements.
//!
//! A hostile tenant times cancels at random against its own statements while another tenant
//! takes sequence values and changes a setting on the same connection: its probes must only
//! ever see its own state (or be cancelled).

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio_postgres::SimpleQueryMessage;

async fn proxy(pool_size: usize, depth: usize) -> Proxy {
    let db = demo_db();
    let config = config_text(&db, pool_size, "").replace(
        &format!("pipeline_depth = {}", pipeline_depth()),
        &format!("pipeline_depth = {depth}"),
    );
    start_proxy_with(&db, &config).await
}

fn first_value(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
        _ => None,
    })
}

/// Busy threads while the race runs: the backend gets preempted in the middle of rlsgate's own
/// statements now and then, which stretches the windows a cancel can land in (as on a loaded
/// server).
struct Load(
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    Vec<std::thread::JoinHandle<()>>,
);

impl Load {
    fn start(threads: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Load(stop, handles)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        for h in self.1.drain(..) {
            let _ = h.join();
        }
    }
}

/// What one probe of the attacker saw.
#[derive(Default, Debug)]
struct Tally {
    probes: usize,
    cancelled: usize,
    undefined: usize,
}

/// North takes sequence values and holds `DateStyle = SQL, DMY` on the shared connection(s);
/// south probes `lastval()` and `DateStyle` while firing a cancel timed at random around each
/// probe; a second south client probes `lastval()` without cancels (it may share a pipeline
/// with the first one's cancelled units). Runs `rounds` rounds.
async fn race(proxy: &Proxy, rounds: usize) -> Tally {
    let north = client(proxy, "north").await;
    north
        .simple_query("SET DateStyle = 'SQL, DMY'")
        .await
        .unwrap();
    let south = client(proxy, "south").await;
    let quiet = client(proxy, "south").await;
    let mut tally = Tally::default();
    let _load = Load::start(2);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..rounds {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        north
            .simple_query(&format!(
                "INSERT INTO customers (store_id, name, email) VALUES ('north', 'race', 'race-{i}@example.com')"
            ))
            .await
            .unwrap();
        let token = south.cancel_token();
        let cancel = tokio::spawn(async move {
            let _ = token.cancel_query(tokio_postgres::NoTls).await;
        });
        // the cancel takes about a millisecond to reach the server: start the probe somewhere
        // in that window
        std::thread::sleep(Duration::from_micros((x >> 40) % 1_500));
        let lastval = (x >> 20).is_multiple_of(2);
        let sql = if lastval {
            "SELECT lastval()::text"
        } else {
            "SELECT current_setting('DateStyle')"
        };
        let (probe, quiet_probe) = tokio::join!(
            async {
                if (x >> 30).is_multiple_of(2) {
                    south.simple_query(sql).await.map(|m| first_value(&m))
                } else {
                    south
                        .query(sql, &[])
                        .await
                        .map(|rows| rows.first().map(|r| r.get::<_, String>(0)))
                }
            },
            quiet.simple_query("SELECT lastval()::text")
        );
        cancel.await.unwrap();
        tally.probes += 1;
        match probe {
            Ok(v) if lastval => panic!("ESCAPE: south read north's sequence value {v:?}"),
            Ok(v) => assert_eq!(
                v.as_deref(),
                Some("ISO, MDY"),
                "south's statement ran with north's settings"
            ),
            Err(e) if code(&e) == "57014" => tally.cancelled += 1,
            Err(e) if lastval && code(&e) == "55000" => tally.undefined += 1,
            Err(e) => panic!("probe {sql}: unexpected error {e:?}"),
        }
        match quiet_probe {
            Ok(m) => panic!(
                "ESCAPE: the other south client read north's sequence value {:?}",
                first_value(&m)
            ),
            Err(e) => assert_eq!(code(&e), "55000", "{e:?}"),
        }
    }
    tally
}

/// Exclusive connections, one upstream connection: every probe follows north on the same
/// backend, behind a sequence discard and a settings reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_never_skips_the_discard_or_reset_on_an_exclusive_connection() {
    let proxy = proxy(1, 1).await;
    let started = Instant::now();
    let tally = race(&proxy, 600).await;
    eprintln!("{tally:?} in {:?}", started.elapsed());
    assert!(tally.undefined > 0, "{tally:?}");
    proxy.stop().await;
}

/// One lane kept busy by both tenants: north takes sequence values, quiet south clients probe
/// `lastval()`, and a south attacker cancels each of its own probes while they wait in the
/// pipeline. A cancel lands in whatever the backend runs when it arrives, rlsgate's sequence
/// discard and tenant context included; nobody may read north's values, and no client but the
/// attacker may see an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_never_skips_the_discard_on_a_lane() {
    let proxy = proxy(2, 8).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = || !stop.load(std::sync::atomic::Ordering::Relaxed);
    let north = (0..2).map(|k| {
        let proxy = &proxy;
        async move {
            let c = client(proxy, "north").await;
            let mut n = 0;
            while running() {
                c.simple_query(&format!(
                    "INSERT INTO customers (store_id, name, email) VALUES ('north', 'race', 'lane-{k}-{n}@example.com')"
                ))
                .await
                .expect("north's insert");
                n += 1;
            }
            n
        }
    });
    let quiet = (0..2).map(|_| {
        let proxy = &proxy;
        async move {
            let c = client(proxy, "south").await;
            let mut n = 0;
            while running() {
                match c
                    .simple_query("SELECT lastval()::text FROM pg_sleep(0.0002)")
                    .await
                {
                    Ok(m) => panic!(
                        "ESCAPE: a south client read north's sequence value {:?}",
                        first_value(&m)
                    ),
                    Err(e) => assert_eq!(code(&e), "55000", "{e:?}"),
                }
                n += 1;
            }
            n
        }
    });
    let attacker = async {
        let _load = Load::start(1);
        let c = client(&proxy, "south").await;
        let started = Instant::now();
        let mut tally = Tally::default();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        // Probes sleep about as long as a cancel takes to arrive: it lands in the probe, or
        // just after it in the units behind (rlsgate's discard and context in front of them
        // included). How long that is depends on the machine's load: while none lands, the
        // probes get longer.
        let mut longest_us = 2_000;
        let mut since_landed = 0;
        while started.elapsed() < Duration::from_secs(4)
            || (tally.cancelled < 3 && started.elapsed() < Duration::from_secs(30))
        {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            since_landed += 1;
            if since_landed > 50 && longest_us < 64_000 {
                longest_us *= 2;
                since_landed = 0;
            }
            let sql = format!(
                "SELECT lastval()::text FROM pg_sleep({})",
                ((x >> 40) % longest_us) as f64 / 1e6
            );
            // (a task of its own: the futures of this test's clients share one task)
            let token = c.cancel_token();
            let cancel = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let _ = token.cancel_query(tokio_postgres::NoTls).await;
            });
            let probe = c.simple_query(&sql).await;
            cancel.await.unwrap();
            tally.probes += 1;
            match probe {
                Ok(m) => panic!(
                    "ESCAPE: south read north's sequence value {:?}",
                    first_value(&m)
                ),
                Err(e) if code(&e) == "57014" => {
                    tally.cancelled += 1;
                    since_landed = 0;
                }
                Err(e) if code(&e) == "55000" => tally.undefined += 1,
                Err(e) => panic!("unexpected error {e:?}"),
            }
        }
        eprintln!("probes slept up to {longest_us} µs");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        tally
    };
    let (inserts, probes, tally) = tokio::join!(
        futures_util::future::join_all(north),
        futures_util::future::join_all(quiet),
        attacker
    );
    eprintln!(
        "attacker {tally:?}; north inserted {inserts:?}, quiet probes {probes:?}; {} units pipelined, {} run again",
        proxy.shared.pipelines.units(),
        proxy.shared.pipelines.reruns()
    );
    assert!(tally.cancelled > 0 && tally.undefined > 0, "{tally:?}");
    assert!(probes.iter().chain(&inserts).all(|&n| n > 0));
    proxy.stop().await;
}

/// One unit of the self-cancelling client (buffered: a round's units go in one write): simple
/// Queries, an extended execution, a driver's prepare (Parse/Describe/Sync) and a statement
/// Close with its Sync.
async fn push_unit(c: &mut RawClient, kind: u64) {
    match kind % 6 {
        0 => c.query("SELECT 1").await,
        1 => c.query("SELECT 1 FROM pg_sleep(0.0002)").await,
        2 => c.query("SELECT 1; SELECT 2").await,
        3 => {
            c.parse("", "SELECT 1").await;
            c.bind("", "").await;
            c.execute("").await;
            c.sync().await;
        }
        4 => {
            c.parse("", "SELECT 1").await;
            c.send(b'D', b"S\0").await;
            c.sync().await;
        }
        _ => {
            c.send(b'C', b"Sgone\0").await;
            c.sync().await;
        }
    }
}

/// A client fires its own cancel at random moments into rounds of short autocommit units of
/// every shape, pipelined (the backend runs them back to back, rlsgate's own statements between
/// them). Wherever it lands (transaction_wrap's `BEGIN`, the tenant context, the client's
/// statement, rlsgate's `COMMIT`, or nothing), a unit may fail only with 57014 and must end
/// outside any transaction: the client never opened one. Some cancels must have landed.
async fn self_cancels(wrap: bool, depth: usize) {
    const UNITS: usize = 12;
    let db = demo_db();
    let config = config_text(&db, 1, "")
        .replace(
            &format!("pipeline_depth = {}", pipeline_depth()),
            &format!("pipeline_depth = {depth}"),
        )
        .replace(
            &format!("transaction_wrap = {WRAP}"),
            &format!("transaction_wrap = {wrap}"),
        );
    let proxy = start_proxy_with(&db, &config).await;
    let mut c = RawClient::connect(&proxy, &token("south")).await;
    assert_eq!(c.backend_key.len(), 8, "BackendKeyData");
    let _load = Load::start(1);
    let started = Instant::now();
    let (mut rounds, mut cancelled) = (0usize, 0usize);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 24
    };
    // The cancel takes a while to reach the server (a connection to rlsgate, one to the
    // postmaster, its fork): it goes out somewhere between `window` before the round's write
    // and `window` after it; the window widens while no cancel lands.
    let (mut window_us, mut since_landed) = (500u64, 0);
    while started.elapsed() < Duration::from_secs(4)
        || (cancelled < 5 && started.elapsed() < Duration::from_secs(30))
    {
        since_landed += 1;
        if since_landed > 30 && window_us < 16_000 {
            window_us *= 2;
            since_landed = 0;
        }
        let kinds: Vec<u64> = (0..UNITS).map(|_| next()).collect();
        c.start_batch();
        for &kind in &kinds {
            push_unit(&mut c, kind).await;
        }
        let offset = next() % (2 * window_us);
        let key = c.backend_key.clone();
        let cancel = if offset < window_us {
            let cancel = tokio::spawn(RawClient::cancel(proxy.addr, key));
            std::thread::sleep(Duration::from_micros(window_us - offset));
            c.write_batch().await;
            cancel
        } else {
            c.write_batch().await;
            std::thread::sleep(Duration::from_micros(offset - window_us));
            tokio::spawn(RawClient::cancel(proxy.addr, key))
        };
        for (i, kind) in kinds.iter().enumerate() {
            let replies = c.until_ready().await;
            for m in replies.iter().filter(|m| m.tag == 'E') {
                assert_eq!(
                    m.code(),
                    "57014",
                    "round {rounds}, unit {i} (kind {}): {}",
                    kind % 6,
                    m.field(b'M')
                );
                cancelled += 1;
                since_landed = 0;
            }
            let ready = replies.last().expect("ReadyForQuery");
            assert_eq!(
                ready.body,
                b"I",
                "round {rounds}, unit {i} (kind {}) left the client in a transaction: {}",
                kind % 6,
                tags(&replies)
            );
        }
        cancel.await.unwrap();
        rounds += 1;
    }
    // a late cancel may still land in the next unit; after a pause none is left
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.query("SELECT count(*) FROM customers").await;
    let replies = c.until_ready().await;
    assert_eq!(tags(&replies), "T D C Z", "{replies:?}");
    assert_eq!(replies.last().unwrap().body, b"I");
    eprintln!(
        "wrap {wrap}, depth {depth}: {rounds} rounds of {UNITS} units, {cancelled} cancelled in {:?} (window {window_us} µs)",
        started.elapsed()
    );
    assert!(cancelled > 0, "no cancel landed in {rounds} rounds");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_never_leaves_a_wrapped_unit_in_a_transaction() {
    self_cancels(true, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_never_leaves_a_unit_in_a_transaction() {
    self_cancels(false, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_never_leaves_a_pipelined_unit_in_a_transaction() {
    self_cancels(true, 8).await;
    self_cancels(false, 8).await;
}
