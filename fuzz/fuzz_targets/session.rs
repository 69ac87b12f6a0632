//! The session's message handling against a scripted upstream: rlsgate runs in-process (one
//! proxy with plain context injection, one with `transaction_wrap`) in front of a fake
//! PostgreSQL 15 backend (`session/fake.rs`); each input is a program of frontend messages sent
//! after a real JWT login, in write chunks that may cut frames, with pauses and maybe an early
//! disconnect.
//!
//! Findings (each a panic, which libFuzzer's hook turns into an abort, in whichever task):
//! - a panic anywhere in rlsgate's tasks;
//! - a data statement upstream without this client's `SET LOCAL app.current_store_id` in its
//!   transaction (checked by the fake server);
//! - rlsgate reporting a lost/desynchronised upstream (08006) or an internal error (XX000): the
//!   fake follows the protocol, so the expect queue disagreed with the server;
//! - after the closing `CopyFail, Sync, ROLLBACK, SELECT marker`: no marker row and
//!   ReadyForQuery('I') within 3 s, no end of stream after Terminate;
//! - the session, or a checked-out upstream connection, still there 3 s after the client left,
//!   or a connection back in the pool that the server reports inside a transaction, in COPY,
//!   skipping to Sync, or with unread or unflushed messages.
#![no_main]

#[path = "session/fake.rs"]
mod fake;
#[path = "session/sql.rs"]
mod sql;
#[path = "session/xact.rs"]
mod xact;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use rlsgate::app::{self, Shared};
use rlsgate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "fuzz-secret-0123456789abcdef0123456789";
const TENANTS: [&str; 2] = ["store-a", "store-b"];
const END_MARKER: &str = "rlsgate-fuzz-end";
/// Generous: an input takes tens of milliseconds under ASan, and every reply is owed at once.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// Statements the programs pick from (raw text covers the rest).
const MENU: &[&str] = &[
    "SELECT 1",
    "SELECT * FROM items WHERE id = $1",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT sp",
    "ROLLBACK TO SAVEPOINT sp",
    "RELEASE SAVEPOINT sp",
    "COMMIT AND CHAIN",
    "ROLLBACK AND CHAIN",
    "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "END",
    "SELECT 1/0",
    "SELEC 1",
    "COPY items FROM STDIN",
    "COPY items TO STDOUT",
    "INSERT INTO items VALUES ($1)",
    "UPDATE items SET n = n + 1",
    "DELETE FROM items",
    "SET application_name = 'fuzz'",
    "SET LOCAL statement_timeout = 0",
    "SHOW application_name",
    "RESET ALL",
    "DISCARD ALL",
    "VACUUM items",
    "SELECT generate_series(1, 3)",
    "PREPARE q AS SELECT 1",
    "EXECUTE q",
    "DEALLOCATE q",
    "DEALLOCATE ALL",
    "LISTEN chan",
    "",
    "SELECT set_config('app.current_store_id', 'other', false)",
    "CREATE TEMP TABLE tmp (a int)",
    "DECLARE c CURSOR FOR SELECT 1",
    "FETCH c",
    "CLOSE c",
    "SET search_path = public",
    "ABORT",
    "SELECT 1; SELECT 2",
    "BEGIN; SELECT 1; COMMIT; SELECT 2",
    "COMMIT; SELECT 1",
    "RESET application_name",
    "SELECT 1 FROM items FOR UPDATE",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "EXPLAIN SELECT 1",
    "DISCARD SEQUENCES",
    "SET SESSION AUTHORIZATION other",
    "ROLLBACK; SELECT 1",
    "SELECT 1; COPY items FROM STDIN; SELECT 2",
    "PREPARE TRANSACTION 'x'",
    "/* c */ BEGIN; INSERT INTO items VALUES (1)",
];
const NAMES: [&str; 4] = ["", "s1", "s2", "q"];
const PORTALS: [&str; 3] = ["", "p1", "c"];

/// How the client's bytes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Write what is buffered (a chunk boundary).
    Chunk,
    /// …and wait briefly for replies before going on.
    Pause,
    /// Close the connection here (maybe mid-frame).
    Disconnect,
}

#[derive(Debug, Default)]
struct Program {
    wrap: bool,
    eager: bool,
    tenant: usize,
    bytes: Vec<u8>,
    cuts: Vec<(usize, Cut)>,
    /// A Terminate (or a frame rlsgate ends the session for) is in the bytes.
    ends_itself: bool,
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }

    fn menu(&mut self) -> &'static str {
        MENU[usize::from(self.byte()) % MENU.len()]
    }
}

