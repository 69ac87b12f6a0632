//! Fault injection against a real PostgreSQL and a real rlsgate: upstream restarts, terminated
//! backends, a hung upstream, clients that vanish mid-work, and network partitions and resets
//! through a TCP relay ([`support::relay::Relay`]) between rlsgate and Postgres.
//!
//! After every fault the same things must hold:
//! - the affected client gets exactly ONE ErrorResponse for the failure (counted on the wire),
//!   within a bound, and then either a ReadyForQuery or the end of the connection;
//! - every other client notices nothing;
//! - upstream, none of rlsgate's backends is left in a transaction or holding a lock;
//! - no commit the client saw acknowledged is lost;
//! - the pool serves at full strength again (`pool_size` concurrent transactions, on distinct
//!   backends, and nothing left checked out).
//!
//! Tests that restart or freeze the server run their own cluster; the others share the binary's.
//! Run: `cargo test --release --test faults -- --test-threads=2` (`RLSGATE_LOG=rlsgate=debug`
//! for the proxy's log).

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rlsgate::embedded_pg::{EmbeddedOptions, EmbeddedPg};
use support::relay::{Dir, Mode, Relay};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// A raw wire-protocol client that counts what it gets and never panics on a dead connection.
// ---------------------------------------------------------------------------------------------

struct Wire {
    stream: TcpStream,
    buf: BytesMut,
    closed: bool,
}

/// Everything received for one request (or while draining).
#[derive(Debug, Default)]
struct Reply {
    msgs: Vec<Msg>,
    /// The connection ended (EOF or reset).
    closed: bool,
    /// Neither a ReadyForQuery nor the end of the connection within the limit.
    timed_out: bool,
    elapsed: Duration,
}

impl Reply {
    fn errors(&self) -> Vec<&Msg> {
        self.msgs.iter().filter(|m| m.tag == 'E').collect()
    }

    fn error_count(&self) -> usize {
        self.errors().len()
    }

    /// "FATAL 57P01 terminating connection …; ERROR 08006 …"
    fn describe_errors(&self) -> String {
        let list: Vec<String> = self
            .errors()
            .iter()
            .map(|m| format!("{} {} {}", m.field(b'S'), m.code(), m.field(b'M')))
            .collect();
        if list.is_empty() {
            "no ErrorResponse".into()
        } else {
            list.join("; ")
        }
    }

    /// Transaction status of the ReadyForQuery that ended the reply.
    fn status(&self) -> Option<char> {
        self.msgs
            .iter()
            .rev()
            .find(|m| m.tag == 'Z')
            .and_then(|m| m.body.first())
            .map(|&b| b as char)
    }

    fn ok(&self) -> bool {
        !self.closed && !self.timed_out && self.error_count() == 0 && self.status().is_some()
    }

    fn completed(&self, tag: &str) -> bool {
        self.msgs
            .iter()
            .any(|m| m.tag == 'C' && m.body.strip_suffix(b"\0") == Some(tag.as_bytes()))
    }

    /// First column of the first DataRow, as text.
    fn value(&self) -> Option<String> {
        let row = self.msgs.iter().find(|m| m.tag == 'D')?;
        let b = &row.body;
        if b.len() < 6 {
            return None;
        }
        let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]);
        let len = usize::try_from(len).ok()?;
        Some(String::from_utf8_lossy(b.get(6..6 + len)?).into_owned())
    }

    fn summary(&self) -> String {
        format!(
            "tags [{}], {}, closed={}, timed_out={}, after {:?}",
            tags(&self.msgs),
            self.describe_errors(),
            self.closed,
            self.timed_out,
            self.elapsed
        )
    }
}

/// `Some(finding)` unless the reply is exactly one clean error: one ErrorResponse, then a
/// ReadyForQuery or the end of the connection, within the limit.
fn not_one_clean_error(what: &str, r: &Reply) -> Option<String> {
    let clean = r.error_count() == 1 && !r.timed_out && (r.closed || r.status().is_some());
    (!clean).then(|| {
        format!(
            "{what}: expected exactly one clean error, got {}",
            r.summary()
        )
    })
}

impl Wire {
    /// Log in through the proxy with a token for `store`.
    async fn connect(addr: SocketAddr, db: &str, store: &str) -> Result<Wire, String> {
        let login = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            stream.set_nodelay(true).ok();
            let mut w = Wire {
                stream,
                buf: BytesMut::new(),
                closed: false,
            };
            let startup = startup_packet(196_608, &[("user", "app"), ("database", db)]);
            w.stream
                .write_all(&startup)
                .await
                .map_err(|e| format!("startup: {e}"))?;
            match w.next().await {
                Some(m) if m.tag == 'R' => {}
                other => {
                    return Err(format!(
                        "login: expected an authentication request: {other:?}"
                    ));
                }
            }
            w.send(b'p', &[token(store).as_bytes(), b"\0"].concat())
                .await;
            loop {
                match w.next().await {
                    Some(m) if m.tag == 'Z' => return Ok(w),
                    Some(m) if m.tag == 'E' => {
                        return Err(format!("login refused: {} {}", m.code(), m.field(b'M')));
                    }
                    Some(_) => {}
                    None => return Err("connection closed during login".into()),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), login)
            .await
            .map_err(|_| "login timed out".to_string())?
    }

    async fn must_connect(addr: SocketAddr, db: &str, store: &str) -> Wire {
        Wire::connect(addr, db, store)
            .await
            .unwrap_or_else(|e| panic!("client {store}: {e}"))
    }

    /// Send one message; a failed write shows up as the connection's end when reading.
    async fn send(&mut self, tag: u8, body: &[u8]) {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        let _ = self.stream.write_all(&m).await;
    }

    async fn send_query(&mut self, sql: &str) {
        self.send(b'Q', &[sql.as_bytes(), b"\0"].concat()).await;
    }

    fn parse_one(&mut self) -> Option<Msg> {
        if self.buf.len() < 5 {
            return None;
        }
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if self.buf.len() < len + 1 {
            return None;
        }
        let m = self.buf.split_to(len + 1);
        Some(Msg {
            tag: m[0] as char,
            body: m[5..].to_vec(),
        })
    }

