//! LISTEN/NOTIFY through rlsgate. Notification channels belong to the database, not to a
//! tenant: a listener hears every tenant's notifications and a sender reaches every tenant's
//! listeners. So they are refused unless `[guard] allow_notifications`, and a notification is
//! only ever handed to a client that listens on a connection of its own (pinned by its LISTEN,
//! or session pooling), never to whoever happens to run a transaction on a shared connection.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use support::*;
use tokio::sync::mpsc;

/// A direct connection (no proxy) listening on `channel`, and the payloads it hears (as long as
/// the client is kept).
async fn direct_listener(
    db: &str,
    channel: &str,
) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<String>) {
    let conn_str = format!(
        "host=127.0.0.1 port={} dbname={db} user=rlsgate_app password={APP_PASSWORD}",
        pg().port()
    );
    let (c, mut connection) = tokio_postgres::connect(&conn_str, tokio_postgres::NoTls)
        .await
        .expect("direct connection");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    c.batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("LISTEN");
    (c, rx)
}

/// What the client got back for `sql`, checking no NotificationResponse is among it.
async fn run_hearing_nothing(c: &mut RawClient, sql: &str) -> Vec<Msg> {
    c.query(sql).await;
    let msgs = c.until_ready().await;
    assert!(
        !msgs.iter().any(|m| m.tag == 'A'),
        "{sql}: a notification reached a client that did not listen: {msgs:?}"
    );
    msgs
}

/// A function that makes its connection listen, out of the guard's sight (the guard sees a
/// plain function call), and notes which backend it ran on.
fn install_listen_anyway(db: &str) {
    admin_sql(
        db,
        "CREATE TABLE listeners (pid int);
         CREATE FUNCTION listen_anyway() RETURNS int LANGUAGE plpgsql SECURITY DEFINER AS
           $$ BEGIN EXECUTE 'LISTEN leak'; INSERT INTO listeners VALUES (pg_backend_pid()); RETURN 1; END $$;
         GRANT EXECUTE ON FUNCTION listen_anyway() TO rlsgate_app;",
    );
}

/// A demo database with `listen_anyway()`, behind a proxy with a pool of 2 and pipeline lanes
/// (depth 4; a lane at most, half the pool).
async fn lane_proxy() -> (String, Proxy) {
    let db = demo_db();
    install_listen_anyway(&db);
    let cfg = config_text(&db, 2, "").replace(
        &format!("pipeline_depth = {}", pipeline_depth()),
        "pipeline_depth = 4",
    );
    let proxy = start_proxy_with(&db, &cfg).await;
    (db, proxy)
}

/// Run `sql` (a unit that sleeps) and send a notification on `leak` while it runs: the server
/// hands it over at the unit's end, in front of its ReadyForQuery. The replies, checked to hold
/// no notification.
async fn notified_during(c: &mut RawClient, db: &str, sql: &str) -> Vec<Msg> {
    c.query(sql).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    admin_sql(db, "NOTIFY leak, 'north-secret'");
    let msgs = c.until_ready().await;
    assert!(
        !msgs.iter().any(|m| m.tag == 'A'),
        "{sql}: a notification reached a client that did not listen: {msgs:?}"
    );
    msgs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_notify_are_refused_by_default_and_nothing_goes_out() {
    let proxy = start_proxy(2).await;
    let (_listener, mut heard) = direct_listener(&proxy.db, "channel_a").await;
    let north = client(&proxy, "north").await;
    for sql in [
        "LISTEN channel_a",
        "NOTIFY channel_a, 'from north'",
        "SELECT pg_notify('channel_a', 'from north')",
        "SELECT count(*) FROM customers WHERE pg_notify('channel_a', name) IS NULL",
    ] {
        for extended in [false, true] {
            let err = if extended {
                north.query(sql, &[]).await.map(|_| ()).unwrap_err()
            } else {
                north.simple_query(sql).await.map(|_| ()).unwrap_err()
            };
            assert_eq!(code(&err), "42501", "{sql}: {err}");
            let text = message(&err);
            assert!(
                text.starts_with("rlsgate:")
                    && text.contains("shared by every tenant")
                    && text.contains("guard.allow_notifications"),
                "{sql}: {err}"
            );
        }
    }
    // stopping to listen is harmless (drivers' session resets send it)
    north.batch_execute("UNLISTEN *").await.unwrap();
    assert_eq!(count(&north, "customers").await, 3);
    // the listener works: the first thing it hears is this, not any of north's attempts
    admin_sql(&proxy.db, "NOTIFY channel_a, 'control'");
    let first = tokio::time::timeout(Duration::from_secs(10), heard.recv())
        .await
        .expect("the control notification arrives");
    assert_eq!(first.as_deref(), Some("control"));
    proxy.stop().await;
}

/// Something out of the guard's sight made the only pool connection listen: the notifications
/// it receives are dropped, not handed to the next tenant whose transaction runs on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_connection_that_listens_hands_nothing_to_its_clients() {
    let proxy = start_proxy(1).await;
    install_listen_anyway(&proxy.db);
    let north = client(&proxy, "north").await;
    north.batch_execute("SELECT listen_anyway()").await.unwrap();

    let mut south = RawClient::connect(&proxy, &token("south")).await;
    run_hearing_nothing(&mut south, "BEGIN").await;
    // the connection south holds does listen
    let msgs = run_hearing_nothing(&mut south, "SELECT pg_listening_channels()").await;
    assert_eq!(first_value(&msgs).as_deref(), Some("leak"), "{msgs:?}");
    admin_sql(&proxy.db, "NOTIFY leak, 'north-secret'");
    let msgs = run_hearing_nothing(&mut south, "SELECT count(*) FROM customers").await;
    assert_eq!(first_value(&msgs).as_deref(), Some("2"), "{msgs:?}");
    // the server hands the notification over as the transaction ends, before its ReadyForQuery
    run_hearing_nothing(&mut south, "COMMIT").await;
    // The connection that dropped it was reset before its next transaction: it no longer
    // listens (the pool's only connection, so this runs on it).
    let msgs =
        run_hearing_nothing(&mut south, "SELECT count(*) FROM pg_listening_channels()").await;
    assert_eq!(first_value(&msgs).as_deref(), Some("0"), "{msgs:?}");
    for _ in 0..3 {
        admin_sql(&proxy.db, "NOTIFY leak, 'north-secret'");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let msgs = run_hearing_nothing(&mut south, "SELECT count(*) FROM customers").await;
        assert_eq!(first_value(&msgs).as_deref(), Some("2"), "{msgs:?}");
    }
    proxy.stop().await;
}

