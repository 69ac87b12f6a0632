//! The upstream pool: connections opened on demand up to `pool_size`, handed out as a
//! [`Checkout`] that closes the connection on drop unless it was released clean.

mod connect;
pub mod statements;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{KeepaliveConfig, UpstreamConfig};
use crate::error::{ClientError, UserFacing, sqlstate};
use crate::metrics::{Metrics, UpstreamErrorKind};
use crate::protocol::backend as be;
use crate::protocol::frontend as fe;
use crate::stream::{IdleProbe, SocketKeepalive, Stream};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no upstream connection available within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to upstream: {0}")]
    Connect(String),
    #[error("upstream TLS: {0}")]
    Tls(String),
    #[error("upstream authentication: {0}")]
    Auth(String),
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("upstream refused the connection: {code} {message}")]
    Server { code: String, message: String },
    #[error("signed tenant context: {0}")]
    Seal(String),
    #[error("pool is closed")]
    Closed,
    #[error("{0}")]
    Limited(ClientError),
}

impl PoolError {
    /// Count a failed checkout: a timeout as a pool timeout, an upstream failure by its kind,
    /// nothing for a closed pool or a tenant limit.
    pub fn count(&self, metrics: &Metrics) {
        let kind = match self {
            PoolError::Timeout(_) => {
                metrics.pool_timeout();
                return;
            }
            PoolError::Closed | PoolError::Limited(_) => return,
            PoolError::Connect(_) | PoolError::Server { .. } | PoolError::Seal(_) => {
                UpstreamErrorKind::Connect
            }
            PoolError::Tls(_) => UpstreamErrorKind::Tls,
            PoolError::Auth(_) => UpstreamErrorKind::Auth,
            PoolError::Protocol(_) => UpstreamErrorKind::Protocol,
        };
        metrics.upstream_error(kind);
    }
}

impl UserFacing for PoolError {
    fn to_client_error(&self) -> ClientError {
        match self {
            PoolError::Timeout(d) => ClientError::error(
                sqlstate::QUERY_CANCELED,
                format!(
                    "rlsgate: no upstream connection became free within {d:?} (checkout_timeout)"
                ),
            )
            .with_hint("the pool is exhausted; retry, or raise upstream.pool_size"),
            PoolError::Connect(_)
            | PoolError::Tls(_)
            | PoolError::Protocol(_)
            | PoolError::Server { .. } => ClientError::error(
                sqlstate::CONNECTION_FAILURE,
                "rlsgate: upstream database is unavailable",
            )
            .with_detail(self.to_string()),
            PoolError::Auth(_) => ClientError::error(
                sqlstate::CONNECTION_FAILURE,
                "rlsgate: cannot log in to the upstream database (check upstream.user/password)",
            ),
            PoolError::Closed => {
                ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, "rlsgate is shutting down")
            }
            PoolError::Seal(_) => ClientError::error(
                sqlstate::CONNECTION_FAILURE,
                "rlsgate: the upstream database is not set up for the signed tenant context",
            )
            .with_detail(self.to_string()),
            PoolError::Limited(e) => e.clone(),
        }
    }
}

/// The session settings a server connection holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldSettings {
    /// The upstream defaults (a fresh or fully reset connection).
    Defaults,
    /// What this replay text (`SET …; SET …`) run on defaults gives.
    Replayed(Arc<str>),
    /// Unknown (a settings statement failed or was skipped, or the client ran RESET ALL):
    /// reset before the next transaction.
    Unknown,
}

impl HeldSettings {
    /// The state a client with this replay text (`None`: no settings) needs.
    pub fn wanted(replay: Option<&Arc<str>>) -> HeldSettings {
        match replay {
            None => HeldSettings::Defaults,
            Some(text) => HeldSettings::Replayed(Arc::clone(text)),
        }
    }

    /// Holds exactly what `replay` describes (`None`: the defaults).
    pub fn matches(&self, replay: Option<&Arc<str>>) -> bool {
        match (self, replay) {
            (HeldSettings::Defaults, None) => true,
            (HeldSettings::Replayed(held), Some(want)) => {
                Arc::ptr_eq(held, want) || **held == **want
            }
            _ => false,
        }
    }
}

/// One upstream connection.
/// The upstream's ParameterStatus set, as every client's greeting repeats it.
pub type ServerParams = Arc<[(String, String)]>;