    /// The next message; `None` once the connection has ended (EOF or reset).
    async fn next(&mut self) -> Option<Msg> {
        loop {
            if let Some(m) = self.parse_one() {
                return Some(m);
            }
            if self.closed {
                return None;
            }
            if self.buf.capacity() - self.buf.len() < 64 * 1024 {
                self.buf.reserve(256 * 1024);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => self.closed = true,
                Ok(_) => {}
            }
        }
    }

    /// Messages up to a ReadyForQuery or the end of the connection, for at most `limit`.
    async fn reply(&mut self, limit: Duration) -> Reply {
        self.read(limit, true).await
    }

    /// Whatever arrives within `limit`, up to the end of the connection.
    async fn drain(&mut self, limit: Duration) -> Reply {
        self.read(limit, false).await
    }

    async fn read(&mut self, limit: Duration, stop_at_ready: bool) -> Reply {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + limit;
        let mut r = Reply::default();
        loop {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Err(_) => {
                    r.timed_out = true;
                    break;
                }
                Ok(None) => {
                    r.closed = true;
                    break;
                }
                Ok(Some(m)) => {
                    let ready = m.tag == 'Z';
                    r.msgs.push(m);
                    if ready && stop_at_ready {
                        break;
                    }
                }
            }
        }
        r.elapsed = started.elapsed();
        r
    }

    async fn query(&mut self, sql: &str, limit: Duration) -> Reply {
        self.send_query(sql).await;
        self.reply(limit).await
    }

    /// A query that must succeed; returns the first value of the first row (if any).
    async fn ok(&mut self, sql: &str) -> Option<String> {
        let r = self.query(sql, Duration::from_secs(10)).await;
        assert!(r.ok(), "{sql}: {}", r.summary());
        r.value()
    }
}

// ---------------------------------------------------------------------------------------------
// Clusters, configs, upstream checks.
// ---------------------------------------------------------------------------------------------

const T10: Duration = Duration::from_secs(10);

/// Small timeouts so that faults show within seconds; `port` is the upstream (cluster or relay).
/// Every idle connection is checked before reuse (`health_check_after = "0s"`), and per-tenant
/// transaction caps are off so that any client mix can fill the pool.
fn config(db: &str, port: u16, pool: usize) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_timeout = "2s"
handshake_timeout = "5s"
idle_in_transaction_timeout = "20s"
query_timeout = "5s"
[upstream]
host = "127.0.0.1"
port = {port}
database = "{db}"
user = "rlsgate_app"
password = "{APP_PASSWORD}"
sslmode = "disable"
transaction_wrap = {WRAP}
pool_size = {pool}
checkout_timeout = "3s"
connect_timeout = "1s"
health_check_after = "0s"
[auth]
hs_secret = "{SECRET}"
tenant_claim = "store_id"
[context]
"app.current_store_id" = "store_id"
[limits]
max_transactions_per_tenant = 0
"#
    )
}

