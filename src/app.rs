//! Shared state, the accept loop and graceful shutdown.
//!
//! [`run`] takes a bound listener and a shutdown token, so tests bind `127.0.0.1:0` and the binary
//! binds the configured address.

use std::hash::RandomState;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::audit::{Audit, SinkConfig};
use crate::auth::throttle::LoginThrottle;
use crate::auth::{KeyError, Validator};
use crate::cancel::CancelRegistry;
use crate::client::{self, Handshake};
use crate::config::Config;
use crate::error::UserFacing;
use crate::guard::Guard;
use crate::pool::Pool;
use crate::session::Session;
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("JWT key configuration: {0}")]
    Key(#[from] KeyError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsError),
    /// Building rlsgate's own protocol messages failed (static text: not expected).
    #[error("internal: {0}")]
    Internal(String),
}

/// The parts a reload replaces (SIGHUP or the admin console's RELOAD): sessions that already
/// logged in keep their identity; new logins and new statements use the new state.
pub struct Live {
    pub config: Arc<Config>,
    pub validator: Validator,
    pub guard: Guard,
    pub tls_acceptor: Option<TlsAcceptor>,
}

impl Live {
    async fn build(config: Config) -> Result<Live, StartError> {
        let validator = Validator::new(&config.auth, &config.context.settings).await?;
        let tls_acceptor = match (&config.tls, config.client_tls_enabled()) {
            (Some(t), true) => match (&t.cert, &t.key) {
                (Some(cert), Some(key)) => Some(TlsAcceptor::from(tls::server_config(cert, key)?)),
                _ => None,
            },
            _ => None,
        };
        Ok(Live {
            guard: Guard::new(&config.guard),
            validator,
            tls_acceptor,
            config: Arc::new(config),
        })
    }
}

/// Everything sessions share. No globals: tests run many of these side by side.
pub struct Shared {
    live: arc_swap::ArcSwap<Live>,
    pub pool: Pool,
    /// `[server] pipeline_depth` > 1: autocommit units share pipelined connections.
    pub pipelines: Arc<crate::pipeline::Pipelines>,
    pub cancels: Arc<CancelRegistry>,
    /// Keys the server-side names of prepared statements (unpredictable per process).
    pub stmt_hasher: RandomState,
    /// The tenant context's `set_config` statement text and Parse, shared by the sessions.
    pub context_parse: crate::session::SharedParse,
    /// The same for the form a connection keeps (`set_config(…, false)`).
    pub kept_context_parse: crate::session::SharedParse,
    /// Clients' startup settings, one copy per distinct request.
    pub startup_settings: crate::session::StartupCache,
    /// transaction_wrap's prepared `BEGIN` and `COMMIT`.
    pub wrap_statements: crate::session::WrapStatements,
    /// `[context] mode = "signed"`: the signing keys and the prepared `rlsgate.enter`.
    pub sealer: Option<Arc<crate::seal::Sealer>>,
    /// Tests only ([`Shared::disable_guard_for_tests`]): the guard's denials are not enforced.
    guard_off: std::sync::atomic::AtomicBool,
    /// Clients whose server connection is pinned to them (transaction mode, session state).
    pub pinned: std::sync::atomic::AtomicUsize,
    pub throttle: LoginThrottle,
    pub audit: Audit,
    pub registry: Arc<crate::registry::Registry>,
    pub limits: Arc<crate::limits::Limits>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// PAUSE from the admin console: no new transactions start until RESUME.
    paused: tokio::sync::watch::Sender<bool>,
    /// Shutting down: no longer ready.
    pub draining: std::sync::atomic::AtomicBool,
    /// Where the configuration was read from (RELOAD, SIGHUP).
    config_path: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// Stops background work (JWKS refresh, audit writer) once the proxy is done.
    background: CancellationToken,
    /// The audit writer, awaited at shutdown so queued events are flushed.
    audit_writer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    next_conn_id: AtomicU64,
    /// Bumped when a reload installs a new guard: analyses kept from an older one are not reused
    /// for a new Parse (see `Statements::unnamed_again`).
    guard_epoch: AtomicU64,
}

