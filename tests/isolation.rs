//! Tenant isolation end to end: a pool of size 1 so both tenants share one server connection.

mod support;

use futures_util::future::join_all;
use support::*;
use tokio_postgres::SimpleQueryMessage;

fn simple_rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<String>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_sees_only_its_rows_in_autocommit() {
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    for _ in 0..3 {
        assert_eq!(count(&north, "customers").await, 3);
        assert_eq!(count(&south, "customers").await, 2);
        assert_eq!(count(&north, "sales_items").await, 3);
        assert_eq!(count(&south, "sales_items").await, 2);
    }
    let rows = north
        .query("SELECT DISTINCT store_id FROM products", &[])
        .await
        .unwrap();
    let stores: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(stores, vec!["north".to_string()]);
    // simple protocol too
    let msgs = south
        .simple_query("SELECT store_id, count(*) FROM customers GROUP BY 1")
        .await
        .unwrap();
    assert_eq!(
        simple_rows(&msgs),
        vec![vec!["south".to_string(), "2".to_string()]]
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_holds_for_a_whole_explicit_transaction() {
    let proxy = start_proxy(1).await;
    let mut north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    let tx = north.transaction().await.unwrap();
    assert_eq!(count(&tx, "customers").await, 3);
    let setting: String = tx
        .query_one("SELECT current_setting('app.current_store_id')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(setting, "north");
    tx.execute(
        "INSERT INTO customers (store_id, name) VALUES ('north', 'Tx Customer')",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(count(&tx, "customers").await, 4);
    tx.rollback().await.unwrap();
    assert_eq!(count(&north, "customers").await, 3);
    // the same (only) server connection now serves south
    south.batch_execute("BEGIN").await.unwrap();
    assert_eq!(count(&south, "customers").await, 2);
    south.batch_execute("COMMIT").await.unwrap();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_after_a_commit_inside_one_query_keep_the_context() {
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    let msgs = north
        .simple_query(
            "SELECT count(*) FROM customers; COMMIT; SELECT count(*) FROM customers; \
             BEGIN; SELECT count(*) FROM products; ROLLBACK; SELECT current_setting('app.current_store_id')",
        )
        .await
        .unwrap();
    let rows = simple_rows(&msgs);
    assert_eq!(
        rows,
        vec![
            vec!["3".to_string()],
            vec!["3".into()],
            vec!["4".into()],
            vec!["north".into()]
        ]
    );
    // an error stops the rest of the string, as in Postgres
    let err = north
        .simple_query("SELECT 1; COMMIT; SELECT 1/0; SELECT count(*) FROM customers")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "22012");
    assert_eq!(count(&north, "customers").await, 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_extended_queries_each_get_the_context() {
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    let stmt = north
        .prepare("SELECT count(*) FROM customers WHERE $1::int > 0")
        .await
        .unwrap();
    // tokio-postgres pipelines concurrent requests on one connection
    let futs = (0..20).map(|i| {
        let north = &north;
        let stmt = &stmt;
        async move {
            north
                .query_one(stmt, &[&(i + 1)])
                .await
                .map(|r| r.get::<_, i64>(0))
        }
    });
    for r in join_all(futs).await {
        assert_eq!(r.unwrap(), 3);
    }
    let futs = (0..20).map(|_| {
        let south = &south;
        async move {
            south
                .query_one("SELECT current_setting('app.current_store_id')", &[])
                .await
                .map(|r| r.get::<_, String>(0))
        }
    });
    for r in join_all(futs).await {
        assert_eq!(r.unwrap(), "south");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_for_another_tenant_fail_with_check() {
    let proxy = start_proxy(1).await;
    let db = proxy.db.clone();
    let north = client(&proxy, "north").await;
    let err = north
        .execute(
            "INSERT INTO customers (store_id, name) VALUES ('south', 'Mallory')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42501", "{err}");
    assert!(message(&err).contains("row-level security"), "{err}");
    let err = north
        .execute("UPDATE customers SET store_id = 'south'", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42501");
    north
        .execute(
            "INSERT INTO customers (store_id, name) VALUES ('north', 'Nora')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        admin_sql(
            &db,
            "SELECT count(*) FROM customers WHERE store_id = 'south'"
        ),
        "2"
    );
    assert_eq!(
        admin_sql(
            &db,
            "SELECT count(*) FROM customers WHERE store_id = 'north'"
        ),
        "4"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_are_isolated() {
    use futures_util::{SinkExt, StreamExt, pin_mut};
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    let out = north
        .copy_out("COPY (SELECT store_id, name FROM customers ORDER BY 2) TO STDOUT")
        .await
        .unwrap();
    pin_mut!(out);
    let mut text = Vec::new();
    while let Some(chunk) = out.next().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(text).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().all(|l| l.starts_with("north\t")), "{text}");

    // Postgres refuses COPY FROM into a table with RLS; the error must come through unchanged.
    let Err(err) = north
        .copy_in::<_, bytes::Bytes>("COPY customers (store_id, name) FROM STDIN")
        .await
    else {
        panic!("COPY FROM into an RLS table must fail");
    };
    assert_eq!(code(&err), "0A000", "{err}");
    assert!(message(&err).contains("row-level security"), "{err}");
    // (tokio-postgres cannot reuse a client after a failed copy_in, even against Postgres itself)
    let north = client(&proxy, "north").await;

    // COPY FROM into a plain staging table streams through the proxy.
    admin_sql(
        &proxy.db,
        "CREATE TABLE staging (store_id text, name text); GRANT INSERT, SELECT ON staging TO rlsgate_app",
    );
    let sink = north
        .copy_in("COPY staging (store_id, name) FROM STDIN")
        .await
        .unwrap();
    pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("north\tCopy {i}\n"));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 5000);
    // (the driver returns at CommandComplete; the next round trip follows the commit)
    assert_eq!(count(&north, "customers").await, 3);
    assert_eq!(admin_sql(&proxy.db, "SELECT count(*) FROM staging"), "5000");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_transaction_leaves_nothing_behind() {
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    north
        .batch_execute("BEGIN; INSERT INTO customers (store_id, name) VALUES ('north', 'Ghost')")
        .await
        .unwrap();
    drop(north);
    // pool size 1: south can only proceed once the abandoned connection is gone
    let south = client(&proxy, "south").await;
    assert_eq!(count(&south, "customers").await, 2);
    let setting: String = south
        .query_one("SELECT current_setting('app.current_store_id')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(setting, "south");
    assert_eq!(
        admin_sql(
            &proxy.db,
            "SELECT count(*) FROM customers WHERE name = 'Ghost'"
        ),
        "0"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_tenant_setting_is_denied_and_changes_nothing() {
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    for sql in [
        "SET app.current_store_id = 'south'",
        "SET SESSION app.current_store_id = 'south'",
        "SET LOCAL app.current_store_id = 'south'",
        "RESET app.current_store_id",
        "SET \"APP\".\"CURRENT_STORE_ID\" = 'south'",
        "SELECT set_config('app.current_store_id', 'south', false)",
        "SELECT 1; SET app.current_store_id = 'south'",
    ] {
        let err = north.simple_query(sql).await.unwrap_err();
        assert_eq!(code(&err), "42501", "{sql}: {err}");
        let err = north.query(sql, &[]).await.unwrap_err();
        assert_eq!(code(&err), "42501", "{sql} (extended): {err}");
        assert_eq!(count(&north, "customers").await, 3, "after {sql}");
    }
    // inside a transaction the denial fails the transaction, like a Postgres error
    north.batch_execute("BEGIN").await.unwrap();
    let err = north
        .simple_query("SET app.current_store_id = 'south'")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42501");
    let err = north.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&err), "25P02", "transaction must be aborted: {err}");
    north.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count(&north, "customers").await, 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_cannot_run_in_a_transaction_block_work() {
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    // Not the owner: VACUUM warns and skips, but it must not fail with "cannot run inside a
    // transaction block" because of the injected context.
    north.simple_query("VACUUM customers").await.unwrap();
    assert_eq!(count(&north, "customers").await, 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rows_and_results_are_relayed() {
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    let len: i32 = north
        .query_one("SELECT length(repeat('x', 20000000))", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(len, 20_000_000);
    let big: String = north
        .query_one("SELECT repeat('y', 8000000)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(big.len(), 8_000_000);
    // a 6.4 MB value streams through byte for byte
    let row = north
        .query_one(
            "SELECT v, md5(v) FROM (SELECT string_agg(md5(g::text), '' ORDER BY g) AS v FROM generate_series(1, 200000) g) s",
            &[],
        )
        .await
        .unwrap();
    let (value, digest): (String, String) = (row.get(0), row.get(1));
    assert_eq!(value.len(), 6_400_000);
    let check: String = north
        .query_one("SELECT md5($1)", &[&value])
        .await
        .unwrap()
        .get(0);
    assert_eq!(check, digest);
    let rows = north
        .query("SELECT g FROM generate_series(1, 100000) g", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 100_000);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_timeout_gives_a_clear_error() {
    let db = demo_db();
    let cfg = config_text(&db, 1, "")
        .replace("checkout_timeout = \"5s\"", "checkout_timeout = \"300ms\"");
    let proxy = start_proxy_with(&db, &cfg).await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    north.batch_execute("BEGIN").await.unwrap();
    let err = south.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&err), "57014", "{err}");
    assert!(message(&err).contains("checkout_timeout"), "{err}");
    north.batch_execute("COMMIT").await.unwrap();
    assert_eq!(count(&south, "customers").await, 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_upstream_connection_is_reported_and_the_pool_recovers() {
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    north.batch_execute("BEGIN").await.unwrap();
    let pid: i32 = north
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    admin_sql(&proxy.db, &format!("SELECT pg_terminate_backend({pid})"));
    let err = north.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.is_closed() || code(&err) == "08006" || code(&err) == "57P01",
        "{err}"
    );
    // the broken connection was dropped; a new client gets a fresh one
    let south = client(&proxy, "south").await;
    assert_eq!(count(&south, "customers").await, 2);
    let new_pid: i32 = south
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(pid, new_pid);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_open_transaction_finish() {
    let proxy = start_proxy(2).await;
    let north = client(&proxy, "north").await;
    let idle = client(&proxy, "south").await;
    assert_eq!(count(&idle, "customers").await, 2);
    north.batch_execute("BEGIN").await.unwrap();
    north
        .execute(
            "INSERT INTO customers (store_id, name) VALUES ('north', 'Late')",
            &[],
        )
        .await
        .unwrap();
    let Proxy {
        shutdown,
        task,
        addr,
        ..
    } = proxy;
    shutdown.cancel();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // no new clients
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    // an idle client is told the proxy is going away
    let err = idle.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.is_closed() || code(&err) == "57P01", "{err}");
    // the open transaction can still commit
    north.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_session_state_and_cleans_it_before_reuse() {
    let db = demo_db();
    admin_sql(&db, &format!("GRANT TEMP ON DATABASE {db} TO rlsgate_app"));
    let cfg = config_text(&db, 1, "").replace(
        "handshake_timeout = \"5s\"",
        "handshake_timeout = \"5s\"\npool_mode = \"session\"",
    );
    let proxy = start_proxy_with(&db, &cfg).await;
    let north = client(&proxy, "north").await;
    north
        .batch_execute(
            "SET statement_timeout = '4321ms'; CREATE TEMP TABLE scratch AS SELECT 1 AS x",
        )
        .await
        .unwrap();
    let timeout: String = north
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "4321ms");
    assert_eq!(count(&north, "scratch").await, 1);
    assert_eq!(count(&north, "customers").await, 3);
    drop(north);
    // pool of 1: south gets the same server connection, cleaned
    let south = client(&proxy, "south").await;
    let timeout: String = south
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "0");
    let err = south.query("SELECT * FROM scratch", &[]).await.unwrap_err();
    assert_eq!(code(&err), "42P01", "temp table must be gone: {err}");
    assert_eq!(count(&south, "customers").await, 2);
    proxy.stop().await;
}