/// Superuser SQL through psql over the unix socket (off the runtime's worker threads).
async fn su(pg: &EmbeddedPg, db: &str, sql: &str) -> String {
    let mut cmd = pg.client_command("psql");
    cmd.args([
        "-X",
        "-q",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        db,
        "-c",
        sql,
    ]);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run psql");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Tables the tests write to (no RLS: they record what the proxy acknowledged).
const FAULT_TABLES: &str = "
CREATE TABLE fault_log (id bigint PRIMARY KEY, writer int NOT NULL DEFAULT 0);
CREATE TABLE fault_copy (id int, payload text);
GRANT SELECT, INSERT, UPDATE ON fault_log, fault_copy TO rlsgate_app;
";

/// A fresh demo database on the shared cluster, with the fault tables.
async fn shared_db() -> String {
    let db = tokio::task::spawn_blocking(demo_db).await.expect("demo db");
    su(pg(), &db, FAULT_TABLES).await;
    db
}

/// A cluster of the test's own (restarted or frozen without disturbing other tests), with
/// `synchronous_commit = on` so that an acknowledged commit survives a crash restart.
struct OwnCluster {
    pg: EmbeddedPg,
    db: String,
    /// A postmaster started by `pg_ctl restart` (outside the watchdog): stopped on drop.
    restarted: bool,
}

impl OwnCluster {
    async fn start() -> OwnCluster {
        let pg = tokio::task::spawn_blocking(|| {
            let opts = EmbeddedOptions {
                extra_conf: vec!["synchronous_commit = on".into()],
                ..EmbeddedOptions::default()
            };
            let pg = EmbeddedPg::start(opts).expect("start a throwaway PostgreSQL");
            pg.psql(
                "postgres",
                &format!(
                    "CREATE ROLE rlsgate_app LOGIN PASSWORD '{APP_PASSWORD}'; CREATE ROLE rlsgate_owner NOLOGIN;"
                ),
            )
            .expect("roles");
            pg.create_database("faults").expect("create database");
            pg.psql("faults", DEMO_SQL).expect("load demo.sql");
            pg.psql("faults", FAULT_TABLES).expect("fault tables");
            pg
        })
        .await
        .expect("join");
        OwnCluster {
            pg,
            db: "faults".into(),
            restarted: false,
        }
    }

    fn data_dir(&self) -> std::path::PathBuf {
        self.pg.socket_dir().join("data")
    }

    /// `pg_ctl -D <data> <args>` as the server's user (the owner of the data directory).
    fn pg_ctl(&self, args: &[&str]) -> Result<String, String> {
        let data = self.data_dir();
        let meta = std::fs::metadata(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let mut cmd = std::process::Command::new(self.pg.bin("pg_ctl"));
        cmd.arg("-D").arg(&data).args(args);
        cmd.current_dir(self.pg.socket_dir());
        cmd.stdin(std::process::Stdio::null());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.uid(meta.uid()).gid(meta.gid());
        }
        let out = cmd.output().map_err(|e| format!("pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "pg_ctl {args:?}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `pg_ctl restart -m <mode>`, waiting until the server accepts connections again.
    async fn restart(&mut self, mode: &'static str) {
        self.restarted = true;
        let log = self.pg.socket_dir().join("postgres.log");
        let log = log.to_string_lossy().into_owned();
        let this = &*self;
        let r = tokio::task::block_in_place(|| {
            this.pg_ctl(&["restart", "-m", mode, "-w", "-t", "60", "-l", &log])
        });
        r.unwrap_or_else(|e| panic!("restart -m {mode}: {e}"));
    }

    fn postmaster_pid(&self) -> i32 {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .expect("postmaster.pid");
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("pid in postmaster.pid")
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        if self.restarted {
            // The watchdog only knows the first postmaster.
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        }
    }
}

/// SIGSTOPs processes; SIGCONTs them when resumed or dropped (also when a test fails).
struct Frozen(Vec<i32>);

impl Frozen {
    fn freeze(pids: &[i32]) -> Frozen {
        for &p in pids {
            // SAFETY: kill(2) has no memory-safety preconditions.
            assert_eq!(unsafe { libc::kill(p, libc::SIGSTOP) }, 0, "SIGSTOP {p}");
        }
        Frozen(pids.to_vec())
    }

    fn resume(&mut self) {
        for p in self.0.drain(..) {
            // SAFETY: as above.
            unsafe { libc::kill(p, libc::SIGCONT) };
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.resume();
    }
}

/// Waits (up to 10 s) until none of rlsgate's backends on `db` is in a transaction, running
/// something, or holding a lock; `Err` describes what is left.
async fn upstream_clean(pg: &EmbeddedPg, db: &str) -> Result<(), String> {
    let check = "SELECT count(*) FILTER (WHERE state IS DISTINCT FROM 'idle')
                      || '|' || count(*) FILTER (WHERE backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
                      || '|' || (SELECT count(*) FROM pg_locks l WHERE l.pid IN
                            (SELECT pid FROM pg_stat_activity
                              WHERE usename = 'rlsgate_app' AND datname = current_database()))
                 FROM pg_stat_activity
                WHERE usename = 'rlsgate_app' AND datname = current_database()";
    let started = Instant::now();
    loop {
        let got = su(pg, db, check).await;
        if got == "0|0|0" {
            return Ok(());
        }
        if started.elapsed() > T10 {
            let detail = su(
                pg,
                db,
                "SELECT string_agg(pid || ' ' || coalesce(state, '?') || ' xid=' || coalesce(backend_xid::text, '-')
                                   || ' locks=' || (SELECT count(*) FROM pg_locks l WHERE l.pid = a.pid)
                                   || ' ' || left(query, 60), E'\\n')
                   FROM pg_stat_activity a
                  WHERE usename = 'rlsgate_app' AND datname = current_database()",
            )
            .await;
            return Err(format!(
                "upstream not clean after 10 s (not idle|in a transaction|locks = {got}):\n{detail}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The pool at full strength: `pool` clients each hold a transaction at once, on distinct
/// backends, without an error; afterwards nothing stays checked out.
async fn pool_full(proxy: &Proxy, pool: usize) -> Result<(), String> {
    let mut clients = Vec::new();
    let mut pids = BTreeSet::new();
    for i in 0..pool {
        let mut c = Wire::connect(proxy.addr, &proxy.db, ["north", "south", "east"][i % 3])
            .await
            .map_err(|e| format!("pool check: client {i}: {e}"))?;
        for sql in ["BEGIN", "SELECT pg_backend_pid()"] {
            let r = c.query(sql, T10).await;
            if !r.ok() {
                return Err(format!("pool check: client {i}: {sql}: {}", r.summary()));
            }
            if let Some(pid) = r.value() {
                pids.insert(pid);
            }
        }
        clients.push(c);
    }
    if pids.len() != pool {
        return Err(format!(
            "pool check: {pool} transactions ran on {} backends",
            pids.len()
        ));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let r = c.query("COMMIT", T10).await;
        if !r.ok() {
            return Err(format!("pool check: client {i}: COMMIT: {}", r.summary()));
        }
    }
    drop(clients);
    let started = Instant::now();
    while proxy.shared.pool.in_use() != 0 {
        if started.elapsed() > Duration::from_secs(5) {
            return Err(format!(
                "pool check: {} connections still checked out after every client left",
                proxy.shared.pool.in_use()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Collects violations so that one run reports all of them.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn add(&mut self, f: Option<String>) {
        if let Some(f) = f {
            self.0.push(f);
        }
    }

    fn check(&mut self, r: Result<(), String>) {
        if let Err(e) = r {
            self.0.push(e);
        }
    }

    fn assert_none(&self) {
        assert!(self.0.is_empty(), "\n- {}", self.0.join("\n- "));
    }
}

/// The pid of rlsgate's backend on `db` whose current query contains `marker`.
async fn backend_running(pg: &EmbeddedPg, db: &str, marker: &str) -> i32 {
    let sql = format!(
        "SELECT pid FROM pg_stat_activity WHERE usename = 'rlsgate_app' AND datname = current_database()
            AND state = 'active' AND query LIKE '%{marker}%'"
    );
    let started = Instant::now();
    loop {
        let got = su(pg, db, &sql).await;
        if let Ok(pid) = got.parse() {
            return pid;
        }
        assert!(
            started.elapsed() < T10,
            "no backend running {marker:?} (got {got:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Upstream restart under a writer load.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct WriterReport {
    acked: Vec<i64>,
    acked_after_restart: usize,
    failures: usize,
    findings: Vec<String>,
}

/// Inserts rows with unique ids in `BEGIN; INSERT; COMMIT` transactions (one statement per
/// Query), recording every id whose COMMIT was acknowledged. A failure must be exactly one
/// ErrorResponse; after it the writer reconnects if the proxy closed it, and goes on.
async fn writer(
    addr: SocketAddr,
    db: String,
    w: i64,
    stop: Arc<AtomicBool>,
    restarted: Arc<AtomicBool>,
) -> WriterReport {
    let mut rep = WriterReport::default();
    let mut conn: Option<Wire> = None;
    let mut seq = 0i64;
    let store = ["north", "south", "east"][w as usize % 3];
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            match Wire::connect(addr, &db, store).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    rep.findings
                        .push(format!("writer {w}: could not log in to rlsgate: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        seq += 1;
        let id = w * 10_000_000 + seq;
        let after_restart = restarted.load(Ordering::Relaxed);
        let insert = format!("INSERT INTO fault_log (id, writer) VALUES ({id}, {w})");
        let mut errors = Vec::new();
        let mut closed = false;
        let mut status = Some('I');
        for sql in ["BEGIN", insert.as_str(), "COMMIT"] {
            let r = c.query(sql, Duration::from_secs(20)).await;
            if r.timed_out {
                rep.findings.push(format!(
                    "writer {w}: {sql}: no answer within 20 s ({})",
                    r.summary()
                ));
                closed = true;
                break;
            }
            errors.extend(
                r.errors()
                    .iter()
                    .map(|m| format!("{} {}", m.field(b'S'), m.code())),
            );
            status = r.status();
            if r.closed {
                closed = true;
                break;
            }
            if r.error_count() > 0 {
                break;
            }
            if sql == "COMMIT" && r.completed("COMMIT") && status == Some('I') {
                rep.acked.push(id);
                if after_restart {
                    rep.acked_after_restart += 1;
                }
            }
        }
        if errors.is_empty() && !closed {
            continue;
        }
        rep.failures += 1;
        if errors.len() != 1 {
            rep.findings.push(format!(
                "writer {w}: transaction {id}: expected one error for the failure, got {} [{}] (connection closed: {closed})",
                errors.len(),
                errors.join(", ")
            ));
        }
        if closed {
            conn = None;
        } else if status != Some('I') {
            let r = c.query("ROLLBACK", T10).await;
            if !r.ok() {
                rep.findings.push(format!(
                    "writer {w}: ROLLBACK after a failure: {}",
                    r.summary()
                ));
                conn = None;
            }
        } else {
            // e.g. "upstream unavailable" while the server restarts: try again shortly
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    rep
}

/// What happens to the upstream while the writers run.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `pg_ctl restart -m <mode>`.
    Restart(&'static str),
    /// `pg_terminate_backend` of every backend of the database (a failover that keeps the
    /// server, or an operator's clean-up), then until those backends have exited.
    TerminateAll,
}

/// Fresh clients right after the fault: each logs in and runs a read and a write transaction;
/// none may see an error (no dead pooled connection is handed out).
async fn fresh_clients_see_no_error(addr: SocketAddr, db: &str, findings: &mut Findings) {
    for i in 0..5 {
        let store = ["north", "south"][i % 2];
        let mut c = match Wire::connect(addr, db, store).await {
            Ok(c) => c,
            Err(e) => {
                findings
                    .0
                    .push(format!("fresh client {i}: login failed: {e}"));
                continue;
            }
        };
        for sql in [
            "SELECT count(*) FROM customers",
            "BEGIN",
            "SELECT count(*) FROM customers",
            "COMMIT",
        ] {
            let r = c.query(sql, T10).await;
            if !r.ok() {
                findings
                    .0
                    .push(format!("fresh client {i}: {sql}: {}", r.summary()));
                break;
            }
        }
    }
}

async fn restart_under_writer_load(mode: &'static str) {
    fault_under_writer_load(Fault::Restart(mode)).await;
}

async fn fault_under_writer_load(fault: Fault) {
    const WRITERS: i64 = 4;
    const POOL: usize = 4;
    let mut cluster = OwnCluster::start().await;
    let db = cluster.db.clone();
    let proxy = start_proxy_with(&db, &config(&db, cluster.pg.port(), POOL)).await;
    // a client that sits idle (between transactions) through the restart
    let mut idle = Wire::must_connect(proxy.addr, &db, "south").await;
    idle.ok("SELECT 1").await;

    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (1..=WRITERS)
        .map(|w| {
            tokio::spawn(writer(
                proxy.addr,
                db.clone(),
                w,
                Arc::clone(&stop),
                Arc::clone(&restarted),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = su(&cluster.pg, &db, "SELECT count(*) FROM fault_log").await;
    let t0 = std::time::Instant::now();
    match fault {
        Fault::Restart(mode) => cluster.restart(mode).await,
        Fault::TerminateAll => {
            let pids = su(
                &cluster.pg,
                &db,
                "SELECT string_agg(pid::text, ',') FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .await;
            su(
                &cluster.pg,
                &db,
                &format!("SELECT pg_terminate_backend(pid) FROM unnest('{{{pids}}}'::int[]) pid"),
            )
            .await;
            // pg_terminate_backend only signals; wait until the backends are gone, as they are
            // by the time a restart returns.
            while su(
                &cluster.pg,
                &db,
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY('{{{pids}}}'::int[])"
                ),
            )
            .await
                != "0"
            {
                assert!(t0.elapsed() < T10, "terminated backends still there");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let server_back = t0.elapsed();
    restarted.store(true, Ordering::Relaxed);
    let t1 = std::time::Instant::now();
    let mut fresh = Findings::default();
    fresh_clients_see_no_error(proxy.addr, &db, &mut fresh).await;
    eprintln!(
        "{fault:?}: took {server_back:?}; 5 fresh clients right after: {} problems in {:?}",
        fresh.0.len(),
        t1.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut findings = fresh;
    let mut acked = BTreeSet::new();
    let mut failures = 0;
    for (i, w) in writers.into_iter().enumerate() {
        let rep = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("writer finished")
            .expect("writer task");
        if rep.acked_after_restart == 0 {
            findings.0.push(format!(
                "writer {}: no commit acknowledged after the restart",
                i + 1
            ));
        }
        failures += rep.failures;
        findings.0.extend(rep.findings);
        acked.extend(rep.acked);
    }
    let present: BTreeSet<i64> = su(&cluster.pg, &db, "SELECT id FROM fault_log")
        .await
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let lost: Vec<_> = acked.difference(&present).collect();
    if !lost.is_empty() {
        findings.0.push(format!(
            "{} acknowledged commits lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        ));
    }
    eprintln!(
        "{fault:?}: {} rows before, {} commits acknowledged, {} present, {failures} failed transactions",
        before,
        acked.len(),
        present.len()
    );
    // the idle client noticed nothing
    let r = idle.query("SELECT count(*) FROM customers", T10).await;
    if !r.ok() || r.value().as_deref() != Some("2") {
        findings
            .0
            .push(format!("idle client after the restart: {}", r.summary()));
    }
    findings.check(upstream_clean(&cluster.pg, &db).await);
    findings.check(pool_full(&proxy, POOL).await);
    proxy.stop().await;
    findings.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_fast_restart_under_writer_load() {
    restart_under_writer_load("fast").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_immediate_restart_under_writer_load() {
    restart_under_writer_load("immediate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_terminated_under_writer_load() {
    fault_under_writer_load(Fault::TerminateAll).await;
}

// ---------------------------------------------------------------------------------------------
// 2. pg_terminate_backend of the serving backend.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backend_mid_transaction_and_mid_query() {
    let db = shared_db().await;
    let proxy = start_proxy_with(&db, &config(&db, pg().port(), 3)).await;
    let mut findings = Findings::default();
    // another client mid-transaction on its own backend the whole time
    let mut bystander = Wire::must_connect(proxy.addr, &db, "north").await;
    bystander.ok("BEGIN").await;
    bystander.ok("INSERT INTO fault_log (id) VALUES (1)").await;

    // mid-transaction, holding row locks, idle (waiting for its client)
    let mut victim = Wire::must_connect(proxy.addr, &db, "south").await;
    victim.ok("BEGIN").await;
    victim.ok("UPDATE customers SET email = email").await;
    let pid = victim.ok("SELECT pg_backend_pid()").await.expect("pid");
    su(pg(), &db, &format!("SELECT pg_terminate_backend({pid})")).await;
    // The failure may be reported at once (and the connection closed) or on the next request.
    let mut r = victim.drain(Duration::from_secs(3)).await;
    if !r.closed {
        let next = victim.query("SELECT 1", T10).await;
        r.msgs.extend(next.msgs);
        (r.closed, r.timed_out) = (next.closed, next.timed_out);
    }
    findings.add(not_one_clean_error("terminated mid-transaction", &r));

    // mid-query (autocommit)
    let mut victim = Wire::must_connect(proxy.addr, &db, "east").await;
    victim.send_query("SELECT pg_sleep(30.5)").await;
    let pid = backend_running(pg(), &db, "pg_sleep(30.5)").await;
    su(pg(), &db, &format!("SELECT pg_terminate_backend({pid})")).await;
    let r = victim.reply(T10).await;
    findings.add(not_one_clean_error("terminated mid-query", &r));

    // the bystander's transaction went on and commits
    bystander.ok("INSERT INTO fault_log (id) VALUES (2)").await;
    bystander.ok("COMMIT").await;
    assert_eq!(
        su(
            pg(),
            &db,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM fault_log"
        )
        .await,
        "1,2"
    );
    // south's rows are free again
    let mut south = Wire::must_connect(proxy.addr, &db, "south").await;
    let r = south
        .query("UPDATE customers SET email = email", Duration::from_secs(5))
        .await;
    assert!(r.ok(), "south's rows still locked: {}", r.summary());
    findings.check(upstream_clean(pg(), &db).await);
    findings.check(pool_full(&proxy, 3).await);
    proxy.stop().await;
    findings.assert_none();
}

// ---------------------------------------------------------------------------------------------
// 3. Upstream hung: postmaster and the serving backend SIGSTOPped, then resumed.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_upstream_then_resumed() {
    const POOL: usize = 3;
    let cluster = OwnCluster::start().await;
    let db = cluster.db.clone();
    let proxy = start_proxy_with(&db, &config(&db, cluster.pg.port(), POOL)).await;
    let mut findings = Findings::default();
    let pool = &proxy.shared.pool;
    // At start the pool probes the upstream with one connection of its own. Let it land first:
    // opened while the clients below log in, it would be a third idle connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.idle_count() < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // two upstream connections open and idle
    {
        let mut a = Wire::must_connect(proxy.addr, &db, "north").await;
        let mut b = Wire::must_connect(proxy.addr, &db, "south").await;
        a.ok("BEGIN").await;
        b.ok("BEGIN").await;
        a.ok("COMMIT").await;
        b.ok("COMMIT").await;
    }
    // Their sessions hand the connections back as they end, after the client has its reply:
    // wait for that, or the next two clients could open a third connection before the freeze.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.idle_count() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        pool.idle_count(),
        2,
        "two upstream connections idle before the freeze"
    );
    let mut hung = Wire::must_connect(proxy.addr, &db, "north").await;
    hung.ok("BEGIN").await;
    let pid: i32 = hung
        .ok("SELECT pg_backend_pid()")
        .await
        .and_then(|p| p.parse().ok())
        .expect("pid");
    let mut other = Wire::must_connect(proxy.addr, &db, "south").await;
    other.ok("BEGIN").await;
    other.ok("INSERT INTO fault_log (id) VALUES (1)").await;

    let mut frozen = Frozen::freeze(&[pid, cluster.postmaster_pid()]);
    let stopped = Instant::now();
    hung.send_query("SELECT 42").await;
    // the other client's backend runs on
    other.ok("INSERT INTO fault_log (id) VALUES (2)").await;
    // a client that needs a new upstream connection gets one clean error within connect_timeout
    let mut newcomer = Wire::must_connect(proxy.addr, &db, "east").await;
    let r = newcomer.query("SELECT 1", T10).await;
    findings.add(not_one_clean_error(
        "new connection to a frozen postmaster",
        &r,
    ));
    if r.elapsed > Duration::from_secs(4) {
        findings.0.push(format!(
            "new connection to a frozen postmaster: the error took {:?} (connect_timeout 1s)",
            r.elapsed
        ));
    }
    other.ok("COMMIT").await;
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(stopped.elapsed())).await;
    frozen.resume();

    // the hung query completes once the server runs again
    let r = hung.reply(T10).await;
    if !r.ok() || r.value().as_deref() != Some("42") {
        findings
            .0
            .push(format!("hung query after resume: {}", r.summary()));
    } else {
        hung.ok("COMMIT").await;
    }
    let r = newcomer.query("SELECT 1", T10).await;
    if !r.ok() {
        findings
            .0
            .push(format!("newcomer after resume: {}", r.summary()));
    }
    assert_eq!(
        su(
            &cluster.pg,
            &db,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM fault_log"
        )
        .await,
        "1,2"
    );
    findings.check(upstream_clean(&cluster.pg, &db).await);
    findings.check(pool_full(&proxy, POOL).await);
    proxy.stop().await;
    findings.assert_none();
}

// ---------------------------------------------------------------------------------------------
// 4. Client killed mid-work.
// ---------------------------------------------------------------------------------------------

/// A client that keeps running short transactions until stopped; returns its failures.
fn busy_bystander(
    addr: SocketAddr,
    db: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let mut c = Wire::must_connect(addr, &db, "north").await;
        let (mut done, mut bad) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            for sql in ["BEGIN", "SELECT count(*) FROM customers", "COMMIT"] {
                let r = c.query(sql, T10).await;
                if !r.ok() {
                    bad.push(format!("bystander: {sql}: {}", r.summary()));
                    return (done, bad);
                }
            }
            done += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (done, bad)
    })
}

/// After `victim` vanished: bystander unharmed, upstream clean, the pool full again.
async fn after_client_killed(
    proxy: &Proxy,
    pool: usize,
    bystander: tokio::task::JoinHandle<(usize, Vec<String>)>,
    stop: Arc<AtomicBool>,
    findings: &mut Findings,
) {
    findings.check(upstream_clean(pg(), &proxy.db).await);
    stop.store(true, Ordering::Relaxed);
    let (done, bad) = bystander.await.expect("bystander");
    findings.0.extend(bad);
    if done == 0 {
        findings.0.push("bystander completed no transaction".into());
    }
    findings.check(pool_full(proxy, pool).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_transaction_holding_a_row_lock() {
    let db = shared_db().await;
    let proxy = start_proxy_with(&db, &config(&db, pg().port(), 2)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let bystander = busy_bystander(proxy.addr, db.clone(), Arc::clone(&stop));
    let mut findings = Findings::default();

    let mut victim = Wire::must_connect(proxy.addr, &db, "south").await;
    victim.ok("BEGIN").await;
    victim
        .ok("SELECT * FROM customers ORDER BY customer_id FOR UPDATE")
        .await;
    let locks = su(
        pg(),
        &db,
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
          WHERE a.usename = 'rlsgate_app' AND a.datname = current_database() AND l.locktype = 'transactionid'",
    )
    .await;
    assert_ne!(locks, "0", "the victim holds its transaction's lock");
    drop(victim);

    // another south client can take the same rows at once
    let mut south = Wire::must_connect(proxy.addr, &db, "south").await;
    let r = south
        .query(
            "SELECT customer_id FROM customers FOR UPDATE NOWAIT",
            Duration::from_secs(5),
        )
        .await;
    let started = Instant::now();
    let mut r = r;
    // the proxy may need a moment to notice the client is gone
    while !r.ok() && started.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        r = south
            .query(
                "SELECT customer_id FROM customers FOR UPDATE NOWAIT",
                Duration::from_secs(5),
            )
            .await;
    }
    if !r.ok() {
        findings.0.push(format!(
            "rows still locked after the client left: {}",
            r.summary()
        ));
    }
    drop(south);
    after_client_killed(&proxy, 2, bystander, stop, &mut findings).await;
    proxy.stop().await;
    findings.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_copy_from_stdin() {
    let db = shared_db().await;
    let proxy = start_proxy_with(&db, &config(&db, pg().port(), 2)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let bystander = busy_bystander(proxy.addr, db.clone(), Arc::clone(&stop));
    let mut findings = Findings::default();

    let mut victim = Wire::must_connect(proxy.addr, &db, "south").await;
    victim.send_query("COPY fault_copy FROM STDIN").await;
    let copy_in = victim.next().await.expect("a reply to COPY");
    assert_eq!(copy_in.tag, 'G', "CopyInResponse: {copy_in:?}");
    for i in 0..1000 {
        victim
            .send(b'd', format!("{i}\tsome payload {i}\n").as_bytes())
            .await;
    }
    // the server has the rows so far (and waits for more)
    backend_running(pg(), &db, "COPY fault_copy").await;
    drop(victim);

    findings.check(upstream_clean(pg(), &db).await);
    let rows = su(pg(), &db, "SELECT count(*) FROM fault_copy").await;
    if rows != "0" {
        findings
            .0
            .push(format!("{rows} rows of an unfinished COPY were committed"));
    }
    after_client_killed(&proxy, 2, bystander, stop, &mut findings).await;
    proxy.stop().await;
    findings.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_while_a_large_result_is_unread() {
    let db = shared_db().await;
    let proxy = start_proxy_with(&db, &config(&db, pg().port(), 2)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let bystander = busy_bystander(proxy.addr, db.clone(), Arc::clone(&stop));
    let mut findings = Findings::default();

    let mut victim = Wire::must_connect(proxy.addr, &db, "south").await;
    // ~50 MB of rows, never read
    victim
        .send_query("SELECT i, repeat('x', 1000) FROM generate_series(1, 50000) i")
        .await;
    let pid = backend_running(pg(), &db, "generate_series(1, 50000)").await;
    // let the buffers between server, proxy and client fill up
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let wait = su(
        pg(),
        &db,
        &format!("SELECT coalesce(wait_event, 'running') FROM pg_stat_activity WHERE pid = {pid}"),
    )
    .await;
    eprintln!("backend {pid} before the client is killed: {wait}");
    drop(victim);

    findings.check(upstream_clean(pg(), &db).await);
    after_client_killed(&proxy, 2, bystander, stop, &mut findings).await;
    proxy.stop().await;
    findings.assert_none();
}

// ---------------------------------------------------------------------------------------------
// 5. Network faults between rlsgate and Postgres (relay).
// ---------------------------------------------------------------------------------------------

/// A relay in front of the shared cluster and a proxy behind it.
async fn behind_relay(pool: usize) -> (Relay, Proxy) {
    let db = shared_db().await;
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], pg().port()))).await;
    let proxy = start_proxy_with(&db, &config(&db, relay.port(), pool)).await;
    (relay, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_reset_of_every_upstream_connection() {
    const POOL: usize = 3;
    let (relay, proxy) = behind_relay(POOL).await;
    let db = proxy.db.clone();
    let mut findings = Findings::default();
    // an idle client whose pooled connections will be reset under it
    let mut idle = Wire::must_connect(proxy.addr, &db, "north").await;
    idle.ok("SELECT 1").await;
    let mut victim = Wire::must_connect(proxy.addr, &db, "south").await;
    victim.ok("BEGIN").await;
    victim.ok("UPDATE customers SET email = email").await;
    let mut querying = Wire::must_connect(proxy.addr, &db, "east").await;
    querying.ok("BEGIN").await;
    querying.send_query("SELECT pg_sleep(5)").await;
    backend_running(pg(), &db, "pg_sleep(5)").await;
    assert!(relay.open() >= 2, "relayed: {}", relay.open());

    relay.kill_all();
    let mut r = victim.drain(Duration::from_secs(3)).await;
    if !r.closed {
        let next = victim.query("SELECT 1", T10).await;
        r.msgs.extend(next.msgs);
        (r.closed, r.timed_out) = (next.closed, next.timed_out);
    }
    findings.add(not_one_clean_error("reset mid-transaction", &r));
    let r = querying.reply(Duration::from_secs(3)).await;
    findings.add(not_one_clean_error("reset mid-query", &r));
    // the idle client noticed nothing
    let r = idle.query("SELECT count(*) FROM customers", T10).await;
    if !r.ok() {
        findings
            .0
            .push(format!("idle client after the reset: {}", r.summary()));
    }
    findings.check(upstream_clean(pg(), &db).await);
    findings.check(pool_full(&proxy, POOL).await);
    proxy.stop().await;
    findings.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_partition_while_opening_connections() {
    const POOL: usize = 2;
    let (relay, proxy) = behind_relay(POOL).await;
    let db = proxy.db.clone();
    let mut findings = Findings::default();
    for (dir, mode) in [
        (Dir::ToServer, Mode::Drop),
        (Dir::ToClient, Mode::Drop),
        (Dir::ToServer, Mode::Stall),
    ] {
        // nothing pooled: the next transaction needs a new upstream connection
        relay.kill_all();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut c = Wire::must_connect(proxy.addr, &db, "north").await;
        relay.set(dir, mode);
        let r = c.query("SELECT 1", T10).await;
        findings.add(not_one_clean_error(
            &format!("{dir:?} {mode:?} while connecting"),
            &r,
        ));
        // connect_timeout is 1s (an idle connection's failed check adds its own timeout)
        if r.elapsed > Duration::from_secs(8) {
            findings.0.push(format!(
                "{dir:?} {mode:?} while connecting: the error took {:?}",
                r.elapsed
            ));
        }
        relay.set_both(Mode::Pass);
        let r = c.query("SELECT count(*) FROM customers", T10).await;
        if !r.ok() {
            findings.0.push(format!(
                "{dir:?} {mode:?}: after the partition healed: {}",
                r.summary()
            ));
        }
    }
    findings.check(upstream_clean(pg(), &db).await);
    findings.check(pool_full(&proxy, POOL).await);
    proxy.stop().await;
    findings.assert_none();
}

/// A partition while a query runs. rlsgate's connection to the relay stays up (the relay
/// acknowledges everything), so only the proxy's own timing can end the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_partition_during_a_query() {
    const POOL: usize = 2;
    let (relay, proxy) = behind_relay(POOL).await;
    let db = proxy.db.clone();
    let mut findings = Findings::default();
    // a client that needs no upstream during the partition
    let mut idle = Wire::must_connect(proxy.addr, &db, "north").await;
    idle.ok("SELECT 1").await;
    for (dir, mode) in [
        (Dir::ToServer, Mode::Drop),
        (Dir::ToClient, Mode::Drop),
        (Dir::ToServer, Mode::Stall),
    ] {
        let what = format!("{dir:?} {mode:?} during a query");
        let mut victim = Wire::must_connect(proxy.addr, &db, "south").await;
        victim.ok("BEGIN").await;
        victim.ok("UPDATE customers SET email = email").await;
        relay.set(dir, mode);
        victim.send_query("SELECT pg_sleep(0.2), 1").await;
        let r = victim.reply(Duration::from_secs(20)).await;
        findings.add(not_one_clean_error(&what, &r));
        if r.elapsed > Duration::from_secs(15) {
            findings
                .0
                .push(format!("{what}: no error within 15 s ({:?})", r.elapsed));
        }
        relay.set_both(Mode::Pass);
        findings.check(
            upstream_clean(pg(), &db)
                .await
                .map_err(|e| format!("{what}: {e}")),
        );
    }
    let r = idle.query("SELECT count(*) FROM customers", T10).await;
    if !r.ok() {
        findings
            .0
            .push(format!("idle client after the partitions: {}", r.summary()));
    }
    findings.check(pool_full(&proxy, POOL).await);
    proxy.stop().await;
    findings.assert_none();
}

/// The upstream hangs (relay stalled both ways) and comes back: the query in flight completes,
/// nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_stall_both_ways_then_resume() {
    const POOL: usize = 2;
    let (relay, proxy) = behind_relay(POOL).await;
    let db = proxy.db.clone();
    let mut findings = Findings::default();
    let mut victim = Wire::must_connect(proxy.addr, &db, "south").await;
    victim.ok("BEGIN").await;
    victim.ok("UPDATE customers SET email = email").await;
    relay.set_both(Mode::Stall);
    victim.send_query("SELECT 42").await;
    let early = victim.reply(Duration::from_millis(2000)).await;
    assert!(
        early.timed_out && early.msgs.is_empty(),
        "an answer came through a stalled relay: {}",
        early.summary()
    );
    relay.set_both(Mode::Pass);
    let r = victim.reply(T10).await;
    if !r.ok() || r.value().as_deref() != Some("42") {
        findings
            .0
            .push(format!("stalled query after resume: {}", r.summary()));
    } else {
        let r = victim.query("COMMIT", T10).await;
        if !r.ok() || !r.completed("COMMIT") {
            findings
                .0
                .push(format!("COMMIT after resume: {}", r.summary()));
        }
    }
    drop(victim);
    findings.check(upstream_clean(pg(), &db).await);
    findings.check(pool_full(&proxy, POOL).await);
    proxy.stop().await;
    findings.assert_none();
}

/// The statements rlsgate runs between two clients fail (made unparsable on the way to the
/// server). `DISCARD SEQUENCES` after another tenant goes into the unit's own transaction: the
/// unit fails with it and does not run (a write that used `lastval()` would store the previous
/// tenant's value), and the next transaction discards again. `RESET ALL` after other settings
/// runs as a statement of its own ahead of the unit: none of the unit's replies may reach the
/// client (they would show the previous client's settings); the session ends. With
/// `keep_context` (the default) the connection kept north's context, so the `RESET ALL` is the
/// awaited clean-up before south runs anything; without, it is pipelined ahead of south's unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cleanup_between_clients_never_shows_the_previous_clients_state() {
    failed_cleanup_between_clients(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cleanup_between_clients_never_shows_the_previous_clients_state_without_kept_context()
 {
    failed_cleanup_between_clients(false).await;
}

async fn failed_cleanup_between_clients(keep_context: bool) {
    let db = shared_db().await;
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], pg().port()))).await;
    let config = config(&db, relay.port(), 1).replace(
        "[upstream]\n",
        &format!("[upstream]\nkeep_context = {keep_context}\n"),
    );
    let proxy = start_proxy_with(&db, &config).await;
    let north = client(&proxy, "north").await;
    let north_insert = |n: u32| {
        format!(
            "INSERT INTO customers (store_id, name, email) VALUES ('north', 'seq', 'seq{n}@cleanup')"
        )
    };
    // north's sequence value is on the one connection
    north.simple_query(&north_insert(0)).await.unwrap();
    relay.set(
        Dir::ToServer,
        Mode::Rewrite("DISCARD SEQUENCES", "DISCARD SEQUENCEZ"),
    );
    let south = client(&proxy, "south").await;
    let leak = "INSERT INTO customers (store_id, name, email) VALUES ('south', 'leak', 'leak-' || lastval() || '@cleanup')";
    let e = south
        .simple_query(leak)
        .await
        .expect_err("the unit must not run after a failed sequence discard");
    assert_eq!(code(&e), "42601", "the discard's error: {e:?}");
    relay.set(Dir::ToServer, Mode::Pass);
    // the same session goes on; the connection is discarded again before its next transaction
    match south.simple_query("SELECT lastval()::text").await {
        Ok(m) => panic!("ESCAPE: south read north's sequence value {m:?}"),
        Err(e) => assert_eq!(code(&e), "55000", "{e:?}"),
    }
    let leaked = south
        .query_one("SELECT count(*) FROM customers WHERE name = 'leak'", &[])
        .await
        .unwrap();
    assert_eq!(leaked.get::<_, i64>(0), 0);

    // north's settings on the connection, then a failing RESET ALL in front of south's unit
    north.simple_query(&north_insert(1)).await.unwrap();
    north
        .simple_query("SET search_path = north_only, public")
        .await
        .unwrap();
    north.simple_query(&north_insert(2)).await.unwrap();
    relay.set(Dir::ToServer, Mode::Rewrite("RESET ALL", "RESET ALX"));
    let south = client(&proxy, "south").await;
    match south.simple_query("SHOW search_path").await {
        Ok(m) => panic!("ESCAPE: a failed RESET ALL let south's unit answer {m:?}"),
        Err(e) => assert!(
            message(&e).contains("could not clean the upstream connection between clients"),
            "{e:?}"
        ),
    }
    assert!(
        south.simple_query("SELECT 1").await.is_err(),
        "the session ends"
    );
    relay.set(Dir::ToServer, Mode::Pass);
    let south = client(&proxy, "south").await;
    let path = south.query_one("SHOW search_path", &[]).await.unwrap();
    assert_eq!(path.get::<_, String>(0), "\"$user\", public");
    match south.simple_query("SELECT lastval()::text").await {
        Ok(m) => panic!("ESCAPE: south read north's sequence value {m:?}"),
        Err(e) => assert_eq!(code(&e), "55000", "{e:?}"),
    }
    proxy.stop().await;
}

/// The hidden statement that lets a connection keep the client's context fails (made unparsable
/// on the way to the server): nothing reaches the client, every transaction still brings its own
/// context, and once the statement goes through again the connection keeps the context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_keep_of_the_context_loses_nothing() {
    let (relay, proxy) = behind_relay(1).await;
    let north = client(&proxy, "north").await;
    let check = |round: u32| {
        let north = &north;
        async move {
            let row = north
                .query_one(
                    "SELECT current_setting('app.current_store_id'), count(*) FROM customers",
                    &[],
                )
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
            assert_eq!(row.get::<_, String>(0), "north", "round {round}");
            assert!(row.get::<_, i64>(1) >= 3, "round {round}");
            let msgs = north
                .simple_query("SELECT current_setting('app.current_store_id')")
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
            assert!(msgs.iter().any(|m| matches!(m,
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("north"))));
        }
    };
    let log_from = server_log_len();
    // (demo.sql revokes set_config: the kept form is `SET app.… = '…'`)
    relay.set(Dir::ToServer, Mode::Rewrite("SET app.", "SEX app."));
    for round in 0..6 {
        check(round).await;
    }
    relay.set(Dir::ToServer, Mode::Pass);
    assert!(
        server_log_since(log_from).contains("SEX app.current_store_id"),
        "the connection never tried to keep the context: the check proves nothing"
    );
    for round in 6..12 {
        check(round).await;
    }
    proxy.stop().await;
}