pub struct ServerConn {
    pub stream: Stream,
    pub read_buf: BytesMut,
    pub id: u64,
    pub backend_pid: i32,
    pub backend_key: Arc<[u8]>,
    pub params: Vec<(String, String)>,
    pub created: Instant,
    pub last_used: Instant,
    /// rlsgate's prepared statements on this connection (bounded; see [`statements`]).
    pub prepared: statements::ServerStatements,
    /// Whose sequence state (`lastval()`, `currval()`) it may hold: discarded before another
    /// tenant's transaction.
    pub sequences: SequenceOwner,
    /// A session-level SET ran on it: reset before anyone else gets it.
    pub dirty_session: bool,
    /// Which tenant context the connection keeps at session level (see [`Ambient`]).
    pub ambient: Ambient,
    /// Which client Parse the server's unnamed statement holds: `(session id, parse sequence)`.
    pub unnamed_owner: Option<(u64, u64)>,
    /// Which session settings the connection holds (compared by content: clients with the same
    /// startup parameters and SETs share connections without a replay).
    pub settings: HeldSettings,
    /// The pool's generation when it was opened: an admin RECONNECT closes older ones.
    pub generation: u64,
    /// The role may call `pg_catalog.set_config` (probed at connect): the tenant context takes
    /// its `set_config` form.
    pub may_set_config: bool,
    /// Signed context: the tenant whose seal (`rlsgate.enter`) the backend holds, if any.
    /// Cleared whenever its sequence state may be gone (DISCARD SEQUENCES / ALL).
    pub sealed: Option<Arc<str>>,
    /// Signed context: which of the configured signing keys the database has (probed at
    /// connect; an index into [`crate::seal::Sealer::key_ids`]).
    pub seal_key: u8,
}

impl ServerConn {
    /// The keepalive options of the upstream socket as the kernel reports them.
    pub fn keepalive_of(&self) -> std::io::Result<SocketKeepalive> {
        self.stream.keepalive()
    }

    /// Why this connection, idle in the pool, must not be handed out: the server sent something
    /// unprompted (typically FATAL 57P01 before closing, at a restart or
    /// `pg_terminate_backend`) or closed it. `None` = its socket is quiet. One non-blocking
    /// peek; on a plain connection, what the server said is read for the log.
    fn gone_reason(&mut self) -> Option<String> {
        let probe = self.stream.probe_idle();
        if probe == IdleProbe::Quiet {
            return None;
        }
        let mut reason = format!("{probe:?}");
        if let (IdleProbe::Readable, Stream::Plain(tcp)) = (probe, &self.stream) {
            // Whatever is already here; the connection is dropped either way.
            let _ = tcp.try_read_buf(&mut self.read_buf);
            if let Ok(Some(frame)) =
                crate::protocol::frame::try_read_frame(&mut self.read_buf, 1 << 20)
                && matches!(frame.tag, be::ERROR_RESPONSE | be::NOTICE_RESPONSE)
                && let Ok(n) = be::notice_fields(frame.body())
            {
                reason = format!("{} {}: {}", n.severity, n.code, n.message);
            }
        }
        Some(reason)
    }
}

/// How the pool sets up its sockets and where it reports.
#[derive(Debug, Clone, Default)]
pub struct PoolOptions {
    /// `[server] tcp_*`, applied to every upstream socket.
    pub keepalive: KeepaliveConfig,
    /// Dropped dead connections are counted as `rlsgate_upstream_errors_total{kind="lost"}`.
    pub metrics: Option<Arc<Metrics>>,
    /// Signed context: every new connection asks which signing key the database has.
    pub sealer: Option<Arc<crate::seal::Sealer>>,
}

/// Where to send a CancelRequest for the backend behind a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    /// Shared: a session sets its target at every checkout (no copy per transaction).
    pub host: Arc<str>,
    pub port: u16,
    pub pid: i32,
    pub key: Arc<[u8]>,
}

