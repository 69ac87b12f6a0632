//! Structured audit events for security teams.
//!
//! [`Audit::record`] turns every [`AuditEvent`] into one `info` line with target `rlsgate::audit`
//! (the event's fields as structured fields, plus `audit = <json>` for JSON-lines consumers). With
//! a sink ([`Audit::with_sink`]) the event is also put on a bounded queue — never waiting; a full
//! queue drops and counts — from which a writer task inserts batches into a Postgres table (see
//! `sql/audit.sql`). Events never hold tokens, passwords or SQL text: statements appear only as a
//! [`fingerprint`].

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

/// Log target of the audit lines.
pub const TARGET: &str = "rlsgate::audit";

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the writer keeps flushing after `stop` fires.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);
/// Six parameters per row must stay under the protocol's 65535.
const MAX_BATCH: usize = 10_000;
const MAX_QUEUE: usize = 10_000_000;

/// One security-relevant thing that happened. Serialized with `"event": "<snake_case name>"`;
/// `peer`, `user` and `tenant` become table columns, the other fields the `detail` JSON.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[rustfmt::skip]
pub enum AuditEvent {
    LoginOk { peer: String, user: String, tenant: String, kid: Option<String>, jti: Option<String>, subject: Option<String> },
    LoginFailed { peer: String, user: Option<String>, reason: String, kid: Option<String>, jti: Option<String> },
    LoginThrottled { peer: String },
    StatementDenied { peer: String, user: String, tenant: String, rule: String, fingerprint: String },
    TokenExpired { peer: String, user: String, tenant: String, jti: Option<String> },
    Reauth { peer: String, user: String, tenant: String, ok: bool, reason: Option<String> },
}

/// Where and how the writer task stores events.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// A tokio-postgres connection string for the audit database (plain TCP or unix socket).
    pub connection: String,
    /// `table` or `schema.table`, each part `[a-z_][a-z0-9_]*`; default `rlsgate_audit.events`.
    pub table: String,
    /// Bounded queue capacity (default 10 000; clamped to 1..=10 000 000).
    pub queue: usize,
    /// Most rows per INSERT (default 500; clamped to 1..=10 000).
    pub batch: usize,
    /// Flush at least this often when events are waiting (default 1 s).
    pub flush_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkConfigError {
    #[error(
        "audit table {0:?} must be `name` or `schema.name`, each part [a-z_][a-z0-9_]* (≤ 63 bytes)"
    )]
    Table(String),
    #[error("audit connection string is invalid: {0}")]
    Connection(String),
}

impl Default for SinkConfig {
    /// The defaults with an empty connection string, which does not validate: set `connection`.
    fn default() -> SinkConfig {
        SinkConfig::new("")
    }
}

impl SinkConfig {
    /// The defaults for everything but the connection string.
    pub fn new(connection: impl Into<String>) -> SinkConfig {
        SinkConfig {
            connection: connection.into(),
            table: "rlsgate_audit.events".into(),
            queue: 10_000,
            batch: 500,
            flush_interval: Duration::from_secs(1),
        }
    }

    /// Checks the table name and that the connection string parses.
    pub fn validate(&self) -> Result<(), SinkConfigError> {
        self.pg_config().map(|_| ())
    }

    fn pg_config(&self) -> Result<tokio_postgres::Config, SinkConfigError> {
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 63
                && p.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        let parts: Vec<&str> = self.table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
            return Err(SinkConfigError::Table(self.table.clone()));
        }
        let mut pg: tokio_postgres::Config = (self.connection.parse())
            .map_err(|e: tokio_postgres::Error| SinkConfigError::Connection(e.to_string()))?;
        if pg.get_hosts().is_empty() {
            return Err(SinkConfigError::Connection("it names no host".into()));
        }
        if pg.get_application_name().is_none() {
            pg.application_name("rlsgate-audit");
        }
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(CONNECT_TIMEOUT);
        }
        Ok(pg)
    }

    /// The table name with each part quoted (the parts are validated, so quoting is plain).
    fn quoted_table(&self) -> String {
        let parts: Vec<String> = self.table.split('.').map(|p| format!("\"{p}\"")).collect();
        parts.join(".")
    }
}

#[derive(Default)]
struct Counters {
    dropped: AtomicU64,
    written: AtomicU64,
}

impl Counters {
    /// Counts dropped events; warns at 1, 2, 4, 8, … dropped so a flood does not flood the log.
    fn drop_events(&self, n: u64, why: &str) {
        let before = self.dropped.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        if n > 0 && (before == 0 || after.ilog2() > before.ilog2()) {
            tracing::warn!(target: TARGET, dropped_total = after, why, "audit events dropped");
        }
    }
}

/// The audit handle shared by all sessions; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: Option<mpsc::Sender<Row>>,
    counters: Arc<Counters>,
}

