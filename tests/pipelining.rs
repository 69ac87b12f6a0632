//! `[server] pipeline_depth` > 1: autocommit units of many clients pipelined onto a few shared
//! server connections. Every row a client reads or writes must still be its tenant's, every
//! reply must reach the client that asked, and everything that is not plain autocommit work
//! must behave as before.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use support::*;
use tokio_postgres::SimpleQueryMessage;

/// A proxy with pipelining on (`depth`) in front of a fresh demo database.
async fn pipelined_proxy(pool_size: usize, depth: usize, extra: &str) -> Proxy {
    pipelined_proxy_on(demo_db(), pool_size, depth, extra).await
}

async fn pipelined_proxy_on(db: String, pool_size: usize, depth: usize, extra: &str) -> Proxy {
    let config = config_text(&db, pool_size, extra).replace(
        &format!("pipeline_depth = {}", pipeline_depth()),
        &format!("pipeline_depth = {depth}"),
    );
    start_proxy_with(&db, &config).await
}

fn first_column(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect()
}

/// Tenants and how many customers each has in the demo data.
const TENANTS: [(&str, usize); 3] = [("north", 3), ("south", 2), ("nowhere", 0)];

/// One client's workload: simple and extended reads, writes, errors; checks every row.
async fn workload(proxy: &Proxy, tenant: &'static str, customers: usize, rounds: usize, seed: u64) {
    let c = client(proxy, tenant).await;
    let mut x = seed;
    for i in 0..rounds {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        match (x >> 33) % 6 {
            0 => {
                let msgs = c
                    .simple_query("SELECT store_id FROM customers")
                    .await
                    .unwrap();
                let rows = first_column(&msgs);
                // (the tenant's other clients insert and delete meanwhile)
                assert!(rows.len() >= customers, "{tenant}: {rows:?}");
                assert!(rows.iter().all(|s| s == tenant), "{tenant} saw {rows:?}");
            }
            1 => {
                let rows = c
                    .query(
                        "SELECT store_id, $1::int FROM products WHERE $1::int >= 0",
                        &[&(i as i32)],
                    )
                    .await
                    .unwrap();
                for r in &rows {
                    assert_eq!(r.get::<_, String>(0), tenant);
                    assert_eq!(r.get::<_, i32>(1), i as i32);
                }
            }
            2 => {
                let setting: String = c
                    .query_one("SELECT current_setting('app.current_store_id')", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(setting, tenant);
            }
            3 => {
                // an error in one unit stays in that unit
                let e = c.simple_query("SELECT 1/0").await.unwrap_err();
                assert_eq!(code(&e), "22012", "{e}");
                let e = c.query("SELECT 1/$1::int", &[&0i32]).await.unwrap_err();
                assert_eq!(code(&e), "22012", "{e}");
            }
            4 if customers > 0 => {
                // a write: RLS admits only the tenant's own rows
                let email = format!("{tenant}-{seed}-{i}@example.com");
                let row = c
                    .query_one(
                        "INSERT INTO customers (store_id, name, email) VALUES (current_setting('app.current_store_id'), 'p', $1) RETURNING store_id",
                        &[&email],
                    )
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, String>(0), tenant);
                let n = c
                    .execute("DELETE FROM customers WHERE email = $1", &[&email])
                    .await
                    .unwrap();
                assert_eq!(n, 1);
            }
            _ => {
                // a unit that is not plain autocommit work takes the exclusive path meanwhile
                let e = c
                    .simple_query("SET app.current_store_id = 'north'")
                    .await
                    .unwrap_err();
                assert_eq!(code(&e), "42501", "{e}");
                let msgs = c
                    .simple_query("BEGIN; SELECT current_setting('app.current_store_id'); COMMIT")
                    .await
                    .unwrap();
                assert_eq!(first_column(&msgs), [tenant]);
            }
        }
    }
}

/// Many tenants' clients interleave units on two shared connections: nobody sees another
/// tenant's row or reply, errors stay in their unit, and the units did run pipelined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_interleaving_on_shared_connections_stay_isolated() {
    let proxy = pipelined_proxy(4, 4, "").await;
    let clients = (0..12).map(|i| {
        let (tenant, customers) = TENANTS[i % TENANTS.len()];
        workload(&proxy, tenant, customers, 150, i as u64 + 1)
    });
    join_all(clients).await;
    let units = proxy.shared.pipelines.units();
    assert!(units > 1000, "only {units} units went through lanes");
    // lanes give their connections back once idle
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(proxy.shared.pipelines.lane_count(), 0);
    proxy.stop().await;
}

