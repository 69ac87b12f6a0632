//! The server must read SQL text exactly as the guard does. Besides denying every known route
//! to change `standard_conforming_strings`/`client_encoding`, rlsgate watches what the server
//! itself reports: a connection that reads text differently is never used (at login) or is
//! closed at once (ParameterStatus mid-session), whatever route changed it.

mod support;

use support::*;

/// A route the guard cannot see: a function the database administrator created (security
/// definer, since the demo schema revokes set_config from the app role).
const LEGACY_MODE: &str = "CREATE FUNCTION public.legacy_mode() RETURNS text LANGUAGE sql \
    SECURITY DEFINER AS $$ SELECT set_config('standard_conforming_strings', 'off', false) $$; \
    GRANT EXECUTE ON FUNCTION public.legacy_mode() TO PUBLIC;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_server_starts_reading_text_differently_is_closed() {
    let db = demo_db();
    admin_sql(&db, LEGACY_MODE);
    let proxy = start_proxy_with(&db, &config_text(&db, 1, "")).await;
    let north = client(&proxy, "north").await;
    let err = north
        .simple_query("SELECT legacy_mode()")
        .await
        .expect_err("the session must end");
    assert_eq!(code(&err), "42501", "{err:?}");
    assert!(
        message(&err).contains("standard_conforming_strings = off"),
        "{err:?}"
    );
    assert!(
        north.simple_query("SELECT 1").await.is_err(),
        "session ended"
    );
    // the other tenant gets a fresh, correctly configured connection (pool of one)
    let south = client(&proxy, "south").await;
    let rows = south
        .query_one("SELECT current_setting('standard_conforming_strings')", &[])
        .await
        .expect("south works");
    assert_eq!(rows.get::<_, String>(0), "on");
    assert_eq!(count(&south, "customers").await, 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_reads_text_differently_is_refused() {
    let db = demo_db();
    admin_sql(
        &db,
        &format!("ALTER ROLE rlsgate_app IN DATABASE {db} SET standard_conforming_strings = off"),
    );
    let proxy = start_proxy_with(&db, &config_text(&db, 1, "")).await;
    let err = connect(&proxy, &token("north"))
        .await
        .expect_err("no upstream connection may be used");
    assert_eq!(code(&err), "08006", "{err}");
    let detail = err
        .as_db_error()
        .and_then(|d| d.detail())
        .unwrap_or_default()
        .to_string();
    assert!(
        detail.contains("standard_conforming_strings = off"),
        "{detail}"
    );
    admin_sql(
        &db,
        &format!("ALTER ROLE rlsgate_app IN DATABASE {db} RESET standard_conforming_strings"),
    );
    proxy.stop().await;
}
