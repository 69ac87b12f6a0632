//! `[upstream] keep_context` (on by default): a server connection keeps a client's tenant context
//! at session level between transactions, so that its transactions send none; a connection that
//! may keep another context is cleaned before anyone else runs anything on it. Checked against
//! what the server itself logs and does, with tenants taking turns on a pool of one connection,
//! and with a procedure whose `COMMIT` runs the rest of it outside the transaction the context
//! was sent for: there a connection that still kept the previous tenant's context would show it.

mod support;

use support::*;

/// A proxy with one connection whose second context setting (`app.kept_probe`, from `sub`)
/// names only this test's statements in the server log (every statement of the database's
/// upstream role is logged).
async fn logged_proxy(keep_context: bool) -> (Proxy, String) {
    let db = demo_db();
    admin_sql(
        &db,
        &format!("ALTER ROLE rlsgate_app IN DATABASE \"{db}\" SET log_statement = 'all'"),
    );
    let config = config_text(&db, 1, "")
        .replace(
            "[upstream]\n",
            &format!("[upstream]\nkeep_context = {keep_context}\n"),
        )
        .replace("[context]\n", "[context]\n\"app.kept_probe\" = \"sub\"\n");
    (start_proxy_with(&db, &config).await, db)
}

/// How many times the context statements ran in `log`: the per-transaction form and the form a
/// connection keeps (`set_config(…, true/false)` where the role may call it, else `SET LOCAL` /
/// `SET`; demo.sql revokes `set_config`).
fn context_runs(log: &str, db: &str) -> (usize, usize) {
    let ours = format!("@{db} ");
    let runs = |forms: [&str; 2]| {
        log.lines()
            .filter(|l| {
                l.contains(&ours)
                    && l.contains("execute rg_ctx_")
                    && forms.iter().any(|f| l.contains(f))
            })
            .count()
    };
    (
        runs(["SET LOCAL app.kept_probe =", "'app.kept_probe', $2, true)"]),
        runs([": SET app.kept_probe =", "'app.kept_probe', $2, false)"]),
    )
}

