//! The per-client session: reads client messages, classifies them with the guard, checks out an
//! upstream connection at transaction start, injects the tenant context, and relays replies.
//!
//! - [`frontend`]: what each client message does (units, injection, prepared statements, denials).
//! - [`relay`]: what each server message does, driven by the [`expect`] queue.
//! - Transaction mode: the connection goes back to the pool when the server reports `I` and
//!   nothing is in flight; session mode keeps it for the client's lifetime.

mod expect;
mod frontend;
mod inject;
pub use inject::{OwnStatement, SharedParse, WrapStatements};
pub use settings::StartupCache;
pub use statements::Prepared;
mod io;
mod park;
mod pipelined;
mod reauth;
mod relay;
mod settings;
mod statements;
mod tx;
mod unit;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::Shared;
use crate::auth::Identity;
use crate::cancel::Registration;
use crate::client::LoggedIn;
use crate::config::PoolMode;
use crate::error::{ClientError, UserFacing, sqlstate};
use crate::guard::TxEffect;
use crate::pool::{Ambient, Checkout, HeldSettings, PoolError, Prefer, SequenceOwner};
use crate::protocol::ProtocolError;
use crate::protocol::backend::{self as be, TxStatus};
use crate::protocol::frame::{Frame, FrameRef, try_read_frame};
use crate::stream::Stream;
use expect::Expect;
use settings::Settings;
use statements::Statements;
use tx::{CopyState, Predicted, Tx};
use unit::{Lanes, Unit};

/// Largest server message relayed (Postgres' own limit is 1 GB).
const MAX_SERVER_MESSAGE: usize = (1 << 30) + 1024;
/// Server messages larger than this are streamed to the client instead of buffered whole.
const STREAM_AT: usize = 1 << 20;
/// How long the last words to a leaving client may take.
const CLOSING_WRITE: std::time::Duration = std::time::Duration::from_secs(5);

/// Which form of the kept context a connection takes (see inject::Context::kept_form).
fn kept_form_for(conn: &crate::pool::ServerConn) -> inject::ContextForm {
    match conn.may_set_config {
        true => inject::ContextForm::SetConfig,
        false => inject::ContextForm::SetLocal,
    }
}

/// The hidden statement that seals a connection for a tenant (signed context).
const SEAL: &str = "tenant seal";
/// The `DISCARD SEQUENCES` between clients of different tenants (see `sync_settings`).
const SEQUENCE_DISCARD: &str = "sequence discard";
/// The `RESET ALL` between clients with different settings.
const SETTINGS_RESET: &str = "settings reset";
/// The `set_config(…, false)` that a connection keeps the client's context with.
const KEEP_CONTEXT: &str = "kept context";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client i/o: {0}")]
    ClientIo(std::io::Error),
    #[error("upstream i/o: {0}")]
    UpstreamIo(std::io::Error),
    #[error("client protocol violation: {0}")]
    ClientProtocol(ProtocolError),
    #[error("upstream protocol violation: {0}")]
    UpstreamProtocol(String),
    #[error("upstream closed the connection")]
    UpstreamClosed,
    #[error("could not apply the tenant context: {0}")]
    Injection(String),
    /// What rlsgate runs between two clients on a connection (`DISCARD SEQUENCES`, `RESET ALL`)
    /// failed: the previous client's state may still be there.
    #[error("cleaning the upstream connection between clients failed: {0}")]
    Cleanup(String),
    #[error("token expired")]
    TokenExpired,
    #[error("shutting down")]
    Shutdown,
    #[error("idle in transaction for longer than idle_in_transaction_timeout")]
    IdleInTransaction,
    #[error("no answer from the upstream within query_timeout")]
    QueryTimeout,
    #[error("terminated by the administrator")]
    Killed,
    #[error("the upstream now reads SQL text with {0}")]
    LexerChanged(String),
}

impl UserFacing for SessionError {
    fn to_client_error(&self) -> ClientError {
        match self {
            SessionError::ClientIo(_) => {
                ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, "client connection error")
            }
            SessionError::ClientProtocol(e) => {
                ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())
            }
            SessionError::UpstreamIo(_)
            | SessionError::UpstreamClosed
            | SessionError::UpstreamProtocol(_) => ClientError::fatal(
                sqlstate::CONNECTION_FAILURE,
                "rlsgate: lost the connection to the upstream database",
            )
            .with_detail(self.to_string()),
            SessionError::Injection(m) => ClientError::fatal(
                sqlstate::INTERNAL_ERROR,
                "rlsgate: could not apply the tenant context",
            )
            .with_detail(m.clone()),
            SessionError::Cleanup(m) => ClientError::fatal(
                sqlstate::INTERNAL_ERROR,
                "rlsgate: could not clean the upstream connection between clients",
            )
            .with_detail(m.clone()),
            SessionError::TokenExpired => {
                ClientError::fatal(sqlstate::INVALID_AUTHORIZATION, "token expired")
                    .with_hint("reconnect with a fresh token")
            }
            SessionError::LexerChanged(what) => ClientError::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!(
                    "rlsgate: the upstream connection now reads SQL text with {what}; closing the session"
                ),
            ),
            SessionError::Killed => ClientError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command (rlsgate KILL)",
            ),
            SessionError::IdleInTransaction => ClientError::fatal(
                sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                "terminating connection due to idle-in-transaction timeout",
            )
            .with_hint("rlsgate's server.idle_in_transaction_timeout"),
            SessionError::QueryTimeout => ClientError::fatal(
                sqlstate::QUERY_CANCELED,
                "rlsgate: no answer from the upstream database within query_timeout; closing the connection",
            )
            .with_hint("rlsgate's server.query_timeout"),
            SessionError::Shutdown => {
                ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, "rlsgate is shutting down")
            }
        }
    }
}

/// The held server connection is ending: the server sent a FATAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerEnding {
    /// Between the client's transactions, nothing of the client's on it: the connection is
    /// closed and the client's next transaction gets another one (see serve).
    Quietly,
    /// With the client's work on it: the FATAL was forwarded to the client, whose session ends
    /// with it (no second error when the connection then closes).
    Told,
}

/// Portals on the server that end the transaction (or run outside one) when executed: name →
/// (their statement's effect, unit of their Bind). Rare: no map is held until one is bound.
#[derive(Default)]
struct EndingPortals(Option<Box<PortalMap>>);