fn frame(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(body: &mut Vec<u8>, s: &str) {
    body.extend_from_slice(s.as_bytes());
    body.push(0);
}

fn query(out: &mut Vec<u8>, sql: &str) {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    frame(out, b'Q', &b);
}

fn parse_msg(out: &mut Vec<u8>, name: &str, sql: &str, ntypes: usize) {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&(ntypes as i16).to_be_bytes());
    for _ in 0..ntypes {
        b.extend_from_slice(&23i32.to_be_bytes());
    }
    frame(out, b'P', &b);
}

fn bind_msg(out: &mut Vec<u8>, portal: &str, stmt: &str, nparams: usize) {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, stmt);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(nparams as i16).to_be_bytes());
    for _ in 0..nparams {
        b.extend_from_slice(&1i32.to_be_bytes());
        b.push(b'1');
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    frame(out, b'B', &b);
}

fn target_msg(out: &mut Vec<u8>, tag: u8, kind: u8, name: &str) {
    let mut b = vec![kind];
    cstr(&mut b, name);
    frame(out, tag, &b);
}

fn execute_msg(out: &mut Vec<u8>, portal: &str, max_rows: i32) {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&max_rows.to_be_bytes());
    frame(out, b'E', &b);
}

impl Program {
    /// The client's frames and cuts, readable (for `RLSGATE_FUZZ_TRACE`).
    fn describe(&self) -> String {
        let mut out = format!(
            "{} eager={} tenant={}:",
            if self.wrap { "wrap" } else { "plain" },
            self.eager,
            self.tenant
        );
        let mut cuts = self.cuts.iter().peekable();
        let mut at = 0;
        while at + 5 <= self.bytes.len() {
            while let Some((_, kind)) = cuts.next_if(|c| c.0 <= at) {
                out.push_str(&format!(" [{kind:?}]"));
            }
            let len = i32::from_be_bytes([
                self.bytes[at + 1],
                self.bytes[at + 2],
                self.bytes[at + 3],
                self.bytes[at + 4],
            ]);
            let end = (at + 1 + len.max(4) as usize).min(self.bytes.len());
            let body: String = String::from_utf8_lossy(&self.bytes[at + 5..end])
                .chars()
                .map(|c| if c == '\0' { '|' } else { c })
                .collect();
            out.push_str(&format!(" {}({body})", self.bytes[at] as char));
            at = end;
        }
        for (_, kind) in cuts {
            out.push_str(&format!(" [{kind:?}]"));
        }
        out
    }