impl Shared {
    pub async fn new(config: Config) -> Result<Arc<Shared>, StartError> {
        let live = Live::build(config).await?;
        let config = Arc::clone(&live.config);
        let background = CancellationToken::new();
        live.validator.spawn_refresh(&background);
        let (audit, audit_writer) = match &config.audit.sink {
            Some(connection) => {
                let sink = SinkConfig {
                    connection: connection.clone(),
                    table: config.audit.table.clone(),
                    queue: config.audit.queue,
                    ..SinkConfig::default()
                };
                let (audit, writer) = Audit::with_sink(sink, background.clone());
                (audit, Some(writer))
            }
            None => (Audit::log_only(), None),
        };
        let throttle = LoginThrottle::new(
            config.auth.failed_login_burst,
            config.auth.failed_login_window,
        );
        let upstream_tls = tls::upstream_config(&config.upstream)?;
        let metrics = Arc::new(crate::metrics::Metrics::new(
            config.metrics.per_tenant,
            config.metrics.tenant_cap,
        ));
        let stmt_hasher = RandomState::new();
        let sealer = crate::seal::Sealer::from_config(&config.context, &stmt_hasher)
            .map_err(|e| StartError::Internal(e.to_string()))?
            .map(Arc::new);
        let pool_options = crate::pool::PoolOptions {
            keepalive: config.server.keepalive(),
            metrics: Some(Arc::clone(&metrics)),
            sealer: sealer.clone(),
        };
        let wrap_statements = crate::session::WrapStatements::new(&stmt_hasher)
            .map_err(|e| StartError::Internal(e.to_string()))?;
        let discard_sequences =
            crate::session::OwnStatement::prepared(&stmt_hasher, "DISCARD SEQUENCES")
                .map_err(|e| StartError::Internal(e.to_string()))?;
        let pool = Pool::with_options(config.upstream.clone(), upstream_tls, pool_options);
        Ok(Arc::new(Shared {
            pipelines: Arc::new(crate::pipeline::Pipelines::new(
                config.server.pipeline_depth,
                config.upstream.pool_size,
                pool.clone(),
                discard_sequences,
            )),
            pool,
            cancels: Arc::new(CancelRegistry::default()),
            stmt_hasher,
            context_parse: Default::default(),
            kept_context_parse: Default::default(),
            startup_settings: Default::default(),
            wrap_statements,
            sealer,
            guard_off: std::sync::atomic::AtomicBool::new(false),
            pinned: std::sync::atomic::AtomicUsize::new(0),
            throttle,
            audit,
            registry: Arc::new(crate::registry::Registry::default()),
            limits: crate::limits::Limits::new(config.limits.clone(), config.upstream.pool_size),
            metrics,
            paused: tokio::sync::watch::channel(false).0,
            draining: std::sync::atomic::AtomicBool::new(false),
            config_path: std::sync::Mutex::new(None),
            background,
            audit_writer: std::sync::Mutex::new(audit_writer),
            next_conn_id: AtomicU64::new(1),
            guard_epoch: AtomicU64::new(0),
            live: arc_swap::ArcSwap::from_pointee(live),
        }))
    }

    /// Turn the statement guard's denials off, for tests that show what the database-side
    /// hardening (`[context] mode = "signed"`) stops on its own. Deliberately not reachable
    /// from a configuration file, the command line or the environment.
    #[doc(hidden)]
    pub fn disable_guard_for_tests(&self) {
        tracing::warn!("the statement guard is OFF (test switch)");
        self.guard_off.store(true, Ordering::Relaxed);
    }

    /// Whether the guard's denials are enforced (always, outside tests).
    pub fn guard_enforced(&self) -> bool {
        !self.guard_off.load(Ordering::Relaxed)
    }

