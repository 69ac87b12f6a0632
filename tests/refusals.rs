//! How refused statements reach the client: the guard's own SQLSTATE and message, no PL/pgSQL
//! CONTEXT lines, and the transaction state exactly as if Postgres had failed the statement —
//! also when the database has revoked PL/pgSQL (rlsgate depends on no procedural language).

mod support;

use support::*;

const DENIED: &str = "SELECT set_config('app.current_store_id', 'south', false)";

/// A demo database with PL/pgSQL unusable by the application role.
fn db_without_plpgsql() -> String {
    let db = demo_db();
    admin_sql(&db, "REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC");
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_inside_a_transaction_is_the_guards_error_and_aborts_it() {
    let db = db_without_plpgsql();
    let proxy = start_proxy_with(&db, &config_text(&db, 2, "")).await;
    let c = client(&proxy, "north").await;

    c.batch_execute("BEGIN").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    let e = c.simple_query(DENIED).await.expect_err("refused");
    let db_err = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_err.code().code(), "42501", "{e}");
    assert!(
        db_err
            .message()
            .starts_with("rlsgate: changing protected setting"),
        "{e}"
    );
    assert_eq!(db_err.where_(), None, "no PL/pgSQL CONTEXT: {e}");
    // The transaction is aborted, as after any error in Postgres.
    let e = c.simple_query("SELECT 1").await.expect_err("aborted");
    assert_eq!(code(&e), "25P02", "{e}");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count(&c, "customers").await, 3);

    // Outside a transaction: same error, and the session goes on.
    let e = c.simple_query(DENIED).await.expect_err("refused");
    assert_eq!(code(&e), "42501", "{e}");
    assert_eq!(e.as_db_error().and_then(|d| d.where_()), None, "{e}");
    let e = c.query(DENIED, &[]).await.expect_err("refused (extended)");
    assert_eq!(code(&e), "42501", "{e}");
    assert!(message(&e).starts_with("rlsgate:"), "{e}");
    assert_eq!(e.as_db_error().and_then(|d| d.where_()), None, "{e}");

    // Extended protocol inside a transaction: the block is aborted too.
    c.batch_execute("BEGIN").await.unwrap();
    let e = c.query(DENIED, &[]).await.expect_err("refused (extended)");
    assert_eq!(code(&e), "42501", "{e}");
    let e = c.query("SELECT 1", &[]).await.expect_err("aborted");
    assert_eq!(code(&e), "25P02", "{e}");
    c.batch_execute("ROLLBACK").await.unwrap();

    let row = c
        .query_one("SELECT current_setting('app.current_store_id')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "north");
    proxy.stop().await;
}

/// A pipeline with a refused Parse: one ErrorResponse (the guard's), everything up to Sync
/// skipped, then ReadyForQuery with the state Postgres would report; the client's unnamed
/// statement parsed before the refusal is still usable afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_parse_in_a_pipeline_skips_to_sync() {
    let db = db_without_plpgsql();
    let proxy = start_proxy_with(&db, &config_text(&db, 2, "")).await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;

    c.query("BEGIN").await;
    assert_eq!(tags(&c.until_ready().await), "C Z");
    c.parse("", "SELECT count(*) FROM customers").await;
    c.bind("", "").await;
    c.execute("").await;
    c.parse("", DENIED).await;
    c.bind("", "").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "1 2 D C E Z", "{msgs:?}");
    let err = &msgs[4];
    assert_eq!(err.code(), "42501");
    assert!(err.field(b'M').starts_with("rlsgate:"), "{err:?}");
    assert_eq!(err.field(b'W'), "", "no CONTEXT: {err:?}");
    assert_eq!(msgs[5].body, b"E", "transaction aborted: {msgs:?}");
    c.query("ROLLBACK").await;
    assert_eq!(tags(&c.until_ready().await), "C Z");

    // A refusal outside a block: idle afterwards, and the session works.
    c.parse("", DENIED).await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "E Z", "{msgs:?}");
    assert_eq!(msgs[1].body, b"I");
    c.query("SELECT count(*) FROM customers").await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "T D C Z", "{msgs:?}");
    proxy.stop().await;
}
