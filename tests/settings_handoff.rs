//! What one client leaves in a pooled connection's settings never reaches the next client,
//! even when rlsgate's own replay of the next client's settings fails, and no setting can make
//! a connection die while it waits in the pool. Pool of one: both tenants share the backend.

mod support;

use support::*;

const PROBE: &str = "SELECT coalesce(current_setting('myapp.secret', true), '<none>') || ' ' || \
    current_setting('search_path') || ' ' || current_setting('statement_timeout') || ' ' || \
    current_setting('app.current_store_id')";

async fn probe(c: &tokio_postgres::Client) -> String {
    let rows = c.simple_query(PROBE).await.expect("probe");
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

async fn south_with_settings(proxy: &Proxy) -> tokio_postgres::Client {
    let south = client(proxy, "south").await;
    south
        .batch_execute(
            "SET myapp.secret = 'b-secret'; SET search_path = 'b_schema', public; SET statement_timeout = '4321'",
        )
        .await
        .unwrap();
    assert_eq!(
        probe(&south).await,
        "b-secret b_schema, public 4321ms south"
    );
    south
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replay_never_leaves_the_previous_clients_settings() {
    let proxy = start_proxy(1).await;
    let south = south_with_settings(&proxy).await;
    // a setting whose replay fails when the replay is not the first statement of a transaction
    let north = client(&proxy, "north").await;
    north
        .batch_execute("SET transaction_deferrable = on")
        .await
        .unwrap();
    for _ in 0..3 {
        // south's settings go onto the connection, then north's replay runs
        probe(&south).await;
        let seen = probe(&north).await;
        assert!(
            !seen.contains("b-secret") && !seen.contains("b_schema") && !seen.contains("4321"),
            "north saw south's settings: {seen}"
        );
        assert!(seen.ends_with(" north"), "{seen}");
    }
    // the same through a startup option
    let conn_str = format!(
        "{} options='-c transaction_deferrable=on'",
        proxy.conn_str(&token("north"))
    );
    let (late, conn) = tokio_postgres::connect(&conn_str, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    probe(&south).await;
    let seen = probe(&late).await;
    assert!(!seen.contains("b-secret"), "{seen}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_timeout_cannot_kill_pooled_connections() {
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    for sql in [
        "SET idle_session_timeout = '100ms'",
        "SET SESSION idle_session_timeout TO 100",
        "SELECT set_config('idle_session_timeout', '100', false)",
        "SET LOCAL idle_session_timeout = 100",
    ] {
        let err = north.simple_query(sql).await.expect_err(sql);
        assert_eq!(code(&err), "42501", "{sql}: {err}");
    }
    let conn_str = format!(
        "{} options='-c idle_session_timeout=100'",
        proxy.conn_str(&token("north"))
    );
    let err = tokio_postgres::connect(&conn_str, tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused at login");
    assert_eq!(code(&err), "42501", "{err}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let south = client(&proxy, "south").await;
    assert_eq!(count(&south, "customers").await, 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_text_per_client_is_bounded() {
    // (1 MB texts: over the guard's default size cap, which has a test of its own)
    let db = demo_db();
    let proxy = start_proxy_with(
        &db,
        &config_text(&db, 1, "[guard]\nmax_statement_bytes = \"2MB\""),
    )
    .await;
    let mut north = RawClient::connect(&proxy, &token("north")).await;
    let pad = "x".repeat(1 << 20);
    let mut refused = None;
    for i in 0..80 {
        north
            .parse(&format!("s{i}"), &format!("SELECT {i} /* {pad} */"))
            .await;
        north.sync().await;
        let msgs = north.until_ready().await;
        if msgs[0].tag == 'E' {
            assert_eq!(msgs[0].code(), "54000", "{}", msgs[0].field(b'M'));
            refused = Some(i);
            break;
        }
    }
    let at = refused.expect("80 MiB of statements were accepted");
    assert!((60..=64).contains(&at), "refused at statement {at}");
    // the client and the others keep working
    north.query("SELECT 1").await;
    assert_eq!(tags(&north.until_ready().await), "T D C Z");
    let south = client(&proxy, "south").await;
    assert_eq!(count(&south, "customers").await, 2);
    proxy.stop().await;
}
