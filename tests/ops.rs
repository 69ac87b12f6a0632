//! Operating rlsgate: /metrics during a workload, /healthz and /readyz (PAUSE, upstream down),
//! the admin console through psql, and reload of the JWT secret without dropping connections.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

async fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect http");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("http answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (code, body)
}

async fn with_http(proxy: &Proxy) -> (u16, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    tokio::spawn(rlsgate::app::serve_http(
        listener,
        proxy.shared.clone(),
        stop.clone(),
    ));
    (port, stop)
}

fn admin_config(db: &str) -> String {
    config_text(db, 2, "admin_claim = \"rlsgate_admin\"")
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_workload() {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &admin_config(&db)).await;
    let (port, stop) = with_http(&proxy).await;
    let (_, before) = http_get(port, "/metrics").await;
    let north = client(&proxy, "north").await;
    for _ in 0..20 {
        assert_eq!(count(&north, "customers").await, 3);
    }
    let _ = north
        .simple_query("SET app.current_store_id = 'south'")
        .await;
    let _ = connect(&proxy, "not-a-token").await;
    let (code, after) = http_get(port, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metric(&after, "rlsgate_logins_total{result=\"ok\"")
            >= metric(&before, "rlsgate_logins_total{result=\"ok\"") + 1.0,
        "{after}"
    );
    assert!(
        metric(&after, "rlsgate_logins_total{result=\"failed\"") >= 1.0,
        "{after}"
    );
    assert!(
        metric(
            &after,
            "rlsgate_guard_denials_total{rule=\"protected_setting\"}"
        ) >= 1.0,
        "{after}"
    );
    assert!(
        metric(&after, "rlsgate_context_injections_total") >= 20.0,
        "{after}"
    );
    assert!(
        metric(&after, "rlsgate_checkout_wait_seconds_count") >= 20.0,
        "{after}"
    );
    assert!(
        metric(&after, "rlsgate_transaction_duration_seconds_count") >= 20.0,
        "{after}"
    );
    // The gauge follows the session's state, which it sets after answering the client: poll.
    let mut idle = metric(&after, "rlsgate_client_connections{state=\"idle\"}");
    let mut last = after;
    for _ in 0..50 {
        if idle >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        last = http_get(port, "/metrics").await.1;
        idle = metric(&last, "rlsgate_client_connections{state=\"idle\"}");
    }
    assert!(idle >= 1.0, "{last}");
    stop.cancel();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_pause_and_the_upstream() {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &admin_config(&db)).await;
    let (port, stop) = with_http(&proxy).await;
    assert_eq!(http_get(port, "/healthz").await.0, 200);
    assert_eq!(http_get(port, "/readyz").await.0, 200);
    let out = admin_psql(&proxy, "PAUSE");
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, body) = http_get(port, "/readyz").await;
    assert_eq!((code, body.contains("paused")), (503, true), "{body}");
    // while paused, a transaction waits; RESUME lets it through
    let north = client(&proxy, "north").await;
    let waiting = tokio::spawn(async move { count(&north, "customers").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a transaction must wait while paused"
    );
    assert!(admin_psql(&proxy, "RESUME").status.success());
    assert_eq!(waiting.await.unwrap(), 3);
    assert_eq!(http_get(port, "/readyz").await.0, 200);
    stop.cancel();
    proxy.stop().await;

    // an upstream that cannot be reached
    let cfg = admin_config(&db).replace(&format!("port = {}", pg().port()), "port = 1");
    let down = start_proxy_with(&db, &cfg).await;
    let (port, stop) = with_http(&down).await;
    let mut code = 0;
    for _ in 0..40 {
        code = http_get(port, "/readyz").await.0;
        if code == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, 503);
    assert_eq!(http_get(port, "/healthz").await.0, 200);
    stop.cancel();
    down.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_commands_work_through_psql() {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &admin_config(&db)).await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    assert_eq!(count(&north, "customers").await, 3);
    assert_eq!(count(&south, "customers").await, 2);
    let _ = south
        .simple_query("SET app.current_store_id = 'north'")
        .await;

    let out = admin_psql(&proxy, "SHOW POOLS");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(&format!("{db}|rlsgate_app|2|")),
        "{}",
        stdout(&out)
    );
    let clients = stdout(&admin_psql(&proxy, "SHOW CLIENTS"));
    assert!(
        clients.contains("|north|app|idle|") && clients.contains("|south|app|idle|"),
        "{clients}"
    );
    let tenants = stdout(&admin_psql(&proxy, "SHOW TENANTS"));
    assert!(
        tenants
            .lines()
            .any(|l| l.starts_with("south|1|") && l.ends_with("|1")),
        "{tenants}"
    );
    let servers = stdout(&admin_psql(&proxy, "SHOW SERVERS"));
    assert!(servers.contains("|idle|"), "{servers}");
    let config = stdout(&admin_psql(&proxy, "SHOW CONFIG"));
    assert!(
        config.contains("upstream.pool_size|2") && !config.contains(SECRET),
        "{config}"
    );
    let bad = admin_psql(&proxy, "DROP TABLE customers");
    assert!(
        !bad.status.success() && stderr(&bad).contains("unknown admin command"),
        "{}",
        stderr(&bad)
    );

    // KILL disconnects a tenant's clients and nobody else
    let out = admin_psql(&proxy, "KILL north");
    assert_eq!(stdout(&out), "KILL 1", "{}", stderr(&out));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = north.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.is_closed() || code(&err) == "57P01", "{err}");
    assert_eq!(count(&south, "customers").await, 2);

    // the admin console needs the admin claim
    let mut cmd = std::process::Command::new(pg().bin("psql"));
    cmd.env_clear().env("PGPASSWORD", token("north")).args([
        "-X",
        "-At",
        &format!(
            "host=127.0.0.1 port={} dbname=rlsgate user=x sslmode=disable",
            proxy.addr.port()
        ),
        "-c",
        "SHOW POOLS",
    ]);
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success() && stderr(&out).contains("admin claim"),
        "{}",
        stderr(&out)
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_jwt_secret_without_dropping_connections() {
    let db = demo_db();
    let dir = std::env::temp_dir().join(format!("rlsgate-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rlsgate.toml");
    let cfg = admin_config(&db);
    std::fs::write(&path, &cfg).unwrap();
    let proxy = start_proxy_with(&db, &cfg).await;
    proxy.shared.set_config_path(path.clone());
    let old = client(&proxy, "north").await;

    let new_secret = "a-brand-new-secret-a-brand-new-secret-0123";
    std::fs::write(&path, cfg.replace(SECRET, new_secret)).unwrap();
    // an invalid file is refused and the old configuration stays
    std::fs::write(&path, "this is not toml").unwrap();
    let out = admin_psql(&proxy, "RELOAD");
    assert!(
        !out.status.success() && stderr(&out).contains("reload refused"),
        "{}",
        stderr(&out)
    );
    assert!(connect(&proxy, &token("south")).await.is_ok());

    std::fs::write(&path, cfg.replace(SECRET, new_secret)).unwrap();
    // (the console logs in with the old secret, then RELOAD swaps it)
    let out = admin_psql(&proxy, "RELOAD");
    assert!(out.status.success(), "{}", stderr(&out));
    let fresh = rlsgate::auth::mint_hs256(
        new_secret.as_bytes(),
        &json!({"store_id": "south", "exp": now() + 600}),
    )
    .unwrap();
    let c = connect(&proxy, &fresh)
        .await
        .expect("a token with the new secret is accepted");
    assert_eq!(count(&c, "customers").await, 2);
    assert!(
        connect(&proxy, &token("south")).await.is_err(),
        "the old secret no longer logs in"
    );
    assert_eq!(
        count(&old, "customers").await,
        3,
        "the old connection keeps working"
    );
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

fn limits_config(db: &str, pool: usize, limits: &str) -> String {
    format!("{}\n[limits]\n{limits}\n", config_text(db, pool, ""))
}

/// [`limits_config`] without pipelining: the flood comparison measures the tenant limit alone
/// (with pipelining, a lane whose head runs long takes no more units, so the unlimited flood
/// does not hold south back the same way).
fn limits_config_exclusive(db: &str, pool: usize, limits: &str) -> String {
    limits_config(db, pool, limits).replace(
        &format!("pipeline_depth = {}", pipeline_depth()),
        "pipeline_depth = 1",
    )
}

/// p99 of south's checkout+query latency while north floods with slow transactions.
async fn south_p99_under_flood(proxy: &Proxy) -> Duration {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..8 {
        let c = client(proxy, "north").await;
        let stop = stop.clone();
        flood.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = c.simple_query("SELECT pg_sleep(0.2)").await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let south = client(proxy, "south").await;
    let mut samples = Vec::new();
    for _ in 0..30 {
        let t = std::time::Instant::now();
        assert_eq!(count(&south, "customers").await, 2);
        samples.push(t.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        let _ = f.await;
    }
    samples.sort();
    samples[samples.len() * 99 / 100]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_cannot_starve_another() {
    let db = demo_db();
    // pool of 4; north may hold at most 2 of them
    let proxy = start_proxy_with(
        &db,
        &limits_config_exclusive(&db, 4, "max_transactions_per_tenant = 2"),
    )
    .await;
    let p99 = south_p99_under_flood(&proxy).await;
    assert!(
        p99 < Duration::from_millis(150),
        "south's p99 under north's flood: {p99:?}"
    );
    proxy.stop().await;
    // without the limit (explicit 0: unset would be the default share of 3) north's eight clients
    // take every connection and south waits behind them
    let proxy = start_proxy_with(
        &db,
        &limits_config_exclusive(&db, 4, "max_transactions_per_tenant = 0"),
    )
    .await;
    let unlimited = south_p99_under_flood(&proxy).await;
    assert!(unlimited > p99, "limit {p99:?} vs none {unlimited:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_client_and_rate_limits_refuse_with_53300_and_53400() {
    let db = demo_db();
    let proxy = start_proxy_with(
        &db,
        &limits_config(
            &db,
            2,
            "max_clients_per_tenant = 2\ntransaction_rate_per_tenant = 5\non_limit = \"error\"",
        ),
    )
    .await;
    let a = client(&proxy, "north").await;
    let _b = client(&proxy, "north").await;
    let err = connect(&proxy, &token("north"))
        .await
        .map(|_| ())
        .expect_err("third north client refused");
    assert_eq!(code(&err), "53300", "{err}");
    let south = client(&proxy, "south").await; // other tenants are unaffected
    let mut limited = 0;
    for _ in 0..20 {
        match a.simple_query("SELECT 1").await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(code(&e), "53400", "{e}");
                limited += 1;
            }
        }
    }
    assert!(limited >= 10, "rate limit refused {limited} of 20");
    assert_eq!(count(&south, "customers").await, 2);
    proxy.stop().await;
}

/// KILL and shutdown end idle sessions by themselves: the clients send nothing and still get
/// their FATAL 57P01 (a check at the next statement is not what ends them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_shutdown_reach_idle_clients_that_send_nothing() {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &admin_config(&db)).await;
    let mut north = RawClient::connect(&proxy, &token("north")).await;
    let mut south = RawClient::connect(&proxy, &token("south")).await;
    south.query("SELECT count(*) FROM customers").await;
    assert_eq!(tags(&south.until_ready().await), "T D C Z");

    let out = admin_psql(&proxy, "KILL north");
    assert_eq!(stdout(&out), "KILL 1", "{}", stderr(&out));
    let m = north.recv().await;
    assert_eq!((m.tag, m.code().as_str()), ('E', "57P01"), "{m:?}");
    assert!(m.field(b'M').contains("KILL"), "{m:?}");

    let Proxy { shutdown, task, .. } = proxy;
    shutdown.cancel();
    let m = south.recv().await;
    assert_eq!((m.tag, m.code().as_str()), ('E', "57P01"), "{m:?}");
    assert!(m.field(b'M').contains("shutting down"), "{m:?}");
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("rlsgate stops")
        .unwrap();
}