type PortalMap = std::collections::HashMap<Box<str>, (TxEffect, u64)>;

impl EndingPortals {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|m| m.is_empty())
    }

    fn get(&self, portal: &str) -> Option<(TxEffect, u64)> {
        self.0.as_ref()?.get(portal).copied()
    }

    fn insert(&mut self, portal: Box<str>, entry: (TxEffect, u64)) {
        self.0.get_or_insert_default().insert(portal, entry);
    }

    /// Keep an entry already there, else insert this one.
    fn insert_missing(&mut self, portal: Box<str>, entry: (TxEffect, u64)) {
        self.0
            .get_or_insert_default()
            .entry(portal)
            .or_insert(entry);
    }

    fn remove(&mut self, portal: &str) -> Option<(TxEffect, u64)> {
        self.0.as_mut()?.remove(portal)
    }

    /// Forget the portals bound in units up to `done` (their transaction is over); the map
    /// goes when empty.
    fn forget_up_to(&mut self, done: u64) {
        if let Some(map) = self.0.as_mut() {
            map.retain(|_, (_, unit)| *unit > done);
            if map.is_empty() {
                self.0 = None;
            }
        }
    }
}

/// A multi-statement Query split after COMMIT/ROLLBACK, run one piece at a time.
struct Split {
    rest: VecDeque<Piece>,
    failed: bool,
    /// Kind of the piece sent last.
    last: PieceKind,
}

/// A piece of a split Query.
pub(crate) struct Piece {
    pub text: String,
    pub kind: PieceKind,
    /// It may run COPY FROM STDIN (the server then reads data: nothing may follow it unasked).
    pub copy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PieceKind {
    /// The client's own BEGIN/START TRANSACTION (transaction_wrap: context goes after it).
    Begin,
    /// Other transaction control (COMMIT, ROLLBACK, …), sent as is.
    Control,
    /// Ordinary statements.
    Statements,
}

pub struct Session {
    shared: Arc<Shared>,
    /// The config at login: modes, limits and timeouts are read from it (a reload applies to
    /// new sessions).
    config: Arc<crate::config::Config>,
    id: u64,
    client: Stream,
    client_buf: BytesMut,
    client_out: BytesMut,
    /// Bytes written to the client that TLS may still hold back (see [`io`]).
    client_unflushed: bool,
    /// (a pointer to the connection, the pool and a permit: held inline, so a checkout
    /// allocates nothing)
    server: Option<Checkout>,
    server_out: BytesMut,
    server_unflushed: bool,
    identity: Identity,
    /// The tenant context, as statements prepared once per connection.
    context: inject::Context,
    expect: VecDeque<Expect>,
    /// `rlsgate.reauth($1)` statements and portal (extended protocol).
    reauth: reauth::ReauthState,
    /// Query/Sync messages sent whose ReadyForQuery has not arrived.
    in_flight: usize,
    /// The transaction on the held connection (see [`tx`]).
    tx: Tx,
    /// The client's extended-protocol unit since its last Sync.
    unit: Unit,
    /// Portals on the server that end the transaction (or run outside one) when executed:
    /// name → (their statement's effect, unit of their Bind). Portals die with their
    /// transaction: entries go when a later unit reports idle.
    ending_portals: EndingPortals,
    copy: CopyState,
    /// The portal last bound to a COPY FROM STDIN statement.
    copy_portal: Option<Box<str>>,
    stmts: Statements,
    settings: Settings,
    /// Units (Query/Sync) sent and answered, to know which setting changes a reply settles.
    units_sent: u64,
    units_done: u64,
    /// Boxed: rare, and every session holds the field.
    split: Option<Box<Split>>,
    /// Transaction mode: the server connection stays with this client (session state), and why.
    pinned: Option<&'static str>,
    /// The pin counted against the tenant's `max_pinned_per_tenant` (taken just before the
    /// pinning statement is sent; released when the client leaves).
    pin_slot: Option<Box<crate::limits::PinSlot>>,
    /// Entry in the client registry (admin console; KILL).
    client_entry: crate::registry::Registration,
    /// Client-connection metrics (state gauge).
    tracker: crate::metrics::ClientTracker,
    /// When the current server connection was checked out.
    held_since: Option<std::time::Instant>,
    /// When bytes last came from the upstream (kept only with a query_timeout).
    server_heard: Option<std::time::Instant>,
    /// The timer of the earliest deadline (idle in transaction, query timeout), made when first
    /// needed and dropped when the session goes idle.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Bytes of a large server message still to stream through to the client.
    passthrough: usize,
    /// When the client's oldest unanswered request arrived (query duration metric).
    query_started: Option<std::time::Instant>,
    /// The tenant's concurrent-transaction slot, held with the server connection.
    tenant_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The client's place under its tenant's limits (released when the session ends).
    tenant_slot: crate::limits::ClientSlot,
    /// A client message that waits until the replies in flight tell the transaction state
    /// (boxed: rare, and every session holds the field).
    pending: Option<Box<Frame>>,
    /// The server is ending the held connection, and what the client was told.
    server_ending: Option<ServerEnding>,
    cancel: Registration,
    shutdown: CancellationToken,
    /// The unit running on a pipeline lane (see [`pipelined`]).
    lane_reply: Option<Arc<crate::pipeline::Reply>>,
    /// The last unit's, kept for the next one (no allocation per unit).
    spare_reply: Option<Arc<crate::pipeline::Reply>>,
    /// Whether units may go to pipeline lanes.
    lanes: Lanes,
    /// The client's span (made again when a resting client resumes).
    span: tracing::Span,
}

/// Report `e` to a client whose session could not go on, as a boxed future (the task's own
/// future does not carry room for it).
fn tell_and_close(
    mut client: Stream,
    e: SessionError,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        crate::client::report(&mut client, &e.to_client_error()).await;
    })
}

/// Which deadline of the session loop fires first.
#[derive(Debug, Clone, Copy)]
enum Deadline {
    IdleInTransaction,
    Query,
}

/// How a session's loop ended without an error.
enum Served {
    /// The client left.
    Left,
    /// The client has been quiet for a while and the session is at rest: it may park.
    Quiet,
}

enum Flow {
    Continue,
    /// Hold this frame until nothing is in flight.
    Wait(Frame),
    Terminate,
}

