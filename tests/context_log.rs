//! The tenant context costs Postgres almost nothing and logs nothing: it is a statement prepared
//! once per server connection and only bound per transaction. With `set_config` callable (the
//! Postgres default) autocommit units get `SELECT pg_catalog.set_config(…, $1, true)` and explicit
//! blocks get `SET LOCAL` right after the client's BEGIN, so the server log stays clean under
//! Postgres' default logging, and `BEGIN ISOLATION LEVEL …` / `SET TRANSACTION …` still work
//! (nothing rlsgate sends takes a snapshot before them). With `set_config` revoked, rlsgate
//! falls back to `SET LOCAL` ahead of autocommit units, which Postgres answers with a WARNING
//! that its log keeps (see the README on `log_min_messages`).

mod support;

use support::*;

const WARNING: &str = "SET LOCAL can only be used in transaction blocks";

async fn tenant_of(c: &tokio_postgres::Client, sql: &str) -> String {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// Every way a transaction starts: autocommit simple and extended, prepared, explicit blocks
/// with and without isolation options, SET TRANSACTION after BEGIN, an extended BEGIN pipelined
/// with its statements. Each sees its own tenant, and the isolation the client asked for.
/// `block_in_one_query`: also `BEGIN; …; COMMIT` as one simple Query (its context goes ahead of
/// it as `SET LOCAL`: a WARNING in the log, see the README).
async fn workload(proxy: &Proxy, block_in_one_query: bool) {
    for round in 0..3 {
        for store in ["north", "south"] {
            let c = client(proxy, store).await;
            let setting = "SELECT current_setting('app.current_store_id')";
            // autocommit, simple and extended
            let rows = c.simple_query(setting).await.unwrap();
            assert!(
                rows.iter().any(|m| matches!(m,
                    tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(store))),
                "{store}: simple"
            );
            assert_eq!(tenant_of(&c, setting).await, store);
            let prepared = c.prepare(setting).await.unwrap();
            for _ in 0..3 {
                let row = c.query_one(&prepared, &[]).await.unwrap();
                assert_eq!(row.get::<_, String>(0), store);
            }
            let own = if store == "north" { 3 } else { 2 };
            assert_eq!(count(&c, "customers").await, own, "{store}: own rows only");
            // explicit blocks
            c.batch_execute("BEGIN").await.unwrap();
            assert_eq!(tenant_of(&c, setting).await, store, "{store}: after BEGIN");
            c.batch_execute("COMMIT").await.unwrap();
            c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                .await
                .unwrap();
            assert_eq!(
                tenant_of(&c, "SHOW transaction_isolation").await,
                "repeatable read"
            );
            assert_eq!(tenant_of(&c, setting).await, store);
            c.batch_execute("COMMIT").await.unwrap();
            c.batch_execute("BEGIN").await.unwrap();
            c.batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                .await
                .expect("SET TRANSACTION right after BEGIN: no snapshot taken before it");
            assert_eq!(
                tenant_of(&c, "SHOW transaction_isolation").await,
                "serializable"
            );
            assert_eq!(tenant_of(&c, setting).await, store);
            c.batch_execute("COMMIT").await.unwrap();
            // multi-statement simple query, and one with its own block
            c.batch_execute("SELECT 1; SELECT 2").await.unwrap();
            if block_in_one_query {
                let rows = c
                    .simple_query(&format!("BEGIN; {setting}; COMMIT"))
                    .await
                    .unwrap();
                assert!(
                    rows.iter().any(|m| matches!(m,
                    tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(store))),
                    "{store}: BEGIN; …; COMMIT"
                );
            }
            // an extended BEGIN pipelined with its statements (JDBC, pgx)
            let mut raw = RawClient::connect(proxy, &token(store)).await;
            raw.parse("", "BEGIN ISOLATION LEVEL SERIALIZABLE").await;
            raw.bind("", "").await;
            raw.execute("").await;
            raw.parse("", setting).await;
            raw.bind("", "").await;
            raw.execute("").await;
            raw.parse("", "COMMIT").await;
            raw.bind("", "").await;
            raw.execute("").await;
            raw.sync().await;
            let replies = raw.until_ready().await;
            assert_eq!(tags(&replies), "1 2 C 1 2 D C 1 2 C Z", "{round} {store}");
            let row = replies.iter().find(|m| m.tag == 'D').expect("a row");
            assert!(
                row.body.ends_with(store.as_bytes()),
                "{store}: {:?}",
                row.body
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_context_leaves_the_server_log_clean_and_falls_back_when_set_config_is_revoked() {
    let db = demo_db();
    // Postgres' defaults for this database: set_config callable, WARNINGs logged (demo.sql
    // revokes the one and raises log_min_messages for the role).
    admin_sql(
        &db,
        &format!(
            "GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO PUBLIC;\n\
             ALTER ROLE rlsgate_app IN DATABASE \"{db}\" SET log_min_messages = 'warning';\n ALTER ROLE rlsgate_app IN DATABASE \"{db}\" SET log_min_error_statement = 'warning';"
        ),
    );
    // pool of 1: every transaction switches tenants on the one connection
    let proxy = start_proxy_with(&db, &config_text(&db, 1, "")).await;
    let from = server_log_len();
    workload(&proxy, false).await;
    let log = server_log_since(from);
    assert!(!log.contains(WARNING), "the server log got:\n{log}");
    assert!(
        !log.contains("ERROR") && !log.contains("WARNING"),
        "the server log got:\n{log}"
    );
    proxy.stop().await;

    // set_config revoked: still correct, through SET LOCAL; its WARNING reaches the log (which
    // is why demo.sql raises log_min_messages for the role).
    admin_sql(
        &db,
        "REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM PUBLIC;",
    );
    let proxy = start_proxy_with(&db, &config_text(&db, 1, "")).await;
    let from = server_log_len();
    workload(&proxy, true).await;
    assert!(server_log_since(from).contains(WARNING));
    proxy.stop().await;
}
