//! Test support: one throwaway Postgres per test binary, a fresh demo database per test, rlsgate
//! started in-process on port 0, tokens, and real clients (tokio-postgres, psql, pgbench).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rlsgate::app::{self, Shared};
use rlsgate::config::Config;
use rlsgate::embedded_pg::{EmbeddedOptions, EmbeddedPg};
use tokio_util::sync::CancellationToken;

pub mod escape_cases;
pub mod relay;

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";
pub const APP_PASSWORD: &str = "app-password-for-tests";
pub const DEMO_SQL: &str = include_str!("../../sql/demo.sql");

static PG: OnceLock<EmbeddedPg> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);
static DEMO_LOAD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The cluster of this test binary (started on first use; stops when the process exits).
pub fn pg() -> &'static EmbeddedPg {
    PG.get_or_init(|| {
        let pg = EmbeddedPg::start(EmbeddedOptions::default()).expect("start throwaway PostgreSQL");
        pg.psql(
            "postgres",
            &format!("CREATE ROLE rlsgate_app LOGIN PASSWORD '{APP_PASSWORD}'; CREATE ROLE rlsgate_owner NOLOGIN;"),
        )
        .expect("create roles");
        pg
    })
}

/// A fresh database with `sql/demo.sql` loaded; returns its name.
pub fn demo_db() -> String {
    let pg = pg();
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    pg.create_database(&name).expect("create database");
    // Loading takes cluster-wide role locks; one at a time avoids deadlocks between tests.
    let _guard = DEMO_LOAD.lock().unwrap_or_else(|e| e.into_inner());
    pg.psql(&name, DEMO_SQL).expect("load demo.sql");
    name
}

/// rlsgate running in this process.
pub struct Proxy {
    pub addr: SocketAddr,
    pub db: String,
    pub shared: Arc<Shared>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }

    pub fn conn_str(&self, token: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={} user=app password={token} sslmode=disable",
            self.addr.port(),
            self.db
        )
    }
}

/// The `wrap_mode` test binary runs every suite again with `[upstream] transaction_wrap = true`.
pub const WRAP: bool = matches!(env!("CARGO_CRATE_NAME").as_bytes(), b"wrap_mode");

/// Config for a proxy in front of `db`; `extra` is appended (later keys in a table override by
/// being placed in the right table by the caller).
pub fn config_text(db: &str, pool_size: usize, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_timeout = "5s"
handshake_timeout = "5s"
pipeline_depth = {depth}
[upstream]
host = "127.0.0.1"
port = {port}
database = "{db}"
user = "rlsgate_app"
password = "{APP_PASSWORD}"
sslmode = "disable"
transaction_wrap = {WRAP}
pool_size = {pool_size}
checkout_timeout = "5s"
[auth]
hs_secret = "{SECRET}"
tenant_claim = "store_id"
{extra}
[context]
"app.current_store_id" = "store_id"
"#,
        port = pg().port(),
        depth = pipeline_depth(),
    )
}

/// The `pipelined_mode` test binary runs end-to-end suites again with `[server] pipeline_depth =
/// 4`.
pub const PIPELINED: bool = matches!(env!("CARGO_CRATE_NAME").as_bytes(), b"pipelined_mode");

