//! Seeded network fuzzer: random client message sequences through the real proxy to a real
//! PostgreSQL, looking for sequences that wedge a pooled server connection, desynchronise the
//! proxy from the server, or leak memory.
//!
//! Each case logs in, sends a random sequence drawn from a grammar of frontend messages (simple
//! Query over a corpus of SQL pieces including transaction control, COPY, cursors, LISTEN, SET and
//! statements the guard denies; Parse/Bind/Describe/Execute/Close/Sync/Flush with valid and
//! invalid names; CopyData/CopyDone/CopyFail; FunctionCall; Terminate; unknown tags) plus
//! mutations (bit flips, tag flips, truncated frames, bad lengths, trailing junk, writes split
//! across TCP packets), while a reader task collects the replies. The case then ends by
//!
//! - `Resync`: CopyFail + Sync + `ROLLBACK` + `SELECT '<marker>'`; a correct proxy answers the
//!   marker (or closes the connection) within a bound: Postgres answers every Sync;
//! - `Abrupt` (drop the socket), `HalfClose` (shutdown write) or `Terminate`.
//!
//! After every case: the session must be gone and its pool connection returned within a bound
//! (a wedged session holds its connection and never sees the disconnect), and a normal client
//! (tokio-postgres) must run `SELECT 1` within a few seconds (pool_size 2). Periodically and at
//! the end: no backend of the proxy's database idle in a transaction, and the RSS bounded.
//!
//! `RLSGATE_FUZZ_SECS` (default 60), `RLSGATE_FUZZ_SEED` (default: time),
//! `RLSGATE_FUZZ_MINIMIZE_SECS` (default 60: automatic minimisation of findings),
//! `RLSGATE_FUZZ_REPLAY` (hex frames, comma-separated, optional `;end=resync|abrupt|...`) for
//! the `replay` test. A failure prints the seed, the case number and the exact bytes.
//!
//! The deterministic regressions at the end of this file are minimal sequences the fuzzer found.

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const POOL_SIZE: usize = 2;

// ---------------------------------------------------------------------------------------------
// PRNG
// ---------------------------------------------------------------------------------------------

/// splitmix64: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Frontend messages
// ---------------------------------------------------------------------------------------------

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// One message of a case: its bytes as sent and a readable label.
#[derive(Clone, Debug)]
struct Item {
    bytes: Vec<u8>,
    label: String,
    /// Cut points: the bytes go out in several writes with a short pause between them.
    splits: Vec<usize>,
    /// Write everything buffered so far after this item (otherwise it is pipelined with the next).
    flush: bool,
    /// Pause after this item (replies are read meanwhile).
    pause_ms: u16,
    /// The SQL of a Query (minimisation drops statements from it).
    sql: Option<String>,
}

impl Item {
    fn new(bytes: Vec<u8>, label: impl Into<String>) -> Item {
        Item {
            bytes,
            label: label.into(),
            splits: Vec::new(),
            flush: true,
            pause_ms: 0,
            sql: None,
        }
    }
}

fn query(sql: &str) -> Item {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    let mut it = Item::new(frame(b'Q', &b), format!("Query({sql:?})"));
    it.sql = Some(sql.to_string());
    it
}

fn parse(name: &str, sql: &str, types: &[u32]) -> Item {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        b.extend_from_slice(&t.to_be_bytes());
    }
    Item::new(
        frame(b'P', &b),
        format!("Parse(name={name:?}, sql={sql:?}, types={types:?})"),
    )
}

/// Bind with text parameters (`None` = NULL) and `result_formats`.
fn bind(portal: &str, stmt: &str, params: &[Option<&str>], result_formats: &[i16]) -> Item {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, stmt);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    b.extend_from_slice(&(result_formats.len() as i16).to_be_bytes());
    for f in result_formats {
        b.extend_from_slice(&f.to_be_bytes());
    }
    Item::new(
        frame(b'B', &b),
        format!(
            "Bind(portal={portal:?}, stmt={stmt:?}, params={params:?}, formats={result_formats:?})"
        ),
    )
}

fn describe(kind: u8, name: &str) -> Item {
    let mut b = vec![kind];
    cstr(&mut b, name);
    Item::new(
        frame(b'D', &b),
        format!("Describe({}, {name:?})", kind as char),
    )
}

fn execute(portal: &str, max_rows: i32) -> Item {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&max_rows.to_be_bytes());
    Item::new(frame(b'E', &b), format!("Execute({portal:?}, {max_rows})"))
}

fn close(kind: u8, name: &str) -> Item {
    let mut b = vec![kind];
    cstr(&mut b, name);
    Item::new(
        frame(b'C', &b),
        format!("Close({}, {name:?})", kind as char),
    )
}

fn sync() -> Item {
    Item::new(frame(b'S', &[]), "Sync")
}

fn flush() -> Item {
    Item::new(frame(b'H', &[]), "Flush")
}

fn copy_data(data: &[u8]) -> Item {
    Item::new(
        frame(b'd', data),
        format!("CopyData({:?})", String::from_utf8_lossy(data)),
    )
}

fn copy_done() -> Item {
    Item::new(frame(b'c', &[]), "CopyDone")
}

fn copy_fail(msg: &str) -> Item {
    let mut b = Vec::new();
    cstr(&mut b, msg);
    Item::new(frame(b'f', &b), format!("CopyFail({msg:?})"))
}

fn function_call(oid: u32, args: &[&[u8]]) -> Item {
    let mut b = oid.to_be_bytes().to_vec();
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(args.len() as i16).to_be_bytes());
    for a in args {
        b.extend_from_slice(&(a.len() as i32).to_be_bytes());
        b.extend_from_slice(a);
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    Item::new(
        frame(b'F', &b),
        format!("FunctionCall(oid={oid}, {} args)", args.len()),
    )
}

fn terminate() -> Item {
    Item::new(frame(b'X', &[]), "Terminate")
}

