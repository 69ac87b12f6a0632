//! Migrations while clients hold prepared statements: after `ALTER TABLE … ADD/DROP COLUMN`
//! Postgres refuses a prepared `SELECT *` with `0A000 cached plan must not change result type`
//! until it is prepared again. rlsgate shares its server-side statements between clients, so it
//! must prepare them again itself — on every pooled connection — or every client would keep
//! failing until the connections are recycled. And the admin `RECONNECT` replaces every upstream
//! connection without a restart.

mod support;

use futures_util::future::join_all;
use support::*;

const SELECT_STAR: &str = "SELECT * FROM customers ORDER BY customer_id";

/// Run the client's prepared `SELECT *` (re-preparing once if it fails, as asyncpg and pgJDBC do
/// on 0A000); returns the column count and how many attempts failed.
///
/// `strict`: the failure must be Postgres' own 0A000. Otherwise a client-side decoding error is
/// accepted too: a statement the client described before the migration and first bound on a
/// connection that never had it is prepared there afresh, and its rows then have the new shape
/// (PgBouncer's prepared-statement mode behaves the same; see the README on migrations).
async fn select_star(
    c: &tokio_postgres::Client,
    stmt: &mut tokio_postgres::Statement,
    strict: bool,
) -> (usize, usize) {
    let mut failures = 0;
    loop {
        match c.query(&*stmt, &[]).await {
            Ok(rows) => {
                assert!(!rows.is_empty(), "the tenant sees its customers");
                return (rows[0].len(), failures);
            }
            Err(e) => {
                let stale = code(&e) == "0A000";
                let decode = !strict && e.as_db_error().is_none();
                assert!(stale || decode, "only a stale plan may fail: {e}");
                failures += 1;
                assert!(failures <= 1, "still failing after a retry: {e}");
                *stmt = c.prepare(SELECT_STAR).await.expect("prepare again");
            }
        }
    }
}

/// Every client runs its statement `rounds` times, concurrently (so every pooled connection
/// gets to run it); returns the column counts seen and the failures per client.
async fn everyone(
    clients: &[tokio_postgres::Client],
    stmts: &mut [tokio_postgres::Statement],
    rounds: usize,
    strict: bool,
) -> (Vec<usize>, Vec<usize>) {
    let runs = clients
        .iter()
        .zip(stmts.iter_mut())
        .map(|(c, s)| async move {
            let mut cols = Vec::new();
            let mut failed = 0;
            for i in 0..rounds {
                if i % 2 == 1 {
                    // inside an explicit transaction too
                    c.batch_execute("BEGIN").await.unwrap();
                    let r = select_star(c, s, strict).await;
                    c.batch_execute("COMMIT").await.unwrap();
                    cols.push(r.0);
                    failed += r.1;
                } else {
                    let r = select_star(c, s, strict).await;
                    cols.push(r.0);
                    failed += r.1;
                }
            }
            (cols, failed)
        });
    let results = join_all(runs).await;
    let cols = results.iter().flat_map(|(c, _)| c.clone()).collect();
    let failed = results.iter().map(|(_, f)| *f).collect();
    (cols, failed)
}

/// Pool of 1: every statement exists on the one connection, so each client sees exactly what it
/// would see from Postgres: one 0A000, then its statement prepared again works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_select_star_recovers_after_add_and_drop_column() {
    migrate_under_clients(1, true).await;
}

/// Pool of 2: clients move between connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_select_star_recovers_across_pooled_connections() {
    migrate_under_clients(2, false).await;
}