async fn tenant(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT current_setting('app.current_store_id')", &[])
        .await
        .expect("current_setting")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_on_a_connection_that_keeps_the_context_send_none() {
    let (proxy, db) = logged_proxy(true).await;
    let north = client(&proxy, "north").await;
    let from = server_log_len();
    for _ in 0..20 {
        assert_eq!(count(&north, "customers").await, 3);
        assert_eq!(tenant(&north).await, "north");
        let rows = north
            .simple_query("SELECT count(*) FROM sales_items")
            .await
            .expect("simple query");
        assert!(
            rows.iter().any(|m| matches!(m,
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("3"))),
            "north's 3 sales items"
        );
    }
    // explicit blocks too
    for _ in 0..5 {
        north.batch_execute("BEGIN").await.expect("begin");
        assert_eq!(tenant(&north).await, "north");
        assert_eq!(count(&north, "customers").await, 3);
        north.batch_execute("COMMIT").await.expect("commit");
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (per_transaction, kept) = context_runs(&server_log_since(from), &db);
    // 65 transactions: the first ones bring their context until the connection keeps it
    assert_eq!(kept, 1, "the connection took the context once");
    assert!(
        per_transaction <= 3,
        "{per_transaction} transactions still sent the context"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_every_transaction_sends_the_context() {
    let (proxy, db) = logged_proxy(false).await;
    let north = client(&proxy, "north").await;
    let from = server_log_len();
    for _ in 0..10 {
        // (one unit each; an extended query with a Describe first is two)
        let msgs = north
            .simple_query("SELECT count(*) FROM customers")
            .await
            .expect("simple query");
        assert!(msgs.iter().any(|m| matches!(m,
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("3"))));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(context_runs(&server_log_since(from), &db), (10, 0));
    proxy.stop().await;
}

/// Tenants take turns on one connection, each long enough for the connection to keep its
/// context; each checks every row it reads, in the simple and the extended protocol, and a
/// procedure that commits half-way records the context it sees after its `COMMIT` (outside
/// the transaction any context was sent for): never another tenant's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_context_never_reaches_another_tenant() {
    let db = demo_db();
    admin_sql(
        &db,
        "CREATE TABLE seen (who text, ctx text);
         GRANT INSERT ON seen TO rlsgate_app;
         CREATE PROCEDURE peek(who text) LANGUAGE plpgsql AS $$
         BEGIN
           COMMIT;
           INSERT INTO seen VALUES (who, current_setting('app.current_store_id', true));
         END $$;
         GRANT EXECUTE ON PROCEDURE peek(text) TO rlsgate_app;",
    );
    let proxy = start_proxy_with(&db, &config_text(&db, 1, "")).await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    for round in 0..6 {
        for (c, store, customers) in [(&north, "north", 3), (&south, "south", 2)] {
            for _ in 0..3 {
                assert_eq!(count(c, "customers").await, customers, "round {round}");
                let stores = c
                    .query("SELECT DISTINCT store_id FROM products", &[])
                    .await
                    .expect("products");
                assert!(
                    stores.iter().all(|r| r.get::<_, String>(0) == store),
                    "{store} read another tenant's products"
                );
                let msgs = c
                    .simple_query("SELECT current_setting('app.current_store_id')")
                    .await
                    .expect("simple");
                assert!(msgs.iter().any(|m| matches!(m,
                    tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(store))));
            }
            c.batch_execute(&format!("CALL peek('{store}')"))
                .await
                .expect("call");
        }
    }
    let seen = admin_sql(
        &db,
        "SELECT count(*) FILTER (WHERE ctx = who), count(*) FILTER (WHERE ctx <> who AND ctx <> ''), count(*) FROM seen",
    );
    let counts: Vec<&str> = seen.split('|').collect();
    assert_eq!(
        counts[1], "0",
        "a procedure saw another tenant's context: {seen}"
    );
    assert_eq!(counts[2], "12", "{seen}");
    // The connection did keep contexts: a procedure of the tenant the connection kept sees its
    // own tenant after the COMMIT (the check above is not vacuous).
    assert_ne!(counts[0], "0", "no connection kept a context: {seen}");
    proxy.stop().await;
}

/// `RESET ALL` and `DISCARD ALL` take the kept context off: the next transactions bring theirs
/// again (they must not run with none), and the connection keeps it again later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_all_and_discard_all_take_the_kept_context_off() {
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    for reset in ["RESET ALL", "DISCARD ALL", "RESET ALL"] {
        for _ in 0..4 {
            assert_eq!(count(&north, "customers").await, 3);
        }
        north.batch_execute(reset).await.expect(reset);
        for _ in 0..4 {
            assert_eq!(tenant(&north).await, "north", "after {reset}");
            assert_eq!(count(&north, "customers").await, 3, "after {reset}");
            let msgs = north
                .simple_query("SELECT count(*) FROM customers")
                .await
                .expect("simple");
            assert!(msgs.iter().any(|m| matches!(m,
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("3"))));
        }
    }
    proxy.stop().await;
}

/// A pipeline lane never takes a connection that keeps a context: it is cleaned first, and the
/// lane's units see their own tenant only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_cleans_a_connection_that_kept_a_context() {
    let db = demo_db();
    let config = config_text(&db, 2, "").replace(
        &format!("pipeline_depth = {}", pipeline_depth()),
        "pipeline_depth = 4",
    );
    let proxy = start_proxy_with(&db, &config).await;
    let mut north = client(&proxy, "north").await;
    // explicit blocks take an exclusive connection; repeated, the connection keeps north
    for _ in 0..4 {
        let tx = north.transaction().await.expect("begin");
        assert_eq!(count(&tx, "customers").await, 3);
        tx.commit().await.expect("commit");
    }
    let south = client(&proxy, "south").await;
    let checks = (0..50).map(|_| async {
        assert_eq!(tenant(&south).await, "south");
        assert_eq!(count(&south, "customers").await, 2);
    });
    futures_util::future::join_all(checks).await;
    assert_eq!(count(&north, "customers").await, 3);
    proxy.stop().await;
}

/// A `rlsgate.reauth` that changes a claim of the context: the connection that kept the old
/// context is cleaned before the client's next transaction, so not even the rest of a procedure
/// after its `COMMIT` sees the old claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reauth_with_other_claims_never_runs_under_the_old_kept_context() {
    let (proxy, db) = logged_proxy(true).await;
    admin_sql(
        &db,
        "CREATE TABLE seen (ctx text);
         GRANT INSERT ON seen TO rlsgate_app;
         CREATE PROCEDURE peek() LANGUAGE plpgsql AS $$
         BEGIN
           COMMIT;
           INSERT INTO seen VALUES (current_setting('app.kept_probe', true));
         END $$;
         GRANT EXECUTE ON PROCEDURE peek() TO rlsgate_app;",
    );
    let north = client(&proxy, "north").await;
    let probe = "SELECT current_setting('app.kept_probe')";
    for _ in 0..4 {
        let row = north.query_one(probe, &[]).await.expect("probe");
        assert_eq!(row.get::<_, String>(0), "user-north");
    }
    north.batch_execute("CALL peek()").await.expect("call");
    let fresh = token_with(serde_json::json!({
        "store_id": "north", "sub": "someone-else", "exp": now() + 3600
    }));
    north
        .batch_execute(&format!("SELECT rlsgate.reauth('{fresh}')"))
        .await
        .expect("reauth");
    for _ in 0..4 {
        north.batch_execute("CALL peek()").await.expect("call");
        let row = north.query_one(probe, &[]).await.expect("probe");
        assert_eq!(row.get::<_, String>(0), "someone-else");
        assert_eq!(count(&north, "customers").await, 3);
    }
    let seen = admin_sql(&db, "SELECT string_agg(ctx, ',' ORDER BY ctx) FROM seen");
    let after: Vec<&str> = seen.split(',').collect();
    assert_eq!(after.len(), 5, "{seen}");
    assert_eq!(
        after.iter().filter(|c| **c == "user-north").count(),
        1,
        "only the call before the reauth sees the old claim: {seen}"
    );
    proxy.stop().await;
}