fn raw(bytes: &[u8], label: &str) -> Item {
    Item::new(bytes.to_vec(), label)
}

// ---------------------------------------------------------------------------------------------
// Grammar
// ---------------------------------------------------------------------------------------------

/// SQL pieces; a Query joins one to four of them.
const PIECES: &[&str] = &[
    "SELECT 1",
    "SELECT 2",
    "SELECT count(*) FROM customers",
    "SELECT name FROM customers ORDER BY 1 LIMIT 3",
    "SELECT pg_sleep(0.02)",
    "SELECT 1/0",
    "SELEC 1",
    "SELECT $1::text",
    "",
    " ",
    "BEGIN",
    "BEGIN ISOLATION LEVEL SERIALIZABLE",
    "START TRANSACTION READ ONLY",
    "COMMIT",
    "END",
    "ROLLBACK",
    "ABORT",
    "COMMIT AND CHAIN",
    "ROLLBACK AND CHAIN",
    "SAVEPOINT a",
    "RELEASE SAVEPOINT a",
    "ROLLBACK TO SAVEPOINT a",
    "PREPARE TRANSACTION 'x'",
    "COMMIT PREPARED 'x'",
    "ROLLBACK PREPARED 'x'",
    "COPY customers (store_id, name) FROM STDIN",
    "COPY customers (store_id, name) FROM STDIN WITH (FORMAT csv)",
    "COPY (SELECT 1) TO STDOUT",
    "COPY customers TO STDOUT",
    "DECLARE c CURSOR FOR SELECT 1",
    "DECLARE c CURSOR WITH HOLD FOR SELECT generate_series(1, 3)",
    "FETCH c",
    "FETCH ALL FROM c",
    "MOVE c",
    "CLOSE c",
    "CLOSE ALL",
    "LISTEN ch",
    "NOTIFY ch, 'x'",
    "UNLISTEN *",
    "SET search_path = public",
    "SET LOCAL search_path = public",
    "SET statement_timeout = '5s'",
    "RESET search_path",
    "SHOW search_path",
    "SET app.current_store_id = 'x'",
    "SET app.current_store_id='x'",
    "RESET app.current_store_id",
    "SELECT set_config('app.current_store_id', 'south', false)",
    "RESET ALL",
    "DISCARD ALL",
    "SET ROLE postgres",
    "DO 'begin null; end'",
    "PREPARE q AS SELECT 1",
    "EXECUTE q",
    "DEALLOCATE q",
    "DEALLOCATE ALL",
    "CREATE TEMP TABLE tt (x int)",
    "INSERT INTO customers (store_id, name) VALUES ('north', 'fuzz')",
    "UPDATE customers SET name = name WHERE customer_id = 1",
    "LOCK TABLE customers IN SHARE MODE",
    "SELECT pg_try_advisory_lock(7)",
    "SELECT pg_advisory_xact_lock(8)",
    "SELECT pg_advisory_unlock_all()",
    "VACUUM stores",
    "SELECT current_setting('app.current_store_id')",
    "SHOW transaction_isolation",
    "SELECT * FROM generate_series(1, 100)",
];

/// Whole Query texts worth sending as they are (shapes the session splits).
const QUERIES: &[&str] = &[
    "BEGIN; SELECT 1; COMMIT; SELECT 2",
    "SELECT 1; SELECT 2",
    "COMMIT; SELECT 1",
    "BEGIN; COPY customers (store_id, name) FROM STDIN; COMMIT",
    "SELECT 1; COPY customers (store_id, name) FROM STDIN",
    "BEGIN; DECLARE c CURSOR FOR SELECT 1; FETCH c; CLOSE c; COMMIT",
    "BEGIN; PREPARE TRANSACTION 'x'",
    "SAVEPOINT a; SELECT 1/0; ROLLBACK TO a; SELECT 1",
    "SELECT 1; SET app.current_store_id='x'; SELECT 2",
    "BEGIN; SELECT 1/0; COMMIT; SELECT 3",
    "ROLLBACK; BEGIN; SELECT 1",
    "VACUUM stores; SELECT 1",
    "SELECT 1 -- comment",
    "/* c */ BEGIN; SELECT 1",
];

const NAMES: &[&str] = &["", "", "s1", "s2", "q", "nope", "rg_0123456789abcdef"];
const PORTALS: &[&str] = &["", "", "p1", "c", "nope"];
const COPY_ROWS: &[&[u8]] = &[
    b"north\tfuzz\n",
    b"north,fuzz\n",
    b"south\tother tenant\n",
    b"garbage",
    b"\\.\n",
    b"",
];
const FN_OIDS: &[u32] = &[2078, 764, 952, 1299, 0, 1, 4_294_967_295];

fn sql_piece(rng: &mut Rng) -> String {
    if rng.chance(25) {
        return rng.pick(QUERIES).to_string();
    }
    let n = 1 + rng.below(3);
    let mut parts: Vec<&str> = (0..n).map(|_| rng.pick(PIECES)).collect();
    if rng.chance(10) {
        parts.push("");
    }
    parts.join("; ")
}

fn one_statement(rng: &mut Rng) -> String {
    if rng.chance(10) {
        sql_piece(rng)
    } else {
        rng.pick(PIECES).to_string()
    }
}