impl Session {
    /// `requested`: the client's startup settings (see `startup_params::requested_settings`),
    /// which the greeting reports back too.
    pub fn new(
        login: LoggedIn,
        requested: &[(String, String)],
        shared: Arc<Shared>,
        id: u64,
        shutdown: CancellationToken,
        tenant_slot: crate::limits::ClientSlot,
        span: tracing::Span,
    ) -> Result<Box<Self>, SessionError> {
        let config = shared.config();
        let cancel = shared.cancels.register();
        let client_entry = shared.registry.register(
            id,
            &login.identity.tenant,
            login.user,
            login.peer,
            login
                .identity
                .expires_at
                .saturating_add(config.auth.leeway.as_secs()),
        );
        let tracker = shared.metrics.track_client(&login.identity.tenant);
        let settings = Settings::from_startup(
            requested,
            shared.live().guard.protected(),
            &shared.startup_settings,
        );
        let login = park::Login {
            client: login.stream,
            read_buf: login.read_buf,
            identity: login.identity,
            settings,
            client_entry,
            tracker,
            tenant_slot,
            cancel,
        };
        let (parked, read_buf) = park::Parked::at_login(login, shared, id, shutdown);
        parked.into_session_with(read_buf, span).map_err(|(_, e)| e)
    }

    /// Finish the login (AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery).
    pub async fn greet(
        &mut self,
        server_params: &[(String, String)],
        requested: &[(String, String)],
    ) -> Result<(), SessionError> {
        // One allocation for the whole greeting (AuthenticationOk 9, BackendKeyData 13,
        // ReadyForQuery 6 bytes; a client's own startup value may be longer than the server's).
        let params: usize = server_params
            .iter()
            .map(|(k, v)| 7 + k.len() + v.len())
            .sum();
        let own: usize = requested.iter().map(|(_, v)| v.len()).sum();
        self.client_out.reserve(28 + params + own);
        be::write_auth_ok(&mut self.client_out);
        for (k, v) in server_params {
            // The client's own startup values win (they are applied upstream before its work).
            let v = match k.as_str() {
                "application_name" | "DateStyle" | "IntervalStyle" | "TimeZone" => {
                    self.settings.startup_value(requested, k).unwrap_or(v)
                }
                _ => v,
            };
            be::write_parameter_status(k, v, &mut self.client_out);
        }
        be::write_backend_key(self.cancel.pid, self.cancel.key, &mut self.client_out);
        be::write_ready(TxStatus::Idle, &mut self.client_out);
        self.flush_client().await
    }

    /// Run until the client leaves. Errors are reported to the client here. A client quiet for
    /// a while rests as a [`park::Parked`] record: what it costs then is the record and this
    /// future (a few pointers), not the session, its span and its loop.
    pub fn run(self: Box<Self>) -> impl Future<Output = ()> + Send {
        let mut session = self;
        async move {
            // A client that has not spoken yet rests at once: a new session's memory is given
            // back before the next client's login needs as much (freed after a quiet spell
            // instead, the sessions of a crowd of clients that logged in together would leave
            // holes that no later allocation fills).
            let mut quiet = session.parkable();
            loop {
                if !std::mem::take(&mut quiet) {
                    let span = session.span.clone();
                    // Boxed: the loop's futures exist only while the client is not resting.
                    if Box::pin(session.serve_until_quiet().instrument(span)).await {
                        return;
                    }
                }
                // (boxed: the task's future stays small, and a session in use does not carry
                // room for the record)
                let parked = Box::new(session.park());
                std::future::poll_fn(|cx| parked.poll_wait(cx)).await;
                // (in a block: what it moves is not kept in this future across the await)
                let goodbye = match parked.into_session(BytesMut::new()) {
                    Ok(s) => {
                        session = s;
                        continue;
                    }
                    Err((client, e)) => {
                        // (not expected: the same identity gave a context at login)
                        tracing::error!(error = %e, "could not resume a resting session");
                        tell_and_close(client, e)
                    }
                };
                goodbye.await;
                return;
            }
        }
    }

    /// Serve the client until it leaves (`true`: it was told why if it must) or rests
    /// (`false`).
    async fn serve_until_quiet(&mut self) -> bool {
        let result = match self.serve().await {
            Ok(Served::Quiet) => {
                tracing::trace!("client resting");
                return false;
            }
            Ok(Served::Left) => Ok(()),
            Err(e) => Err(e),
        };
        // Boxed: the goodbye's futures would otherwise size the future while it serves.
        Box::pin(self.end(result)).await;
        tracing::debug!("client disconnected");
        true
    }

    /// The client is leaving (or must): report the error, if any, and give the connection back.
    async fn end(&mut self, result: Result<(), SessionError>) {
        if let Some(reply) = self.lane_reply.take() {
            // the lane drops the unit's replies; a server that does not answer ends the lane
            reply.abandon(matches!(result, Err(SessionError::QueryTimeout)));
        }
        if let Err(SessionError::LexerChanged(what)) = &result {
            tracing::error!(%what, "upstream connection reads SQL text differently from the guard; closing it");
            drop(self.server.take());
        }
        if let Err(e) = &result {
            match e {
                SessionError::ClientIo(_) => tracing::debug!(error = %e, "client connection ended"),
                SessionError::TokenExpired => {
                    tracing::info!("token expired; closing the connection");
                    self.shared
                        .audit
                        .record(crate::audit::AuditEvent::TokenExpired {
                            peer: self.client_entry.entry.peer.to_string(),
                            user: self.client_entry.entry.user.clone(),
                            tenant: self.identity.tenant.to_string(),
                            jti: self.identity.jti.clone(),
                        });
                }
                _ => tracing::warn!(error = %e, "session ended with an error"),
            }
            let lost = matches!(
                e,
                SessionError::UpstreamIo(_) | SessionError::UpstreamClosed
            );
            if lost {
                self.shared
                    .metrics
                    .upstream_error(crate::metrics::UpstreamErrorKind::Lost);
            }
            // One error per failure: after the server's own FATAL, the client has its answer.
            let told = lost && self.server_ending == Some(ServerEnding::Told);
            if told {
                let _ = tokio::time::timeout(CLOSING_WRITE, async {
                    self.client.write_all(&self.client_out).await?;
                    self.client.flush().await
                })
                .await;
            } else if !matches!(e, SessionError::ClientIo(_)) {
                let mut out = std::mem::take(&mut self.client_out);
                be::write_error(&e.to_client_error(), &mut out);
                // bounded: a client that does not read must not keep the session
                let _ = tokio::time::timeout(CLOSING_WRITE, async {
                    self.client.write_all(&out).await?;
                    self.client.flush().await
                })
                .await;
            }
        }
        if self.client.is_tls() {
            // close_notify, as Postgres sends it (see client::close)
            crate::client::close(&mut self.client).await;
        }
        self.finish().await;
    }