/// The same on a pipeline lane: the notification arrives inside another client's unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_lane_that_listens_hands_nothing_to_its_clients() {
    let (db, proxy) = lane_proxy().await;
    // both pool connections listen: one held in a block while the other runs the function
    // (another tenant: one tenant may not hold the whole pool)
    let mut holder = RawClient::connect(&proxy, &token("north")).await;
    run_hearing_nothing(&mut holder, "BEGIN").await;
    run_hearing_nothing(&mut holder, "SELECT listen_anyway()").await;
    let other = client(&proxy, "south").await;
    other.batch_execute("SELECT listen_anyway()").await.unwrap();
    run_hearing_nothing(&mut holder, "COMMIT").await;
    assert_eq!(
        admin_sql(&db, "SELECT count(DISTINCT pid) FROM listeners"),
        "2"
    );

    let units = proxy.shared.pipelines.units();
    let mut south = RawClient::connect(&proxy, &token("south")).await;
    for _ in 0..3 {
        let msgs = notified_during(
            &mut south,
            &db,
            "SELECT count(*) FROM customers, pg_sleep(0.3)",
        )
        .await;
        assert_eq!(first_value(&msgs).as_deref(), Some("2"), "{msgs:?}");
    }
    assert!(
        proxy.shared.pipelines.units() >= units + 3,
        "the units ran on a lane"
    );
    proxy.stop().await;
}

/// A lane whose connection turns out to listen takes no more units once it has dropped a
/// notification, and its connection is reset (it stops listening) before it is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_that_dropped_a_notification_retires_and_its_connection_stops_listening() {
    // (one lane at most, and the other connection never listens)
    let (db, proxy) = lane_proxy().await;
    let units = proxy.shared.pipelines.units();
    let mut south = RawClient::connect(&proxy, &token("south")).await;
    run_hearing_nothing(&mut south, "SELECT listen_anyway()").await;
    assert_eq!(proxy.shared.pipelines.units(), units + 1, "ran on a lane");
    assert_eq!(
        admin_sql(&db, "SELECT count(DISTINCT pid) FROM listeners"),
        "1"
    );

    // a unit that runs while the notification is sent, on the lane's connection (the one
    // that listens: a lane that lingered out gave it back to the pool, where it is the
    // first one taken again)
    let msgs = notified_during(
        &mut south,
        &db,
        "SELECT count(*) FROM customers, pg_listening_channels(), pg_sleep(0.3)",
    )
    .await;
    assert_eq!(
        first_value(&msgs).as_deref(),
        Some("2"),
        "ran where the channel is listened on: {msgs:?}"
    );

    // From now on no connection listens: the lane's was reset when it retired.
    for _ in 0..4 {
        let msgs =
            run_hearing_nothing(&mut south, "SELECT count(*) FROM pg_listening_channels()").await;
        assert_eq!(first_value(&msgs).as_deref(), Some("0"), "{msgs:?}");
    }
    assert!(
        proxy.shared.pipelines.units() >= units + 6,
        "the units ran on lanes"
    );
    proxy.stop().await;
}

/// With `allow_notifications`, a client that listens keeps its connection (pinned) and hears
/// what is sent on its channel; the other clients hear nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_notifications_reach_the_listening_client_only() {
    let db = demo_db();
    let cfg = format!(
        "{}\n[guard]\nallow_notifications = true\n",
        config_text(&db, 2, "")
    );
    let proxy = start_proxy_with(&db, &cfg).await;
    let mut north = RawClient::connect(&proxy, &token("north")).await;
    run_hearing_nothing(&mut north, "LISTEN chan").await;
    let mut south = RawClient::connect(&proxy, &token("south")).await;
    admin_sql(&db, "NOTIFY chan, 'hello'");
    run_hearing_nothing(&mut south, "SELECT 1").await;
    north.query("SELECT 1").await;
    let msgs = north.until_ready().await;
    let heard: Vec<&Msg> = msgs.iter().filter(|m| m.tag == 'A').collect();
    assert_eq!(heard.len(), 1, "{msgs:?}");
    assert!(
        String::from_utf8_lossy(&heard[0].body).contains("hello"),
        "{msgs:?}"
    );
    // north's own NOTIFY reaches it too; south still hears nothing
    run_hearing_nothing(&mut south, "NOTIFY chan, 'from south'").await;
    north.query("SELECT 1").await;
    let msgs = north.until_ready().await;
    assert!(
        msgs.iter()
            .any(|m| m.tag == 'A' && String::from_utf8_lossy(&m.body).contains("from south")),
        "{msgs:?}"
    );
    run_hearing_nothing(&mut south, "SELECT 1").await;
    proxy.stop().await;
}