fn random_item(rng: &mut Rng) -> Item {
    let r = rng.below(100);
    match r {
        0..=23 => query(&sql_piece(rng)),
        24..=35 => {
            let sql = one_statement(rng);
            let types: &[u32] = match rng.below(6) {
                0 => &[25],
                1 => &[0],
                2 => &[4_294_967_295],
                _ => &[],
            };
            parse(rng.pick(NAMES), &sql, types)
        }
        36..=47 => {
            let params: &[Option<&str>] = match rng.below(6) {
                0 => &[Some("x")],
                1 => &[None],
                2 => &[Some("a"), Some("b")],
                _ => &[],
            };
            let formats: &[i16] = match rng.below(8) {
                0 => &[1],
                1 => &[7],
                _ => &[],
            };
            bind(rng.pick(PORTALS), rng.pick(NAMES), params, formats)
        }
        48..=52 => {
            if rng.chance(50) {
                describe(b'S', rng.pick(NAMES))
            } else {
                describe(b'P', rng.pick(PORTALS))
            }
        }
        53..=64 => execute(rng.pick(PORTALS), rng.pick(&[0, 0, 1, 2, -1])),
        65..=68 => {
            if rng.chance(50) {
                close(b'S', rng.pick(NAMES))
            } else {
                close(b'P', rng.pick(PORTALS))
            }
        }
        69..=78 => sync(),
        79..=82 => flush(),
        83..=88 => copy_data(rng.pick(COPY_ROWS)),
        89..=91 => copy_done(),
        92..=93 => copy_fail("fuzz"),
        94..=96 => {
            let oid = rng.pick(FN_OIDS);
            let args: Vec<&[u8]> = match rng.below(3) {
                0 => vec![],
                1 => vec![b"app.current_store_id", b"south", b"false"],
                _ => vec![b"\x00\x00\x00\x01"],
            };
            function_call(oid, &args)
        }
        97 => terminate(),
        _ => {
            // unknown or out-of-place tags with random bodies
            let tag = rng.pick(&[b'z', b'?', b'p', b'\0', b'R', b'Z', b'T', 0xff, b'v']);
            let n = rng.below(12);
            let body = rng.bytes(n);
            let mut it = Item::new(frame(tag, &body), "");
            it.label = format!("Frame(tag={:?}, {n} random bytes)", tag as char);
            it
        }
    }
}

/// A message that fails in the extended protocol, so the server skips everything up to Sync.
fn error_opener(rng: &mut Rng) -> Item {
    match rng.below(5) {
        0 | 1 => execute(rng.pick(PORTALS), 0),
        2 => bind("", "nope", &[], &[]),
        3 => parse("", "SELEC 1", &[]),
        _ => describe(b'S', "nope"),
    }
}

/// How a case ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// CopyFail + Sync + ROLLBACK + marker query; the marker must come back (or the connection close).
    Resync,
    /// Drop the socket.
    Abrupt,
    /// Shut down the write side, read for a moment, drop.
    HalfClose,
    /// Send Terminate, drop.
    Terminate,
}

#[derive(Clone, Debug)]
struct Case {
    items: Vec<Item>,
    end: End,
    /// Framing intact (no truncation, bad lengths or junk between frames).
    framed: bool,
    /// Any mutation at all.
    mutated: bool,
}

fn mutate(rng: &mut Rng, items: &mut Vec<Item>) -> bool {
    let i = rng.below(items.len());
    let it = &mut items[i];
    let len = it.bytes.len();
    match rng.below(6) {
        0 if len > 5 => {
            let pos = 5 + rng.below(len - 5);
            let bit = rng.below(8);
            it.bytes[pos] ^= 1 << bit;
            it.label
                .push_str(&format!(" [bitflip byte {pos} bit {bit}]"));
            true
        }
        1 if len > 0 => {
            let tag = rng.next() as u8;
            it.bytes[0] = tag;
            it.label.push_str(&format!(" [tag -> {:?}]", tag as char));
            true
        }
        2 if len > 0 => {
            let keep = rng.below(len);
            it.bytes.truncate(keep);
            it.label.push_str(&format!(" [truncated to {keep}]"));
            false
        }
        3 => {
            let declared: i32 = match rng.below(7) {
                0 => 0,
                1 => 3,
                2 => -1,
                3 => i32::MAX,
                4 => len as i32 - 2,
                5 => len as i32,
                _ => 0x0100_0000 + rng.below(1 << 20) as i32,
            };
            if len >= 5 {
                it.bytes[1..5].copy_from_slice(&declared.to_be_bytes());
            }
            it.label.push_str(&format!(" [length -> {declared}]"));
            false
        }
        4 => {
            let n = 1 + rng.below(8);
            let junk = rng.bytes(n);
            it.bytes.extend_from_slice(&junk);
            it.label.push_str(&format!(" [+{n} junk bytes]"));
            false
        }
        _ => {
            let dup = it.clone();
            items.insert(i, dup);
            true
        }
    }
}

fn random_case(rng: &mut Rng) -> Case {
    let n = 1 + rng.below(8);
    let mut items: Vec<Item> = (0..n).map(|_| random_item(rng)).collect();
    if rng.chance(30) {
        items.insert(0, error_opener(rng));
    }
    let mut framed = true;
    let mut mutated = false;
    if rng.chance(12) {
        let k = 1 + rng.below(2);
        for _ in 0..k {
            mutated = true;
            framed &= mutate(rng, &mut items);
        }
    }
    for it in &mut items {
        it.flush = rng.chance(60);
        it.pause_ms = match rng.below(10) {
            0..=5 => 0,
            6..=8 => rng.below(15) as u16,
            _ => 30 + rng.below(120) as u16,
        };
        if it.bytes.len() > 1 && rng.chance(8) {
            let cuts = 1 + rng.below(3);
            let mut s: Vec<usize> = (0..cuts)
                .map(|_| 1 + rng.below(it.bytes.len() - 1))
                .collect();
            s.sort();
            s.dedup();
            it.splits = s;
        }
    }
    let end = if !framed {
        rng.pick(&[End::Abrupt, End::Abrupt, End::HalfClose])
    } else {
        match rng.below(10) {
            0..=5 => End::Resync,
            6 | 7 => End::Abrupt,
            8 => End::HalfClose,
            _ => End::Terminate,
        }
    };
    Case {
        items,
        end,
        framed,
        mutated,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    s.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

fn describe_case(case: &Case) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  end={:?} framed={} mutated={}",
        case.end, case.framed, case.mutated
    );
    for (i, it) in case.items.iter().enumerate() {
        let _ = writeln!(
            s,
            "  [{i}] {}{}{}{}",
            it.label,
            if it.flush { "" } else { " (pipelined)" },
            if it.splits.is_empty() {
                String::new()
            } else {
                format!(" (split at {:?})", it.splits)
            },
            if it.pause_ms > 0 {
                format!(" (pause {}ms)", it.pause_ms)
            } else {
                String::new()
            }
        );
        let _ = writeln!(s, "      hex: {}", hex(&it.bytes));
        let _ = writeln!(s, "      txt: {}", printable(&it.bytes));
    }
    let _ = writeln!(
        s,
        "  replay: RLSGATE_FUZZ_REPLAY='{};end={}' cargo test --release --test net_fuzz replay -- --ignored --nocapture",
        case.items
            .iter()
            .map(|i| hex(&i.bytes))
            .collect::<Vec<_>>()
            .join(","),
        format!("{:?}", case.end).to_lowercase()
    );
    s
}