struct Inner {
    cfg: UpstreamConfig,
    /// `cfg.host`, shared by every cancel target.
    cancel_host: Arc<str>,
    tls: Option<Arc<rustls::ClientConfig>>,
    keepalive: KeepaliveConfig,
    metrics: Option<Arc<Metrics>>,
    sealer: Option<Arc<crate::seal::Sealer>>,
    /// Boxed: a connection moves at every checkout and release (a pointer instead of its
    /// 360 bytes; callgrind: −1 000 instructions per transaction).
    #[allow(
        clippy::vec_box,
        reason = "the boxes move in and out at every checkout, not the Vec"
    )]
    idle: Mutex<Vec<Box<ServerConn>>>,
    permits: Arc<Semaphore>,
    next_id: AtomicU64,
    /// The last connection attempt failed (readiness).
    failing: std::sync::atomic::AtomicBool,
    /// Some connection attempt has succeeded.
    connected_once: std::sync::atomic::AtomicBool,
    /// A connection found that the upstream role may not call `set_config`.
    set_config_denied: std::sync::atomic::AtomicBool,
    /// ParameterStatus set of the first connection, reported to clients at login.
    /// Shared with every login's greeting (no copy per login).
    server_params: Mutex<Option<ServerParams>>,
    /// Bumped by an admin RECONNECT: connections of an older generation are closed instead of
    /// being handed out or returned.
    generation: AtomicU64,
    /// Orders prepares (of clients and of rlsgate's server copies) and stale-plan reports.
    plan_clock: AtomicU64,
    /// The clock at the last stale-plan report (0: none yet).
    last_stale: AtomicU64,
    /// Statements whose cached plan the server refused, with the clock at the report.
    stale_plans: Mutex<HashMap<Arc<str>, u64>>,
}

/// Most stale statements remembered (see [`Pool::plan_went_stale`]).
const MAX_STALE_PLANS: usize = 10_000;

