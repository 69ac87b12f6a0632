//! Upstream connection health: pooled connections the server closed (restart, immediate
//! shutdown, pg_terminate_backend) are never handed out, and TCP keepalive reaches both the
//! client and the upstream sockets. Tests that restart PostgreSQL use a cluster of their own.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rlsgate::config::Config;
use rlsgate::embedded_pg::{EmbeddedOptions, EmbeddedPg, ShutdownMode};
use rlsgate::metrics::Metrics;
use rlsgate::pool::{Pool, PoolOptions, ServerConn};
use rlsgate::stream::SocketKeepalive;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A cluster of this test's own (so it can be restarted) with the `rlsgate_app` role and a
/// database `health`.
fn own_cluster() -> EmbeddedPg {
    let pg = EmbeddedPg::start(EmbeddedOptions::default()).expect("start throwaway PostgreSQL");
    pg.psql(
        "postgres",
        &format!("CREATE ROLE rlsgate_app LOGIN PASSWORD '{APP_PASSWORD}';"),
    )
    .expect("create role");
    pg.create_database("health").expect("create database");
    pg
}

fn config(port: u16, db: &str, pool_size: usize, server: &str, upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_timeout = "5s"
handshake_timeout = "5s"
{server}
[upstream]
host = "127.0.0.1"
port = {port}
database = "{db}"
user = "rlsgate_app"
password = "{APP_PASSWORD}"
sslmode = "disable"
pool_size = {pool_size}
checkout_timeout = "10s"
{upstream}
[limits]
max_transactions_per_tenant = 0
[auth]
hs_secret = "{SECRET}"
tenant_claim = "store_id"
[context]
"app.current_store_id" = "store_id"
"#
    )
}

fn lost(metrics: &Metrics) -> f64 {
    let series = r#"rlsgate_upstream_errors_total{kind="lost"} "#;
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.parse().ok())
        .expect("the lost series is exported")
}

/// Open `n` upstream connections through the proxy at once (each client holds a transaction
/// until all have one), then let them go back to the pool; returns their backend pids.
async fn warm(proxy: &Proxy, n: usize) -> HashSet<i32> {
    let mut clients = Vec::new();
    for i in 0..n {
        clients.push(client(proxy, &format!("warm{i}")).await);
    }
    let mut pids = HashSet::new();
    for c in &clients {
        c.batch_execute("BEGIN").await.expect("begin");
        let pid: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        pids.insert(pid);
    }
    for c in &clients {
        c.batch_execute("COMMIT").await.expect("commit");
    }
    assert_eq!(
        pids.len(),
        n,
        "{n} transactions at once use {n} connections"
    );
    wait_idle(&proxy.shared.pool, n).await;
    pids
}

async fn wait_idle(pool: &Pool, n: usize) {
    for _ in 0..200 {
        if pool.idle_count() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("expected {n} idle connections, have {}", pool.idle_count());
}

/// Brand-new clients, all at once, each running one query: every one must succeed, on a
/// backend that is not one of `dead`.
async fn fresh_clients_succeed(proxy: &Proxy, n: usize, dead: &HashSet<i32>) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let conn_str = proxy.conn_str(&token(&format!("fresh{i}")));
        tasks.push(tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&conn_str, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("login: {e}"))?;
            tokio::spawn(conn);
            let row = c
                .query_one(
                    "SELECT pg_backend_pid(), current_setting('app.current_store_id')",
                    &[],
                )
                .await
                .map_err(|e| format!("query: {} {}", code(&e), message(&e)))?;
            Ok::<_, String>((i, row.get::<_, i32>(0), row.get::<_, String>(1)))
        }));
    }
    for t in tasks {
        let (i, pid, store) = t
            .await
            .expect("client task")
            .unwrap_or_else(|e| panic!("a new client failed after the upstream went away: {e}"));
        assert_eq!(store, format!("fresh{i}"));
        assert!(!dead.contains(&pid), "served by the dead backend {pid}");
    }
}

