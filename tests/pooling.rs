//! Transaction pooling that clients cannot tell from their own session: settings, prepared
//! statements, session state, cancels. Pools smaller than the number of clients.

mod support;

use support::*;
use tokio_postgres::Client;

async fn show(c: &Client, name: &str) -> String {
    c.query_one(&format!("SHOW {name}"), &[])
        .await
        .unwrap_or_else(|e| panic!("SHOW {name}: {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_client_across_pooled_connections() {
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    north
        .batch_execute("SET statement_timeout = '4321ms'")
        .await
        .unwrap();
    north
        .simple_query("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    north
        .query("SELECT set_config('search_path', 'public', false)", &[])
        .await
        .err(); // revoked in demo db
    north
        .execute("SET lock_timeout = '777ms'", &[])
        .await
        .unwrap(); // extended protocol
    for _ in 0..3 {
        assert_eq!(show(&south, "statement_timeout").await, "0");
        assert_eq!(show(&south, "TimeZone").await, show_default_tz().await);
        assert_eq!(show(&north, "statement_timeout").await, "4321ms");
        assert_eq!(show(&north, "TimeZone").await, "Asia/Tokyo");
        assert_eq!(show(&north, "lock_timeout").await, "777ms");
        assert_eq!(count(&north, "customers").await, 3);
        assert_eq!(count(&south, "customers").await, 2);
    }
    // a SET rolled back does not stick; a committed one inside a block does
    north
        .batch_execute("BEGIN; SET statement_timeout = '1s'; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(show(&south, "statement_timeout").await, "0");
    assert_eq!(show(&north, "statement_timeout").await, "4321ms");
    north
        .batch_execute("BEGIN; SET statement_timeout = '2s'; COMMIT")
        .await
        .unwrap();
    assert_eq!(show(&south, "statement_timeout").await, "0");
    assert_eq!(show(&north, "statement_timeout").await, "2s");
    // a failed statement after a SET in the same implicit transaction undoes it
    north
        .simple_query("SET statement_timeout = '3s'; SELECT 1/0")
        .await
        .unwrap_err();
    assert_eq!(show(&north, "statement_timeout").await, "2s");
    // RESET and RESET ALL
    north.batch_execute("RESET lock_timeout").await.unwrap();
    assert_eq!(show(&south, "lock_timeout").await, "0");
    assert_eq!(show(&north, "lock_timeout").await, "0");
    north.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(show(&north, "statement_timeout").await, "0");
    assert_eq!(show(&north, "TimeZone").await, show_default_tz().await);
    proxy.stop().await;
}

async fn show_default_tz() -> String {
    pg().psql("postgres", "SHOW TimeZone")
        .expect("show")
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_are_applied_and_reported() {
    let proxy = start_proxy(1).await;
    let south = client(&proxy, "south").await;
    let conn = format!(
        "{} application_name=reporting options='-c statement_timeout=1234 -c TimeZone=Europe/Paris'",
        proxy.conn_str(&token("north"))
    );
    let (north, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    for _ in 0..2 {
        assert_eq!(show(&north, "statement_timeout").await, "1234ms");
        assert_eq!(show(&north, "application_name").await, "reporting");
        assert_eq!(show(&north, "TimeZone").await, "Europe/Paris");
        assert_eq!(show(&south, "statement_timeout").await, "0");
        assert_ne!(show(&south, "application_name").await, "reporting");
    }
    // RESET ALL returns to the startup values, as in Postgres
    north
        .batch_execute("SET statement_timeout = '9s'; ")
        .await
        .unwrap();
    north.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(show(&north, "statement_timeout").await, "1234ms");
    assert_eq!(show(&south, "statement_timeout").await, "0");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_pins_the_connection_and_is_cleaned_after_the_client() {
    let db = demo_db();
    admin_sql(&db, &format!("GRANT TEMP ON DATABASE {db} TO rlsgate_app"));
    let proxy = start_proxy_with(&db, &config_text(&db, 2, "")).await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    north
        .batch_execute("CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1), (2)")
        .await
        .unwrap();
    north
        .batch_execute("PREPARE q AS SELECT count(*) FROM customers")
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(count(&north, "scratch").await, 2);
        let n: i64 = north.query_one("EXECUTE q", &[]).await.unwrap().get(0);
        assert_eq!(n, 3);
        assert_eq!(count(&south, "customers").await, 2);
    }
    let pid: i32 = north
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    drop(north);
    drop(south);
    // the pinned connection is reset (asynchronously) and goes back to the pool
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while proxy.shared.pool.idle_count() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        proxy.shared.pool.idle_count(),
        2,
        "both connections idle again"
    );
    // whoever gets that connection next finds no temp table and no prepared statement: two
    // clients inside blocks hold both connections of the pool of two, so one of them has it
    let mut seen = Vec::new();
    // (two tenants: the per-tenant transaction limit is 1 with a pool of two)
    let clients = [client(&proxy, "east").await, client(&proxy, "west").await];
    for c in &clients {
        c.batch_execute("BEGIN").await.unwrap();
        let p: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        seen.push(p);
    }
    for c in &clients {
        let temp = c
            .query("SELECT * FROM scratch", &[])
            .await
            .err()
            .map(|e| code(&e));
        assert_eq!(
            temp.as_deref(),
            Some("42P01"),
            "a backend of {seen:?} still has the temp table"
        );
        c.batch_execute("ROLLBACK").await.unwrap();
    }
    assert!(
        seen.contains(&pid),
        "the cleaned connection {pid} should have served one of {seen:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_deallocate_of_protocol_statements_is_answered_by_the_proxy() {
    let proxy = start_proxy(1).await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    c.parse("s1", "SELECT count(*) FROM customers").await;
    c.sync().await;
    assert_eq!(tags(&c.until_ready().await), "1 Z");
    c.bind("", "s1").await;
    c.execute("").await;
    c.sync().await;
    assert_eq!(tags(&c.until_ready().await), "2 D C Z");
    c.query("DEALLOCATE s1").await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "C Z");
    assert_eq!(msgs[0].body, b"DEALLOCATE\0");
    c.bind("", "s1").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(msgs[0].code(), "26000");
    // the name can be reused
    c.parse("s1", "SELECT 42").await;
    c.sync().await;
    assert_eq!(tags(&c.until_ready().await), "1 Z");
    c.query("DEALLOCATE ALL").await;
    assert_eq!(tags(&c.until_ready().await), "C Z");
    c.query("DEALLOCATE nosuch").await;
    let msgs = c.until_ready().await;
    assert_eq!(msgs[0].code(), "26000");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_only_the_clients_own_query() {
    let proxy = start_proxy(2).await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    let token = north.cancel_token();
    let south_sleep = tokio::spawn(async move {
        let r = south.simple_query("SELECT pg_sleep(1.5)").await;
        (south, r.map(|_| ()))
    });
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let started = std::time::Instant::now();
    let err = north.simple_query("SELECT pg_sleep(20)").await.unwrap_err();
    assert_eq!(code(&err), "57014", "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    canceller.await.unwrap().unwrap();
    let (south, r) = south_sleep.await.unwrap();
    r.expect("the other client's query must not be cancelled");
    assert_eq!(count(&north, "customers").await, 3);
    assert_eq!(count(&south, "customers").await, 2);
    // An idle client's cancel key cancels nothing (not the connection it used last, now
    // another client's); unknown keys are ignored. (A driver's cancel returns before rlsgate has
    // handled it, and may land in the client's next statement, as with Postgres itself: these
    // wait until rlsgate closed the cancel connection.)
    let mut idle = RawClient::connect(&proxy, &support::token("north")).await;
    idle.query("SELECT count(*) FROM customers").await;
    assert_eq!(tags(&idle.until_ready().await), "T D C Z");
    let busy = tokio::spawn(async move { south.simple_query("SELECT pg_sleep(0.5)").await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    RawClient::cancel_and_wait(proxy.addr, &idle.backend_key).await;
    RawClient::cancel_and_wait(proxy.addr, &[0, 0, 0, 1, 0, 0, 0, 2]).await;
    busy.await
        .unwrap()
        .expect("an idle client's cancel must not reach another client's query");
    idle.query("SELECT count(*) FROM customers").await;
    let replies = idle.until_ready().await;
    assert_eq!(tags(&replies), "T D C Z", "{replies:?}");
    assert_eq!(count(&north, "customers").await, 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_racing_with_check_in_never_hits_the_next_client() {
    // pool of 1: as soon as north's query ends the connection serves south; north's cancels
    // fired around that moment must never cancel south's queries.
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    let token = north.cancel_token();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spammer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = token.cancel_query(tokio_postgres::NoTls).await;
                sent += 1;
            }
            sent
        })
    };
    let mut south_ok = 0;
    for _ in 0..200 {
        let _ = north.simple_query("SELECT 1").await; // may be cancelled: that is its own query
        south
            .simple_query("SELECT pg_sleep(0.001)")
            .await
            .expect("south must never be cancelled");
        south_ok += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = spammer.await.unwrap();
    assert!(sent > 10, "cancels sent: {sent}");
    assert_eq!(south_ok, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_clients_are_disconnected() {
    let db = demo_db();
    let cfg = config_text(&db, 1, "").replace(
        "[upstream]",
        "idle_in_transaction_timeout = \"300ms\"\n[upstream]",
    );
    let proxy = start_proxy_with(&db, &cfg).await;
    let north = client(&proxy, "north").await;
    north.batch_execute("BEGIN").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let err = north.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.is_closed() || code(&err) == "25P03", "{err}");
    // the connection went back (closed): south is served
    let south = client(&proxy, "south").await;
    assert_eq!(count(&south, "customers").await, 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_extra_clients() {
    let db = demo_db();
    let cfg = config_text(&db, 1, "").replace("[upstream]", "max_client_conn = 2\n[upstream]");
    let proxy = start_proxy_with(&db, &cfg).await;
    let a = client(&proxy, "north").await;
    let b = client(&proxy, "south").await;
    let err = connect(&proxy, &token("east"))
        .await
        .map(|_| ())
        .expect_err("third client refused");
    assert_eq!(code(&err), "53300", "{err}");
    drop(a);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let c = client(&proxy, "east").await;
    assert_eq!(count(&c, "customers").await, 1);
    assert_eq!(count(&b, "customers").await, 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_upkeep_opens_min_idle_and_retires_old_connections() {
    let db = demo_db();
    let cfg = config_text(&db, 3, "").replace(
        "checkout_timeout = \"5s\"",
        "checkout_timeout = \"5s\"\nmin_idle = 2\nmax_lifetime = \"1500ms\"\nidle_timeout = \"0s\"",
    );
    let proxy = start_proxy_with(&db, &cfg).await;
    // min_idle connections appear without any client
    let mut idle = 0;
    for _ in 0..50 {
        idle = proxy.shared.pool.idle_count();
        if idle >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(idle, 2);
    let north = client(&proxy, "north").await;
    let first: i32 = north
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(std::time::Duration::from_millis(2000)).await;
    // every connection is older than max_lifetime now: none of them serves again
    let pids: Vec<i32> = futures_util::future::join_all(
        (0..3).map(|_| north.query_one("SELECT pg_backend_pid()", &[])),
    )
    .await
    .into_iter()
    .map(|r| r.unwrap().get(0))
    .collect();
    assert!(
        !pids.contains(&first),
        "{first} served after max_lifetime: {pids:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_idle_timeout() {
    let db = demo_db();
    let cfg = config_text(&db, 3, "").replace(
        "checkout_timeout = \"5s\"",
        "checkout_timeout = \"5s\"\nidle_timeout = \"500ms\"",
    );
    let proxy = start_proxy_with(&db, &cfg).await;
    let north = client(&proxy, "north").await;
    assert_eq!(count(&north, "customers").await, 3);
    // the connection went back to the pool; without idle_timeout it would stay there
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(proxy.shared.pool.idle_count(), 0);
    assert_eq!(count(&north, "customers").await, 3);
    proxy.stop().await;
}