impl Inner {
    /// Open one upstream connection within `connect_timeout`, recording for readiness whether
    /// the upstream can be reached.
    async fn open(&self) -> Result<Box<ServerConn>, PoolError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connect = connect::connect(
            &self.cfg,
            self.tls.as_ref(),
            &self.keepalive,
            self.sealer.as_deref(),
            id,
        );
        let result = match tokio::time::timeout(self.cfg.connect_timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(PoolError::Connect(format!(
                "timed out after {:?}",
                self.cfg.connect_timeout
            ))),
        };
        self.failing.store(result.is_err(), Ordering::Relaxed);
        let mut conn = Box::new(result?);
        conn.generation = self.generation.load(Ordering::Relaxed);
        self.connected_once.store(true, Ordering::Relaxed);
        if !conn.may_set_config {
            self.set_config_denied.store(true, Ordering::Relaxed);
        }
        tracing::debug!(
            server_id = id,
            backend_pid = conn.backend_pid,
            "opened upstream connection"
        );
        if let Ok(mut p) = self.server_params.lock() {
            p.get_or_insert_with(|| Arc::from(conn.params.as_slice()));
        }
        Ok(conn)
    }

    /// An idle connection the server closed or spoke on: log it, count it (`lost`), and tell the
    /// caller to drop it.
    fn dead(&self, conn: &mut ServerConn, during: &'static str) -> bool {
        let Some(reason) = conn.gone_reason() else {
            return false;
        };
        tracing::info!(
            server_id = conn.id,
            backend_pid = conn.backend_pid,
            during,
            reason,
            "dropping idle upstream connection the server closed"
        );
        self.lost();
        true
    }

    fn lost(&self) {
        if let Some(m) = &self.metrics {
            m.upstream_error(UpstreamErrorKind::Lost);
        }
    }

    /// Past `max_lifetime` at `now`, or from before a reload that changed the upstream. (The
    /// caller reads the clock once for all of a connection's checks.)
    fn too_old(&self, conn: &ServerConn, now: Instant) -> bool {
        (!self.cfg.max_lifetime.is_zero()
            && now.saturating_duration_since(conn.created) >= self.cfg.max_lifetime)
            || conn.generation < self.generation.load(Ordering::Relaxed)
    }

    fn expired(&self, conn: &ServerConn, now: Instant) -> bool {
        self.too_old(conn, now)
            || (!self.cfg.idle_timeout.is_zero()
                && now.saturating_duration_since(conn.last_used) >= self.cfg.idle_timeout)
    }
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("size", &self.inner.cfg.pool_size)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool with the default [`PoolOptions`] (default keepalive, no metrics).
    pub fn new(cfg: UpstreamConfig, tls: Option<Arc<rustls::ClientConfig>>) -> Pool {
        Pool::with_options(cfg, tls, PoolOptions::default())
    }

    pub fn with_options(
        cfg: UpstreamConfig,
        tls: Option<Arc<rustls::ClientConfig>>,
        opts: PoolOptions,
    ) -> Pool {
        let permits = Arc::new(Semaphore::new(cfg.pool_size));
        Pool {
            inner: Arc::new(Inner {
                cancel_host: Arc::from(cfg.host.as_str()),
                cfg,
                tls,
                keepalive: opts.keepalive,
                metrics: opts.metrics,
                sealer: opts.sealer,
                idle: Mutex::new(Vec::new()),
                permits,
                next_id: AtomicU64::new(1),
                server_params: Mutex::new(None),
                failing: std::sync::atomic::AtomicBool::new(false),
                connected_once: std::sync::atomic::AtomicBool::new(false),
                set_config_denied: std::sync::atomic::AtomicBool::new(false),
                generation: AtomicU64::new(0),
                plan_clock: AtomicU64::new(0),
                last_stale: AtomicU64::new(0),
                stale_plans: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn close(&self) {
        self.inner.permits.close();
        if let Ok(mut idle) = self.inner.idle.lock() {
            idle.clear();
        }
    }

    /// Admin `RECONNECT`: every connection open now is closed instead of being reused — idle ones
    /// at once, busy ones when their client releases them (as PgBouncer's RECONNECT). Returns
    /// how many idle connections were closed.
    pub fn reconnect(&self) -> usize {
        self.inner.generation.fetch_add(1, Ordering::Relaxed);
        let closed = match self.inner.idle.lock() {
            Ok(mut idle) => std::mem::take(&mut *idle),
            Err(_) => Vec::new(),
        };
        tracing::info!(
            idle_closed = closed.len(),
            "RECONNECT: upstream connections will be replaced"
        );
        closed.len()
    }

    /// The next tick of the plan clock: stamps a client's prepare and each server copy of a
    /// statement, so that a copy older than the client's prepare is never used for it (it may
    /// predate a migration the client has already seen).
    pub fn plan_tick(&self) -> u64 {
        self.inner.plan_clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The server refused rlsgate's statement `name`, a copy stamped `copy`, with `cached plan
    /// must not change result type` (a column was added to or dropped from a table it reads).
    /// Clients that prepared it before now get that error too, as they would from Postgres,
    /// where each session's copy fails until it is prepared again; clients that prepare it
    /// again get fresh copies.
    ///
    /// A change already reported after `copy` was made is not news: several connections report
    /// the same migration, and counting it again would fail the clients that prepared again in
    /// between. Returns the report's tick, or `None` when it was not news.
    pub fn plan_went_stale(&self, name: &Arc<str>, copy: u64) -> Option<u64> {
        let Ok(mut stale) = self.inner.stale_plans.lock() else {
            return None;
        };
        if stale.get(name).is_some_and(|t| *t > copy) {
            return None;
        }
        if stale.len() >= MAX_STALE_PLANS {
            // Forgetting is safe: a stale copy then fails on the server and is seen again.
            stale.clear();
        }
        let tick = self.plan_tick();
        stale.insert(Arc::clone(name), tick);
        self.inner.last_stale.fetch_max(tick, Ordering::Relaxed);
        drop(stale);
        tracing::info!(
            statement = %name,
            tick,
            "the server refused a cached plan whose result type changed; preparing the statement again"
        );
        Some(tick)
    }

    /// Whether statement `name`, prepared by a client at `stamp`, was reported stale since.
    /// One atomic load unless some plan went stale after `stamp`.
    pub fn stale_after(&self, name: &str, stamp: u64) -> bool {
        self.inner.last_stale.load(Ordering::Relaxed) > stamp
            && self
                .inner
                .stale_plans
                .lock()
                .is_ok_and(|stale| stale.get(name).is_some_and(|t| *t > stamp))
    }

    /// The upstream's ParameterStatus set (connecting once if none is known yet).
    pub async fn server_params(&self) -> Result<ServerParams, PoolError> {
        if let Some(p) = self.known_server_params() {
            return Ok(p);
        }
        // Boxed: a checkout's future is large, and this path runs before the first connection only.
        let conn = Box::pin(self.checkout()).await?;
        let params = Arc::from(conn.conn_ref().params.as_slice());
        conn.release();
        Ok(params)
    }

    /// Some connection found that the upstream role may not call `set_config`.
    pub fn set_config_denied(&self) -> bool {
        self.inner.set_config_denied.load(Ordering::Relaxed)
    }

    /// The server's ParameterStatus set, once a connection has reported it.
    pub fn known_server_params(&self) -> Option<ServerParams> {
        self.inner.server_params.lock().ok().and_then(|p| p.clone())
    }

    /// Borrow a connection, waiting up to `checkout_timeout` for a free slot. An idle
    /// connection is handed out only if its socket is quiet (the server has neither spoken on
    /// it nor closed it since it was released) and, when it has been idle `health_check_after`
    /// or longer, it answers an empty query.
    pub async fn checkout(&self) -> Result<Checkout, PoolError> {
        self.checkout_for(Prefer::Recent).await
    }

    /// [`Pool::checkout`], preferring an idle connection as `prefer` says, else the most
    /// recently used one.
    pub async fn checkout_for(&self, prefer: Prefer<'_>) -> Result<Checkout, PoolError> {
        let timeout = self.inner.cfg.checkout_timeout;
        // Fast path without a timer when a slot is free.
        let permit = match Arc::clone(&self.inner.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(PoolError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                match tokio::time::timeout(timeout, Arc::clone(&self.inner.permits).acquire_owned())
                    .await
                {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(PoolError::Closed),
                    Err(_) => return Err(PoolError::Timeout(timeout)),
                }
            }
        };
        loop {
            let conn = match self.take_idle(prefer) {
                Idle::Ready(conn) => conn,
                Idle::NeedsCheck(mut conn) => {
                    if let Err(e) = Box::pin(health_check(&mut conn)).await {
                        tracing::info!(server_id = conn.id, error = %e, "dropping idle upstream connection that failed its check");
                        self.inner.lost();
                        continue;
                    }
                    conn
                }
                Idle::None => break,
            };
            return Ok(Checkout {
                conn: Some(conn),
                pool: Arc::clone(&self.inner),
                permit: Some(permit),
            });
        }
        // Boxed: connecting is rare, and its state would size every checkout's future (which the
        // session boxes per transaction).
        let conn = Box::pin(self.inner.open()).await?;
        Ok(Checkout {
            conn: Some(conn),
            pool: Arc::clone(&self.inner),
            permit: Some(permit),
        })
    }

    /// [`Pool::checkout_for`] when it need not wait: a free slot and an idle connection that
    /// needs no health check. `None` = take the waiting way (no future is made for the usual
    /// checkout).
    pub fn try_checkout_now(&self, prefer: Prefer<'_>) -> Option<Checkout> {
        let permit = Arc::clone(&self.inner.permits).try_acquire_owned().ok()?;
        match self.take_idle(prefer) {
            Idle::Ready(conn) => Some(Checkout {
                conn: Some(conn),
                pool: Arc::clone(&self.inner),
                permit: Some(permit),
            }),
            Idle::NeedsCheck(conn) => {
                // (back on top of the stack: the waiting way takes it again and checks it)
                if let Ok(mut idle) = self.inner.idle.lock() {
                    idle.push(conn);
                }
                None
            }
            Idle::None => None,
        }
    }

    /// The idle connection to hand out next (the most recently used of those `prefer` picks, if
    /// any, else the most recently used), closing those past their time or that the server
    /// closed.
    fn take_idle(&self, prefer: Prefer<'_>) -> Idle {
        loop {
            let candidate = self.inner.idle.lock().ok().and_then(|mut idle| {
                let preferred = match prefer {
                    Prefer::Recent => None,
                    Prefer::Sealed(tenant) => idle
                        .iter()
                        .rposition(|c| c.sealed.as_deref() == Some(tenant)),
                    // one that keeps this context, else one that keeps none (no clean-up)
                    Prefer::Kept(key) => idle
                        .iter()
                        .rposition(|c| c.ambient.keeps(key))
                        .or_else(|| idle.iter().rposition(|c| c.ambient.safe_for(Some(key)))),
                };
                match preferred {
                    Some(i) => Some(idle.remove(i)),
                    None => idle.pop(),
                }
            });
            let Some(mut conn) = candidate else {
                return Idle::None;
            };
            let now = Instant::now();
            if self.inner.expired(&conn, now) {
                tracing::debug!(
                    server_id = conn.id,
                    "closing upstream connection past idle_timeout/max_lifetime"
                );
                continue;
            }
            if self.inner.dead(&mut conn, "checkout") {
                continue;
            }
            if now.saturating_duration_since(conn.last_used) >= self.inner.cfg.health_check_after {
                return Idle::NeedsCheck(conn);
            }
            return Idle::Ready(conn);
        }
    }

    pub fn cancel_target(&self, conn: &ServerConn) -> CancelTarget {
        CancelTarget {
            host: Arc::clone(&self.inner.cancel_host),
            port: self.inner.cfg.port,
            pid: conn.backend_pid,
            key: Arc::clone(&conn.backend_key),
        }
    }

    /// Connections checked out right now.
    pub fn in_use(&self) -> usize {
        self.inner
            .cfg
            .pool_size
            .saturating_sub(self.inner.permits.available_permits())
            .saturating_sub(0)
    }

    pub fn idle_ids(&self) -> Vec<u64> {
        self.inner
            .idle
            .lock()
            .map(|i| i.iter().map(|c| c.id).collect())
            .unwrap_or_default()
    }

    /// Whether the last attempt to open an upstream connection failed.
    pub fn upstream_failing(&self) -> bool {
        self.inner.failing.load(Ordering::Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        self.inner.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    /// Periodic upkeep: close idle connections the server closed, and those past
    /// `idle_timeout`/`max_lifetime` (keeping `min_idle`), and open connections up to
    /// `min_idle` idle ones.
    pub async fn maintain(&self) {
        let min_idle = self.inner.cfg.min_idle;
        if let Ok(mut idle) = self.inner.idle.lock() {
            // idle is a stack: the oldest-used connections are at the front
            let mut keep = Vec::with_capacity(idle.len());
            let total = idle.len();
            let now = Instant::now();
            for (i, mut conn) in idle.drain(..).enumerate() {
                let remaining = total - i;
                if self.inner.dead(&mut conn, "maintenance") {
                    continue;
                }
                if self.inner.expired(&conn, now)
                    && (keep.len() + remaining > min_idle || self.inner.too_old(&conn, now))
                {
                    tracing::debug!(server_id = conn.id, "closing idle upstream connection");
                } else {
                    keep.push(conn);
                }
            }
            *idle = keep;
        }
        // Until a first connection worked, and while connecting fails, probe the upstream (with
        // nothing else open) so readiness reflects whether it can be reached.
        let unknown = !self.inner.connected_once.load(Ordering::Relaxed) || self.upstream_failing();
        let probe = usize::from(unknown && self.idle_count() == 0 && self.in_use() == 0);
        while self.idle_count() < min_idle.max(probe) {
            let Ok(permit) = Arc::clone(&self.inner.permits).try_acquire_owned() else {
                return;
            };
            match self.inner.open().await {
                Ok(conn) => {
                    if let Ok(mut idle) = self.inner.idle.lock() {
                        idle.insert(0, conn);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not open an upstream connection in the background");
                    return;
                }
            }
            drop(permit);
        }
    }
}

/// What [`Pool::take_idle`] found.
enum Idle {
    Ready(Box<ServerConn>),
    /// Idle `health_check_after` or longer: it must answer an empty query first.
    NeedsCheck(Box<ServerConn>),
    None,
}

/// Run a maintenance query (health check, reset): it must succeed and leave the connection idle.
async fn maintenance(conn: &mut ServerConn, sql: &str) -> Result<(), PoolError> {
    let mut out = BytesMut::new();
    fe::write_query(sql, &mut out).map_err(|e| PoolError::Protocol(e.to_string()))?;
    let run = async {
        conn.stream
            .write_all(&out)
            .await
            .map_err(|e| PoolError::Connect(e.to_string()))?;
        let mut failed = false;
        loop {
            let frame = connect::read_frame(&mut conn.stream, &mut conn.read_buf).await?;
            match frame.tag {
                be::ERROR_RESPONSE => failed = true,
                be::READY_FOR_QUERY => {
                    return match (failed, be::ready_status(frame.body())) {
                        (false, Ok(be::TxStatus::Idle)) => Ok(()),
                        _ => Err(PoolError::Protocol(format!(
                            "{sql:?} failed or left a transaction open"
                        ))),
                    };
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .map_err(|_| PoolError::Connect(format!("{sql:?} timed out")))?
}

/// An empty query: EmptyQueryResponse + ReadyForQuery('I') proves the connection works.
async fn health_check(conn: &mut ServerConn) -> Result<(), PoolError> {
    maintenance(conn, "").await
}

/// Undo session state so the next client starts from the connection's defaults.
async fn reset_session(conn: &mut ServerConn) -> Result<(), PoolError> {
    maintenance(conn, "DISCARD ALL").await?;
    conn.ambient = Ambient::Clear;
    Ok(())
}

/// Take a tenant context the connection keeps off it (and every other session-level setting:
/// the caller replays its own), awaiting the answer: before a client with another context, or
/// a pipeline lane, runs anything on it (see [`Ambient`]). On error the caller closes it.
pub async fn clear_context(conn: &mut ServerConn) -> Result<(), PoolError> {
    maintenance(conn, "RESET ALL").await?;
    conn.ambient = Ambient::Clear;
    conn.settings = HeldSettings::Defaults;
    Ok(())
}

/// Which idle connection a checkout prefers (else the most recently used).
#[derive(Debug, Clone, Copy)]
pub enum Prefer<'a> {
    Recent,
    /// Signed context: one sealed for this tenant (it saves sealing it again).
    Sealed(&'a str),
    /// One that keeps this tenant context (see [`Ambient`]), else one that needs no clean-up.
    Kept(&'a [u8]),
}

/// A borrowed connection. Dropping it without [`Checkout::release`] closes the connection, so
/// a connection in an unknown state is never handed to another client.
pub struct Checkout {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Inner>,
    /// Held until the connection is back in the pool (or closed).
    permit: Option<OwnedSemaphorePermit>,
}

/// Whose sequence state a server connection may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SequenceOwner {
    /// No tenant's transaction ran on it yet.
    Nobody,
    /// The tenant whose transaction ran last on it.
    Tenant(Arc<str>),
    /// A discard failed or may not have run: discarded before any tenant's next transaction.
    Unknown,
}

/// The tenant context a server connection keeps at session level, `set_config(…, false)`
/// committed by a hidden statement of its own (`[upstream] keep_context`), identified by the
/// context's key (`session::inject::Context::key`: its values). While a connection keeps the
/// context of the client that holds it, that client's transactions need no context of their
/// own in front of them.
///
/// The rule that makes this safe: a client's statements only ever run on a connection whose
/// session-level value is empty or the client's own context. A connection that may keep any
/// other context is cleaned (`RESET ALL`, a round trip whose answer is awaited) before it is
/// handed to a client with another context or to a pipeline lane; so whatever runs out of
/// reach of the per-transaction context (a procedure's `COMMIT`, a statement outside a
/// transaction) sees nothing or its own tenant, never another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Ambient {
    /// Nothing of rlsgate's at session level (a new connection, after `RESET ALL`/`DISCARD ALL`).
    #[default]
    Clear,
    /// The hidden `set_config(…, false)` for this context is in flight: empty or this context.
    Setting(Bytes),
    /// Committed: this context, for sure.
    Kept(Bytes),
    /// Empty or this context (the hidden statement failed, or a `RESET ALL` was sent).
    Maybe(Bytes),
}

impl Ambient {
    /// Whether the context `key` is certainly in effect: its transactions need none of their own.
    pub fn keeps(&self, key: &[u8]) -> bool {
        matches!(self, Ambient::Kept(k) if **k == *key)
    }

    /// Whether a client with the context `key` (`None`: none kept, e.g. a pipeline lane) may
    /// run statements on the connection as it is: it holds nothing or only that context.
    pub fn safe_for(&self, key: Option<&[u8]>) -> bool {
        match (self, key) {
            (Ambient::Clear, _) => true,
            (Ambient::Setting(k) | Ambient::Kept(k) | Ambient::Maybe(k), Some(key)) => **k == *key,
            (_, None) => false,
        }
    }

    /// A `RESET ALL` (the client's, or rlsgate's between clients) was sent: the context may be
    /// gone.
    pub fn reset_sent(&mut self) {
        if let Ambient::Setting(k) | Ambient::Kept(k) = self {
            *self = Ambient::Maybe(std::mem::take(k));
        }
    }

    /// The hidden `set_config(…, false)` answered ReadyForQuery without an error.
    pub fn confirmed(&mut self) {
        if let Ambient::Setting(k) = self {
            *self = Ambient::Kept(std::mem::take(k));
        }
    }

    /// The hidden `set_config(…, false)` failed (rolled back): what was there before is left.
    pub fn failed(&mut self) {
        if let Ambient::Setting(k) = self {
            *self = Ambient::Maybe(std::mem::take(k));
        }
    }
}

impl SequenceOwner {
    /// Before `tenant`'s transaction: must the sequence state be discarded? Records `tenant`
    /// as the owner from then on.
    pub fn hand_to(&mut self, tenant: &str) -> bool {
        let discard = match self {
            SequenceOwner::Tenant(t) if **t == *tenant => return false,
            SequenceOwner::Nobody => false,
            SequenceOwner::Tenant(_) | SequenceOwner::Unknown => true,
        };
        *self = SequenceOwner::Tenant(Arc::from(tenant));
        discard
    }
}

impl Checkout {
    pub fn conn(&mut self) -> &mut ServerConn {
        // Invariant: `conn` is Some until release/drop consume self.
        self.conn
            .as_mut()
            .expect("checkout holds a connection until released")
    }

    pub fn conn_ref(&self) -> &ServerConn {
        self.conn
            .as_ref()
            .expect("checkout holds a connection until released")
    }

    /// Return a connection that is idle (ReadyForQuery 'I', nothing in flight) to the pool.
    pub fn release(mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let now = Instant::now();
        conn.last_used = now;
        if !conn.read_buf.is_empty() {
            tracing::warn!(
                server_id = conn.id,
                "closing upstream connection with unread bytes at release"
            );
            return;
        }
        if self.pool.too_old(&conn, now) {
            tracing::debug!(
                server_id = conn.id,
                "closing upstream connection past max_lifetime"
            );
            return;
        }
        if conn.dirty_session {
            let pool = Arc::clone(&self.pool);
            let permit = self.permit.take();
            tokio::spawn(async move {
                let _permit = permit;
                match reset_session(&mut conn).await {
                    Ok(()) => {
                        conn.dirty_session = false;
                        conn.sealed = None;
                        conn.prepared.clear();
                        conn.unnamed_owner = None;
                        conn.settings = HeldSettings::Defaults;
                        if let Ok(mut idle) = pool.idle.lock() {
                            idle.push(conn);
                        }
                    }
                    Err(e) => {
                        tracing::info!(server_id = conn.id, error = %e, "closing connection that could not be reset")
                    }
                }
            });
            return;
        }
        if let Ok(mut idle) = self.pool.idle.lock() {
            idle.push(conn);
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            tracing::debug!(
                server_id = conn.id,
                "closing upstream connection that was not released clean"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Ambient;
    use bytes::Bytes;

    #[test]
    fn a_context_counts_as_kept_only_once_it_committed() {
        let north = Bytes::from_static(b"north");
        let south = Bytes::from_static(b"south");
        let mut a = Ambient::Clear;
        assert!(a.safe_for(Some(&north)) && a.safe_for(None) && !a.keeps(&north));
        a = Ambient::Setting(north.clone());
        assert!(!a.keeps(&north), "not before its answer");
        assert!(a.safe_for(Some(&north)));
        assert!(!a.safe_for(Some(&south)) && !a.safe_for(None));
        a.confirmed();
        assert_eq!(a, Ambient::Kept(north.clone()));
        assert!(a.keeps(&north) && !a.keeps(&south));
        assert!(!a.safe_for(Some(&south)) && !a.safe_for(None));
        a.reset_sent();
        assert_eq!(a, Ambient::Maybe(north.clone()));
        assert!(!a.keeps(&north) && a.safe_for(Some(&north)) && !a.safe_for(Some(&south)));
        // a failed hidden statement leaves what was there
        let mut b = Ambient::Setting(north.clone());
        b.failed();
        assert_eq!(b, Ambient::Maybe(north.clone()));
        b.confirmed();
        assert_eq!(
            b,
            Ambient::Maybe(north),
            "a failure is not undone by its ReadyForQuery"
        );
        let mut c = Ambient::Clear;
        c.reset_sent();
        c.confirmed();
        c.failed();
        assert_eq!(c, Ambient::Clear);
    }
}
