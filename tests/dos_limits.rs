//! Denial of service through the pool, with the shipped defaults: a tenant that sits in a
//! transaction (or holds a lock and waits) is disconnected after `idle_in_transaction_timeout`;
//! one tenant's open transactions cannot take the whole pool (`max_transactions_per_tenant`
//! defaults to a fair share); session state pins at most `max_pinned_per_tenant` connections per
//! tenant, beyond which the pinning statement is refused before it runs.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// `config_text` with `server` keys (before `[upstream]`) and a `[limits]` table. LISTEN is
/// allowed (`[guard] allow_notifications`): these tests pin connections with it.
fn config(db: &str, pool: usize, server: &str, limits: &str) -> String {
    let text = config_text(db, pool, "admin_claim = \"rlsgate_admin\"")
        .replace("[upstream]", &format!("{server}\n[upstream]"));
    format!("{text}\n[guard]\nallow_notifications = true\n[limits]\n{limits}\n")
}

/// An admin console command that must succeed.
fn admin(proxy: &Proxy, sql: &str) -> String {
    let out = admin_psql(proxy, sql);
    assert!(out.status.success(), "{sql}: {}", stderr(&out));
    stdout(&out)
}

/// Temp tables of that name anywhere in the cluster's database (any backend).
fn temp_tables(db: &str, name: &str) -> String {
    admin_sql(
        db,
        &format!("SELECT count(*) FROM pg_class WHERE relname = '{name}' AND relpersistence = 't'"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_timeout_is_on_by_default_and_frees_a_held_lock() {
    let db = demo_db();
    // the default, without the key
    let proxy = start_proxy_with(&db, &config(&db, 2, "", "")).await;
    assert_eq!(
        proxy.shared.config().server.idle_in_transaction_timeout,
        Duration::from_secs(60)
    );
    proxy.stop().await;

    // the same mechanism with a short timeout: north locks a shared table and sits idle; with
    // a pool of 1 south waits for the connection, with 4 for the lock
    for pool in [1, 4] {
        let proxy = start_proxy_with(
            &db,
            &config(&db, pool, "idle_in_transaction_timeout = \"600ms\"", ""),
        )
        .await;
        let mut north = RawClient::connect(&proxy, &token("north")).await;
        north
            .query("BEGIN; LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
            .await;
        let msgs = north.until_ready().await;
        assert_eq!(msgs.last().unwrap().body, b"T", "{msgs:?}");
        // south's query waits on the lock (inside the server, not idle) until north is cut off
        let south = client(&proxy, "south").await;
        let started = Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(10), count(&south, "customers"))
            .await
            .expect("the lock holder was not disconnected");
        assert_eq!(n, 2);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(4),
            "south waited {waited:?} (the lock holder must be disconnected after ~600ms)"
        );
        let fatal = north.recv().await;
        assert_eq!(fatal.tag, 'E', "{fatal:?}");
        assert_eq!(fatal.field(b'S'), "FATAL");
        assert_eq!(fatal.code(), "25P03", "{}", fatal.field(b'M'));
        // and the lock is gone with the connection
        assert_eq!(
            admin_sql(
                &db,
                "SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND relation = 'customers'::regclass"
            ),
            "0"
        );
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_open_transactions_leave_room_for_another_tenant() {
    let db = demo_db();
    // pool of 4, no [limits] keys: north may hold 3
    let proxy = start_proxy_with(&db, &config(&db, 4, "", "")).await;
    assert_eq!(proxy.shared.limits.max_transactions(), 3);
    let mut holders = Vec::new();
    for _ in 0..3 {
        let c = client(&proxy, "north").await;
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        holders.push(c);
    }
    // a fourth north transaction waits for north's share (up to checkout_timeout, 5s)…
    let fourth = client(&proxy, "north").await;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let r = fourth.batch_execute("BEGIN; SELECT 1").await;
        (fourth, r, started.elapsed()) // keeps the client (and what it holds)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // …while south gets the connection north may not take, at once
    let south = client(&proxy, "south").await;
    let started = Instant::now();
    assert_eq!(count(&south, "customers").await, 2);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "south waited {:?} while north held its transactions",
        started.elapsed()
    );
    assert!(
        !waiting.is_finished(),
        "north's fourth transaction still waits"
    );
    let (_fourth, r, waited) = waiting.await.unwrap();
    let err = r.expect_err("north's fourth transaction is over the tenant's share");
    assert_eq!(code(&err), "53400", "{err}");
    assert!(
        message(&err).contains("max_transactions_per_tenant"),
        "{err}"
    );
    assert!(waited >= Duration::from_secs(4), "{waited:?}");
    // north's share comes back when a transaction ends
    holders[0].batch_execute("COMMIT").await.unwrap();
    let again = client(&proxy, "north").await;
    assert_eq!(count(&again, "customers").await, 3);
    for c in &holders[1..] {
        c.batch_execute("COMMIT").await.unwrap();
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_beyond_the_tenants_cap_are_refused_before_they_run() {
    let db = demo_db();
    admin_sql(&db, &format!("GRANT TEMP ON DATABASE {db} TO rlsgate_app"));
    // pool of 4 with the default pin cap (1); transactions unlimited, so only the pin cap stands
    // between north and the whole pool
    let proxy = start_proxy_with(&db, &config(&db, 4, "", "max_transactions_per_tenant = 0")).await;
    assert_eq!(proxy.shared.limits.max_pinned(), 1);
    let first = client(&proxy, "north").await;
    first
        .batch_execute("CREATE TEMP TABLE kept (x int); INSERT INTO kept VALUES (1)")
        .await
        .unwrap();
    assert_eq!(proxy.shared.limits.pinned("north"), 1);

    let mut refused = Vec::new();
    for i in 0..3 {
        let c = client(&proxy, "north").await;
        // simple protocol
        let err = c
            .batch_execute(&format!("CREATE TEMP TABLE refused_{i} (x int)"))
            .await
            .expect_err("over the pin cap");
        assert_eq!(code(&err), "53400", "{err}");
        assert_eq!(
            message(&err),
            "rlsgate: tenant \"north\" already holds 1 pinned server connections (limits.max_pinned_per_tenant)"
        );
        let hint = err
            .as_db_error()
            .and_then(|d| d.hint())
            .unwrap_or_default()
            .to_string();
        assert!(hint.contains("pool_mode = \"session\""), "{hint}");
        // LISTEN, and the extended protocol
        let err = c.batch_execute("LISTEN chan").await.expect_err("LISTEN");
        assert_eq!(code(&err), "53400", "{err}");
        let err = c
            .execute(&format!("CREATE TEMP TABLE refused_x{i} (x int)"), &[])
            .await
            .expect_err("extended protocol");
        assert_eq!(code(&err), "53400", "{err}");
        // the client is still usable for ordinary work
        assert_eq!(count(&c, "customers").await, 3);
        refused.push(c);
    }
    for i in 0..3 {
        assert_eq!(temp_tables(&db, &format!("refused_{i}")), "0");
        assert_eq!(temp_tables(&db, &format!("refused_x{i}")), "0");
    }
    assert_eq!(temp_tables(&db, "kept"), "1");
    assert_eq!(proxy.shared.limits.pinned("north"), 1);
    assert_eq!(
        proxy
            .shared
            .pinned
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let tenants = admin(&proxy, "SHOW TENANTS");
    assert!(
        tenants.lines().any(|l| l.starts_with("north|4|1|")),
        "{tenants}"
    );

    // south is served at once, and may pin its own connection
    let south = client(&proxy, "south").await;
    let started = Instant::now();
    assert_eq!(count(&south, "customers").await, 2);
    assert!(started.elapsed() < Duration::from_secs(2));
    south.batch_execute("LISTEN south_chan").await.unwrap();
    assert_eq!(proxy.shared.limits.pinned("south"), 1);

    // once north's pinned client leaves, north may pin again
    assert_eq!(count(&first, "kept").await, 1);
    drop(first);
    let mut freed = false;
    for _ in 0..50 {
        if proxy.shared.limits.pinned("north") == 0 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "the pin is released when its client leaves");
    let c = &refused[0];
    c.batch_execute("CREATE TEMP TABLE later (x int); INSERT INTO later VALUES (1), (2)")
        .await
        .unwrap();
    assert_eq!(count(c, "later").await, 2);
    assert_eq!(proxy.shared.limits.pinned("north"), 1);
    let err = refused[1]
        .batch_execute("LISTEN chan")
        .await
        .expect_err("the cap holds again");
    assert_eq!(code(&err), "53400", "{err}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_pin_cap_is_a_quarter_of_the_pool_per_tenant() {
    let db = demo_db();
    admin_sql(&db, &format!("GRANT TEMP ON DATABASE {db} TO rlsgate_app"));
    let proxy = start_proxy_with(&db, &config(&db, 8, "", "")).await;
    assert_eq!(proxy.shared.limits.max_pinned(), 2);
    let a = client(&proxy, "north").await;
    a.batch_execute("CREATE TEMP TABLE t (x int)")
        .await
        .unwrap();
    let b = client(&proxy, "north").await;
    b.batch_execute("LISTEN chan").await.unwrap();
    let c = client(&proxy, "north").await;
    let err = c
        .batch_execute("SELECT 1; CREATE TEMP TABLE t (x int)")
        .await
        .expect_err("third pin");
    assert_eq!(code(&err), "53400", "{err}");
    assert!(message(&err).contains("already holds 2 pinned"), "{err}");
    // a pinned client's further session state does not count again
    a.batch_execute("CREATE TEMP TABLE t2 (x int); LISTEN other")
        .await
        .unwrap();
    assert_eq!(proxy.shared.limits.pinned("north"), 2);
    let south = client(&proxy, "south").await;
    south
        .batch_execute("CREATE TEMP TABLE t (x int)")
        .await
        .unwrap();
    assert_eq!(proxy.shared.limits.pinned("south"), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unset_limits_differ_from_explicit_zero() {
    let db = demo_db();
    let on_error = "on_limit = \"error\"";
    // unset: pool of 2 → north may run 1 transaction at a time, and pin 1 connection
    let proxy = start_proxy_with(&db, &config(&db, 2, "", on_error)).await;
    assert_eq!(proxy.shared.limits.max_transactions(), 1);
    assert_eq!(proxy.shared.limits.max_pinned(), 1);
    let a = client(&proxy, "north").await;
    let b = client(&proxy, "north").await;
    a.batch_execute("BEGIN").await.unwrap();
    let err = b.batch_execute("BEGIN").await.expect_err("over the share");
    assert_eq!(code(&err), "53400", "{err}");
    a.batch_execute("COMMIT").await.unwrap();
    proxy.stop().await;

    // explicit 0: unlimited
    let limits = format!("{on_error}\nmax_transactions_per_tenant = 0\nmax_pinned_per_tenant = 0");
    let proxy = start_proxy_with(&db, &config(&db, 2, "", &limits)).await;
    assert_eq!(proxy.shared.limits.max_transactions(), 0);
    assert_eq!(proxy.shared.limits.max_pinned(), 0);
    let a = client(&proxy, "north").await;
    let b = client(&proxy, "north").await;
    a.batch_execute("BEGIN").await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    b.batch_execute("COMMIT").await.unwrap();
    a.batch_execute("LISTEN x").await.unwrap();
    b.batch_execute("LISTEN x").await.unwrap();
    assert_eq!(proxy.shared.limits.pinned("north"), 2);
    proxy.stop().await;

    // explicit values are taken as they are
    let limits = "max_transactions_per_tenant = 2\nmax_pinned_per_tenant = 3";
    let proxy = start_proxy_with(&db, &config(&db, 2, "", limits)).await;
    assert_eq!(proxy.shared.limits.max_transactions(), 2);
    assert_eq!(proxy.shared.limits.max_pinned(), 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_and_lock_timeouts_can_be_pinned_on_the_upstream_role() {
    // what the README advises for statements that run or wait on a lock (not idle)
    let db = demo_db();
    admin_sql(
        &db,
        &format!(
            "ALTER ROLE rlsgate_app IN DATABASE {db} SET statement_timeout = '1s'; ALTER ROLE rlsgate_app IN DATABASE {db} SET lock_timeout = '500ms'"
        ),
    );
    let cfg = config(&db, 2, "", "").replace(
        "[guard]\n",
        "[guard]\nprotected = [\"app.*\", \"statement_timeout\", \"lock_timeout\"]\n",
    );
    let proxy = start_proxy_with(&db, &cfg).await;
    let north = client(&proxy, "north").await;
    for sql in [
        "SET statement_timeout = 0",
        "SET lock_timeout TO DEFAULT",
        "SELECT set_config('statement_timeout', '0', false)",
    ] {
        let err = north.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&err), "42501", "{sql}: {err}");
    }
    let err = north
        .batch_execute("SELECT pg_sleep(5)")
        .await
        .expect_err("statement_timeout");
    assert_eq!(code(&err), "57014", "{err}");
    // a lock holder that keeps running does not make others wait longer than lock_timeout
    let holder = client(&proxy, "south").await;
    holder
        .batch_execute("BEGIN; LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let err = north
        .batch_execute("SELECT count(*) FROM customers")
        .await
        .expect_err("lock_timeout");
    assert_eq!(code(&err), "55P03", "{err}");
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count(&north, "customers").await, 3);
    proxy.stop().await;
}

/// The guard's cost grows with the text (several hundred bytes of memory per byte): texts over
/// `guard.max_statement_bytes` are refused unread with 54000, in both protocols, and the
/// session goes on; texts under it (also large ones, classified one at a time off the shared
/// worker threads) run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_longer_than_the_guard_checks_are_refused_unread() {
    let db = demo_db();
    let proxy = start_proxy_with(
        &db,
        &config_text(&db, 2, "[guard]\nmax_statement_bytes = \"128KB\""),
    )
    .await;
    let c = client(&proxy, "north").await;
    let literal = |n: usize| format!("SELECT length('{}')", "x".repeat(n));
    // 100 KB: over the one-at-a-time threshold, under the cap
    let rows = c
        .simple_query(&literal(100 * 1024))
        .await
        .expect("100 KB runs");
    assert!(
        rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("102400"))),
        "{rows:?}"
    );
    for big in [
        literal(200 * 1024),
        format!("SELECT 1; {}", literal(200 * 1024)),
    ] {
        let e = c.simple_query(&big).await.expect_err("refused");
        assert_eq!(code(&e), "54000", "{}", message(&e));
        assert!(
            message(&e).contains("max_statement_bytes"),
            "{}",
            message(&e)
        );
        let e = c
            .query(big.as_str(), &[])
            .await
            .expect_err("refused (extended)");
        assert_eq!(code(&e), "54000", "{}", message(&e));
    }
    assert!(count(&c, "customers").await > 0);
    // a client running small statements meanwhile is served
    let other = client(&proxy, "south").await;
    let heavy = tokio::spawn({
        let text = literal(120 * 1024);
        async move {
            for _ in 0..5 {
                c.simple_query(&text).await.expect("large statement");
            }
        }
    });
    for _ in 0..20 {
        other
            .simple_query("SELECT 1")
            .await
            .expect("small statement");
    }
    heavy.await.expect("heavy client");
    proxy.stop().await;
}