async fn migrate_under_clients(pool: usize, strict: bool) {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &config_text(&db, pool, "")).await;
    let mut clients = Vec::new();
    let mut stmts = Vec::new();
    for i in 0..4 {
        let c = client(&proxy, if i % 2 == 0 { "north" } else { "south" }).await;
        stmts.push(c.prepare(SELECT_STAR).await.unwrap());
        clients.push(c);
    }
    let (cols, failed) = everyone(&clients, &mut stmts, 6, strict).await;
    let before = cols[0];
    assert!(cols.iter().all(|&n| n == before), "{cols:?}");
    assert_eq!(failed.iter().sum::<usize>(), 0);

    for (ddl, want) in [
        ("ALTER TABLE customers ADD COLUMN note text", before + 1),
        ("ALTER TABLE customers DROP COLUMN note", before),
    ] {
        admin_sql(&db, ddl);
        // Each client recovers within one retry …
        let (cols, failed) = everyone(&clients, &mut stmts, 1, strict).await;
        assert!(cols.iter().all(|&n| n == want), "{ddl}: {cols:?}");
        assert!(failed.iter().all(|&f| f <= 1), "{ddl}: {failed:?}");
        // … and from then on nobody fails, on any pooled connection.
        let (cols, failed) = everyone(&clients, &mut stmts, 6, strict).await;
        assert!(cols.iter().all(|&n| n == want), "{ddl}: {cols:?}");
        assert_eq!(failed, vec![0; 4], "{ddl}");
    }
    proxy.stop().await;
}

/// A client that retries its old statement keeps getting 0A000, as from Postgres (its copy of
/// the statement is stale); the same text prepared under a new name works at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_statement_keeps_failing_until_prepared_again() {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &config_text(&db, 1, "")).await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    c.parse("s1", SELECT_STAR).await;
    c.sync().await;
    assert_eq!(tags(&c.until_ready().await), "1 Z");
    let ok = run_s1(&mut c, "s1").await;
    assert!(tags(&ok).starts_with("2 D"), "{ok:?}");
    admin_sql(&db, "ALTER TABLE customers ADD COLUMN note text");
    for _ in 0..2 {
        let failed = run_s1(&mut c, "s1").await;
        assert_eq!(tags(&failed), "E Z", "{failed:?}");
        assert_eq!(failed[0].code(), "0A000", "{failed:?}");
    }
    c.parse("s2", SELECT_STAR).await;
    c.sync().await;
    assert_eq!(tags(&c.until_ready().await), "1 Z");
    let again = run_s1(&mut c, "s2").await;
    assert!(tags(&again).starts_with("2 D"), "{again:?}");
    let width = |msgs: &[Msg]| {
        let row = msgs.iter().find(|m| m.tag == 'D').expect("a row");
        i16::from_be_bytes([row.body[0], row.body[1]])
    };
    assert_eq!(width(&again), width(&ok) + 1, "the new column is there");
    proxy.stop().await;
}

async fn run_s1(c: &mut RawClient, stmt: &str) -> Vec<Msg> {
    c.bind("", stmt).await;
    c.execute("").await;
    c.sync().await;
    c.until_ready().await
}

/// Admin `RECONNECT`: the next transactions run on new backends; nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reconnect_replaces_every_upstream_connection() {
    let db = demo_db();
    let cfg = config_text(&db, 2, "admin_claim = \"rlsgate_admin\"");
    let proxy = start_proxy_with(&db, &cfg).await;
    let busy = client(&proxy, "north").await;
    let idle = client(&proxy, "south").await;
    // One connection busy inside a transaction, one idle in the pool.
    busy.batch_execute("BEGIN").await.unwrap();
    let busy_pid: i32 = busy
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let idle_pid: i32 = idle
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(busy_pid, idle_pid);

    let out = admin_psql(&proxy, "RECONNECT");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("RECONNECT"), "{}", stdout(&out));

    // The open transaction is not disturbed; it commits on its own backend.
    let still: i32 = busy
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, busy_pid);
    busy.batch_execute("COMMIT").await.unwrap();

    // Afterwards neither old backend serves anyone.
    for _ in 0..4 {
        for c in [&busy, &idle] {
            let p: i32 = c
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            assert!(p != busy_pid && p != idle_pid, "old backend {p} reused");
        }
    }
    assert_eq!(count(&idle, "customers").await, 2);
    proxy.stop().await;
}