async fn restart_then_new_clients_succeed(mode: ShutdownMode) {
    let mut pg = own_cluster();
    let proxy = start_proxy_with("health", &config(pg.port(), "health", 4, "", "")).await;
    let before = warm(&proxy, 4).await;
    let lost_before = lost(&proxy.shared.metrics);

    tokio::task::block_in_place(|| pg.restart(mode)).expect("restart PostgreSQL");

    fresh_clients_succeed(&proxy, 5, &before).await;
    // The four dead connections were dropped (at checkout or by the background upkeep) and
    // counted; none of them was handed out.
    assert_eq!(lost(&proxy.shared.metrics) - lost_before, 4.0);
    // The pool works on: another round, no errors.
    fresh_clients_succeed(&proxy, 5, &before).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_restart_no_client_gets_a_dead_connection() {
    restart_then_new_clients_succeed(ShutdownMode::Fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_restart_no_client_gets_a_dead_connection() {
    restart_then_new_clients_succeed(ShutdownMode::Immediate).await;
}

/// `pg_terminate_backend` of the given backends, waiting (up to 5 s each) until they exited.
fn terminate(db: &str, pids: &HashSet<i32>) {
    let list = pids
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = admin_sql(
        db,
        &format!(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity WHERE pid IN ({list})"
        ),
    );
    assert_eq!(out, pids.len().to_string(), "all terminated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backends_are_not_handed_out() {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &config(pg().port(), &db, 4, "", "")).await;
    let before = warm(&proxy, 4).await;
    let lost_before = lost(&proxy.shared.metrics);
    terminate(&db, &before);
    fresh_clients_succeed(&proxy, 5, &before).await;
    assert_eq!(lost(&proxy.shared.metrics) - lost_before, 4.0);
    proxy.stop().await;
}

// --- the pool on its own (no background upkeep): checkout and maintain each do it ----------

fn pool_on(port: u16, db: &str, pool_size: usize, upstream: &str) -> (Pool, Arc<Metrics>) {
    let cfg = Config::from_toml(&config(port, db, pool_size, "", upstream)).expect("config");
    let metrics = Arc::new(Metrics::new(false, 10));
    let opts = PoolOptions {
        keepalive: cfg.server.keepalive(),
        metrics: Some(Arc::clone(&metrics)),
        sealer: None,
    };
    (Pool::with_options(cfg.upstream, None, opts), metrics)
}

/// One simple query on a pooled connection, by hand; returns its single value.
async fn query_value(conn: &mut ServerConn, sql: &str) -> String {
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    msg.extend_from_slice(sql.as_bytes());
    msg.push(0);
    conn.stream.write_all(&msg).await.expect("send query");
    let mut value = None;
    loop {
        while conn.read_buf.len() >= 5 {
            let len = i32::from_be_bytes(conn.read_buf[1..5].try_into().unwrap()) as usize;
            if conn.read_buf.len() < len + 1 {
                break;
            }
            let mut m: BytesMut = conn.read_buf.split_to(len + 1);
            let tag = m[0];
            m.advance(5);
            match tag {
                b'D' => {
                    let n = i32::from_be_bytes(m[2..6].try_into().unwrap()) as usize;
                    value = Some(String::from_utf8_lossy(&m[6..6 + n]).to_string());
                }
                b'E' => panic!("query failed: {}", String::from_utf8_lossy(&m)),
                b'Z' => return value.expect("a row"),
                _ => {}
            }
        }
        let n = tokio::time::timeout(
            Duration::from_secs(10),
            conn.stream.read_buf(&mut conn.read_buf),
        )
        .await
        .expect("answer in time")
        .expect("read");
        assert!(n > 0, "server closed the connection");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_skips_closed_connections_and_keeps_live_ones() {
    let db = demo_db();
    let (pool, metrics) = pool_on(pg().port(), &db, 3, "");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(pool.checkout().await.expect("checkout"));
    }
    let pids: Vec<i32> = held.iter().map(|c| c.conn_ref().backend_pid).collect();
    for c in held {
        c.release();
    }
    assert_eq!(pool.idle_count(), 3);
    // Two of the three die; the third stays good and must still be reused.
    let (killed, alive) = (HashSet::from([pids[0], pids[2]]), pids[1]);
    terminate(&db, &killed);

    // Held, so that each checkout takes another connection.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = pool.checkout().await.expect("checkout after terminate");
        let pid = c.conn_ref().backend_pid;
        assert!(
            !killed.contains(&pid),
            "handed out terminated backend {pid}"
        );
        assert_eq!(
            query_value(c.conn(), "SELECT pg_backend_pid()").await,
            pid.to_string()
        );
        held.push(c);
    }
    let got: Vec<i32> = held.iter().map(|c| c.conn_ref().backend_pid).collect();
    assert!(
        got.contains(&alive),
        "the live connection is reused: {got:?}"
    );
    assert_eq!(lost(&metrics), 2.0);
    for c in held {
        c.release();
    }
    assert_eq!(pool.idle_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_replaces_idle_connections_the_server_closed() {
    let mut pg = own_cluster();
    let (pool, metrics) = pool_on(pg.port(), "health", 4, "min_idle = 2");
    pool.maintain().await;
    let before: HashSet<u64> = pool.idle_ids().into_iter().collect();
    assert_eq!(before.len(), 2, "min_idle connections opened");

    tokio::task::block_in_place(|| pg.restart(ShutdownMode::Fast)).expect("restart");
    pool.maintain().await;

    let after: HashSet<u64> = pool.idle_ids().into_iter().collect();
    assert_eq!(after.len(), 2, "min_idle connections reopened");
    assert!(
        before.is_disjoint(&after),
        "{before:?} still idle: {after:?}"
    );
    assert_eq!(lost(&metrics), 2.0);
    let mut c = pool.checkout().await.expect("checkout");
    assert_eq!(query_value(c.conn(), "SELECT 41 + 1").await, "42");
    c.release();
}

// --- keepalive ------------------------------------------------------------------------------

/// The keepalive options of every TCP socket of this process for which `matches(local, peer)`,
/// read with getsockopt on its file descriptor.
fn own_sockets(matches: impl Fn(SocketAddr, SocketAddr) -> bool) -> Vec<SocketKeepalive> {
    let mut found = Vec::new();
    for_own_sockets(|local, peer, sock| {
        if matches(local, peer)
            && let Ok(k) = rlsgate::stream::socket_keepalive(sock)
        {
            found.push(k);
        }
    });
    found
}

/// Call `visit(local, peer, socket)` for every connected TCP socket of this process.
fn for_own_sockets(mut visit: impl FnMut(SocketAddr, SocketAddr, socket2::SockRef<'_>)) {
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let entry = entry.expect("fd entry");
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: only getsockopt/getsockname/getpeername on the fd, which stays borrowed for
        // this iteration; if it was closed (or reused) meanwhile, those calls just fail or
        // describe another socket, which the address match filters out.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let addrs = (sock.local_addr(), sock.peer_addr());
        let (Ok(local), Ok(peer)) = addrs else {
            continue;
        };
        let (Some(local), Some(peer)) = (local.as_socket(), peer.as_socket()) else {
            continue;
        };
        visit(local, peer, sock);
    }
}

/// The proxy's side of a client connection, and the proxy's upstream sockets (found by the
/// client ports Postgres reports for the proxy's database).
async fn both_sides(proxy: &Proxy, pg_port: u16) -> (SocketKeepalive, Vec<SocketKeepalive>) {
    let raw = served_client(proxy).await;
    let (_, client_keepalive) = client_side(proxy, &raw);
    let ports: HashSet<u16> = admin_sql(
        &proxy.db,
        "SELECT client_port FROM pg_stat_activity WHERE datname = current_database() AND usename = 'rlsgate_app'",
    )
    .lines()
    .map(|p| p.parse().expect("port"))
    .collect();
    assert!(!ports.is_empty(), "the proxy has an upstream connection");
    let upstream = own_sockets(|l, p| p.port() == pg_port && ports.contains(&l.port()));
    assert_eq!(upstream.len(), ports.len(), "each upstream socket found");
    (client_keepalive, upstream)
}

/// A client that logged in and got an answer (so the proxy holds its socket and an upstream one).
async fn served_client(proxy: &Proxy) -> RawClient {
    let mut raw = RawClient::connect(proxy, &token("ka")).await;
    raw.query("SELECT 1").await;
    let msgs = raw.until_ready().await;
    assert_eq!(tags(&msgs), "T D C Z", "{msgs:?}");
    raw
}

/// Keepalive on with these values.
fn keepalive(idle: u64, interval: u64, count: u32, user_timeout: u64) -> SocketKeepalive {
    SocketKeepalive {
        enabled: true,
        idle: Duration::from_secs(idle),
        interval: Duration::from_secs(interval),
        count,
        user_timeout: Duration::from_secs(user_timeout),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_settings_reach_client_and_upstream_sockets() {
    let db = demo_db();
    let server = "tcp_keepidle = \"37s\"\ntcp_keepintvl = \"7s\"\ntcp_keepcnt = 3\ntcp_user_timeout = \"45s\"";
    let proxy = start_proxy_with(&db, &config(pg().port(), &db, 2, server, "")).await;
    let want = keepalive(37, 7, 3, 45);
    let (client_side, upstream) = both_sides(&proxy, pg().port()).await;
    assert_eq!(client_side, want, "client socket");
    for u in &upstream {
        assert_eq!(*u, want, "upstream socket");
    }
    // …and as the pool reports it for a checked-out connection.
    let c = proxy.shared.pool.checkout().await.expect("checkout");
    assert_eq!(c.conn_ref().keepalive_of().expect("getsockopt"), want);
    c.release();
    proxy.stop().await;
}

/// TCP_NODELAY and the keepalive options of the proxy's socket for `client`.
fn client_side(proxy: &Proxy, client: &RawClient) -> (bool, SocketKeepalive) {
    let client_addr = client.stream.local_addr().unwrap();
    let proxy_port = proxy.addr.port();
    let mut found = Vec::new();
    for_own_sockets(|local, peer, sock| {
        if local.port() == proxy_port && peer == client_addr {
            found.push((
                sock.tcp_nodelay().expect("TCP_NODELAY"),
                rlsgate::stream::socket_keepalive(sock).expect("keepalive"),
            ));
        }
    });
    assert_eq!(found.len(), 1, "the proxy's socket for the client");
    found[0]
}

/// Linux hands accepted sockets the listener's options, so the proxy sets them once on the
/// listener; every client socket must still carry them, also after a reload changes them (the
/// listener gets the new ones, sockets queued before get them set one by one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_socket_gets_nodelay_and_keepalive_also_after_a_reload() {
    let db = demo_db();
    let server = "tcp_keepidle = \"37s\"\ntcp_keepintvl = \"7s\"\ntcp_keepcnt = 3";
    let proxy = start_proxy_with(&db, &config(pg().port(), &db, 2, server, "")).await;
    let want = keepalive(37, 7, 3, 0);
    let mut clients = Vec::new();
    for i in 0..4 {
        let raw = served_client(&proxy).await;
        assert_eq!(client_side(&proxy, &raw), (true, want), "client {i}");
        clients.push(raw);
    }
    let changed = "tcp_keepidle = \"41s\"\ntcp_keepintvl = \"5s\"\ntcp_keepcnt = 4";
    let mut text = config(pg().port(), &db, 2, changed, "");
    text = text.replace("127.0.0.1:0", &proxy.addr.to_string());
    let reloaded = Config::from_toml(&text).expect("config");
    proxy.shared.reload(reloaded).await.expect("reload");
    let want = keepalive(41, 5, 4, 0);
    for i in 0..3 {
        let raw = served_client(&proxy).await;
        assert_eq!(
            client_side(&proxy, &raw),
            (true, want),
            "client {i} after the reload"
        );
        clients.push(raw);
    }
    drop(clients);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_is_on_by_default_and_can_be_switched_off() {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &config(pg().port(), &db, 2, "", "")).await;
    let defaults = keepalive(60, 10, 6, 0);
    let (client_side, upstream) = both_sides(&proxy, pg().port()).await;
    assert_eq!(client_side, defaults);
    assert!(upstream.iter().all(|u| *u == defaults), "{upstream:?}");
    proxy.stop().await;

    // Another database, so this proxy's upstream sockets are the only ones left to inspect.
    let db = demo_db();
    let server = "tcp_keepalive = false";
    let proxy = start_proxy_with(&db, &config(pg().port(), &db, 2, server, "")).await;
    let (client_side, _) = both_sides(&proxy, pg().port()).await;
    assert!(
        !client_side.enabled,
        "SO_KEEPALIVE off on the client socket"
    );
    let c = proxy.shared.pool.checkout().await.expect("checkout");
    assert!(!c.conn_ref().keepalive_of().expect("getsockopt").enabled);
    c.release();
    proxy.stop().await;
}
