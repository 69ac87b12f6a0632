//! `SELECT rlsgate.reauth($1)` with the token as a bind parameter — how every driver passes
//! values — extends a connection like the literal form: answered by rlsgate, never sent to the
//! server (which has no `rlsgate` schema), same tenant only, errors with Postgres' semantics.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

fn no_leeway(db: &str) -> String {
    config_text(db, 2, "leeway = \"0s\"")
}

fn north_token(secs: u64) -> String {
    token_with(json!({"store_id": "north", "sub": "alice", "exp": now() + secs}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_with_a_bind_parameter_extends_the_connection() {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &no_leeway(&db)).await;
    let c = connect(&proxy, &north_token(3)).await.expect("login");

    // Another tenant's token: refused, the session goes on as north.
    let south = token_with(json!({"store_id": "south", "exp": now() + 600}));
    let err = c
        .query_one("SELECT rlsgate.reauth($1)", &[&south])
        .await
        .unwrap_err();
    assert_eq!(code(&err), "28000", "{err}");
    assert!(message(&err).contains("another tenant"), "{err}");
    assert_eq!(count(&c, "customers").await, 3);

    // A cast on the parameter, and a prepared statement used twice.
    let stmt = c.prepare("SELECT rlsgate.reauth($1::text)").await.unwrap();
    for _ in 0..2 {
        let row = c.query_one(&stmt, &[&north_token(600)]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "ok");
    }
    assert_eq!(stmt.params().len(), 1);
    assert_eq!(stmt.columns()[0].name(), "reauth");

    tokio::time::sleep(Duration::from_millis(4000)).await;
    assert_eq!(
        count(&c, "customers").await,
        3,
        "the connection outlives its first token"
    );
    proxy.stop().await;
}

/// Inside a transaction a refused reauth aborts the block, as any failed statement does; in a
/// pipeline everything up to Sync is skipped after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reauth_behaves_like_a_failed_statement() {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &no_leeway(&db)).await;
    let c = connect(&proxy, &north_token(600)).await.expect("login");
    c.batch_execute("BEGIN").await.unwrap();
    let err = c
        .query_one("SELECT rlsgate.reauth($1)", &[&"not-a-token"])
        .await
        .unwrap_err();
    assert_eq!(code(&err), "28000", "{err}");
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&err), "25P02", "{err}");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count(&c, "customers").await, 3);

    // Raw pipeline: unnamed reauth statement, parameter in text format, then a refused one and
    // a query behind it that must be skipped.
    let mut raw = RawClient::connect(&proxy, &north_token(600)).await;
    let bind_with = |token: &str| {
        let mut body = vec![0u8, 0]; // portal "", statement ""
        body.extend_from_slice(&[0, 0]); // no format codes: text
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&(token.len() as i32).to_be_bytes());
        body.extend_from_slice(token.as_bytes());
        body.extend_from_slice(&[0, 0]); // result formats
        body
    };
    raw.parse("", "SELECT rlsgate.reauth($1)").await;
    raw.send(b'B', &bind_with(&north_token(600))).await;
    raw.send(b'D', b"P\0").await;
    raw.execute("").await;
    raw.sync().await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "1 2 T D C Z", "{msgs:?}");
    assert!(msgs[3].body.ends_with(b"ok"), "{msgs:?}");

    raw.parse("", "SELECT rlsgate.reauth($1)").await;
    raw.send(b'B', &bind_with("garbage")).await;
    raw.execute("").await;
    raw.parse("", "SELECT count(*) FROM customers").await;
    raw.bind("", "").await;
    raw.execute("").await;
    raw.sync().await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "1 2 E Z", "{msgs:?}");
    assert_eq!(msgs[2].code(), "28000");

    // The unnamed statement is an ordinary one again after a new Parse.
    raw.parse("", "SELECT count(*) FROM customers").await;
    raw.bind("", "").await;
    raw.execute("").await;
    raw.sync().await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "1 2 D C Z", "{msgs:?}");
    proxy.stop().await;
}