    fn decode(data: &[u8]) -> Program {
        let mut input = Input(data);
        let head = input.byte();
        let mut p = Program {
            wrap: head & 1 != 0,
            eager: head & 2 != 0,
            tenant: usize::from(head >> 2 & 1),
            ..Program::default()
        };
        let out = &mut p.bytes;
        let mut last_frame = 0;
        for _ in 0..64 {
            if input.0.is_empty() {
                break;
            }
            let start = out.len();
            match input.byte() % 20 {
                0 | 1 => {
                    let n = 1 + usize::from(input.byte() % 3);
                    let sql: Vec<&str> = (0..n).map(|_| input.menu()).collect();
                    query(out, &sql.join("; "));
                }
                2 => {
                    let n = usize::from(input.byte() % 48);
                    let text = input.take(n);
                    let mut b = text;
                    b.push(0);
                    frame(out, b'Q', &b);
                }
                3 => {
                    let name = NAMES[usize::from(input.byte()) % NAMES.len()];
                    let sql = input.menu();
                    let ntypes = usize::from(input.byte() % 3);
                    parse_msg(out, name, sql, ntypes);
                }
                4 => {
                    let portal = PORTALS[usize::from(input.byte()) % PORTALS.len()];
                    let stmt = NAMES[usize::from(input.byte()) % NAMES.len()];
                    let nparams = usize::from(input.byte() % 3);
                    bind_msg(out, portal, stmt, nparams);
                }
                5 => {
                    let b = input.byte();
                    let (kind, name) = if b & 1 == 0 {
                        (b'S', NAMES[usize::from(b >> 1) % NAMES.len()])
                    } else {
                        (b'P', PORTALS[usize::from(b >> 1) % PORTALS.len()])
                    };
                    target_msg(out, b'D', kind, name);
                }
                6 => {
                    let portal = PORTALS[usize::from(input.byte()) % PORTALS.len()];
                    let max_rows = [0, 0, 1, 2][usize::from(input.byte() % 4)];
                    execute_msg(out, portal, max_rows);
                }
                7 => {
                    let b = input.byte();
                    let (kind, name) = if b & 1 == 0 {
                        (b'S', NAMES[usize::from(b >> 1) % NAMES.len()])
                    } else {
                        (b'P', PORTALS[usize::from(b >> 1) % PORTALS.len()])
                    };
                    target_msg(out, b'C', kind, name);
                }
                8 | 9 => frame(out, b'S', &[]),
                10 => frame(out, b'H', &[]),
                11 => {
                    let n = usize::from(input.byte() % 16);
                    let data = input.take(n);
                    frame(out, b'd', &data);
                }
                12 => frame(out, b'c', &[]),
                13 => frame(out, b'f', b"client gave up\0"),
                14 => {
                    // a chunk boundary inside the last frame
                    let len = out.len() - last_frame;
                    let at = if len > 1 {
                        last_frame + 1 + usize::from(input.byte()) % (len - 1)
                    } else {
                        out.len()
                    };
                    p.cuts.push((at, Cut::Chunk));
                }
                15 => p.cuts.push((out.len(), Cut::Chunk)),
                16 => p.cuts.push((out.len(), Cut::Pause)),
                17 => {
                    let at = out.len() - usize::from(input.byte() % 3).min(out.len() - last_frame);
                    p.cuts.push((at, Cut::Disconnect));
                    break;
                }
                18 => {
                    // any frame: FunctionCall, Terminate, garbage tags and bodies
                    let tag = input.byte();
                    let n = usize::from(input.byte() % 16);
                    let body = input.take(n);
                    frame(out, tag, &body);
                    if !b"QPBDECSHdcfF".contains(&tag) {
                        p.ends_itself = true;
                    }
                }
                _ => {
                    // what drivers send for one statement: Parse, Bind, Describe, Execute, Sync
                    let sql = input.menu();
                    let nparams = usize::from(input.byte() % 2);
                    parse_msg(out, "", sql, 0);
                    bind_msg(out, "", "", nparams);
                    target_msg(out, b'D', b'P', "");
                    execute_msg(out, "", 0);
                    frame(out, b'S', &[]);
                }
            }
            if out.len() > start {
                last_frame = start;
            }
        }
        p.cuts.sort_by_key(|c| c.0);
        p
    }
}

// ---------------------------------------------------------------------- harness

struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _shutdown: CancellationToken,
}

struct Harness {
    rt: tokio::runtime::Runtime,
    fake: Arc<fake::Fake>,
    /// `[plain, transaction_wrap]`.
    proxies: [Proxy; 2],
    tokens: [String; 2],
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fn config(port: u16, wrap: bool) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
handshake_timeout = "10s"
shutdown_timeout = "1s"
[upstream]
host = "127.0.0.1"
port = {port}
database = "fuzz"
user = "rlsgate_app"
sslmode = "disable"
transaction_wrap = {wrap}
pool_size = 2
checkout_timeout = "5s"
[auth]
hs_secret = "{SECRET}"
tenant_claim = "store_id"
[context]
"app.current_store_id" = "store_id"
"#
    )
}

async fn start_proxy(port: u16, wrap: bool) -> Proxy {
    let config = Config::from_toml(&config(port, wrap)).expect("valid fuzz config");
    let shared = Shared::new(config).await.expect("shared state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    tokio::spawn(app::run(listener, Arc::clone(&shared), shutdown.clone()));
    Proxy {
        addr,
        shared,
        _shutdown: shutdown,
    }
}

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (fake, proxies) = rt.block_on(async {
            let fake = fake::Fake::start().await;
            let plain = start_proxy(fake.port, false).await;
            let wrap = start_proxy(fake.port, true).await;
            (fake, [plain, wrap])
        });
        let exp = jsonwebtoken_exp();
        let tokens = TENANTS.map(|t| {
            rlsgate::auth::mint_hs256(
                SECRET.as_bytes(),
                &serde_json::json!({"store_id": t, "sub": "fuzz", "exp": exp}),
            )
            .expect("mint")
        });
        Harness {
            rt,
            fake,
            proxies,
            tokens,
        }
    })
}

fn jsonwebtoken_exp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 7 * 24 * 3600
}

// ---------------------------------------------------------------------- client

#[derive(Debug, Clone)]
struct Msg {
    tag: u8,
    body: Vec<u8>,
}