/// `[server] pipeline_depth` of the test proxies: `RLSGATE_TEST_PIPELINE_DEPTH` if set, else 4
/// in the `pipelined_mode` binary and 1 elsewhere.
pub fn pipeline_depth() -> usize {
    std::env::var("RLSGATE_TEST_PIPELINE_DEPTH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if PIPELINED { 4 } else { 1 })
}

/// Logs from the proxy when `RLSGATE_LOG` is set (e.g. `RLSGATE_LOG=debug cargo test`).
fn init_logs() {
    if let Ok(filter) = std::env::var("RLSGATE_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .try_init();
    }
}

pub async fn start_proxy_with(db: &str, config: &str) -> Proxy {
    init_logs();
    let config = Config::from_toml(config).expect("valid test config");
    let shared = Shared::new(config).await.expect("shared state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app::run(listener, Arc::clone(&shared), shutdown.clone()));
    Proxy {
        addr,
        db: db.to_string(),
        shared,
        shutdown,
        task,
    }
}

/// A proxy with `pool_size` connections in front of a fresh demo database.
pub async fn start_proxy(pool_size: usize) -> Proxy {
    let db = demo_db();
    start_proxy_with(&db, &config_text(&db, pool_size, "")).await
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn token_with(claims: serde_json::Value) -> String {
    rlsgate::auth::mint_hs256(SECRET.as_bytes(), &claims).expect("mint")
}

pub fn token(store: &str) -> String {
    token_with(
        serde_json::json!({"store_id": store, "sub": format!("user-{store}"), "exp": now() + 3600}),
    )
}

/// A tokio-postgres client through the proxy.
pub async fn connect(
    proxy: &Proxy,
    token: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) =
        tokio_postgres::connect(&proxy.conn_str(token), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

pub async fn client(proxy: &Proxy, store: &str) -> tokio_postgres::Client {
    connect(proxy, &token(store))
        .await
        .expect("connect through rlsgate")
}

/// Length of the test cluster's server log now (bytes): where [`server_log_since`] starts.
pub fn server_log_len() -> u64 {
    std::fs::metadata(pg().log_path()).map_or(0, |m| m.len())
}

/// The test cluster's server log written since `from` (bytes).
pub fn server_log_since(from: u64) -> String {
    let bytes = std::fs::read(pg().log_path()).expect("server log");
    String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).into_owned()
}

/// Superuser SQL straight to Postgres (to check what reached the server).
pub fn admin_sql(db: &str, sql: &str) -> String {
    pg().psql(db, sql).expect("admin sql").trim().to_string()
}

/// Run a Postgres client binary against the proxy.
pub fn run_client(proxy: &Proxy, bin: &str, token: &str, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(pg().bin(bin));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", proxy.addr.port().to_string())
        .env("PGUSER", "app")
        .env("PGDATABASE", &proxy.db)
        .env("PGPASSWORD", token)
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10")
        .args(args);
    cmd.output().expect("run client binary")
}

pub fn psql(proxy: &Proxy, token: &str, sql: &str) -> Output {
    run_client(
        proxy,
        "psql",
        token,
        &["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
    )
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// SQLSTATE of a tokio-postgres error (empty when it has none).
pub fn code(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_string())
        .unwrap_or_default()
}

pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

pub async fn count(c: &impl tokio_postgres::GenericClient, table: &str) -> i64 {
    c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

/// A raw wire-protocol client for sequences drivers do not produce.
pub struct RawClient {
    pub stream: tokio::net::TcpStream,
    buf: bytes::BytesMut,
    /// Messages held by `start_batch`.
    batch: Option<Vec<u8>>,
    /// BackendKeyData's body (process id and secret key): what a CancelRequest carries.
    pub backend_key: Vec<u8>,
}

/// One server message: tag and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub tag: char,
    pub body: Vec<u8>,
}

impl Msg {
    /// SQLSTATE of an ErrorResponse/NoticeResponse.
    pub fn code(&self) -> String {
        self.field(b'C')
    }

    pub fn field(&self, f: u8) -> String {
        let mut parts = self.body.split(|&b| b == 0);
        parts
            .find(|p| p.first() == Some(&f))
            .map(|p| String::from_utf8_lossy(&p[1..]).to_string())
            .unwrap_or_default()
    }
}

impl RawClient {
    pub async fn connect(proxy: &Proxy, token: &str) -> RawClient {
        RawClient::connect_with(proxy, token, &[]).await
    }

    /// Log in with extra startup parameters.
    pub async fn connect_with(proxy: &Proxy, token: &str, extra: &[(&str, &str)]) -> RawClient {
        use tokio::io::AsyncWriteExt;
        let stream = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("connect");
        let mut c = RawClient {
            stream,
            buf: bytes::BytesMut::new(),
            batch: None,
            backend_key: Vec::new(),
        };
        let mut params = vec![("user", "app"), ("database", proxy.db.as_str())];
        params.extend_from_slice(extra);
        let msg = startup_packet(196_608, &params);
        c.stream.write_all(&msg).await.unwrap();
        let auth = c.recv().await;
        assert_eq!(auth.tag, 'R', "{auth:?}");
        c.send(b'p', &[token.as_bytes(), b"\0"].concat()).await;
        if let Some(key) = c.until_ready().await.into_iter().find(|m| m.tag == 'K') {
            c.backend_key = key.body;
        }
        c
    }

    /// Send a CancelRequest with this client's key on a connection of its own (returns once it
    /// is written, as drivers do: it may reach the server later).
    pub async fn cancel(proxy: std::net::SocketAddr, backend_key: Vec<u8>) {
        let _ = RawClient::send_cancel(proxy, &backend_key).await;
    }

    /// Send a CancelRequest and wait until rlsgate closes that connection: it has dealt with
    /// the request (delivered it to the server, or found nothing to cancel).
    pub async fn cancel_and_wait(proxy: std::net::SocketAddr, backend_key: &[u8]) {
        use tokio::io::AsyncReadExt;
        let mut s = RawClient::send_cancel(proxy, backend_key)
            .await
            .expect("cancel request sent");
        let mut sink = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(15), async {
            while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        })
        .await;
        assert!(closed.is_ok(), "rlsgate closed the cancel connection");
    }

    async fn send_cancel(
        proxy: std::net::SocketAddr,
        backend_key: &[u8],
    ) -> std::io::Result<tokio::net::TcpStream> {
        use tokio::io::AsyncWriteExt;
        let mut msg = 16i32.to_be_bytes().to_vec();
        msg.extend_from_slice(&80877102i32.to_be_bytes());
        msg.extend_from_slice(backend_key);
        let mut s = tokio::net::TcpStream::connect(proxy).await?;
        s.write_all(&msg).await?;
        Ok(s)
    }

    pub async fn send(&mut self, tag: u8, body: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        match self.batch.as_mut() {
            Some(batch) => batch.extend_from_slice(&m),
            None => self.stream.write_all(&m).await.unwrap(),
        }
    }

    /// Hold the messages sent from now on until `write_batch` writes them all at once (the
    /// proxy then reads them before any reply can come back).
    pub fn start_batch(&mut self) {
        self.batch = Some(Vec::new());
    }

    pub async fn write_batch(&mut self) {
        use tokio::io::AsyncWriteExt;
        let batch = self.batch.take().expect("start_batch first");
        self.stream.write_all(&batch).await.unwrap();
    }

    pub async fn query(&mut self, sql: &str) {
        self.send(b'Q', &[sql.as_bytes(), b"\0"].concat()).await;
    }

    pub async fn parse(&mut self, name: &str, sql: &str) {
        self.send(
            b'P',
            &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat(),
        )
        .await;
    }

    pub async fn bind(&mut self, portal: &str, stmt: &str) {
        self.send(
            b'B',
            &[
                portal.as_bytes(),
                b"\0",
                stmt.as_bytes(),
                b"\0",
                &[0, 0, 0, 0, 0, 0],
            ]
            .concat(),
        )
        .await;
    }

    pub async fn execute(&mut self, portal: &str) {
        self.send(b'E', &[portal.as_bytes(), b"\0", &[0, 0, 0, 0]].concat())
            .await;
    }

    pub async fn sync(&mut self) {
        self.send(b'S', &[]).await;
    }

    pub async fn recv(&mut self) -> Msg {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let m = self.buf.split_to(len + 1);
                    return Msg {
                        tag: m[0] as char,
                        body: m[5..].to_vec(),
                    };
                }
            }
            let n =
                tokio::time::timeout(Duration::from_secs(15), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("server answered within 15s")
                    .expect("read");
            assert!(n > 0, "connection closed by rlsgate");
        }
    }

    /// Messages up to and including ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().await;
            let done = m.tag == 'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }
}

/// A StartupMessage with the given protocol version code and parameters.
pub fn startup_packet(version: i32, params: &[(&str, &str)]) -> bytes::BytesMut {
    use bytes::BufMut;
    let mut body = bytes::BytesMut::new();
    body.put_i32(version);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut msg = bytes::BytesMut::new();
    msg.put_i32(body.len() as i32 + 4);
    msg.put_slice(&body);
    msg
}

/// Tags of a message list, e.g. "1 2 T D C Z".
/// First column of the first DataRow, as text.
pub fn first_value(msgs: &[Msg]) -> Option<String> {
    let b = &msgs.iter().find(|m| m.tag == 'D')?.body;
    let len = usize::try_from(i32::from_be_bytes(b.get(2..6)?.try_into().ok()?)).ok()?;
    Some(String::from_utf8_lossy(b.get(6..6 + len)?).into_owned())
}

pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter()
        .map(|m| m.tag.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// base64url without padding, for building hostile tokens by hand.
pub fn base64url(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A token for the admin console (`admin_claim = "rlsgate_admin"` in the config).
pub fn admin_token() -> String {
    token_with(
        serde_json::json!({"store_id": "ops", "sub": "operator", "rlsgate_admin": true, "exp": now() + 600}),
    )
}

/// An admin console command through psql (`-At`, `|`-separated).
pub fn admin_psql(proxy: &Proxy, sql: &str) -> Output {
    std::process::Command::new(pg().bin("psql"))
        .env_clear()
        .env("PGPASSWORD", admin_token())
        .args([
            "-X",
            "-At",
            "-F",
            "|",
            &format!(
                "host=127.0.0.1 port={} dbname=rlsgate user=operator sslmode=disable",
                proxy.addr.port()
            ),
            "-c",
            sql,
        ])
        .output()
        .expect("run psql")
}

/// Resident memory of this process (the in-process proxy included), in kB.
pub fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The venv of tests/compat/install.sh (psycopg 3 bundling libpq 18), or `None` after saying why
/// the test is skipped.
pub fn libpq18_python() -> Option<std::path::PathBuf> {
    let env = std::env::var_os("COMPAT_ENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/compat-env")
        });
    let python = env.join("venv/bin/python");
    let version = std::process::Command::new(&python)
        .args(["-c", "import psycopg; print(psycopg.pq.version())"])
        .output();
    match version {
        Ok(out) if out.status.success() => {
            let v: u32 = stdout(&out).parse().unwrap_or(0);
            if v >= 180_000 {
                return Some(python);
            }
            eprintln!("SKIPPED: {} has libpq {v}, not 18+", python.display());
        }
        _ => eprintln!(
            "SKIPPED: no psycopg venv at {} (create it with tests/compat/install.sh)",
            python.display()
        ),
    }
    None
}
