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

/// List-valued `search_path` (from `options=-c search_path=a,b`, a startup parameter as JDBC's
/// `currentSchema=a,b` sends, or `set_config('search_path', 'a, b', false)`) is replayed as the
/// same list when the client comes back to a connection another client used in between — not as
/// one quoted schema named `a,b`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_valued_search_path_is_replayed_as_a_list() {
    let db = demo_db();
    admin_sql(
        &db,
        "CREATE SCHEMA sa; CREATE SCHEMA \"Sb\"; \
         CREATE TABLE sa.only_a (x int); CREATE TABLE \"Sb\".only_b (y int); \
         GRANT USAGE ON SCHEMA sa, \"Sb\" TO rlsgate_app; \
         GRANT SELECT ON sa.only_a, \"Sb\".only_b TO rlsgate_app; \
         GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO PUBLIC",
    );
    let proxy = start_proxy_with(&db, &config_text(&db, 1, "")).await;
    let base = proxy.conn_str(&token("north"));
    let via_options = format!("{base} options='-c search_path=sa,\\\"Sb\\\"'");
    let (options_client, conn) = tokio_postgres::connect(&via_options, tokio_postgres::NoTls)
        .await
        .expect("connect with options");
    tokio::spawn(conn);
    let set_config_client = client(&proxy, "north").await;
    set_config_client
        .simple_query("SELECT set_config('search_path', 'sa, \"Sb\"', false)")
        .await
        .expect("set_config");
    let other = client(&proxy, "south").await;

    // A startup parameter of its own, as JDBC's currentSchema sends it.
    let mut raw =
        RawClient::connect_with(&proxy, &token("north"), &[("search_path", "sa,\"Sb\"")]).await;
    for _ in 0..3 {
        other.simple_query("SELECT 1").await.unwrap();
        raw.query("SELECT x FROM only_a; SELECT y FROM only_b; SHOW search_path")
            .await;
        let msgs = raw.until_ready().await;
        assert!(
            !msgs.iter().any(|m| m.tag == 'E'),
            "startup parameter: {msgs:?}"
        );
        let last_row = msgs.iter().rev().find(|m| m.tag == 'D').expect("a row");
        assert!(
            String::from_utf8_lossy(&last_row.body).ends_with("sa, \"Sb\""),
            "{last_row:?}"
        );
    }

    for (how, c) in [
        ("options", &options_client),
        ("set_config", &set_config_client),
    ] {
        for _ in 0..3 {
            // Someone else uses the only connection in between.
            other.simple_query("SELECT 1").await.unwrap();
            let path: String = c.query_one("SHOW search_path", &[]).await.unwrap().get(0);
            assert_eq!(path, "sa, \"Sb\"", "{how}");
            c.simple_query("SELECT x FROM only_a")
                .await
                .unwrap_or_else(|e| panic!("{how}: {e}"));
            c.simple_query("SELECT y FROM only_b")
                .await
                .unwrap_or_else(|e| panic!("{how}: {e}"));
        }
    }
    proxy.stop().await;
}

/// Settings are compared by content: clients with the same startup parameters (every client of
/// one app, as a rule) share a connection without a reset and replay per transaction; a client
/// with other settings gets its own, and the first clients theirs again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_the_same_settings_share_a_connection_without_a_replay() {
    let db = demo_db();
    // every statement the pool's connection runs goes to the server log
    admin_sql(
        &db,
        &format!("ALTER ROLE rlsgate_app IN DATABASE {db} SET log_statement = 'all'"),
    );
    let proxy = start_proxy_with(&db, &config_text(&db, 1, "")).await;
    let log_len = || {
        std::fs::metadata(pg().log_path())
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let log_since = |from: u64| {
        let bytes = std::fs::read(pg().log_path()).expect("server log");
        String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).into_owned()
    };
    let from = log_len();
    let same = [("application_name", "handoff-same-app")];
    let mut a = RawClient::connect_with(&proxy, &token("north"), &same).await;
    let mut b = RawClient::connect_with(&proxy, &token("south"), &same).await;
    let show = "SELECT current_setting('application_name') || ' ' || \
        current_setting('app.current_store_id')";
    let value = |msgs: &[Msg]| {
        let row = msgs.iter().find(|m| m.tag == 'D').expect("a row");
        String::from_utf8_lossy(&row.body[6..]).into_owned()
    };
    for _ in 0..4 {
        for (c, store) in [(&mut a, "north"), (&mut b, "south")] {
            c.query(show).await;
            assert_eq!(
                value(&c.until_ready().await),
                format!("handoff-same-app {store}")
            );
        }
    }
    let mut other = RawClient::connect_with(
        &proxy,
        &token("north"),
        &[("application_name", "handoff-other")],
    )
    .await;
    other.query(show).await;
    assert_eq!(value(&other.until_ready().await), "handoff-other north");
    a.query(show).await;
    assert_eq!(value(&a.until_ready().await), "handoff-same-app north");
    let log = log_since(from);
    let replays = log
        .matches("SET \"application_name\" TO 'handoff-same-app'")
        .count();
    // once onto the fresh connection, once after the other client: not per transaction
    assert_eq!(replays, 2, "replays of the shared settings:\n{log}");
    assert_eq!(
        log.matches("SET \"application_name\" TO 'handoff-other'")
            .count(),
        1,
        "{log}"
    );
    proxy.stop().await;
}