    async fn serve(&mut self) -> Result<Served, SessionError> {
        // The registry wakes a session whose token expired (once a second, while it lives); the
        // expiry is read after such a wake-up, not on every loop (a clock read each).
        let mut woken = true;
        loop {
            if self.process_client().await? {
                return Ok(Served::Left);
            }
            if self.expect.is_empty() && self.lane_reply.is_none() {
                // nothing awaits the upstream: what the client asked was answered here
                self.query_started = None;
            }
            self.maybe_release().await;

            let idle = self.between_transactions();
            // Holding a connection inside a transaction and waiting for the client.
            let idle_in_tx =
                self.server.is_some() && !idle && self.in_flight == 0 && self.pending.is_none();
            if idle && self.pending.is_none() {
                // Between transactions: large buffers go (small ones serve the next transaction;
                // all go when the client rests).
                io::release_idle(&mut self.client_buf);
                io::release_idle(&mut self.client_out);
                io::release_idle(&mut self.server_out);
            }
            // KILL, the token's expiry and shutdown wake the session through its registry entry
            // (see `Registry::wake_expired`); the flags are read here, before every wait, so a
            // wake-up that arrives while the session is busy is not lost.
            if self.client_entry.entry.is_killed() {
                return Err(SessionError::Killed);
            }
            if idle && self.shutdown.is_cancelled() {
                return Err(SessionError::Shutdown);
            }
            // A token that expires while the client is between transactions ends the session then
            // (a new transaction checks it too: see start_unit).
            if idle && std::mem::take(&mut woken) && self.token_expired() {
                return Err(SessionError::TokenExpired);
            }
            // One timer for the deadlines below (the earliest one), kept boxed in the session and
            // reset rather than made anew: an idle session holds none.
            let mut deadline: Option<(tokio::time::Instant, Deadline)> = None;
            let mut earliest = |at: tokio::time::Instant, which: Deadline| {
                if deadline.is_none_or(|(d, _)| at < d) {
                    deadline = Some((at, which));
                }
            };
            // Holding a connection inside a transaction and waiting for the client.
            if idle_in_tx
                && !self.config.server.idle_in_transaction_timeout.is_zero()
                && let Some(at) = tokio::time::Instant::now()
                    .checked_add(self.config.server.idle_in_transaction_timeout)
            {
                earliest(at, Deadline::IdleInTransaction);
            }
            // A request waits for the upstream (query_timeout bounds the wait).
            // Measured from the request or the last bytes from the upstream, whichever is later:
            // long results and COPY TO keep it alive; COPY FROM STDIN waits for the client.
            let waits_for_upstream =
                (self.server.is_some() && !self.expect.is_empty() && self.copy != CopyState::In)
                    || self.lane_reply.is_some();
            if let (Some(started), false) = (
                self.query_started,
                self.config.server.query_timeout.is_zero(),
            ) && waits_for_upstream
            {
                let since = self.server_heard.map_or(started, |h| h.max(started));
                earliest(
                    tokio::time::Instant::from_std(since + self.config.server.query_timeout),
                    Deadline::Query,
                );
            }
            let mut timer = match deadline {
                Some((at, _)) => {
                    let mut t = self
                        .timer
                        .take()
                        .unwrap_or_else(|| Box::pin(tokio::time::sleep_until(at)));
                    if t.deadline() != at {
                        t.as_mut().reset(at);
                    }
                    Some(t)
                }
                None => {
                    if idle {
                        // (an idle session keeps nothing it does not need)
                        self.timer = None;
                    }
                    None
                }
            };
            // Quiet for a while (the registry's clock says so) and at rest: park (see `run`).
            if idle && timer.is_none() && self.client_entry.entry.quiet.resting() && self.parkable()
            {
                return Ok(Served::Quiet);
            }
            let (io, entry) = io::Sockets::new(self);
            // In this order, without drawing a random start per wake-up: a deadline that passed
            // wins, a wake-up is never starved by a socket that is always ready.
            let event = tokio::select! {
                biased;
                () = async {
                    match timer.as_mut() {
                        Some(t) => t.await,
                        None => std::future::pending().await,
                    }
                } => {
                    return Err(match deadline {
                        Some((_, Deadline::Query)) => SessionError::QueryTimeout,
                        Some((_, Deadline::IdleInTransaction)) | None => {
                            SessionError::IdleInTransaction
                        }
                    })
                }
                () = std::future::poll_fn(|cx| entry.wake.poll_woken(cx)) => None,
                r = io => Some(r?),
            };
            if timer.is_some() {
                self.timer = timer;
            }
            // woken through the registry entry: the flags are read at the top of the loop
            let Some(event) = event else {
                woken = true;
                continue;
            };
            if event.client_read > 0 {
                self.shared.metrics.bytes(event.client_read as u64, 0);
                self.client_entry.entry.quiet.heard();
            }
            if event.client_closed {
                return Ok(Served::Left);
            }
            if event.lane {
                if !self.config.server.query_timeout.is_zero() {
                    self.server_heard = Some(std::time::Instant::now());
                }
                self.on_lane_reply().await?;
            }
            if event.server_read {
                if !self.config.server.query_timeout.is_zero() {
                    self.server_heard = Some(std::time::Instant::now());
                }
                self.process_server()?;
                if self
                    .server_ending
                    .take_if(|e| *e == ServerEnding::Quietly)
                    .is_some()
                {
                    self.close_lost_server().await;
                }
            }
        }
    }

    /// Between transactions (also in session mode, where the connection stays held).
    fn between_transactions(&self) -> bool {
        (self.server.is_none() && self.lane_reply.is_none())
            || (self.in_flight == 0
                && !self.unit.open
                && self.expect.is_empty()
                && self.tx.predicted() == Predicted::Idle)
    }