impl Msg {
    fn field(&self, f: u8) -> String {
        self.body
            .split(|&b| b == 0)
            .find(|p| p.first() == Some(&f))
            .map(|p| String::from_utf8_lossy(&p[1..]).into_owned())
            .unwrap_or_default()
    }
}

impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tag {
            b'E' | b'N' => write!(
                f,
                "{} {} {} {}",
                self.tag as char,
                self.field(b'S'),
                self.field(b'C'),
                self.field(b'M')
            ),
            b'C' | b'Z' | b'D' => write!(
                f,
                "{} {}",
                self.tag as char,
                String::from_utf8_lossy(&self.body).replace('\0', "")
            ),
            t => write!(f, "{}", t as char),
        }
    }
}

/// Reads frames until the connection ends; `None` at the end.
async fn reader(mut rd: tokio::net::tcp::OwnedReadHalf, tx: mpsc::UnboundedSender<Option<Msg>>) {
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        while buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
            assert!(
                len >= 4,
                "rlsgate sent the client a frame with length {len}"
            );
            if buf.len() < len as usize + 1 {
                break;
            }
            let m = buf.split_to(len as usize + 1);
            let _ = tx.send(Some(Msg {
                tag: m[0],
                body: m[5..].to_vec(),
            }));
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = tx.send(None);
                return;
            }
            Ok(_) => {}
        }
    }
}

async fn login(addr: SocketAddr, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect to rlsgate");
    s.set_nodelay(true).ok();
    let mut body = BytesMut::new();
    body.put_i32(196_608);
    for (k, v) in [("user", "app"), ("database", "fuzz")] {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = (body.len() as i32 + 4).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    let mut b = Vec::new();
    cstr(&mut b, token);
    let mut pw = Vec::new();
    frame(&mut pw, b'p', &b);
    s.write_all(&out).await.expect("startup");
    // AuthenticationCleartextPassword, then everything up to ReadyForQuery
    let mut buf = BytesMut::new();
    let mut sent_password = false;
    loop {
        while buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < len + 1 {
                break;
            }
            let m = buf.split_to(len + 1);
            match m[0] {
                b'R' if !sent_password => {
                    s.write_all(&pw).await.expect("password");
                    sent_password = true;
                }
                b'Z' => return s,
                b'E' => panic!("login refused: {}", String::from_utf8_lossy(&m[5..])),
                _ => {}
            }
        }
        let n = s.read_buf(&mut buf).await.expect("read login");
        assert!(n > 0, "rlsgate closed the connection during login");
    }
}