/// With depth 1 nothing is pipelined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_one_pipelines_nothing() {
    let proxy = pipelined_proxy(2, 1, "").await;
    workload(&proxy, "north", 3, 30, 7).await;
    assert_eq!(proxy.shared.pipelines.units(), 0);
    proxy.stop().await;
}

/// `lastval()` after another tenant's insert on the same connection: the sequence state went
/// with the tenant switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_sequence_state_does_not_show() {
    let proxy = pipelined_proxy(2, 4, "").await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    for i in 0..20 {
        north
            .simple_query(&format!(
                "INSERT INTO customers (store_id, name, email) VALUES ('north', 'x', 'seq-{i}@example.com')"
            ))
            .await
            .unwrap();
        let e = south.simple_query("SELECT lastval()").await.unwrap_err();
        assert_eq!(code(&e), "55000", "{e}");
    }
    // (most of them: on a loaded machine a unit may find the lane's head slow and take an
    // exclusive connection)
    let units = proxy.shared.pipelines.units();
    assert!(units >= 30, "{units} units pipelined");
    proxy.stop().await;
}

/// A Bind of the unnamed statement without a Parse, after a pipelined unit Parsed it, runs
/// that statement (the session knows the client's unnamed statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_of_a_pipelined_unit_is_kept() {
    let proxy = pipelined_proxy(2, 4, "").await;
    let mut c = RawClient::connect(&proxy, &token("south")).await;
    c.start_batch();
    c.parse("", "SELECT store_id FROM customers ORDER BY 1 LIMIT 1")
        .await;
    c.bind("", "").await;
    c.execute("").await;
    c.sync().await;
    c.write_batch().await;
    let first = c.until_ready().await;
    assert_eq!(tags(&first), "1 2 D C Z");
    // the same statement, bound again alone (another unit: another connection, maybe)
    c.start_batch();
    c.bind("", "").await;
    c.execute("").await;
    c.sync().await;
    c.write_batch().await;
    let again = c.until_ready().await;
    assert_eq!(tags(&again), "2 D C Z");
    assert!(String::from_utf8_lossy(&again[1].body).contains("south"));
    assert!(proxy.shared.pipelines.units() >= 1);
    proxy.stop().await;
}

/// A cancel reaches the client's own pipelined statement, and only it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_the_clients_own_pipelined_statement() {
    let proxy = pipelined_proxy(2, 4, "").await;
    let sleeper = client(&proxy, "north").await;
    let other = client(&proxy, "south").await;
    let cancel = sleeper.cancel_token();
    let started = std::time::Instant::now();
    let sleeping = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(20)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // queued behind the sleep on the one lane
    let behind = tokio::spawn(async move {
        let msgs = other
            .simple_query("SELECT current_setting('app.current_store_id')")
            .await
            .unwrap();
        first_column(&msgs)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = sleeping.await.unwrap().unwrap_err();
    assert_eq!(code(&e), "57014", "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(behind.await.unwrap(), ["south"]);
    proxy.stop().await;
}

/// A client's statement prepared without a connection (Parse + Sync) whose Parse then fails on
/// the lane: the client gets the server's error for that unit; the lane and the session go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_deferred_prepare_on_a_lane_is_the_clients_error() {
    let proxy = pipelined_proxy(2, 4, "").await;
    let other = client(&proxy, "north").await;
    let mut c = RawClient::connect(&proxy, &token("south")).await;
    c.start_batch();
    c.parse("missing", "SELECT * FROM no_such_table").await;
    c.sync().await;
    c.write_batch().await;
    assert_eq!(tags(&c.until_ready().await), "1 Z");
    for _ in 0..3 {
        c.start_batch();
        c.bind("", "missing").await;
        c.execute("").await;
        c.sync().await;
        c.write_batch().await;
        let msgs = c.until_ready().await;
        assert_eq!(tags(&msgs), "E Z");
        assert_eq!(msgs[0].code(), "42P01");
        assert_eq!(count(&other, "customers").await, 3);
    }
    c.query("SELECT current_setting('app.current_store_id')")
        .await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "T D C Z");
    assert!(String::from_utf8_lossy(&msgs[1].body).contains("south"));
    assert!(proxy.shared.pipelines.units() >= 4);
    proxy.stop().await;
}

