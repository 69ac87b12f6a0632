//! The scripted upstream of the `session` target: a PostgreSQL 15 stand-in on 127.0.0.1 that
//! answers the protocol the way a backend does, with its own encoders and none of rlsgate's code.
//!
//! What it models (postgres.c / xact.c, simplified to what rlsgate can observe):
//! - the transaction block states: none, started (one command or an unsynced extended unit),
//!   implicit block (multi-statement Query), explicit block, aborted block; `finish_xact_command`
//!   after a Query, a Sync, a transaction statement and VACUUM-like statements;
//! - errors: the failed state, skipping to Sync in the extended protocol, 25P02 in an aborted
//!   block for everything but COMMIT/ROLLBACK/ROLLBACK TO, 25P01/25001 for block-only and
//!   no-block statements, savepoints, AND CHAIN, `SELECT 1/0` (22012), syntax errors (42601),
//!   Bind parameter-count mismatches and malformed Bind bodies (08P01), unknown statements and
//!   portals, duplicate names, rlsgate's own `DO $rlsgate$ … RAISE` refusals;
//! - statements and portals (portals die with their transaction), SQL PREPARE/EXECUTE/DEALLOCATE
//!   sharing the protocol's statement namespace, DISCARD ALL;
//! - COPY FROM STDIN (CopyInResponse; Flush and Sync ignored until CopyDone/CopyFail; any other
//!   message fails the COPY) and COPY TO STDOUT; PortalSuspended for Execute row limits;
//! - output buffered until ReadyForQuery, Flush, CopyInResponse, an ErrorResponse or
//!   NoticeResponse (elog.c flushes those) or 8 kB; or flushed after every read when the input
//!   asks for an eager server.
//!
//! Split in three: this file (the server, the connection state, the messages), `sql.rs` (statements
//! classified with pg_query), `xact.rs` (the transaction model, running a statement, the oracle).
//!
//! The oracle it carries: every data statement (SELECT, DML, COPY, EXECUTE, DECLARE, FETCH,
//! EXPLAIN) that runs must run in a transaction whose `app.current_store_id` was set with
//! `SET LOCAL` to the tenant of the client being served. A violation panics.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::sql::{Kind, Stmt, classify};

/// Largest frame rlsgate may send upstream (Postgres' own limit is 1 GB).
const MAX_FRAME: usize = 1 << 30;
/// Postgres flushes its output buffer when it fills (8 kB).
const PQ_BUFFER: usize = 8192;

/// Transaction block state (`TBlockState`, folded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Block {
    #[default]
    Default,
    Started,
    Implicit,
    InProgress,
    Aborted,
}

/// What the checks between inputs see of one backend.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Backend process id (as in BackendKeyData; shown in panic messages).
    #[allow(dead_code)]
    pub pid: i32,
    pub closed: bool,
    pub block: Block,
    pub in_copy: bool,
    pub skipping: bool,
    /// Bytes of output waiting for a flush.
    pub unflushed: usize,
    /// Bytes received and not yet processed (a partial frame).
    pub unread: usize,
    /// The last messages received, for panic messages.
    pub log: VecDeque<String>,
}

impl Status {
    pub fn clean(&self) -> bool {
        self.block == Block::Default
            && !self.in_copy
            && !self.skipping
            && self.unflushed == 0
            && self.unread == 0
    }
}

pub struct Fake {
    pub port: u16,
    backends: Mutex<Vec<Arc<Mutex<Status>>>>,
    /// Tenant of the client rlsgate serves now.
    pub(crate) tenant: Mutex<String>,
    eager: AtomicBool,
    next_pid: AtomicI32,
}

