//! Transaction pooling that clients cannot tell from their own session: settings, prepared
//! statements, session state, cancels. Pools smaller than the number of clients.

mod support;

use support::*;
use tokio_postgres::Client;

async fn show(c: &Client, name: &str) -> String {
    c.query_one(&format!("SHOW {name}"), &[])
        .await
        .unwrap_or_else(|e| panic!("SHOW {name}: {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_client_across_pooled_connections() {
    let proxy = start_proxy(1).await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    north
        .batch_execute("SET statement_timeout = '4321ms'")
        .await
        .unwrap();
    north
        .simple_query("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    north
        .query("SELECT set_config('search_path', 'public', false)", &[])
        .await
        .err(); // revoked in demo db
    north
        .execute("SET lock_timeout = '777ms'", &[])
        .await
        .unwrap(); // extended protocol
    for _ in 0..3 {
        assert_eq!(show(&south, "statement_timeout").await, "0");
        assert_eq!(show(&south, "TimeZone").await, show_default_tz().await);
        assert_eq!(show(&north, "statement_timeout").await, "4321ms");
        assert_eq!(show(&north, "TimeZone").await, "Asia/Tokyo");
        assert_eq!(show(&north, "lock_timeout").await, "777ms");
        assert_eq!(count(&north, "customers").await, 3);
        assert_eq!(count(&south, "customers").await, 2);
    }
    // a SET rolled back does not stick; a committed one inside a block does
    north
        .batch_execute("BEGIN; SET statement_timeout = '1s'; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(show(&south, "statement_timeout").await, "0");
    assert_eq!(show(&north, "statement_timeout").await, "4321ms");
    north
        .batch_execute("BEGIN; SET statement_timeout = '2s'; COMMIT")
        .await
        .unwrap();
    assert_eq!(show(&south, "statement_timeout").await, "0");
    assert_eq!(show(&north, "statement_timeout").await, "2s");
    // a failed statement after a SET in the same implicit transaction undoes it
    north
        .simple_query("SET statement_timeout = '3s'; SELECT 1/0")
        .await
        .unwrap_err();
    assert_eq!(show(&north, "statement_timeout").await, "2s");
    // RESET and RESET ALL
    north.batch_execute("RESET lock_timeout").await.unwrap();
    assert_eq!(show(&south, "lock_timeout").await, "0");
    assert_eq!(show(&north, "lock_timeout").await, "0");
    north.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(show(&north, "statement_timeout").await, "0");
    assert_eq!(show(&north, "TimeZone").await, show_default_tz().await);
    proxy.stop().await;
}

async fn show_default_tz() -> String {
    pg().psql("postgres", "SHOW TimeZone")
        .expect("show")
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_are_applied_and_reported() {
    let proxy = start_proxy(1).await;
    let south = client(&proxy, "south").await;
    let conn = format!(
        "{} application_name=reporting options='-c statement_timeout=1234 -c TimeZone=Europe/Paris'",
        proxy.conn_str(&token("north"))
    );
    let (north, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    for _ in 0..2 {
        assert_eq!(show(&north, "statement_timeout").await, "1234ms");
        assert_eq!(show(&north, "application_name").await, "reporting");
        assert_eq!(show(&north, "TimeZone").await, "Europe/Paris");
        assert_eq!(show(&south, "statement_timeout").await, "0");
        assert_ne!(show(&south, "application_name").await, "reporting");
    }
    // RESET ALL returns to the startup values, as in Postgres
    north
        .batch_execute("SET statement_timeout = '9s'; ")
        .await
        .unwrap();
    north.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(show(&north, "statement_timeout").await, "1234ms");
    assert_eq!(show(&south, "statement_timeout").await, "0");
    proxy.stop().await;
}
