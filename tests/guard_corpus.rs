//! Adversarial corpus for the tenant-escape guard, through the real proxy and a real Postgres.
//!
//! Pool of size 1: both tenants share one server connection, so anything a denied statement
//! managed to change would show up for the other tenant. `set_config` is granted to the app role
//! in this database so that only the guard stands between a client and the tenant setting.

mod support;

use support::escape_cases::GUARD_CORPUS_DENY as DENY;
use support::*;
use tokio_postgres::Client;

/// Ordinary SQL an ORM or a person sends; must reach the server.
const ALLOW: &[&str] = &[
    "SET search_path = public",
    "SET search_path TO \"$user\", public",
    "SET TimeZone = 'UTC'",
    "SET TIME ZONE 'Europe/Paris'",
    "SET statement_timeout = '5s'",
    "SET application_name = 'my-app'",
    "SET SESSION statement_timeout TO 1000",
    "SET LOCAL statement_timeout = 1000",
    "SET client_encoding = 'UTF8'",
    "SET datestyle = 'ISO, MDY'",
    "SET extra_float_digits = 3",
    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "RESET statement_timeout",
    "RESET search_path",
    "SELECT set_config('search_path', 'public', false)",
    "SELECT set_config('statement_timeout', '1000', true)",
    "SELECT set_config('application_name', 'orm', false)",
    "SHOW search_path",
    "SHOW app.current_store_id",
    "SELECT current_setting('app.current_store_id')",
    "SELECT current_setting('app.current_store_id', true)",
    "WITH c AS (SELECT * FROM customers) SELECT count(*) FROM c",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT sum(n) FROM r",
    "SELECT now(), lower('X'), length('abc')",
    "SELECT * FROM customers ORDER BY customer_id LIMIT 2",
    "TABLE stores",
    "EXPLAIN SELECT * FROM customers",
    "EXPLAIN ANALYZE SELECT count(*) FROM customers",
    "EXPLAIN (FORMAT JSON) SELECT * FROM products WHERE price > 1",
    "SELECT query_to_xml('select 1 as one', true, true, '')",
    "SELECT table_to_xml('stores'::regclass, true, true, '')",
    "SELECT 'SET app.current_store_id = ''south''' AS harmless_text",
    "SELECT count(*) FROM customers WHERE name = 'set_config(''app.current_store_id'',''south'',true)'",
    "SELECT 1 AS \"app.current_store_id\"",
    "SELECT pg_advisory_xact_lock(7)",
    "DISCARD PLANS",
    "DISCARD SEQUENCES",
    "RESET ALL",
    "DISCARD ALL",
    "SELECT version()",
    // stopping to listen touches only the session's own channels (drivers' resets send it)
    "UNLISTEN *",
    "UNLISTEN channel_a",
    "SELECT pg_notification_queue_usage()",
    "SELECT p.name, sum(i.quantity) FROM sales_items i JOIN products p USING (product_id) GROUP BY 1",
    "INSERT INTO customers (store_id, name) VALUES ('north', 'Allowed Insert'); \
     UPDATE customers SET email = 'x@north.example' WHERE name = 'Allowed Insert'; \
     DELETE FROM customers WHERE name = 'Allowed Insert'",
    "SELECT 1; SELECT 2",
    "BEGIN; SELECT count(*) FROM customers; COMMIT",
    "START TRANSACTION READ ONLY; SELECT 1; ROLLBACK",
    "VACUUM customers",
    "ANALYZE customers",
    "CALL nonexistent_procedure_is_a_postgres_error_not_a_denial()",
];

async fn assert_context(north: &Client, south: &Client, case: &str) {
    let row = north
        .query_one("SELECT current_setting('app.current_store_id'), (SELECT count(*) FROM customers), (SELECT count(*) FROM customers WHERE store_id = 'south')", &[])
        .await
        .unwrap_or_else(|e| panic!("north after {case:?}: {e}"));
    assert_eq!(row.get::<_, String>(0), "north", "after {case:?}");
    assert_eq!(row.get::<_, i64>(1), 3, "after {case:?}");
    assert_eq!(
        row.get::<_, i64>(2),
        0,
        "south rows visible to north after {case:?}"
    );
    let row = south
        .query_one(
            "SELECT current_setting('app.current_store_id'), (SELECT count(*) FROM customers)",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("south after {case:?}: {e}"));
    assert_eq!(row.get::<_, String>(0), "south", "after {case:?}");
    assert_eq!(row.get::<_, i64>(1), 2, "after {case:?}");
}