impl Audit {
    /// Events only to the log (target `rlsgate::audit`).
    pub fn log_only() -> Audit {
        Audit {
            tx: None,
            counters: Arc::default(),
        }
    }

    /// Log + Postgres sink. Spawns the writer task (call inside a tokio runtime); connection
    /// failures are retried with backoff in that task and never block [`Audit::record`]. An
    /// invalid `cfg` is logged as an error and every event counts as dropped. The task ends when
    /// `stop` fires (after flushing what is queued, ≤ ~2 s) or when every handle is dropped.
    pub fn with_sink(cfg: SinkConfig, stop: CancellationToken) -> (Audit, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(cfg.queue.clamp(1, MAX_QUEUE));
        let audit = Audit {
            tx: Some(tx),
            counters: Arc::default(),
        };
        let task = match cfg.pg_config() {
            Ok(pg) => {
                tracing::info!(target: TARGET, table = %cfg.table, queue = cfg.queue, "audit sink enabled");
                let counters = Arc::clone(&audit.counters);
                let (backoff, next_attempt) = (MIN_BACKOFF, Instant::now());
                let writer = Writer {
                    cfg: SinkConfig {
                        batch: cfg.batch.clamp(1, MAX_BATCH),
                        ..cfg
                    },
                    pg,
                    counters,
                    client: None,
                    backoff,
                    next_attempt,
                    settled: 0,
                };
                tokio::spawn(writer.run(rx, stop))
            }
            Err(e) => {
                tracing::error!(target: TARGET, error = %e, "audit sink disabled; events are only logged");
                drop(rx); // every try_send now fails and is counted as dropped
                tokio::spawn(async {})
            }
        };
        (audit, task)
    }

    /// Records an event: always one log line; then, with a sink, a `try_send` into the queue
    /// (never waits). A full or closed queue drops the event and counts it.
    pub fn record(&self, event: AuditEvent) {
        if self.tx.is_none() && !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            // neither logged nor stored: nothing to build
            return;
        }
        let mut map = match serde_json::to_value(&event) {
            Ok(Value::Object(map)) => map,
            _ => return, // unreachable: every variant serializes to an object
        };
        for v in map.values_mut() {
            // Postgres text and jsonb cannot hold NUL.
            if let Value::String(s) = v
                && s.contains('\0')
            {
                *s = s.replace('\0', "\u{FFFD}");
            }
        }
        let s = |k: &str| map.get(k).and_then(Value::as_str);
        // (the map itself goes to the sink: serialized in place, not copied)
        let json = serde_json::to_string(&map).unwrap_or_default();
        let ok = map.get("ok").and_then(Value::as_bool);
        tracing::info!(target: TARGET, event = s("event"), peer = s("peer"), user = s("user"),
            tenant = s("tenant"), kid = s("kid"), jti = s("jti"), subject = s("subject"),
            reason = s("reason"), rule = s("rule"), fingerprint = s("fingerprint"),
            ok, audit = json.as_str(), "audit event");
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Row::new(map)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.counters.drop_events(1, "queue full"),
            Err(TrySendError::Closed(_)) => self.counters.drop_events(1, "sink stopped"),
        }
    }

    /// Events dropped because the queue was full or the sink failed (permanently or per batch).
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Events inserted into the sink table.
    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }
}

/// One table row: the common columns, everything else in `detail`.
struct Row {
    at: SystemTime,
    event: Option<String>,
    peer: Option<String>,
    user: Option<String>,
    tenant: Option<String>,
    detail: String,
}

impl Row {
    fn new(mut map: serde_json::Map<String, Value>) -> Row {
        let mut take = |k: &str| match map.remove(k) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let (event, peer, user, tenant) =
            (take("event"), take("peer"), take("user"), take("tenant"));
        let detail = Value::Object(map).to_string();
        Row {
            at: SystemTime::now(),
            event,
            peer,
            user,
            tenant,
            detail,
        }
    }
}