impl Fake {
    pub async fn start() -> Arc<Fake> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake server");
        let fake = Arc::new(Fake {
            port: listener.local_addr().expect("addr").port(),
            backends: Mutex::new(Vec::new()),
            tenant: Mutex::new(String::new()),
            eager: AtomicBool::new(false),
            next_pid: AtomicI32::new(1000),
        });
        let accepting = Arc::clone(&fake);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                tcp.set_nodelay(true).ok();
                let fake = Arc::clone(&accepting);
                tokio::spawn(async move { serve(fake, tcp).await });
            }
        });
        fake
    }

    /// Set up for the next input: whose tenant statements must carry, and the flush policy.
    pub fn prepare(&self, tenant: &str, eager: bool) {
        *self.tenant.lock().unwrap() = tenant.to_string();
        self.eager.store(eager, Ordering::Relaxed);
    }

    /// Backends still open, with their state (closed ones are forgotten).
    pub fn open_backends(&self) -> Vec<Status> {
        let mut all = self.backends.lock().unwrap();
        all.retain(|s| !s.lock().unwrap().closed);
        all.iter().map(|s| s.lock().unwrap().clone()).collect()
    }
}

async fn serve(fake: Arc<Fake>, mut tcp: TcpStream) {
    let mut buf = BytesMut::with_capacity(8192);
    // Startup (an SSLRequest is declined; a CancelRequest is ignored).
    loop {
        while buf.len() < 4 {
            if tcp.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        }
        let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        assert!(
            (8..=10000).contains(&len),
            "rlsgate sent a startup packet of {len} bytes"
        );
        while buf.len() < len {
            if tcp.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        }
        let packet = buf.split_to(len);
        match i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]) {
            80_877_103 => {
                if tcp.write_all(b"N").await.is_err() {
                    return;
                }
            }
            80_877_102 => return,
            196_608 => break,
            v => panic!("rlsgate sent a startup packet with protocol version {v}"),
        }
    }
    let pid = fake.next_pid.fetch_add(1, Ordering::Relaxed);
    let status = Arc::new(Mutex::new(Status {
        pid,
        ..Status::default()
    }));
    fake.backends.lock().unwrap().push(Arc::clone(&status));
    let mut b = Backend::new(Arc::clone(&fake), Arc::clone(&status));
    b.msg(b'R', &0i32.to_be_bytes());
    for (k, v) in [
        ("application_name", "rlsgate"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("IntervalStyle", "postgres"),
        ("is_superuser", "off"),
        ("server_encoding", "UTF8"),
        ("server_version", "15.8"),
        ("session_authorization", "rlsgate_app"),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
    ] {
        b.parameter_status(k, v);
    }
    let mut key = pid.to_be_bytes().to_vec();
    key.extend_from_slice(&0x5eed_i32.to_be_bytes());
    b.msg(b'K', &key);
    b.ready();
    loop {
        if b.flush || b.out.len() >= PQ_BUFFER || fake.eager.load(Ordering::Relaxed) {
            if !b.out.is_empty() && tcp.write_all(&b.out).await.is_err() {
                break;
            }
            b.out.clear();
            b.flush = false;
        }
        b.publish(buf.len());
        if b.closing {
            break;
        }
        match tcp.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        while buf.len() >= 5 && !b.closing {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
            assert!(
                len >= 4 && (len as usize) < MAX_FRAME,
                "rlsgate sent a frame {:?} with length {len} upstream",
                buf[0] as char
            );
            if buf.len() < len as usize + 1 {
                break;
            }
            let tag = buf.get_u8();
            buf.advance(4);
            let body = buf.split_to(len as usize - 4);
            b.message(tag, &body);
        }
    }
    if std::env::var_os("RLSGATE_FUZZ_TRACE").is_some() {
        eprintln!(
            "backend {pid} closed; last messages:\n  {}",
            Vec::from(b.log.clone()).join("\n  ")
        );
    }
    let mut s = status.lock().unwrap();
    s.closed = true;
}

pub(crate) struct PgError {
    code: String,
    message: String,
}

pub(crate) fn err(code: &str, message: impl Into<String>) -> PgError {
    PgError {
        code: code.to_string(),
        message: message.into(),
    }
}