// ---------------------------------------------------------------------------------------------
// Client connection with a reader task
// ---------------------------------------------------------------------------------------------

enum Ev {
    Msg(Msg),
    Closed(String),
}

struct Conn {
    w: tokio::net::tcp::OwnedWriteHalf,
    rx: mpsc::UnboundedReceiver<Ev>,
    got: Vec<Msg>,
    closed: Option<String>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn split_msgs(buf: &mut Vec<u8>) -> Vec<Msg> {
    let mut out = Vec::new();
    loop {
        if buf.len() < 5 {
            return out;
        }
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < len + 1 {
            return out;
        }
        let m: Vec<u8> = buf.drain(..len + 1).collect();
        out.push(Msg {
            tag: m[0] as char,
            body: m[5..].to_vec(),
        });
    }
}

impl Conn {
    async fn login(proxy: &Proxy, token: &str) -> Result<Conn, String> {
        let mut s = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(proxy.addr),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).ok();
        let startup = startup_packet(196_608, &[("user", "app"), ("database", proxy.db.as_str())]);
        s.write_all(&startup).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut sent_pw = false;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for m in split_msgs(&mut buf) {
                match m.tag {
                    'R' if !sent_pw => {
                        let mut pw = token.as_bytes().to_vec();
                        pw.push(0);
                        s.write_all(&frame(b'p', &pw))
                            .await
                            .map_err(|e| e.to_string())?;
                        sent_pw = true;
                    }
                    'E' => return Err(format!("login refused: {}", m.field(b'M'))),
                    'Z' => {
                        let (r, w) = s.into_split();
                        let (tx, rx) = mpsc::unbounded_channel();
                        let rest = buf;
                        let reader = tokio::spawn(read_loop(r, rest, tx));
                        return Ok(Conn {
                            w,
                            rx,
                            got: Vec::new(),
                            closed: None,
                            reader,
                        });
                    }
                    _ => {}
                }
            }
            let mut chunk = [0u8; 4096];
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, s.read(&mut chunk))
                .await
                .map_err(|_| "login timed out".to_string())?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed during login".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        match tokio::time::timeout(Duration::from_secs(3), self.w.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write: {e}")),
            Err(_) => Err("write stalled 3s (proxy not reading)".into()),
        }
    }

    fn take(&mut self, ev: Ev) {
        match ev {
            Ev::Msg(m) => self.got.push(m),
            Ev::Closed(why) => self.closed = Some(why),
        }
    }

    fn drain(&mut self) {
        while let Ok(ev) = self.rx.try_recv() {
            self.take(ev);
        }
    }

    /// Wait until a received message satisfies `pred` (true), the connection closes or the
    /// deadline passes (false).
    async fn wait_for(&mut self, pred: impl Fn(&Msg) -> bool, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            self.drain();
            if self.got.iter().any(&pred) {
                return true;
            }
            if self.closed.is_some() {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(ev)) => self.take(ev),
                Ok(None) => {
                    self.closed.get_or_insert_with(|| "reader gone".into());
                }
                Err(_) => return false,
            }
        }
    }
}

async fn read_loop(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut buf: Vec<u8>,
    tx: mpsc::UnboundedSender<Ev>,
) {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        for m in split_msgs(&mut buf) {
            if tx.send(Ev::Msg(m)).is_err() {
                return;
            }
        }
        match r.read(&mut chunk).await {
            Ok(0) => {
                let _ = tx.send(Ev::Closed("eof".into()));
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                let _ = tx.send(Ev::Closed(e.to_string()));
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Timeouts {
    /// Resync marker after Sync.
    sync: Duration,
    /// Session gone and pool connection back after the client left.
    cleanup: Duration,
    /// A normal client's `SELECT 1`.
    health: Duration,
    /// Return at the first failure (minimisation: only whether it fails matters).
    stop_early: bool,
}

const NORMAL: Timeouts = Timeouts {
    sync: Duration::from_secs(5),
    cleanup: Duration::from_secs(5),
    health: Duration::from_secs(5),
    stop_early: false,
};

const QUICK: Timeouts = Timeouts {
    sync: Duration::from_secs(2),
    cleanup: Duration::from_secs(2),
    health: Duration::from_secs(3),
    stop_early: true,
};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    Login(String),
    /// After Sync (+ROLLBACK + marker query) nothing came back and the connection stayed open.
    NoReadyAfterSync,
    /// The proxy answered after Sync but `ROLLBACK` did not get the session out of its
    /// transaction: the marker query failed (the errors it got are listed).
    NoRecovery(String),
    /// The proxy told the client it lost the upstream although the upstream is fine.
    Desync(String),
    /// The session (and its pool connection) outlived the client.
    SessionOutlivesClient(String),
    /// A normal client could not run SELECT 1.
    Health(String),
}

impl Failure {
    fn kind(&self) -> &'static str {
        match self {
            Failure::Login(_) => "login",
            Failure::NoReadyAfterSync => "no-ready-after-sync",
            Failure::NoRecovery(_) => "no-recovery",
            Failure::Desync(_) => "desync",
            Failure::SessionOutlivesClient(_) => "session-outlives-client",
            Failure::Health(_) => "health",
        }
    }

    /// Wedges show up as any of these, depending on how the case ends.
    fn family(&self) -> &'static str {
        match self {
            Failure::NoReadyAfterSync | Failure::SessionOutlivesClient(_) | Failure::Health(_) => {
                "wedge"
            }
            other => other.kind(),
        }
    }
}