/// The writer task's state: one connection, reopened with exponential backoff.
struct Writer {
    cfg: SinkConfig,
    pg: tokio_postgres::Config,
    counters: Arc<Counters>,
    client: Option<tokio_postgres::Client>,
    backoff: Duration,
    next_attempt: Instant,
    /// Rows this writer has written or dropped.
    settled: u64,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Row>, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(self.cfg.batch);
        'outer: while !stop.is_cancelled() {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                n = rx.recv_many(&mut batch, self.cfg.batch) => if n == 0 { break },
            }
            let deadline = Instant::now() + self.cfg.flush_interval;
            while batch.len() < self.cfg.batch {
                let room = self.cfg.batch - batch.len();
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break 'outer,
                    _ = tokio::time::sleep_until(deadline) => break,
                    n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                }
            }
            if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep_until(self.next_attempt) => {}
                }
            }
            self.flush(&batch).await;
            batch.clear();
        }
        self.shutdown(rx, batch).await;
    }

    /// Inserts `rows` with one statement; on failure counts them dropped and schedules a reconnect.
    async fn flush(&mut self, rows: &[Row]) -> bool {
        let n = rows.len() as u64;
        let result = self.insert(rows).await;
        self.settled += n;
        match result {
            Ok(()) => {
                self.counters.written.fetch_add(n, Ordering::Relaxed);
                self.backoff = MIN_BACKOFF;
                true
            }
            Err(e) => {
                tracing::warn!(target: TARGET, error = %e, rows = n, retry_in = ?self.backoff, "audit sink: batch not written");
                self.counters.drop_events(n, "sink error");
                self.client = None;
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                false
            }
        }
    }

    async fn insert(&mut self, rows: &[Row]) -> Result<(), String> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let connect = self.pg.connect(tokio_postgres::NoTls);
            let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| "connecting timed out".to_string())?
                .map_err(|e| format!("connecting: {e}"))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(target: TARGET, error = %e, "audit sink connection ended");
                }
            });
            self.client = Some(client);
        }
        let client = self.client.as_ref().ok_or("not connected")?;
        let mut sql = format!(
            "INSERT INTO {} (at, event, peer, username, tenant, detail) VALUES ",
            self.cfg.quoted_table()
        );
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * 6);
        for (i, row) in rows.iter().enumerate() {
            let b = i * 6;
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(
                sql,
                "{sep}(${}::timestamptz,${}::text,${}::text,${}::text,${}::text,${}::text::jsonb)",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6
            );
            let cols: [&(dyn ToSql + Sync); 6] = [
                &row.at,
                &row.event,
                &row.peer,
                &row.user,
                &row.tenant,
                &row.detail,
            ];
            params.extend(cols);
        }
        client
            .execute(sql.as_str(), &params)
            .await
            .map(|_| ())
            .map_err(|e| format!("inserting: {e}"))
    }

    /// After `stop`: closes the queue, flushes what it holds for at most [`SHUTDOWN_FLUSH`] and
    /// counts whatever could not be written as dropped.
    async fn shutdown(mut self, mut rx: mpsc::Receiver<Row>, mut pending: Vec<Row>) {
        rx.close();
        while let Ok(row) = rx.try_recv() {
            pending.push(row);
        }
        let start = self.settled;
        let batch = self.cfg.batch;
        let drain = async {
            for chunk in pending.chunks(batch) {
                if !self.flush(chunk).await {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, drain).await;
        let lost = pending.len() as u64 - (self.settled - start).min(pending.len() as u64);
        self.counters
            .drop_events(lost, "sink stopped before writing");
        tracing::info!(target: TARGET, written = self.counters.written.load(Ordering::Relaxed),
            dropped = self.counters.dropped.load(Ordering::Relaxed), "audit sink stopped");
    }
}

/// A statement fingerprint for the audit log — never the text, which may hold other people's
/// data. libpg_query's fingerprint (literals ignored, full relation names) when the text parses,
/// else a hash of the text with literals and comments removed. 16 hex digits.
pub fn fingerprint(sql: &str) -> String {
    let opts = pg_query::FingerprintOptions::FULL_RELNAME;
    match pg_query::fingerprint(sql, pg_query::ParserOptions::DEFAULT, opts) {
        Ok(fp) => format!("{:016x}", fp.value),
        Err(_) => {
            // FNV-1a: stable across builds and Rust versions.
            let hash = strip_literals(sql)
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
            format!("{hash:016x}")
        }
    }
}

/// The statement's tokens (Postgres's own lexer) with constants replaced by `?`, comments dropped
/// and unquoted words lower-cased. When the text does not even lex (an unterminated quote or
/// comment), only the words before the first quote, `$` or comment are kept.
fn strip_literals(sql: &str) -> String {
    use pg_query::protobuf::Token;
    let Ok(scan) = pg_query::scan(sql) else {
        let starts = ["'", "\"", "$", "--", "/*"];
        let cut = starts.iter().filter_map(|p| sql.find(p)).min();
        let words = sql[..cut.unwrap_or(sql.len())].split(|c: char| !c.is_alphabetic() && c != '_');
        return words
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect::<Vec<_>>()
            .join(" ");
    };
    let mut out = Vec::with_capacity(scan.tokens.len());
    for t in &scan.tokens {
        let text = sql.get(t.start as usize..t.end as usize).unwrap_or("");
        match Token::try_from(t.token) {
            Ok(Token::Sconst | Token::Usconst | Token::Bconst | Token::Xconst)
            | Ok(Token::Iconst | Token::Fconst) => out.push("?".to_string()),
            Ok(Token::SqlComment | Token::CComment) => {}
            _ if text.starts_with('"') => out.push(text.to_string()),
            _ => out.push(text.to_lowercase()),
        }
    }
    out.join(" ")
}