async fn corpus_proxy() -> Proxy {
    let db = demo_db();
    admin_sql(
        &db,
        "GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO rlsgate_app",
    );
    let cfg = config_text(&db, 1, "").replace("[upstream]", "session_state = \"deny\"\n[upstream]");
    start_proxy_with(&db, &cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_escape_in_the_corpus_is_denied_and_changes_nothing() {
    assert!(DENY.len() + ALLOW.len() >= 100);
    let proxy = corpus_proxy().await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    for (want, sql) in DENY {
        let err = north
            .simple_query(sql)
            .await
            .err()
            .unwrap_or_else(|| panic!("simple {sql:?} was allowed"));
        assert_eq!(code(&err), *want, "simple {sql:?}: {err}");
        assert!(
            message(&err).starts_with("rlsgate:"),
            "simple {sql:?} must be refused by rlsgate: {err}"
        );
        // extended protocol (Parse of a named statement)
        let err = north
            .query(*sql, &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("extended {sql:?} was allowed"));
        assert_eq!(code(&err), *want, "extended {sql:?}: {err}");
        assert_context(&north, &south, sql).await;
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_sql_still_works() {
    let proxy = corpus_proxy().await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    for sql in ALLOW {
        match north.simple_query(sql).await {
            Ok(_) => {}
            Err(e) => {
                assert!(
                    !message(&e).starts_with("rlsgate:"),
                    "{sql:?} was refused by rlsgate: {e}"
                );
                assert_eq!(code(&e), "42883", "{sql:?} failed: {e}");
            }
        }
        assert_context(&north, &south, sql).await;
    }
    // single statements also through the extended protocol
    for sql in ALLOW
        .iter()
        .filter(|s| !s.contains(';') && !s.starts_with("VACUUM") && !s.starts_with("CALL"))
    {
        if let Err(e) = north.query(*sql, &[]).await {
            panic!("extended {sql:?}: {e}");
        }
    }
    assert_context(&north, &south, "extended allow list").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denial_inside_a_transaction_fails_it_like_a_postgres_error() {
    let proxy = corpus_proxy().await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    for (_, sql) in DENY.iter().take(40) {
        north.batch_execute("BEGIN").await.unwrap();
        assert_eq!(count(&north, "customers").await, 3);
        let err = north.simple_query(sql).await.unwrap_err();
        assert!(message(&err).starts_with("rlsgate:"), "{sql}: {err}");
        let err = north.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(
            code(&err),
            "25P02",
            "after {sql:?} the transaction must be aborted: {err}"
        );
        north.batch_execute("ROLLBACK").await.unwrap();
        assert_context(&north, &south, sql).await;
    }
    // RESET ALL may not clear the context mid-transaction
    north.batch_execute("BEGIN").await.unwrap();
    let err = north.simple_query("RESET ALL").await.unwrap_err();
    assert_eq!(code(&err), "42501", "{err}");
    north.batch_execute("ROLLBACK").await.unwrap();
    assert_context(&north, &south, "RESET ALL in a transaction").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_inside_pipelines_leave_the_other_requests_intact() {
    use futures_util::future::join_all;
    let proxy = corpus_proxy().await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    let futs = (0..30).map(|i| {
        let north = &north;
        async move {
            if i % 3 == 0 {
                north
                    .query(
                        "SELECT set_config('app.current_store_id', 'south', true)",
                        &[],
                    )
                    .await
                    .map(|_| -1)
            } else {
                north
                    .query_one("SELECT count(*) FROM customers", &[])
                    .await
                    .map(|r| r.get::<_, i64>(0))
            }
        }
    });
    for (i, r) in join_all(futs).await.into_iter().enumerate() {
        match r {
            Ok(n) => assert_eq!((i % 3 != 0, n), (true, 3), "request {i}"),
            Err(e) => assert_eq!(
                (i % 3, code(&e)),
                (0, "42501".to_string()),
                "request {i}: {e}"
            ),
        }
    }
    assert_context(&north, &south, "pipeline").await;
    proxy.stop().await;
}