pub(crate) fn aborted() -> PgError {
    err(
        "25P02",
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

pub(crate) enum Done {
    Complete,
    Suspended,
    CopyIn,
}

/// Where a COPY FROM STDIN came from: a Query (its remaining statements run after CopyDone) or
/// an Execute.
pub(crate) enum CopyFrom {
    Query {
        stmts: Arc<Vec<Arc<Stmt>>>,
        next: usize,
    },
    Execute,
}

pub(crate) struct Portal {
    pub(crate) stmt: Arc<Stmt>,
    pub(crate) rows_left: usize,
    pub(crate) done: bool,
}

pub(crate) struct Backend {
    pub(crate) fake: Arc<Fake>,
    pub(crate) status: Arc<Mutex<Status>>,
    pub(crate) out: BytesMut,
    pub(crate) flush: bool,
    pub(crate) closing: bool,
    pub(crate) block: Block,
    /// `app.current_store_id` set by SET LOCAL in the current transaction.
    pub(crate) locals: Option<String>,
    pub(crate) savepoints: Vec<(String, Option<String>)>,
    pub(crate) skip: bool,
    pub(crate) copy: Option<(CopyFrom, usize)>,
    pub(crate) stmts: HashMap<String, Arc<Stmt>>,
    pub(crate) portals: HashMap<String, Portal>,
    pub(crate) log: VecDeque<String>,
}

fn cstr(body: &mut &[u8]) -> Option<String> {
    let end = body.iter().position(|&b| b == 0)?;
    let s = String::from_utf8_lossy(&body[..end]).into_owned();
    *body = &body[end + 1..];
    Some(s)
}

fn i16_(body: &mut &[u8]) -> Option<i16> {
    if body.len() < 2 {
        return None;
    }
    let v = i16::from_be_bytes([body[0], body[1]]);
    *body = &body[2..];
    Some(v)
}

fn i32_(body: &mut &[u8]) -> Option<i32> {
    if body.len() < 4 {
        return None;
    }
    let v = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    *body = &body[4..];
    Some(v)
}

/// Bind: (portal, statement, number of parameter values), or None when malformed.
fn parse_bind(mut body: &[u8]) -> Option<(String, String, usize)> {
    let portal = cstr(&mut body)?;
    let stmt = cstr(&mut body)?;
    let nformats = i16_(&mut body)?;
    for _ in 0..nformats.max(0) {
        i16_(&mut body)?;
    }
    let nparams = i16_(&mut body)?;
    if nparams < 0 || (nformats > 1 && nformats != nparams) {
        return None;
    }
    for _ in 0..nparams {
        let len = i32_(&mut body)?;
        if len > 0 {
            if body.len() < len as usize {
                return None;
            }
            body = &body[len as usize..];
        } else if len < -1 {
            return None;
        }
    }
    let nresults = i16_(&mut body)?;
    for _ in 0..nresults.max(0) {
        i16_(&mut body)?;
    }
    body.is_empty().then_some((portal, stmt, nparams as usize))
}

impl Backend {
    fn new(fake: Arc<Fake>, status: Arc<Mutex<Status>>) -> Backend {
        Backend {
            fake,
            status,
            out: BytesMut::new(),
            flush: false,
            closing: false,
            block: Block::Default,
            locals: None,
            savepoints: Vec::new(),
            skip: false,
            copy: None,
            stmts: HashMap::new(),
            portals: HashMap::new(),
            log: VecDeque::new(),
        }
    }

    fn publish(&self, unread: usize) {
        let mut s = self.status.lock().unwrap();
        s.block = self.block;
        s.in_copy = self.copy.is_some();
        s.skipping = self.skip;
        s.unflushed = if self.flush { 0 } else { self.out.len() };
        s.unread = unread;
        s.log = self.log.clone();
    }

    // ------------------------------------------------------------------ output

    pub(crate) fn msg(&mut self, tag: u8, body: &[u8]) {
        self.out.put_u8(tag);
        self.out.put_i32(body.len() as i32 + 4);
        self.out.put_slice(body);
    }

    pub(crate) fn parameter_status(&mut self, k: &str, v: &str) {
        let body = [k.as_bytes(), b"\0", v.as_bytes(), b"\0"].concat();
        self.msg(b'S', &body);
    }

    pub(crate) fn complete(&mut self, tag: &str) {
        let body = [tag.as_bytes(), b"\0"].concat();
        self.msg(b'C', &body);
    }

    fn notice(&mut self, severity: &str, code: &str, message: &str, tag: u8) {
        let mut body = Vec::new();
        for (f, v) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', message),
        ] {
            body.push(f);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        self.msg(tag, &body);
        // elog.c's send_message_to_frontend flushes errors and notices at once.
        self.flush = true;
    }

    fn error(&mut self, e: &PgError) {
        self.log(format!("-> E {} {}", e.code, e.message));
        self.notice("ERROR", &e.code, &e.message, b'E');
    }

    pub(crate) fn warning(&mut self, code: &str, message: &str) {
        self.notice("WARNING", code, message, b'N');
    }

    fn ready(&mut self) {
        let status = match self.block {
            Block::Default | Block::Started => b'I',
            Block::Implicit | Block::InProgress => b'T',
            Block::Aborted => b'E',
        };
        self.log(format!("-> Z {}", status as char));
        self.msg(b'Z', &[status]);
        self.flush = true;
    }

    pub(crate) fn row_description(&mut self) {
        let mut body = Vec::new();
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(b"?column?\0");
        body.extend_from_slice(&0i32.to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&25i32.to_be_bytes());
        body.extend_from_slice(&(-1i16).to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        self.msg(b'T', &body);
    }

    pub(crate) fn data_row(&mut self, value: &str) {
        let mut body = Vec::new();
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&(value.len() as i32).to_be_bytes());
        body.extend_from_slice(value.as_bytes());
        self.msg(b'D', &body);
    }

    fn log(&mut self, line: String) {
        if self.log.len() >= 48 {
            self.log.pop_front();
        }
        self.log.push_back(line);
    }

    // ------------------------------------------------------------------ messages

    fn message(&mut self, tag: u8, body: &[u8]) {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).replace('\0', "|");
        self.log(format!("<- {} {shown}", tag as char));
        if self.copy.is_some() {
            return self.copy_message(tag, body);
        }
        if self.skip && !matches!(tag, b'S' | b'X') {
            return;
        }
        match tag {
            b'Q' => self.query(body),
            b'P' => self.parse(body),
            b'B' => self.bind(body),
            b'D' => self.describe(body),
            b'E' => self.execute(body),
            b'C' => self.close(body),
            b'S' => {
                self.skip = false;
                self.finish_command();
                self.ready();
            }
            b'H' => self.flush = true,
            b'F' => {
                self.begin_command();
                if self.block == Block::Aborted {
                    self.error(&aborted());
                    self.fail();
                } else {
                    self.msg(b'V', &(-1i32).to_be_bytes());
                    self.finish_command();
                }
                self.ready();
            }
            b'X' => self.closing = true,
            // CopyData/CopyDone/CopyFail outside COPY: ignored, per the protocol.
            b'd' | b'c' | b'f' => {}
            other => panic!(
                "rlsgate sent message type {:?} upstream, which no PostgreSQL backend accepts",
                other as char
            ),
        }
    }

    /// An error in the extended protocol: skip to Sync.
    fn extended_error(&mut self, e: PgError) {
        self.error(&e);
        self.fail();
        self.skip = true;
    }

    fn query(&mut self, body: &[u8]) {
        let Some(sql) = body
            .strip_suffix(b"\0")
            .and_then(|s| std::str::from_utf8(s).ok())
        else {
            self.error(&err("08P01", "invalid string in message"));
            self.fail();
            return self.ready();
        };
        self.begin_command();
        match classify(sql) {
            Err(m) => {
                self.error(&err("42601", m));
                self.fail();
                self.ready();
            }
            Ok(stmts) if stmts.is_empty() => {
                self.msg(b'I', &[]);
                self.finish_command();
                self.ready();
            }
            Ok(stmts) => self.run_query(Arc::new(stmts), 0),
        }
    }

    /// `exec_simple_query` from statement `from` on.
    fn run_query(&mut self, stmts: Arc<Vec<Arc<Stmt>>>, from: usize) {
        let implicit = stmts.len() > 1;
        for i in from..stmts.len() {
            let st = Arc::clone(&stmts[i]);
            self.begin_command();
            if implicit && !st.is_tx() && self.block == Block::Started {
                self.block = Block::Implicit;
            }
            let mut rows = match st.kind {
                Kind::Rows { n, .. } => n,
                _ => 0,
            };
            match self.exec(&st, true, 0, &mut rows) {
                Err(e) => {
                    self.error(&e);
                    self.fail();
                    return self.ready();
                }
                Ok(Done::CopyIn) => {
                    self.copy = Some((
                        CopyFrom::Query {
                            stmts: Arc::clone(&stmts),
                            next: i + 1,
                        },
                        0,
                    ));
                    return;
                }
                Ok(_) => {}
            }
            self.after_query_statement(&st, i + 1 == stmts.len());
        }
        self.ready();
    }

    fn after_query_statement(&mut self, st: &Stmt, last: bool) {
        if last {
            if self.block == Block::Implicit {
                self.block = Block::Started;
            }
            self.finish_command();
        } else if st.is_tx() || st.needs_commit() {
            self.finish_command();
        }
    }

    fn copy_message(&mut self, tag: u8, body: &[u8]) {
        match tag {
            b'd' => {
                if let Some((_, n)) = self.copy.as_mut() {
                    *n += 1;
                }
            }
            b'H' | b'S' => {}
            b'c' => {
                let Some((from, n)) = self.copy.take() else {
                    return;
                };
                self.complete(&format!("COPY {n}"));
                if let CopyFrom::Query { stmts, next } = from {
                    let st = Arc::clone(&stmts[next - 1]);
                    self.after_query_statement(&st, next == stmts.len());
                    self.run_query(stmts, next);
                }
            }
            other => {
                let Some((from, _)) = self.copy.take() else {
                    return;
                };
                let e = if other == b'f' {
                    let why = String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(body))
                        .into_owned();
                    err("57014", format!("COPY from stdin failed: {why}"))
                } else {
                    err(
                        "08P01",
                        format!("unexpected message type 0x{other:02X} during COPY from stdin"),
                    )
                };
                self.error(&e);
                self.fail();
                match from {
                    CopyFrom::Query { .. } => self.ready(),
                    CopyFrom::Execute => self.skip = true,
                }
            }
        }
    }

    fn parse(&mut self, mut body: &[u8]) {
        let (Some(name), Some(sql)) = (cstr(&mut body), cstr(&mut body)) else {
            return self.extended_error(err("08P01", "invalid Parse message"));
        };
        let ntypes = i16_(&mut body).unwrap_or(0).max(0) as usize;
        self.begin_command();
        let st = match classify(&sql) {
            Err(m) => return self.extended_error(err("42601", m)),
            Ok(v) if v.len() > 1 => {
                return self.extended_error(err(
                    "42601",
                    "cannot insert multiple commands into a prepared statement",
                ));
            }
            Ok(mut v) => v.pop().unwrap_or_else(|| Arc::new(Stmt::empty())),
        };
        if self.block == Block::Aborted && st.kind != Kind::Empty && !st.is_exit() {
            return self.extended_error(aborted());
        }
        if !name.is_empty() && self.stmts.contains_key(&name) {
            return self.extended_error(err(
                "42P05",
                format!("prepared statement \"{name}\" already exists"),
            ));
        }
        let st = Arc::new(Stmt {
            text: st.text.clone(),
            kind: st.kind.clone(),
            nparams: st.nparams.max(ntypes),
            fails: st.fails,
        });
        self.stmts.insert(name, st);
        self.msg(b'1', &[]);
    }

    fn bind(&mut self, body: &[u8]) {
        let Some((portal, stmt, nparams)) = parse_bind(body) else {
            return self.extended_error(err("08P01", "insufficient data left in message"));
        };
        self.begin_command();
        let Some(st) = self.stmts.get(&stmt).cloned() else {
            return self.extended_error(err(
                "26000",
                format!("prepared statement \"{stmt}\" does not exist"),
            ));
        };
        if nparams != st.nparams {
            return self.extended_error(err(
                "08P01",
                format!(
                    "bind message supplies {nparams} parameters, but prepared statement \"{stmt}\" requires {}",
                    st.nparams
                ),
            ));
        }
        if self.block == Block::Aborted && !st.is_exit() {
            return self.extended_error(aborted());
        }
        if !portal.is_empty() && self.portals.contains_key(&portal) {
            return self
                .extended_error(err("42P03", format!("cursor \"{portal}\" already exists")));
        }
        let rows_left = match st.kind {
            Kind::Rows { n, .. } => n,
            _ => 1,
        };
        self.portals.insert(
            portal,
            Portal {
                stmt: st,
                rows_left,
                done: false,
            },
        );
        self.msg(b'2', &[]);
    }

    fn describe(&mut self, mut body: &[u8]) {
        let kind = body.first().copied();
        body = body.get(1..).unwrap_or_default();
        let Some(name) = cstr(&mut body) else {
            return self.extended_error(err("08P01", "invalid Describe message"));
        };
        self.begin_command();
        let st = match kind {
            Some(b'S') => match self.stmts.get(&name).cloned() {
                Some(st) => st,
                None => {
                    return self.extended_error(err(
                        "26000",
                        format!("prepared statement \"{name}\" does not exist"),
                    ));
                }
            },
            Some(b'P') => match self.portals.get(&name) {
                Some(p) => Arc::clone(&p.stmt),
                None => {
                    return self
                        .extended_error(err("34000", format!("portal \"{name}\" does not exist")));
                }
            },
            _ => return self.extended_error(err("08P01", "invalid DESCRIBE message subtype")),
        };
        if self.block == Block::Aborted && st.returns_rows() {
            return self.extended_error(aborted());
        }
        if kind == Some(b'S') {
            let mut t = (st.nparams as i16).to_be_bytes().to_vec();
            for _ in 0..st.nparams {
                t.extend_from_slice(&23i32.to_be_bytes());
            }
            self.msg(b't', &t);
        }
        if st.returns_rows() {
            self.row_description();
        } else {
            self.msg(b'n', &[]);
        }
    }

    fn execute(&mut self, mut body: &[u8]) {
        let (Some(name), Some(max_rows)) = (cstr(&mut body), i32_(&mut body)) else {
            return self.extended_error(err("08P01", "invalid Execute message"));
        };
        let Some(portal) = self.portals.get(&name) else {
            return self.extended_error(err("34000", format!("portal \"{name}\" does not exist")));
        };
        let st = Arc::clone(&portal.stmt);
        let (mut rows_left, done) = (portal.rows_left, portal.done);
        self.begin_command();
        if st.kind == Kind::Empty {
            self.msg(b'I', &[]);
            return;
        }
        if self.block == Block::Aborted && !st.is_exit() {
            return self.extended_error(aborted());
        }
        if done && !matches!(st.kind, Kind::Rows { .. }) {
            return self.extended_error(err("55000", format!("portal \"{name}\" cannot be run")));
        }
        match self.exec(&st, false, max_rows, &mut rows_left) {
            Err(e) => self.extended_error(e),
            Ok(outcome) => {
                if let Some(p) = self.portals.get_mut(&name)
                    && Arc::ptr_eq(&p.stmt, &st)
                {
                    p.rows_left = rows_left;
                    p.done = !matches!(outcome, Done::Suspended);
                }
                match outcome {
                    Done::CopyIn => self.copy = Some((CopyFrom::Execute, 0)),
                    Done::Suspended => {}
                    Done::Complete => {
                        if st.is_tx() || st.needs_commit() {
                            self.finish_command();
                        }
                    }
                }
            }
        }
    }

    fn close(&mut self, mut body: &[u8]) {
        let kind = body.first().copied();
        body = body.get(1..).unwrap_or_default();
        let Some(name) = cstr(&mut body) else {
            return self.extended_error(err("08P01", "invalid Close message"));
        };
        self.begin_command();
        match kind {
            Some(b'S') => {
                self.stmts.remove(&name);
            }
            Some(b'P') => {
                self.portals.remove(&name);
            }
            _ => return self.extended_error(err("08P01", "invalid CLOSE message subtype")),
        }
        self.msg(b'3', &[]);
    }
}