    /// The held connection was ended by the server between transactions: close it, count it.
    async fn close_lost_server(&mut self) {
        self.cancel.slot.clear().await;
        if let Some(server) = self.server.take() {
            self.account_release();
            self.shared
                .metrics
                .upstream_error(crate::metrics::UpstreamErrorKind::Lost);
            drop(server);
        }
    }

    /// Handle every complete client frame that can be handled now. `Ok(true)` = client is done.
    /// Frames stay buffered while a split Query or a held frame waits for replies (COPY traffic
    /// excepted), and while the output towards either side is full (backpressure).
    async fn process_client(&mut self) -> Result<bool, SessionError> {
        loop {
            if self.split.is_some() && self.copy != CopyState::In {
                return Ok(false);
            }
            if self.lane_reply.is_some() {
                // the client's next messages wait for the unit on the lane
                return Ok(false);
            }
            if self.may_pipeline() {
                // (boxed, as check_out: rare waits inside)
                match Box::pin(self.try_pipeline()).await? {
                    pipelined::Piped::Sent => return Ok(false),
                    pipelined::Piped::Answered | pipelined::Piped::No => {}
                }
                if self.lane_reply.is_some() {
                    return Ok(false);
                }
            }
            // (not for a unit a lane runs: it writes nothing here)
            io::reserve_first(&mut self.server_out);
            if self.server_out.len() >= io::OUT_CAP || self.client_out.len() >= io::OUT_CAP {
                return Ok(false);
            }
            let frame = match self.pending.take() {
                Some(f) => *f,
                None => {
                    match try_read_frame(&mut self.client_buf, self.config.server.max_message_size)
                    {
                        Ok(Some(f)) => f,
                        Ok(None) => return Ok(false),
                        Err(e) => return Err(SessionError::ClientProtocol(e)),
                    }
                }
            };
            match self.handle_client(frame).await? {
                Flow::Continue => {}
                Flow::Wait(f) => {
                    self.pending = Some(Box::new(f));
                    return Ok(false);
                }
                Flow::Terminate => return Ok(true),
            }
        }
    }

    /// Handle every complete server frame in the read buffer. The buffer is taken out of the
    /// connection meanwhile, so that each frame is handled by reference (nothing reads into it:
    /// handling is synchronous); it goes back unless the connection was dropped.
    fn process_server(&mut self) -> Result<(), SessionError> {
        io::reserve_first(&mut self.client_out);
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let mut buf = std::mem::take(&mut server.conn().read_buf);
        let result = self.relay_server_frames(&mut buf);
        if let Some(server) = self.server.as_mut() {
            server.conn().read_buf = buf;
        }
        result
    }