/// The backend under a lane is terminated mid-unit: the client gets one error for that unit and
/// its next statement runs (on another connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_whose_backend_dies_fails_only_its_units() {
    let proxy = pipelined_proxy(2, 4, "").await;
    let c = client(&proxy, "north").await;
    let sleeping = tokio::spawn(async move {
        let e = c.simple_query("SELECT pg_sleep(30)").await.unwrap_err();
        (c, e)
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    pg().psql(
        &proxy.db,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'",
    )
    .unwrap();
    let (c, e) = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the client is answered")
        .unwrap();
    assert_eq!(code(&e), "08006", "{e}");
    let msgs = c
        .simple_query("SELECT current_setting('app.current_store_id')")
        .await
        .unwrap();
    assert_eq!(first_column(&msgs), ["north"]);
    proxy.stop().await;
}

/// Clients whose session settings differ never share a lane: each unit runs with its client's
/// settings, also when many of them interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_run_with_their_own_clients_settings() {
    // (room for a lane per setting: up to half the pool are lanes)
    let proxy = pipelined_proxy(6, 4, "").await;
    let names = ["app_one", "app_two", "app_three"];
    let runs = names.iter().map(|name| {
        let proxy = &proxy;
        async move {
            let mut c =
                RawClient::connect_with(proxy, &token("north"), &[("application_name", name)])
                    .await;
            for _ in 0..100 {
                c.query("SELECT current_setting('application_name')").await;
                let msgs = c.until_ready().await;
                assert_eq!(tags(&msgs), "T D C Z");
                assert!(
                    String::from_utf8_lossy(&msgs[1].body).contains(name),
                    "{name}: {:?}",
                    String::from_utf8_lossy(&msgs[1].body)
                );
            }
        }
    });
    join_all(runs).await;
    assert!(proxy.shared.pipelines.units() >= 300);
    proxy.stop().await;
}

/// `query_timeout` with a unit on a lane: the waiting client's session ends with 57014 (as on
/// an exclusive connection); the proxy goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_ends_a_session_waiting_on_a_lane() {
    let db = demo_db();
    let config = config_text(&db, 2, "").replace(
        &format!("pipeline_depth = {}", pipeline_depth()),
        "pipeline_depth = 4\nquery_timeout = \"1s\"",
    );
    let proxy = start_proxy_with(&db, &config).await;
    let c = client(&proxy, "north").await;
    let started = std::time::Instant::now();
    let e = c.simple_query("SELECT pg_sleep(5)").await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(code(&e), "57014", "{e}");
    assert!(proxy.shared.pipelines.units() >= 1);
    let d = client(&proxy, "south").await;
    assert_eq!(count(&d, "customers").await, 2);
    proxy.stop().await;
}

/// Soak: 16 clients of 6 tenants send 100 000 units over 2 shared connections, with errors,
/// server-side statement timeouts and cancels mixed in. Every row each client reads must be
/// its tenant's and every reply the one it asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_interleaved_units_stay_isolated() {
    const CLIENTS: usize = 16;
    const UNITS: usize = 100_000 / CLIENTS;
    // tenant tK has K + 1 customers; statements over 100 ms time out on the server
    let db = demo_db();
    pg().psql(
        &db,
        &format!(
            "INSERT INTO stores SELECT 't' || k, 'soak' FROM generate_series(0, 5) k;
             INSERT INTO customers (store_id, name, email)
               SELECT 't' || k, 'c', 'c' || j || '@soak' FROM generate_series(0, 5) k, generate_series(0, k) j;
             ALTER DATABASE {db} SET statement_timeout = '100ms';"
        ),
    )
    .unwrap();
    let proxy = pipelined_proxy_on(db, 4, 8, "").await;
    let cancels_sent = &std::sync::atomic::AtomicU64::new(0);
    let runs = (0..CLIENTS).map(|i| {
        let proxy = &proxy;
        async move {
            let k = i % 6;
            let tenant = format!("t{k}");
            let c = client(proxy, &tenant).await;
            let rows_stmt = c
                .prepare("SELECT store_id, count(*) OVER () FROM customers WHERE $1::int >= 0")
                .await
                .unwrap();
            let div = c.prepare("SELECT 10 / $1::int").await.unwrap();
            let mut x = i as u64 + 11;
            let (mut errors, mut cancels, mut timeouts) = (0, 0, 0);
            for u in 0..UNITS {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                match (x >> 33) % 1000 {
                    0..=399 => {
                        let rows = c.query(&rows_stmt, &[&(u as i32)]).await.unwrap();
                        assert_eq!(rows.len(), k + 1, "{tenant}");
                        for r in &rows {
                            assert_eq!(r.get::<_, String>(0), tenant);
                            assert_eq!(r.get::<_, i64>(1), k as i64 + 1);
                        }
                    }
                    400..=799 => {
                        let msgs = c
                            .simple_query(&format!(
                                "SELECT current_setting('app.current_store_id') || ':{u}'"
                            ))
                            .await
                            .unwrap();
                        assert_eq!(first_column(&msgs), [format!("{tenant}:{u}")]);
                    }
                    800..=997 => {
                        // errors: one simple, one extended; the answer says which unit it was
                        let n = ((x >> 40) % 3) as i32;
                        match c.query_one(&div, &[&n]).await {
                            Ok(row) => assert_eq!(row.get::<_, i32>(0), 10 / n),
                            Err(e) => {
                                assert_eq!((code(&e), n), ("22012".to_string(), 0), "{e}");
                                errors += 1;
                            }
                        }
                    }
                    998 => {
                        // a server-side statement timeout
                        let e = c.simple_query("SELECT pg_sleep(0.2)").await.unwrap_err();
                        assert_eq!(code(&e), "57014", "{e}");
                        timeouts += 1;
                    }
                    _ => {
                        // a cancel while the unit runs (or waits on its lane)
                        let token = c.cancel_token();
                        cancels_sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let canceller = tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            let _ = token.cancel_query(tokio_postgres::NoTls).await;
                        });
                        match c.simple_query("SELECT pg_sleep(0.05)").await {
                            Ok(_) => {}
                            Err(e) => {
                                assert_eq!(code(&e), "57014", "{e}");
                                cancels += 1;
                            }
                        }
                        canceller.await.unwrap();
                        // A driver's cancel returns once written; one rlsgate deals with after
                        // the unit ended would land in the client's next unit (as with Postgres
                        // itself): wait until rlsgate has dealt with every cancel sent so far.
                        while proxy.shared.metrics.cancels()
                            < cancels_sent.load(std::sync::atomic::Ordering::SeqCst)
                        {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            }
            (errors, cancels, timeouts)
        }
    });
    let outcomes = join_all(runs).await;
    let (errors, cancels, timeouts) = outcomes
        .iter()
        .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    assert!(
        errors > 0 && cancels > 0 && timeouts > 0,
        "{errors} {cancels} {timeouts}"
    );
    let units = proxy.shared.pipelines.units();
    assert!(units >= 95_000, "only {units} units went through lanes");
    proxy.stop().await;
}