    /// The current configuration (a reload may replace it between calls).
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.live.load().config)
    }

    /// Classify a statement with the current guard (cached by text).
    pub fn analyze(&self, sql: &str) -> Arc<crate::guard::Analysis> {
        self.live.load().guard.analyze(sql)
    }

    /// The generation of the guard in force (see [`Shared::analyze`]); changes with every
    /// reload.
    pub fn guard_epoch(&self) -> u64 {
        self.guard_epoch.load(Ordering::Acquire)
    }

    /// The current live state (validator, guard, TLS acceptor).
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    pub fn set_config_path(&self, path: std::path::PathBuf) {
        if let Ok(mut p) = self.config_path.lock() {
            *p = Some(path);
        }
    }

    /// RELOAD / SIGHUP: read the config file again and swap it in if it is valid.
    pub async fn reload_from_file(&self) -> Result<Vec<String>, String> {
        let path = self
            .config_path
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .ok_or("no configuration file to reload from")?;
        let config = Config::load(&path).map_err(|e| e.to_string())?;
        let notes = self.reload(config).await.map_err(|e| e.to_string())?;
        tracing::info!(path = %path.display(), ?notes, "configuration reloaded");
        Ok(notes)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
        tracing::info!(paused, "pause state changed");
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Wait while paused (at most `limit`); false if still paused.
    pub async fn wait_unpaused(&self, limit: std::time::Duration) -> bool {
        // (not paused, the usual case: no receiver, no timer)
        if !self.is_paused() {
            return true;
        }
        let mut rx = self.paused.subscribe();
        let wait = async {
            while *rx.borrow_and_update() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// /readyz: not draining, not paused, upstream reachable.
    pub fn readiness(&self) -> crate::http::ReadyStatus {
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return crate::http::ReadyStatus::not_ready("shutting down");
        }
        if self.is_paused() {
            return crate::http::ReadyStatus::not_ready("paused");
        }
        if self.pool.upstream_failing() {
            return crate::http::ReadyStatus::not_ready("upstream unreachable");
        }
        if self.registry.clients().len() >= self.config().server.max_client_conn {
            return crate::http::ReadyStatus::not_ready("max_client_conn reached");
        }
        crate::http::ReadyStatus::ready()
    }

    /// Re-read: validate and build the new state first; on any error the old one stays in force.
    /// Returns notes about changes that only a restart applies.
    pub async fn reload(&self, config: Config) -> Result<Vec<String>, StartError> {
        let old = self.config();
        let mut notes = Vec::new();
        if old.server.listen != config.server.listen {
            notes.push(format!(
                "server.listen change to {} needs a restart",
                config.server.listen
            ));
        }
        if old.server.http_listen != config.server.http_listen {
            notes.push("server.http_listen change needs a restart".to_string());
        }
        if format!("{:?}", old.upstream) != format!("{:?}", config.upstream) {
            notes.push("[upstream] changes need a restart".to_string());
        }
        if old.server.keepalive() != config.server.keepalive() {
            notes.push(
                "server.tcp_* keepalive changes apply to new client connections; upstream connections keep theirs until a restart".to_string(),
            );
        }
        if (
            old.context.mode,
            &old.context.signing_key,
            &old.context.previous_signing_key,
        ) != (
            config.context.mode,
            &config.context.signing_key,
            &config.context.previous_signing_key,
        ) {
            notes.push(
                "[context] mode and signing key changes need a restart (the running ones stay in force)"
                    .to_string(),
            );
        }
        if old.server.pool_mode != config.server.pool_mode {
            notes.push("server.pool_mode change applies to new clients only".to_string());
        }
        let live = Live::build(config).await?;
        live.validator.spawn_refresh(&self.background);
        self.live.store(Arc::new(live));
        self.guard_epoch.fetch_add(1, Ordering::AcqRel);
        Ok(notes)
    }
}

/// [`run`] on a runtime worker thread rather than the caller's (`block_on`'s) thread: sessions
/// spawned from the accept loop then start on the worker's own queue instead of waking it from
/// outside (about two futex calls per login).
pub async fn run_on_worker(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    if let Err(e) = tokio::spawn(run(listener, shared, shutdown)).await {
        tracing::error!(error = %e, "the accept loop failed");
    }
}

/// Accept clients until `shutdown` fires, then let sessions finish their transactions for up to
/// `server.shutdown_timeout`.
pub async fn run(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let maintenance = {
        let pool = shared.pool.clone();
        let stop = shutdown.clone();
        let gauges = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            let metrics = Arc::clone(&gauges.metrics);
            let shared_for_gauges = gauges;
            let mut memory = MemoryReturn::default();
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        pool.maintain().await;
                        metrics.set_server_connections(pool.idle_count(), pool.in_use());
                        metrics.set_pinned(shared_for_gauges.pinned.load(Ordering::Relaxed));
                        let registry = &shared_for_gauges.registry;
                        memory.after_clients(registry.take_peak(), registry.count()).await;
                        // idle sessions whose token expired end now, quiet ones rest (no timer
                        // per session)
                        registry.tick(jsonwebtoken::get_current_timestamp());
                    }
                    _ = stop.cancelled() => return,
                }
            }
        })
    };
    let clients = Arc::new(tokio::sync::Semaphore::new(
        shared.config().server.max_client_conn,
    ));
    crate::fd_limit::prepare(
        shared.config().server.max_client_conn,
        shared.config().upstream.pool_size,
    );
    let mut fd_reserve = crate::fd_limit::Reserve::new();
    let mut socket_options = crate::stream::ClientSocketOptions::default();
    let local = listener.local_addr().ok();
    tracing::info!(listen = ?local, pool_size = shared.config().upstream.pool_size, "rlsgate is accepting connections");
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    if let Err(e) = socket_options.apply(&listener, &tcp, &shared.config().server.keepalive()) {
                        tracing::warn!(%peer, error = %e, "cannot set TCP_NODELAY or keepalive on the client socket");
                    }
                    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
                    let Ok(slot) = Arc::clone(&clients).try_acquire_owned() else {
                        tracing::warn!(%peer, "max_client_conn reached; refusing a client");
                        tokio::spawn(refuse_client(tcp));
                        continue;
                    };
                    let span = client_span(conn_id, peer, None);
                    // (no wrapping async block: it would store the session future twice)
                    let session = handle(tcp, peer, Arc::clone(&shared), conn_id, shutdown.clone(), slot, span);
                    tracker.spawn(session);
                }
                Err(e) if crate::fd_limit::is_exhaustion(&e) && fd_reserve.release() => {
                    // Out of descriptors: use the reserved one to tell the waiting client.
                    let next = tokio::time::timeout(
                        std::time::Duration::from_millis(100),
                        listener.accept(),
                    )
                    .await;
                    if let Ok(Ok((tcp, peer))) = next {
                        tracing::warn!(%peer, error = %e, "out of file descriptors; refusing a client");
                        refuse_at_fd_limit(tcp);
                    }
                    fd_reserve.restore();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    shared.draining.store(true, Ordering::Relaxed);
    // idle sessions end now; busy ones at the end of their transaction (see Session::serve)
    shared.registry.wake_all();
    maintenance.abort();
    tracker.close();
    let timeout = shared.config().server.shutdown_timeout;
    tracing::info!(
        sessions = tracker.len(),
        ?timeout,
        "shutting down: waiting for open transactions"
    );
    if tokio::time::timeout(timeout, tracker.wait()).await.is_err() {
        tracing::warn!(
            sessions = tracker.len(),
            "shutdown timeout reached; closing remaining sessions"
        );
    }
    shared.pool.close();
    shared.background.cancel();
    let writer = shared.audit_writer.lock().ok().and_then(|mut w| w.take());
    if let Some(writer) = writer {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), writer).await;
    }
}