    fn relay_server_frames(&mut self, buf: &mut BytesMut) -> Result<(), SessionError> {
        loop {
            if self.server_ending == Some(ServerEnding::Quietly) || self.server.is_none() {
                return Ok(());
            }
            let forwards_rows = matches!(
                self.expect.front(),
                Some(Expect::Execute { .. } | Expect::Query { .. })
            );
            // A large DataRow/CopyData the client gets anyway is streamed through as it arrives
            // instead of being buffered whole (memory stays bounded by the read size).
            if self.passthrough > 0 {
                let n = self.passthrough.min(buf.len());
                if n == 0 {
                    return Ok(());
                }
                self.client_out.extend_from_slice(&buf[..n]);
                buf.advance(n);
                self.passthrough -= n;
                continue;
            }
            if forwards_rows
                && matches!(buf.first(), Some(&(be::DATA_ROW | be::COPY_DATA)))
                && let Some(len) = crate::protocol::frame::peek_len(buf)
                && len > STREAM_AT
                && len <= MAX_SERVER_MESSAGE
            {
                let n = buf.len().min(len);
                self.client_out.extend_from_slice(&buf[..n]);
                buf.advance(n);
                self.passthrough = len - n;
                continue;
            }
            let total = match crate::protocol::frame::complete_len(buf, MAX_SERVER_MESSAGE) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(()),
                Err(e) => return Err(SessionError::UpstreamProtocol(e.to_string())),
            };
            let handled = self.handle_server(FrameRef::at(buf, total));
            buf.advance(total);
            handled?;
        }
    }

    /// Write out what is buffered for the client (login and the final error only; the session
    /// loop writes as the client reads).
    async fn flush_client(&mut self) -> Result<(), SessionError> {
        if !self.client_out.is_empty() {
            self.client
                .write_all(&self.client_out)
                .await
                .map_err(SessionError::ClientIo)?;
            self.client.flush().await.map_err(SessionError::ClientIo)?;
            self.shared.metrics.bytes(0, self.client_out.len() as u64);
            self.client_out.clear();
        }
        Ok(())
    }

    /// Get a server connection for a new unit of work.
    async fn ensure_server(&mut self) -> Result<(), PoolError> {
        if self.server.is_some() {
            return Ok(());
        }
        if self.check_out_now() {
            return Ok(());
        }
        // Boxed: the checkout's future is large and only lives while a connection is fetched;
        // inline it would size every session's future, also while the client is idle.
        Box::pin(self.check_out()).await
    }

    /// The usual checkout, when nothing need wait: no pause, a free slot for the tenant, an idle
    /// connection that needs no health check. No future is made (and boxed) for it. False =
    /// take the waiting way ([`Session::check_out`]).
    fn check_out_now(&mut self) -> bool {
        if self.shared.is_paused() {
            return false;
        }
        let Some(permit) = self.shared.limits.try_begin_transaction(&self.tenant_slot) else {
            return false;
        };
        let Some(checkout) = self.shared.pool.try_checkout_now(self.prefer()) else {
            return false;
        };
        self.tenant_permit = permit;
        let now = std::time::Instant::now();
        self.took(checkout, now, now);
        true
    }

    async fn check_out(&mut self) -> Result<(), PoolError> {
        let started = self.admit(std::time::Instant::now()).await?;
        let checkout = match self.shared.pool.checkout_for(self.prefer()).await {
            Ok(c) => c,
            Err(e) => {
                e.count(&self.shared.metrics);
                self.tenant_permit = None;
                self.set_client_state(crate::metrics::ClientState::Idle, 0);
                return Err(e);
            }
        };
        self.took(checkout, started, std::time::Instant::now());
        Ok(())
    }

    /// Which idle connection suits this client best: with the signed context one sealed for its
    /// tenant (no sealing again), else one that keeps its context (none to send).
    fn prefer(&self) -> Prefer<'_> {
        if self.shared.sealer.is_some() {
            return Prefer::Sealed(&self.identity.tenant);
        }
        match self.kept_key() {
            Some(key) => Prefer::Kept(key),
            None => Prefer::Recent,
        }
    }

    /// The key of the context a connection may keep for this client (`[upstream]
    /// keep_context`; see pool::Ambient). None where the context is sent every transaction:
    /// transaction_wrap and Citus (SET LOCAL inside rlsgate's block), the signed context (its
    /// seal is kept instead), a role claim (a session-level role changes more than settings).
    fn kept_key(&self) -> Option<&bytes::Bytes> {
        let upstream = &self.config.upstream;
        if !upstream.keep_context
            || upstream.transaction_wrap
            || self.shared.sealer.is_some()
            || self.identity.role.is_some()
        {
            return None;
        }
        self.context.key()
    }

    /// Before a transaction on a connection with nothing in flight: a context the connection
    /// keeps for another client (another tenant, or this client before a reauth changed its
    /// claims) is taken off with `RESET ALL`, awaited, so that nothing of this client's ever
    /// runs under it (see pool::Ambient). A connection that cannot be cleaned is closed and the
    /// session ends, as when rlsgate's other statements between clients fail.
    async fn clear_foreign_context(&mut self) -> Result<(), SessionError> {
        let key = self.kept_key().map(|k| &k[..]);
        let safe = self
            .server
            .as_ref()
            .is_none_or(|server| server.conn_ref().ambient.safe_for(key));
        if safe {
            return Ok(());
        }
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        match Box::pin(crate::pool::clear_context(server.conn())).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "a statement rlsgate runs between clients failed; ending the session");
                self.cancel.slot.clear().await;
                drop(self.server.take());
                self.account_release();
                Err(SessionError::Cleanup(format!("RESET ALL: {e}")))
            }
        }
    }

    /// Before a transaction, when the connection served this client's tenant last and keeps no
    /// context yet: a hidden `set_config(…, false)` of the client's context, in a transaction
    /// of its own ahead of the unit (which still brings its own context, since this one is not
    /// confirmed yet). Once it answers without an error the connection keeps the context, and
    /// transactions with the same context need none of their own (see pool::Ambient). Should
    /// it fail, nothing is lost: the connection holds what it held.
    fn keep_context(&mut self, served_tenant: bool) -> Result<(), SessionError> {
        if !served_tenant {
            return Ok(());
        }
        // (only a connection that keeps nothing, or maybe this context: no key cloned otherwise)
        let due = match (self.kept_key(), self.server.as_ref()) {
            (Some(key), Some(server)) => match &server.conn_ref().ambient {
                Ambient::Clear => true,
                Ambient::Maybe(k) => k == key,
                Ambient::Setting(_) | Ambient::Kept(_) => false,
            },
            _ => false,
        };
        let (true, Some(key)) = (due, self.kept_key().cloned()) else {
            return Ok(());
        };
        let shared = Arc::clone(&self.shared);
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let conn = server.conn();
        let statements = self
            .context
            .kept_form(
                kept_form_for(conn),
                &self.identity,
                &shared.stmt_hasher,
                &shared.kept_context_parse,
            )
            .map_err(|e| SessionError::Injection(e.to_string()))?;
        for statement in statements {
            frontend::prepare_own(statement, conn, &self.expect, &mut self.server_out);
        }
        for statement in statements {
            self.server_out.extend_from_slice(&statement.run);
        }
        crate::protocol::frontend::write_sync(&mut self.server_out);
        conn.ambient = Ambient::Setting(key);
        self.expect_ready(Expect::HiddenQuery { what: KEEP_CONTEXT });
        // (a cancel of the client's waits for it, as for rlsgate's other statements: it is
        // meant for the client's own)
        self.cancel.slot.hold();
        Ok(())
    }

    /// The hidden `set_config(…, false)` failed: the connection holds what it held, and the
    /// statement may not exist there (it is prepared again next time).
    fn keep_context_failed(&mut self) {
        let shared = Arc::clone(&self.shared);
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let conn = server.conn();
        conn.ambient.failed();
        if let Ok(statements) = self.context.kept_form(
            kept_form_for(conn),
            &self.identity,
            &shared.stmt_hasher,
            &shared.kept_context_parse,
        ) {
            for statement in statements {
                conn.prepared.retire(&statement.name);
            }
        }
    }

    /// The client holds `checkout` now (asked for at `started`).
    fn took(&mut self, checkout: Checkout, started: std::time::Instant, now: std::time::Instant) {
        self.admitted_at(started, now, checkout.conn_ref().id);
        self.cancel
            .slot
            .set(self.shared.pool.cancel_target(checkout.conn_ref()));
        tracing::trace!(
            server_id = checkout.conn_ref().id,
            "checked out upstream connection"
        );
        self.server = Some(checkout);
        self.tx.connected();
    }

    /// What a transaction waits for before it takes a connection (its own or a pipeline lane's):
    /// the end of a pause, then its tenant's transaction slot (kept in `tenant_permit`). Returns
    /// when the wait started.
    /// `started`: now, as the caller read it (the clock is read as few times per transaction as
    /// it can be).
    async fn admit(
        &mut self,
        started: std::time::Instant,
    ) -> Result<std::time::Instant, PoolError> {
        self.set_client_state(crate::metrics::ClientState::Waiting, 0);
        let limit = self.shared.config().upstream.checkout_timeout;
        let permit = if !self.shared.wait_unpaused(limit).await {
            self.shared.metrics.pool_timeout();
            Err(PoolError::Timeout(limit))
        } else {
            self.shared
                .limits
                .begin_transaction(&self.tenant_slot, limit)
                .await
                .map_err(PoolError::Limited)
        };
        match permit {
            Ok(permit) => {
                self.tenant_permit = permit;
                Ok(started)
            }
            Err(e) => {
                self.set_client_state(crate::metrics::ClientState::Idle, 0);
                Err(e)
            }
        }
    }

    /// The transaction that waited since `started` runs now, on server connection `server_id`
    /// (0: a pipeline lane's). Returns now.
    fn admitted(&mut self, started: std::time::Instant, server_id: u64) -> std::time::Instant {
        let now = std::time::Instant::now();
        self.admitted_at(started, now, server_id);
        now
    }

    /// [`Session::admitted`] with the clock already read.
    fn admitted_at(
        &mut self,
        started: std::time::Instant,
        now: std::time::Instant,
        server_id: u64,
    ) {
        self.shared
            .metrics
            .checkout_wait(now.saturating_duration_since(started));
        self.set_client_state(crate::metrics::ClientState::Active, server_id);
        self.held_since = Some(now);
    }

    /// The client's state in the metrics and the registry (admin console `SHOW CLIENTS`).
    fn set_client_state(&mut self, state: crate::metrics::ClientState, server_id: u64) {
        self.tracker.set_state(state);
        let registry_state = match state {
            crate::metrics::ClientState::Idle => crate::registry::STATE_IDLE,
            crate::metrics::ClientState::Waiting => crate::registry::STATE_WAITING,
            crate::metrics::ClientState::Active => crate::registry::STATE_ACTIVE,
        };
        crate::registry::Registry::set_state(&self.client_entry.entry, registry_state, server_id);
    }

    /// Transaction mode: give the connection back once the server is idle and nothing is pending.
    async fn maybe_release(&mut self) {
        if self.config.server.pool_mode != PoolMode::Transaction
            || self.pinned.is_some()
            || self.server.is_none()
            || !self.server_at_rest()
        {
            return;
        }
        self.cancel.slot.clear().await;
        if let Some(server) = self.server.take() {
            tracing::trace!(
                server_id = server.conn_ref().id,
                "released upstream connection"
            );
            self.account_release();
            server.release();
        }
    }

    /// Bookkeeping when the client gives its connection back.
    fn account_release(&mut self) {
        self.account_release_at(std::time::Instant::now());
    }

    /// [`Session::account_release`] with the clock already read.
    fn account_release_at(&mut self, now: std::time::Instant) {
        self.tenant_permit = None;
        if let Some(since) = self.held_since.take() {
            self.tracker
                .transaction_finished(now.saturating_duration_since(since));
        }
        self.shared.registry.transaction(&self.identity.tenant);
        self.set_client_state(crate::metrics::ClientState::Idle, 0);
    }

    /// Client is gone: keep the connection only if it is idle and clean.
    async fn finish(&mut self) {
        self.cancel.slot.clear().await;
        self.pin_slot = None;
        if let Some(what) = self.pinned.take() {
            let left = self
                .shared
                .pinned
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed)
                - 1;
            tracing::info!(
                reason = what,
                pinned_clients = left,
                "unpinned server connection (client left)"
            );
        }
        let clean = self.server_at_rest();
        if let Some(server) = self.server.take() {
            if clean && server.conn_ref().read_buf.is_empty() {
                server.release();
            } else {
                tracing::info!(
                    server_id = server.conn_ref().id,
                    "client left mid-transaction; closing its upstream connection"
                );
                drop(server);
            }
        }
    }

    /// Nothing is owed on the server connection and no transaction is open there: it can go
    /// back to the pool. Not while the server skips messages up to a Sync it has not had (a
    /// failed extended COPY consumed the client's Sync): the client's next Sync is for it.
    fn server_at_rest(&self) -> bool {
        self.in_flight == 0
            && self.expect.is_empty()
            && self.server_out.is_empty()
            && !self.unit.open
            && !self.unit.skipping()
            && self.split.is_none()
            && self.tx.predicted() == Predicted::Idle
    }

    /// Expect a ReadyForQuery for this entry; returns the unit's number.
    fn expect_ready(&mut self, entry: Expect) -> u64 {
        self.expect.push_back(entry);
        self.in_flight += 1;
        self.units_sent += 1;
        self.units_sent
    }

    /// Before a transaction: close statements the connection evicted (or retired after a
    /// migration), discard another tenant's
    /// sequence state (`lastval()`/`currval()` would show its new ids), and if the connection
    /// holds other settings than this client's, replay the client's — all hidden, pipelined
    /// ahead of the client's messages.
    fn sync_settings(&mut self, discard_inline: bool) -> Result<(), SessionError> {
        let inline_ok = self.may_discard_inline(discard_inline);
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let conn = server.conn();
        for name in conn.prepared.take_to_close() {
            crate::protocol::frontend::write_close(b'S', &name, &mut self.server_out)
                .map_err(SessionError::ClientProtocol)?;
            self.expect.push_back(Expect::Hidden {
                tag: be::CLOSE_COMPLETE,
                prepared: None,
            });
        }
        let served_tenant =
            matches!(&conn.sequences, SequenceOwner::Tenant(t) if **t == *self.identity.tenant);
        let other_tenant = conn.sequences.hand_to(&self.identity.tenant);
        let discard_inline = other_tenant && inline_ok;
        let wanted = self.settings.wanted();
        let held = conn.settings.matches(wanted);
        if other_tenant {
            // (DISCARD SEQUENCES, below, clears the seal)
            conn.sealed = None;
        }
        if held && !other_tenant {
            self.seal()?;
            return self.keep_context(served_tenant);
        }
        // Statements of their own (each its own implicit transaction), so that a replay that
        // fails cannot roll back the reset and leave the previous client's settings.
        let reset = !held && conn.settings != HeldSettings::Defaults;
        if reset {
            conn.ambient.reset_sent();
        }
        conn.settings = HeldSettings::wanted(wanted);
        if other_tenant && !discard_inline {
            self.hidden_query("DISCARD SEQUENCES", SEQUENCE_DISCARD)?;
        }
        if reset {
            self.hidden_query("RESET ALL", SETTINGS_RESET)?;
        }
        // (before the client's settings: a default_transaction_read_only of theirs must not
        // apply to it)
        self.seal()?;
        if !held {
            let replay = self.settings.replay_sql();
            if !replay.is_empty() {
                crate::protocol::frontend::write_query(replay, &mut self.server_out)
                    .map_err(SessionError::ClientProtocol)?;
                // (expect_ready, spelled out: `replay` borrows the settings)
                self.expect.push_back(Expect::HiddenQuery {
                    what: "settings replay",
                });
                self.in_flight += 1;
                self.units_sent += 1;
                self.cancel.slot.hold();
            }
        }
        // (its own transaction: before the inline discard, which goes into the unit's)
        self.keep_context(served_tenant)?;
        if discard_inline {
            self.discard_inline();
        }
        Ok(())
    }

    /// Before a unit pipelined behind the client's own: the sequence discard, should the
    /// connection's sequence state be another tenant's or unknown (a discard failed).
    fn discard_sequences(&mut self, discard_inline: bool) -> Result<(), SessionError> {
        let inline_ok = self.may_discard_inline(discard_inline);
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        if !server.conn().sequences.hand_to(&self.identity.tenant) {
            return Ok(());
        }
        if inline_ok {
            self.discard_inline();
            Ok(())
        } else {
            server.conn().sealed = None;
            self.hidden_query("DISCARD SEQUENCES", SEQUENCE_DISCARD)?;
            self.seal()
        }
    }

    /// The sequence discard may go into the unit's implicit transaction (`first_statement`: the
    /// unit's first statement allows it): not with transaction_wrap, whose BEGIN goes first, nor
    /// with a seal, which the discard clears and which goes before the unit.
    fn may_discard_inline(&self, first_statement: bool) -> bool {
        first_statement && !self.config.upstream.transaction_wrap && self.shared.sealer.is_none()
    }

    /// `DISCARD SEQUENCES` between tenants, prepared once per connection and bound in front of
    /// the unit's first statement, in its implicit transaction: should it fail (the client's
    /// cancel, a statement_timeout), the server skips the unit, which never runs on the previous
    /// tenant's sequence state, and the next transaction discards again (see
    /// relay::on_injection_error).
    fn discard_inline(&mut self) {
        let shared = Arc::clone(&self.shared);
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let statement = shared.pipelines.discard_statement();
        let parsed =
            frontend::prepare_own(statement, server.conn(), &self.expect, &mut self.server_out);
        self.server_out.extend_from_slice(&statement.run);
        self.expect.push_back(Expect::Inject {
            remaining: 1,
            parsed: parsed.then(|| Box::from([Arc::clone(&statement.name)])),
            block: expect::BlockEdge::Neither,
            discards: true,
        });
    }

    /// One of rlsgate's own Queries before a transaction, answered unseen.
    fn hidden_query(&mut self, sql: &str, what: &'static str) -> Result<(), SessionError> {
        crate::protocol::frontend::write_query(sql, &mut self.server_out)
            .map_err(SessionError::ClientProtocol)?;
        self.expect_ready(Expect::HiddenQuery { what });
        // A cancel landing in one of rlsgate's own Queries would leave the previous client's
        // state under the client's statements: cancels wait until they are done (see
        // `relay::on_ready`).
        self.cancel.slot.hold();
        Ok(())
    }

    /// Signed context: seal the connection for this client's tenant unless it already is —
    /// `BEGIN READ WRITE; SELECT rlsgate.enter(…); COMMIT`, prepared and bound, in a transaction
    /// of its own (it takes a snapshot, which must not happen inside the client's transaction
    /// before a `SET TRANSACTION`; and it writes, also for a client whose sessions default to
    /// read-only), pipelined ahead of the unit. If it fails, the session ends (`SEAL`, see the
    /// relay): nothing runs unsealed.
    fn seal(&mut self) -> Result<(), SessionError> {
        let (Some(sealer), Some(server)) = (self.shared.sealer.as_deref(), self.server.as_mut())
        else {
            return Ok(());
        };
        let conn = server.conn();
        let tenant = &*self.identity.tenant;
        if conn.sealed.as_deref() == Some(tenant) {
            return Ok(());
        }
        for statement in sealer.statements() {
            frontend::prepare_own(statement, conn, &self.expect, &mut self.server_out);
        }
        sealer
            .write_seal(
                tenant,
                conn.backend_pid,
                conn.seal_key,
                &mut self.server_out,
            )
            .map_err(|e| SessionError::Injection(e.to_string()))?;
        crate::protocol::frontend::write_sync(&mut self.server_out);
        conn.sealed = Some(Arc::from(tenant));
        self.expect_ready(Expect::HiddenQuery { what: SEAL });
        self.cancel.slot.hold();
        Ok(())
    }

    /// `SELECT rlsgate.reauth('<jwt>')`: a fresh token for the same tenant replaces the identity
    /// (and its context) from the next transaction on.
    async fn reauth(&mut self, token: &str) -> Result<(), ClientError> {
        // Boxed, as check_out: a rare, large future.
        Box::pin(self.reauth_with(token)).await
    }

    async fn reauth_with(&mut self, token: &str) -> Result<(), ClientError> {
        let outcome = self
            .shared
            .live()
            .validator
            .validate(token, &self.client_entry.entry.user)
            .await;
        let result = match outcome {
            Err(e) => Err(ClientError::error(
                sqlstate::INVALID_AUTHORIZATION,
                format!("rlsgate: reauth refused: {e}"),
            )),
            Ok(id) if id.tenant != self.identity.tenant => Err(ClientError::error(
                sqlstate::INVALID_AUTHORIZATION,
                "rlsgate: reauth refused: the token is for another tenant",
            )),
            Ok(id) => match inject::Context::new(
                &id,
                self.shared.config().upstream.citus_propagate_set,
                &self.shared.stmt_hasher,
                &self.shared.context_parse,
            ) {
                Ok(context) => {
                    self.context = context;
                    self.client_entry.entry.expires_at.store(
                        id.expires_at
                            .saturating_add(self.config.auth.leeway.as_secs()),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    self.identity = id;
                    Ok(())
                }
                Err(e) => Err(ClientError::error(
                    sqlstate::INVALID_AUTHORIZATION,
                    format!("rlsgate: reauth refused: {e}"),
                )),
            },
        };
        self.shared.audit.record(crate::audit::AuditEvent::Reauth {
            peer: self.client_entry.entry.peer.to_string(),
            user: self.client_entry.entry.user.clone(),
            tenant: self.identity.tenant.to_string(),
            ok: result.is_ok(),
            reason: result.as_ref().err().map(|e| e.message.clone()),
        });
        result
    }

    /// (The registry entry holds the expiry with the leeway; reauth moves it.)
    fn token_expired(&self) -> bool {
        self.client_entry
            .entry
            .expired(jsonwebtoken::get_current_timestamp())
    }
}
