//! Quiet clients rest: after a second or two without a word, an idle client's session shrinks to
//! a compact record (no transaction state, buffers, context messages or span) and grows back at
//! its next message. What it had must all come back: prepared statements, settings, its tenant,
//! and the ways a session ends (KILL, its token's expiry).

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

/// Wait until at least `n` clients rest (the registry's clock parks a client quiet for a whole
/// tick: 1–2 s).
async fn until_resting(proxy: &Proxy, n: i64) {
    for _ in 0..150 {
        if proxy.shared.metrics.resting_clients() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{} clients resting after 15 s, expected {n}",
        proxy.shared.metrics.resting_clients()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resting_client_comes_back_with_its_statements_settings_and_tenant() {
    // one connection: the other tenant's work runs on it while north rests
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    let named = north
        .prepare("SELECT count(*) FROM customers WHERE name <> $1")
        .await
        .unwrap();
    north
        .batch_execute("SET statement_timeout = '54321ms'")
        .await
        .unwrap();
    until_resting(&proxy, 2).await;
    assert_eq!(count(&south, "customers").await, 2);
    south
        .batch_execute("SET statement_timeout = '1s'")
        .await
        .unwrap();
    until_resting(&proxy, 2).await;

    let rows = north.query(&named, &[&"nobody"]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 3, "north's own rows only");
    let timeout = north.simple_query("SHOW statement_timeout").await.unwrap();
    let shown = timeout.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(shown.as_deref(), Some("54321ms"), "north's setting");
    assert_eq!(count(&north, "customers").await, 3);
    north
        .batch_execute(
            "BEGIN; INSERT INTO customers (store_id, name) VALUES ('north', 'After a rest'); COMMIT",
        )
        .await
        .unwrap();
    assert_eq!(count(&north, "customers").await, 4);
    assert_eq!(
        count(&south, "customers").await,
        2,
        "south still sees its own"
    );
    let forged = north
        .simple_query("SET app.current_store_id = 'south'")
        .await
        .unwrap_err();
    assert_eq!(
        code(&forged),
        "42501",
        "the guard still reads a resumed session"
    );
    assert!(proxy.shared.metrics.resting_clients() < 2, "north resumed");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resting_client_is_ended_by_kill_and_by_its_token_expiry() {
    let db = demo_db();
    let extra = "leeway = \"0s\"\nadmin_claim = \"rlsgate_admin\"";
    let proxy = start_proxy_with(&db, &config_text(&db, 2, extra)).await;
    let north = client(&proxy, "north").await;
    assert_eq!(count(&north, "customers").await, 3);
    let expiring = token_with(json!({"store_id": "south", "exp": now() + 5}));
    let mut south = RawClient::connect(&proxy, &expiring).await;
    south.query("SELECT count(*) FROM customers").await;
    assert_eq!(tags(&south.until_ready().await), "T D C Z");
    until_resting(&proxy, 2).await;

    let out = admin_psql(&proxy, "KILL north");
    assert_eq!(stdout(&out), "KILL 1", "{}", stderr(&out));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = north.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.is_closed() || code(&err) == "57P01", "{err}");

    // south says nothing: its session wakes from its rest at the expiry and tells it
    let m = south.recv().await;
    assert_eq!((m.tag, m.code().as_str()), ('E', "28000"), "{m:?}");
    assert_eq!(m.field(b'S'), "FATAL");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_rest_and_wake_together_each_in_its_own_tenant() {
    const CLIENTS: usize = 120;
    let proxy = start_proxy(2).await;
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let tenant = if i % 2 == 0 { "north" } else { "south" };
        let mut c = RawClient::connect(&proxy, &token(tenant)).await;
        if i % 3 == 0 {
            // a named statement kept through the rest (extended protocol)
            c.parse("counted", "SELECT count(*) FROM customers").await;
            c.sync().await;
            assert_eq!(tags(&c.until_ready().await), "1 Z");
        }
        clients.push((tenant, i, c));
    }
    until_resting(&proxy, CLIENTS as i64).await;
    // all at once: each pipelines its query behind nothing, right as it wakes
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(tenant, i, mut c)| {
            tokio::spawn(async move {
                let expected = if tenant == "north" { "3" } else { "2" };
                if i % 3 == 0 {
                    c.bind("", "counted").await;
                    c.execute("").await;
                    c.sync().await;
                    let msgs = c.until_ready().await;
                    assert_eq!(tags(&msgs), "2 D C Z", "client {i}");
                    assert_eq!(first_value(&msgs).as_deref(), Some(expected), "client {i}");
                } else {
                    c.query("SELECT count(*) FROM customers").await;
                    let msgs = c.until_ready().await;
                    assert_eq!(tags(&msgs), "T D C Z", "client {i}");
                    assert_eq!(first_value(&msgs).as_deref(), Some(expected), "client {i}");
                }
                c
            })
        })
        .collect();
    let mut back = Vec::new();
    for t in tasks {
        back.push(t.await.expect("client task"));
    }
    // and they rest again
    until_resting(&proxy, CLIENTS as i64).await;
    drop(back);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_holding_a_connection_does_not_rest() {
    let db = demo_db();
    let proxy = start_proxy_with(
        &db,
        &config_text(&db, 2, "").replace("[server]\n", "[server]\npool_mode = \"session\"\n"),
    )
    .await;
    let north = client(&proxy, "north").await;
    assert_eq!(count(&north, "customers").await, 3);
    // a transaction mode client in an open block holds its connection too
    let tx = start_proxy(2).await;
    let south = client(&tx, "south").await;
    south.batch_execute("BEGIN").await.unwrap();
    assert_eq!(count(&south, "customers").await, 2);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(proxy.shared.metrics.resting_clients(), 0, "session mode");
    assert_eq!(tx.shared.metrics.resting_clients(), 0, "inside a block");
    assert_eq!(count(&north, "customers").await, 3);
    south.batch_execute("COMMIT").await.unwrap();
    until_resting(&tx, 1).await;
    proxy.stop().await;
    tx.stop().await;
}