/// Memory freed by clients that left goes back to the system. The allocator keeps freed memory
/// for reuse; after thousands of idle clients leave, rlsgate would otherwise hold their memory
/// until it exits.
#[derive(Default)]
struct MemoryReturn {
    /// Most clients seen since memory was last returned.
    peak: usize,
}

impl MemoryReturn {
    /// Clients that left since the peak before memory is returned (and at least half of it).
    const LEFT: usize = 100;

    /// `seen`: most clients at once since the last call; `now`: clients now.
    async fn after_clients(&mut self, seen: usize, now: usize) {
        self.peak = self.peak.max(seen);
        if self.peak - now < Self::LEFT || now > self.peak / 2 {
            return;
        }
        self.peak = now;
        // walks the whole heap: off the runtime's worker threads
        let _ = tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim only releases free memory back to the system.
            unsafe { libc::malloc_trim(0) }
        })
        .await;
        tracing::debug!(clients = now, "returned freed memory to the system");
    }
}

/// Serve /metrics, /healthz and /readyz on `listener` until `stop` fires.
pub async fn serve_http(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let ready = Arc::clone(&shared);
    let state = crate::http::HttpState::new(Arc::clone(&shared.metrics), move || ready.readiness());
    crate::http::serve(listener, state, stop).await;
}

/// Over `max_client_conn`: tell the client and close, without reading anything.
async fn refuse_client(tcp: TcpStream) {
    let err = too_many_clients("rlsgate's server.max_client_conn is reached");
    client::report(&mut crate::stream::Stream::Plain(tcp), &err).await;
}

/// `FATAL 53300`, as Postgres words it, with rlsgate's reason as the hint.
fn too_many_clients(hint: &'static str) -> crate::error::ClientError {
    crate::error::ClientError::fatal(
        crate::error::sqlstate::TOO_MANY_CONNECTIONS,
        "sorry, too many clients already",
    )
    .with_hint(hint)
}