/// Cancels sent for very short units, with other clients' units queued behind them on the one
/// lane: a cancel that lands after its unit ended hits the unit behind, which rlsgate then
/// runs again. No other client ever sees a cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_never_reaches_another_clients_unit() {
    let proxy = pipelined_proxy(2, 8, "").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let victims = (0..5).map(|_| {
        let proxy = &proxy;
        let stop = stop.clone();
        async move {
            let c = client(proxy, "south").await;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let msgs = c
                    .simple_query(
                        "SELECT current_setting('app.current_store_id') FROM pg_sleep(0.0005)",
                    )
                    .await
                    .expect("a unit of another client must never be cancelled");
                assert_eq!(first_column(&msgs), ["south"]);
                n += 1;
            }
            n
        }
    });
    let attacker = async {
        let c = client(&proxy, "north").await;
        let started = std::time::Instant::now();
        let mut sent = 0;
        // until a cancel hit a unit behind (or long enough to have tried hard)
        while started.elapsed() < Duration::from_secs(20)
            && (proxy.shared.pipelines.reruns() == 0 || started.elapsed() < Duration::from_secs(3))
        {
            let token = c.cancel_token();
            let (r, _) = tokio::join!(c.simple_query("SELECT 1"), async {
                let _ = token.cancel_query(tokio_postgres::NoTls).await;
            });
            if let Err(e) = r {
                assert_eq!(code(&e), "57014", "{e}");
            }
            sent += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sent
    };
    let (ran, sent) = tokio::join!(join_all(victims), attacker);
    let reruns = proxy.shared.pipelines.reruns();
    eprintln!("{sent} cancels, victims ran {ran:?} units, {reruns} units ran again");
    assert!(ran.iter().all(|&n| n > 0));
    proxy.stop().await;
}

/// Two long units on one lane, both cancelled: the second, at risk from the first one's cancel
/// while it waited, still answers its own cancel with 57014 (it is not run again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_long_units_on_a_lane_can_be_cancelled() {
    let proxy = pipelined_proxy(2, 4, "").await;
    let a = client(&proxy, "north").await;
    let b = client(&proxy, "south").await;
    let (ta, tb) = (a.cancel_token(), b.cancel_token());
    let started = std::time::Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        ta.cancel_query(tokio_postgres::NoTls).await.unwrap();
        tb.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let (ra, rb) = tokio::join!(
        a.simple_query("SELECT pg_sleep(10)"),
        b.simple_query("SELECT pg_sleep(10)")
    );
    canceller.await.unwrap();
    for r in [ra, rb] {
        let e = r.unwrap_err();
        assert_eq!(code(&e), "57014", "{e}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    proxy.stop().await;
}