/// Wait until the proxy's session is gone, it holds no upstream connection, and the fake's open
/// backends are clean (so that what an input leaves behind is found with that input).
async fn settle(h: &Harness, proxy: &Proxy, what: &str) {
    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    while proxy.shared.registry.count() > 0 {
        if tokio::time::Instant::now() > deadline {
            panic!(
                "rlsgate's session still runs {ANSWER_WITHIN:?} after {what}; backends: {:#?}",
                h.fake.open_backends()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while proxy.shared.pool.in_use() > 0 {
        if tokio::time::Instant::now() > deadline {
            panic!(
                "rlsgate still holds {} upstream connection(s) {ANSWER_WITHIN:?} after {what}; backends: {:#?}",
                proxy.shared.pool.in_use(),
                h.fake.open_backends()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // A connection rlsgate closed (the client left mid-transaction) may still hold messages the
    // fake backend has not read: it reads and checks them until it sees the end of the stream,
    // against the tenant of whichever input is current by then. Wait for those backends to
    // finish: the fake keeps no more open backends than the pools hold.
    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    loop {
        let held: usize = h.proxies.iter().map(|p| p.shared.pool.idle_count()).sum();
        let open = h.fake.open_backends().len();
        if open <= held {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{open} fake backends still open {ANSWER_WITHIN:?} after {what}, but the pools hold {held}: {:#?}",
                h.fake.open_backends()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let dirty: Vec<_> = h
            .fake
            .open_backends()
            .into_iter()
            .filter(|b| !b.clean())
            .collect();
        if dirty.is_empty() {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "rlsgate keeps upstream connections the server reports busy after {what} (none is checked out): {dirty:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn check_errors(msgs: &[Msg]) {
    for m in msgs.iter().filter(|m| m.tag == b'E') {
        let code = m.field(b'C');
        assert!(
            code != "08006" && code != "XX000",
            "rlsgate reported {m}: it disagreed with a server that follows the protocol; replies: {}",
            show(msgs)
        );
    }
}

fn show(msgs: &[Msg]) -> String {
    msgs.iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join(" | ")
}

async fn run(h: &Harness, p: Program) {
    let proxy = &h.proxies[usize::from(p.wrap)];
    if std::env::var_os("RLSGATE_FUZZ_TRACE").is_some() {
        eprintln!("program: {}", p.describe());
    }
    settle(h, proxy, "the previous input").await;
    h.fake.prepare(TENANTS[p.tenant], p.eager);
    let stream = login(proxy.addr, &h.tokens[p.tenant]).await;
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(reader(rd, tx));
    let mut msgs: Vec<Msg> = Vec::new();
    let mut closed = false;

    let mut at = 0;
    let mut disconnected = false;
    for &(cut, kind) in &p.cuts {
        let cut = cut.min(p.bytes.len());
        if cut > at {
            let _ = wr.write_all(&p.bytes[at..cut]).await;
            at = cut;
        }
        match kind {
            Cut::Chunk => tokio::task::yield_now().await,
            Cut::Pause => {
                // whatever comes within a moment
                while let Ok(Some(m)) =
                    tokio::time::timeout(Duration::from_millis(2), rx.recv()).await
                {
                    match m {
                        Some(m) => msgs.push(m),
                        None => {
                            closed = true;
                            break;
                        }
                    }
                }
            }
            Cut::Disconnect => {
                disconnected = true;
                break;
            }
        }
        if closed {
            break;
        }
    }
    if disconnected || closed {
        if std::env::var_os("RLSGATE_FUZZ_TRACE").is_some() {
            eprintln!("client left; it saw: {}", show(&msgs));
        }
        drop(wr);
        drop(rx);
        check_errors(&msgs);
        settle(h, proxy, "the client left").await;
        return;
    }
    let _ = wr.write_all(&p.bytes[at..]).await;

    // The end: leave COPY, close the extended unit, end any block, and a marker row.
    let mut end = Vec::new();
    frame(&mut end, b'f', b"fuzz end\0");
    frame(&mut end, b'S', &[]);
    query(&mut end, "ROLLBACK");
    query(&mut end, &format!("SELECT '{END_MARKER}'"));
    let _ = wr.write_all(&end).await;

    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    let mut marker = false;
    let mut finished = false;
    while !finished {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Some(m))) => {
                if m.tag == b'D' && String::from_utf8_lossy(&m.body).contains(END_MARKER) {
                    marker = true;
                } else if m.tag == b'Z' && marker {
                    assert_eq!(
                        m.body,
                        b"I",
                        "the marker's ReadyForQuery is not idle: {}",
                        show(&msgs)
                    );
                    finished = true;
                }
                msgs.push(m);
            }
            Ok(Some(None)) | Ok(None) => {
                closed = true;
                break;
            }
            Err(_) => {
                check_errors(&msgs);
                panic!(
                    "no answer to the closing Sync/ROLLBACK/SELECT within {ANSWER_WITHIN:?}; replies so far: {}\nbackends: {:#?}",
                    show(&msgs),
                    h.fake.open_backends()
                );
            }
        }
    }
    check_errors(&msgs);
    if closed {
        // rlsgate ended the session: it must have said why (FATAL), unless the client did.
        let fatal = msgs
            .iter()
            .any(|m| m.tag == b'E' && m.field(b'S') == "FATAL");
        assert!(
            fatal || p.ends_itself,
            "rlsgate closed the connection without an error; replies: {}",
            show(&msgs)
        );
    } else {
        let mut t = Vec::new();
        frame(&mut t, b'X', &[]);
        let _ = wr.write_all(&t).await;
        loop {
            match tokio::time::timeout(ANSWER_WITHIN, rx.recv()).await {
                Ok(Some(Some(m))) => {
                    panic!(
                        "rlsgate sent {m} after the client's last ReadyForQuery; replies: {}",
                        show(&msgs)
                    )
                }
                Ok(_) => break,
                Err(_) => panic!("rlsgate did not close the connection after Terminate"),
            }
        }
    }
    if std::env::var_os("RLSGATE_FUZZ_TRACE").is_some() {
        eprintln!("client saw: {}", show(&msgs));
        for b in h.fake.open_backends() {
            eprintln!(
                "backend {} (open):\n  {}",
                b.pid,
                Vec::from(b.log).join("\n  ")
            );
        }
    }
    settle(h, proxy, "the client left").await;
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 4096 {
        return;
    }
    let program = Program::decode(data);
    let h = harness();
    h.rt.block_on(run(h, program));
});