/// At the open-files limit: `FATAL 53300` written without waiting (whatever the client sent
/// is read first, so closing does not reset the connection under the message), then closed.
fn refuse_at_fd_limit(tcp: TcpStream) {
    let err = too_many_clients("rlsgate has reached its open-files limit");
    let mut out = bytes::BytesMut::new();
    crate::protocol::backend::write_error(&err, &mut out);
    let mut sink = [0u8; 1024];
    let _ = tcp.try_read(&mut sink);
    let _ = tcp.try_write(&out);
    if let Ok(std) = tcp.into_std() {
        let _ = std.shutdown(std::net::Shutdown::Write);
    }
}

/// One client connection, from accept to close. The task's future is what an idle client costs:
/// the login runs in a boxed future freed once the session starts, so only the session's own
/// state stays with the task.
///
/// Not an `async fn`: its arguments would stay in the task's future for the client's lifetime.
fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    conn_id: u64,
    shutdown: CancellationToken,
    client_slot: tokio::sync::OwnedSemaphorePermit,
    span: tracing::Span,
) -> impl Future<Output = ()> + Send {
    let login = Box::pin(start(tcp, peer, shared, conn_id, shutdown).instrument(span));
    async move {
        let _client_slot = client_slot;
        let Some(session) = login.await else {
            return;
        };
        session.run().await;
    }
}

/// The span of a client connection's logs: its id and address, and once logged in its user and
/// tenant (a resting session's span is made again from them when it resumes).
pub fn client_span(conn_id: u64, peer: SocketAddr, who: Option<(&str, &str)>) -> tracing::Span {
    let span = tracing::info_span!(
        "conn",
        conn_id,
        %peer,
        user = tracing::field::Empty,
        tenant = tracing::field::Empty
    );
    if let Some((user, tenant)) = who {
        span.record("user", user);
        span.record("tenant", tenant);
    }
    span
}

/// Handshake, login and greeting: the session that then serves the client (holding its slot
/// under its tenant's connection limit). `None` = the connection is done (a cancel request, the
/// admin console, a refused login).
async fn start(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    conn_id: u64,
    shutdown: CancellationToken,
) -> Option<Box<Session>> {
    let timeout = shared.config().server.handshake_timeout;
    let login = match tokio::time::timeout(timeout, client::handshake(tcp, peer, &shared)).await {
        Err(_) => {
            tracing::info!("handshake timed out");
            return None;
        }
        Ok(Err((stream, e))) => {
            tracing::info!(error = %e, "login refused");
            if let Some(mut stream) = stream {
                client::report(&mut stream, &e.to_client_error()).await;
            }
            return None;
        }
        Ok(Ok(Handshake::Cancel {
            pid,
            key,
            mut stream,
        })) => {
            shared.cancels.cancel(pid, &key).await;
            shared.metrics.cancel();
            client::close(&mut stream).await;
            return None;
        }
        Ok(Ok(Handshake::Admin { stream, read_buf })) => {
            tracing::info!("admin console login");
            Box::pin(crate::admin::run(stream, read_buf, Arc::clone(&shared))).await;
            return None;
        }
        Ok(Ok(Handshake::Login(login))) => login,
    };
    let span = tracing::Span::current();
    span.record("user", login.user.as_str());
    span.record("tenant", &*login.identity.tenant);
    let mut login = *login;
    let tenant_slot = match shared.limits.join(&login.identity.tenant) {
        Ok(slot) => slot,
        Err(e) => {
            tracing::info!(error = %e, "tenant connection limit");
            client::report(&mut login.stream, &e).await;
            return None;
        }
    };
    let known = shared.pool.known_server_params();
    let params = match known {
        Some(p) => Ok(p),
        // (boxed, as the admin console below: rare, and large futures would size every login's)
        None => Box::pin(shared.pool.server_params()).await,
    };
    let params = match params {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "upstream unavailable at login");
            client::report(&mut login.stream, &e.to_client_error()).await;
            return None;
        }
    };
    // (debug: the audit event `login_ok` is the login's line at info, with peer, user, tenant,
    // subject, kid and jti; one line per login instead of two)
    tracing::debug!(
        subject = login.identity.subject.as_deref().unwrap_or(""),
        tls = login.stream.is_tls(),
        "client logged in"
    );
    let requested = client::startup_params::requested_settings(&login.startup.params);
    let session = Session::new(
        login,
        &requested,
        Arc::clone(&shared),
        conn_id,
        shutdown,
        tenant_slot,
        span,
    );
    let mut session = match session {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "could not start session");
            return None;
        }
    };
    if let Err(e) = session.greet(&params, &requested).await {
        tracing::debug!(error = %e, "client left during login");
        return None;
    }
    Some(session)
}