#[derive(Default)]
struct CaseReport {
    failures: Vec<Failure>,
    /// FATAL/ERROR lines (severity code message) sent to the client.
    errors: Vec<String>,
    closed_by_proxy: bool,
    reached_marker: bool,
    tags: String,
}

fn error_line(m: &Msg) -> String {
    let sev = {
        let v = m.field(b'V');
        if v.is_empty() { m.field(b'S') } else { v }
    };
    let detail = m.field(b'D');
    format!(
        "{sev} {} {}{}",
        m.code(),
        m.field(b'M'),
        if detail.is_empty() {
            String::new()
        } else {
            format!(" ({detail})")
        }
    )
}

async fn run_case(
    proxy: &Proxy,
    token: &str,
    case: &Case,
    marker: &str,
    t: Timeouts,
) -> CaseReport {
    let mut rep = CaseReport::default();
    let mut conn = match Conn::login(proxy, token).await {
        Ok(c) => c,
        Err(e) => {
            rep.failures.push(Failure::Login(e));
            return rep;
        }
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut write_failed = false;
    for it in &case.items {
        if write_failed {
            break;
        }
        if it.splits.is_empty() {
            pending.extend_from_slice(&it.bytes);
            if it.flush {
                let out = std::mem::take(&mut pending);
                write_failed = conn.write(&out).await.is_err();
            }
        } else {
            let out = std::mem::take(&mut pending);
            if !out.is_empty() {
                write_failed = conn.write(&out).await.is_err();
            }
            let mut at = 0;
            for &cut in it.splits.iter().chain(std::iter::once(&it.bytes.len())) {
                if write_failed {
                    break;
                }
                write_failed = conn.write(&it.bytes[at..cut]).await.is_err();
                at = cut;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        if it.pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(it.pause_ms.into())).await;
        }
    }
    if !pending.is_empty() && !write_failed {
        write_failed = conn.write(&pending).await.is_err();
    }
    match case.end {
        End::Resync if !write_failed => {
            let mut tail = copy_fail("fuzz resync").bytes;
            tail.extend_from_slice(&sync().bytes);
            tail.extend_from_slice(&query("ROLLBACK").bytes);
            tail.extend_from_slice(&query(&format!("SELECT '{marker}'")).bytes);
            let sent_at = {
                conn.drain();
                conn.got.len()
            };
            if conn.write(&tail).await.is_ok() {
                let needle = marker.as_bytes().to_vec();
                let found = conn
                    .wait_for(
                        |m| m.tag == 'D' && m.body.windows(needle.len()).any(|w| w == needle),
                        t.sync,
                    )
                    .await;
                rep.reached_marker = found;
                let after: Vec<&Msg> = conn.got[sent_at..].iter().collect();
                if !found && conn.closed.is_none() && after.iter().any(|m| m.tag == 'Z') {
                    let errors: Vec<String> = after
                        .iter()
                        .filter(|m| m.tag == 'E')
                        .map(|m| error_line(m))
                        .collect();
                    rep.failures.push(Failure::NoRecovery(format!(
                        "replies since CopyFail+Sync+ROLLBACK+marker were sent (may include late ones): {}; errors {errors:?}",
                        tags(&conn.got[sent_at..])
                    )));
                } else if !found && conn.closed.is_none() {
                    rep.failures.push(Failure::NoReadyAfterSync);
                    if t.stop_early {
                        return rep;
                    }
                }
            }
        }
        End::Terminate if !write_failed => {
            let _ = conn.write(&terminate().bytes).await;
            conn.wait_for(|_| false, Duration::from_millis(300)).await;
        }
        End::HalfClose => {
            let _ = conn.w.shutdown().await;
            conn.wait_for(|_| false, Duration::from_millis(300)).await;
        }
        _ => {
            // let replies to the last messages arrive (they are part of the transcript)
            conn.wait_for(|_| false, Duration::from_millis(5)).await;
        }
    }
    conn.drain();
    rep.closed_by_proxy = conn.closed.is_some();
    rep.tags = tags(&conn.got);
    for m in conn.got.iter().filter(|m| m.tag == 'E') {
        let line = error_line(m);
        let code = m.code();
        // XX000 from the server itself (e.g. "cache lookup failed") is not rlsgate's
        let desync = (code == "XX000" && line.contains("rlsgate"))
            || (code == "08006"
                && (line.contains("protocol violation") || line.contains("unsolicited")));
        if desync {
            rep.failures.push(Failure::Desync(line.clone()));
        }
        rep.errors.push(line);
    }
    drop(conn);
    if t.stop_early && !rep.failures.is_empty() {
        return rep;
    }

    // the session must notice the client is gone and give its connection back
    let deadline = Instant::now() + t.cleanup;
    loop {
        let clients = proxy.shared.registry.clients().len();
        let in_use = proxy.shared.pool.in_use();
        if clients == 0 && in_use == 0 {
            break;
        }
        if Instant::now() >= deadline {
            rep.failures.push(Failure::SessionOutlivesClient(format!(
                "{clients} session(s) alive, {in_use} pool connection(s) checked out {}s after the client left",
                t.cleanup.as_secs()
            )));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // a normal client still gets a connection
    let health = tokio::time::timeout(t.health, async {
        let c = connect(proxy, token).await.map_err(|e| message(&e))?;
        c.simple_query("SELECT 1").await.map_err(|e| message(&e))?;
        Ok::<_, String>(())
    })
    .await;
    match health {
        Ok(Ok(())) => {}
        Ok(Err(e)) => rep.failures.push(Failure::Health(e)),
        Err(_) => rep.failures.push(Failure::Health(format!(
            "SELECT 1 did not complete within {}s",
            t.health.as_secs()
        ))),
    }
    rep
}

// ---------------------------------------------------------------------------------------------
// Harness: one database, a proxy that is replaced when a case wedged it
// ---------------------------------------------------------------------------------------------

struct Harness {
    db: String,
    proxy: Proxy,
    token: String,
    restarts: usize,
}

async fn blocking_admin_sql(db: &str, sql: &str) -> String {
    let (db, sql) = (db.to_string(), sql.to_string());
    tokio::task::spawn_blocking(move || admin_sql(&db, &sql))
        .await
        .expect("admin sql task")
}

impl Harness {
    async fn new() -> Harness {
        let db = tokio::task::spawn_blocking(demo_db).await.unwrap();
        let proxy = start_proxy_with(&db, &config_text(&db, POOL_SIZE, "")).await;
        Harness {
            db,
            proxy,
            token: token("north"),
            restarts: 0,
        }
    }

    /// A fresh proxy; the old one is abandoned and its upstream backends terminated.
    async fn restart(&mut self) {
        self.proxy.shutdown.cancel();
        blocking_admin_sql(
            &self.db,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND usename = 'rlsgate_app'",
        )
        .await;
        let proxy = start_proxy_with(&self.db, &config_text(&self.db, POOL_SIZE, "")).await;
        let old = std::mem::replace(&mut self.proxy, proxy);
        drop(old);
        self.restarts += 1;
    }

    /// Backends of this database stuck in a transaction while nobody uses the proxy.
    async fn stuck_backends(&self) -> String {
        blocking_admin_sql(
            &self.db,
            "SELECT coalesce(string_agg(pid || ':' || state || ':' || coalesce(wait_event, '') \
             || ':' || left(query, 60), ' | '), '') FROM pg_stat_activity \
             WHERE datname = current_database() AND usename = 'rlsgate_app' \
             AND (state LIKE 'idle in transaction%' \
                  OR (xact_start IS NOT NULL AND wait_event = 'ClientRead'))",
        )
        .await
    }

    async fn run(&mut self, case: &Case, marker: &str, t: Timeouts) -> CaseReport {
        let rep = run_case(&self.proxy, &self.token, case, marker, t).await;
        if !rep.failures.is_empty() {
            self.restart().await;
        }
        rep
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

struct Finding {
    case_no: u64,
    failure: Failure,
    case: Case,
    tags: String,
    errors: Vec<String>,
}

/// Remove items (and simplify the ending) while the case still fails with the same kind.
async fn minimize(h: &mut Harness, f: &Finding, budget: Duration) -> (Case, usize) {
    let start = Instant::now();
    let family = f.failure.family();
    let mut best = f.case.clone();
    let mut trials = 0usize;
    let fails = |rep: &CaseReport| rep.failures.iter().any(|x| x.family() == family);
    // canonical writes first: one write per item, no pauses, if that still fails
    let mut plain = best.clone();
    for it in &mut plain.items {
        it.splits.clear();
        it.pause_ms = 0;
        it.flush = true;
    }
    trials += 1;
    if fails(&h.run(&plain, "fuzz_min", QUICK).await) {
        best = plain;
    }
    let mut changed = true;
    while changed && start.elapsed() < budget {
        changed = false;
        let mut i = best.items.len();
        while i > 0 && start.elapsed() < budget {
            i -= 1;
            if best.items.len() == 1 {
                break;
            }
            let mut cand = best.clone();
            cand.items.remove(i);
            trials += 1;
            if fails(&h.run(&cand, "fuzz_min", QUICK).await) {
                best = cand;
                changed = true;
            }
        }
    }
    // fewer statements in each Query
    let mut i = 0;
    while i < best.items.len() && start.elapsed() < budget {
        let Some(sql) = best.items[i].sql.clone() else {
            i += 1;
            continue;
        };
        let parts: Vec<&str> = sql.split(';').collect();
        let mut reduced = false;
        if parts.len() > 1 {
            for j in (0..parts.len()).rev() {
                let mut fewer = parts.clone();
                fewer.remove(j);
                let text = fewer.join(";").trim().to_string();
                let mut cand = best.clone();
                let old = &cand.items[i];
                let mut it = query(&text);
                it.flush = old.flush;
                it.pause_ms = old.pause_ms;
                cand.items[i] = it;
                trials += 1;
                if fails(&h.run(&cand, "fuzz_min", QUICK).await) {
                    best = cand;
                    reduced = true;
                    break;
                }
            }
        }
        if !reduced {
            i += 1;
        }
    }
    // a simpler ending, if it still fails
    for end in [End::Abrupt, End::Resync] {
        if best.end != end && start.elapsed() < budget && (best.framed || end == End::Abrupt) {
            let mut cand = best.clone();
            cand.end = end;
            trials += 1;
            if fails(&h.run(&cand, "fuzz_min", QUICK).await) {
                best = cand;
                break;
            }
        }
    }
    best.mutated = best.items.iter().any(|i| i.label.contains(" ["));
    (best, trials)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_fuzz() {
    let secs = env_u64("RLSGATE_FUZZ_SECS").unwrap_or(60);
    let min_secs = env_u64("RLSGATE_FUZZ_MINIMIZE_SECS").unwrap_or(60);
    let seed = env_u64("RLSGATE_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!("net_fuzz: seed {seed} (RLSGATE_FUZZ_SEED={seed}), {secs}s");
    let started = Instant::now();
    let budget = Duration::from_secs(secs);
    let mut h = Harness::new().await;
    let mut rng = Rng(seed);

    // warm-up: first connections opened, then the baseline RSS
    let warm = Case {
        items: vec![query("SELECT 1")],
        end: End::Resync,
        framed: true,
        mutated: false,
    };
    let rep = h.run(&warm, "warm", NORMAL).await;
    assert!(
        rep.failures.is_empty(),
        "warm-up failed: {:?}",
        rep.failures
    );
    let rss_start = rss_kb();
    let mut rss_max = rss_start;

    let mut findings: Vec<Finding> = Vec::new();
    let mut stuck: Vec<String> = Vec::new();
    let mut error_counts: BTreeMap<String, usize> = BTreeMap::new();
    let (mut cases, mut resyncs, mut closed, mut mutated) = (0u64, 0u64, 0u64, 0u64);
    let mut per_kind: BTreeMap<&'static str, usize> = BTreeMap::new();
    while started.elapsed() < budget {
        let case = random_case(&mut rng);
        let case_no = cases;
        cases += 1;
        mutated += u64::from(case.mutated);
        let marker = format!("fuzz_end_{case_no}");
        let rep = h.run(&case, &marker, NORMAL).await;
        resyncs += u64::from(rep.reached_marker);
        closed += u64::from(rep.closed_by_proxy);
        for e in &rep.errors {
            // counts by severity + code + message without variable parts
            let key: String = e.chars().take(110).collect();
            *error_counts.entry(key).or_default() += 1;
        }
        rss_max = rss_max.max(rss_kb());
        if let Some(first) = rep.failures.first() {
            *per_kind.entry(first.kind()).or_default() += 1;
            println!(
                "\n=== FINDING seed {seed} case {case_no}: {:?}\n  replies: {}\n  errors: {:?}\n{}",
                rep.failures,
                rep.tags,
                rep.errors,
                describe_case(&case)
            );
            findings.push(Finding {
                case_no,
                failure: first.clone(),
                case,
                tags: rep.tags,
                errors: rep.errors,
            });
            if findings.len() >= 40 {
                println!("net_fuzz: 40 findings, stopping early");
                break;
            }
        } else if cases % 50 == 0 {
            let s = h.stuck_backends().await;
            if !s.is_empty() {
                println!("=== STUCK BACKENDS after case {case_no}: {s}");
                stuck.push(format!("after case {case_no}: {s}"));
                h.restart().await;
            }
        }
    }
    let fuzz_time = started.elapsed();
    let s = h.stuck_backends().await;
    if !s.is_empty() && findings.is_empty() {
        stuck.push(format!("at the end: {s}"));
    }
    let rss_end = rss_kb();

    println!(
        "\nnet_fuzz: seed {seed}: {cases} cases in {:.1}s ({mutated} mutated), {resyncs} resynced, \
         {closed} closed by the proxy, {} findings {per_kind:?}, {} proxy restarts",
        fuzz_time.as_secs_f64(),
        findings.len(),
        h.restarts
    );
    println!(
        "net_fuzz: RSS start {} MiB, max {} MiB, end {} MiB",
        rss_start / 1024,
        rss_max / 1024,
        rss_end / 1024
    );
    println!("net_fuzz: errors sent to the client (count, severity code message):");
    for (k, n) in &error_counts {
        println!("  {n:6}  {k}");
    }

    // minimise findings while the budget lasts; print each distinct minimal sequence once
    let mut minimized: Vec<String> = Vec::new();
    if !findings.is_empty() && min_secs > 0 {
        let min_start = Instant::now();
        for f in &findings {
            let left = Duration::from_secs(min_secs).saturating_sub(min_start.elapsed());
            if left.is_zero() {
                println!("net_fuzz: minimisation budget spent (RLSGATE_FUZZ_MINIMIZE_SECS)");
                break;
            }
            let (min, trials) = minimize(&mut h, f, left.min(Duration::from_secs(40))).await;
            let sig: String = min
                .items
                .iter()
                .map(|i| i.label.as_str())
                .collect::<Vec<_>>()
                .join(" | ");
            let sig = format!("{:?} {sig}", min.end);
            if minimized.contains(&sig) {
                println!(
                    "=== case {} minimises to an earlier sequence: {sig}",
                    f.case_no
                );
                continue;
            }
            // confirm with the normal bounds
            let rep = h.run(&min, "fuzz_confirm", NORMAL).await;
            println!(
                "\n=== MINIMISED case {} ({}), {} trials, confirmed: {:?}\n{}",
                f.case_no,
                f.failure.family(),
                trials,
                rep.failures,
                describe_case(&min)
            );
            minimized.push(sig);
        }
        println!("\nnet_fuzz: distinct minimal sequences:");
        for m in &minimized {
            println!("  {m}");
        }
    }
    h.proxy.stop().await;

    let growth_mb = rss_max.saturating_sub(rss_start) / 1024;
    let mut problems = Vec::new();
    if !findings.is_empty() {
        problems.push(format!(
            "{} failing cases (first: case {} {:?}; replies {}; errors {:?})",
            findings.len(),
            findings[0].case_no,
            findings[0].failure,
            findings[0].tags,
            findings[0].errors
        ));
    }
    if !stuck.is_empty() {
        problems.push(format!("backends stuck in a transaction: {stuck:?}"));
    }
    if growth_mb > 512 {
        problems.push(format!("RSS grew by {growth_mb} MiB"));
    }
    assert!(
        problems.is_empty(),
        "net_fuzz seed {seed} (RLSGATE_FUZZ_SEED={seed}): {}",
        problems.join("; ")
    );
}

/// Replay a printed case: `RLSGATE_FUZZ_REPLAY='<hex>,<hex>,...;end=resync'`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "manual: replays RLSGATE_FUZZ_REPLAY"]
async fn replay() {
    let Ok(spec) = std::env::var("RLSGATE_FUZZ_REPLAY") else {
        println!("set RLSGATE_FUZZ_REPLAY");
        return;
    };
    let (frames, end) = spec
        .split_once(";end=")
        .unwrap_or((spec.as_str(), "resync"));
    let end = match end.trim() {
        "abrupt" => End::Abrupt,
        "halfclose" => End::HalfClose,
        "terminate" => End::Terminate,
        _ => End::Resync,
    };
    let items = frames
        .split(',')
        .map(|h| {
            let b = unhex(h);
            let label = printable(&b);
            raw(&b, &label)
        })
        .collect();
    check(items, end).await;
}

// ---------------------------------------------------------------------------------------------
// Deterministic regressions (minimal sequences found by the fuzzer)
// ---------------------------------------------------------------------------------------------

/// Run `items` (each written as its own write) on a fresh proxy with pool_size 2 and end the way
/// given; panics with the transcript on any failure.
async fn check(items: Vec<Item>, end: End) {
    let mut h = Harness::new().await;
    let case = Case {
        items,
        end,
        framed: true,
        mutated: false,
    };
    let rep = run_case(&h.proxy, &h.token, &case, "fuzz_regression", NORMAL).await;
    let failed = !rep.failures.is_empty();
    let stuck = h.stuck_backends().await;
    if failed {
        h.restart().await;
    }
    h.proxy.stop().await;
    assert!(
        !failed && stuck.is_empty(),
        "{:?}; stuck backends: {stuck:?}\n  replies: {}\n  errors: {:?}\n{}",
        rep.failures,
        rep.tags,
        rep.errors,
        describe_case(&case)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_harness_passes_a_plain_sequence() {
    check(
        vec![
            parse("", "SELECT 1", &[]),
            bind("", "", &[], &[]),
            execute("", 0),
            sync(),
            query("BEGIN; SELECT 1; COMMIT; SELECT 2"),
        ],
        End::Resync,
    )
    .await;
}

// Found by seed 1 before 53584a4 (the session stopped reading the client while waiting for
// replies to Queries the server skips after an extended-protocol error).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wedge_unbound_execute_then_split_transaction_query() {
    // seed 1 case 227: 450000000a630000000000,
    //   5100000026424547494e3b2053454c45435420313b20434f4d4d49543b2053454c454354203200
    check(
        vec![execute("c", 0), query("BEGIN; SELECT 1; COMMIT; SELECT 2")],
        End::Resync,
    )
    .await;
    check(
        vec![execute("", 0), query("BEGIN; SELECT 1; COMMIT; SELECT 2")],
        End::Abrupt,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wedge_unbound_execute_then_rollback_and_chain_query() {
    // seed 1 case 226: 450000000d6e6f70650000000000,
    //   5100000028203b20524f4c4c4241434b20414e4420434841494e3b204445414c4c4f43415445207100
    check(
        vec![
            execute("nope", 0),
            query(" ; ROLLBACK AND CHAIN; DEALLOCATE q"),
        ],
        End::Resync,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wedge_unbound_execute_then_commit_then_query() {
    check(
        vec![execute("", 0), query("COMMIT"), query("SELECT 2")],
        End::Resync,
    )
    .await;
    check(
        vec![execute("", 0), query("COMMIT"), query("SELECT 2")],
        End::Abrupt,
    )
    .await;
}

/// Seed 2 case 0: a BEGIN that ends a split Query (`ROLLBACK; BEGIN`), then a statement the
/// guard refuses (the proxy fails the transaction upstream, as Postgres would), then any
/// statement: the proxy re-applies the tenant context inside the aborted transaction, gets
/// 25P02 and ends the session with FATAL XX000 instead of answering 25P02.
/// Bytes: 5100000014524f4c4c4241434b3b20424547494e00, 510000000c53454c4543203100,
/// 510000000d53454c454354203100
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_denied_statement_after_split_begin() {
    check(
        vec![
            query("ROLLBACK; BEGIN"),
            query("SELEC 1"),
            query("SELECT 1"),
        ],
        End::Resync,
    )
    .await;
}

/// Seed 3 case 179: a BEGIN that ends a split Query, then a FunctionCall (refused with 0A000, the
/// transaction failed upstream): from then on `ROLLBACK` itself is answered with 25P02, so the
/// client can never leave the failed transaction (every later statement fails).
/// Bytes: 5100000014524f4c4c4241434b3b20424547494e00,
/// 460000000e00000001000000000000 (FunctionCall oid 1, no args; any oid does it)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_recovery_rollback_after_split_begin_and_refused_function_call() {
    check(
        vec![query("ROLLBACK; BEGIN"), function_call(1, &[])],
        End::Resync,
    )
    .await;
}

/// Seed 3 case 1205 (hand-minimised further): any extended-protocol message without a Sync
/// (here a Parse), then `BEGIN`, a statement that fails, and any Query: the proxy re-applies the
/// tenant context inside the aborted transaction, gets 25P02 and ends the session with
/// FATAL XX000 instead of answering 25P02. (Found as Describe(P, "") + `BEGIN; SELECT 1/0` +
/// `COMMIT`.)
/// Bytes: 50000000100053454c4543542031000000, 510000000a424547494e00,
/// 510000000f53454c45435420312f3000, 510000000d53454c454354203200
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_unsynced_parse_then_failed_transaction() {
    check(
        vec![
            parse("", "SELECT 1", &[]),
            query("BEGIN"),
            query("SELECT 1/0"),
            query("SELECT 2"),
        ],
        End::Resync,
    )
    .await;
    check(
        vec![
            describe(b'P', ""),
            query("BEGIN; SELECT 1/0"),
            query("COMMIT"),
        ],
        End::Resync,
    )
    .await;
}
