//! The client side of a connection before the session starts: SSLRequest/TLS, CancelRequest,
//! StartupMessage checks, and the password (a JWT) → [`Identity`].

pub mod startup_params;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::app::Shared;
use crate::audit::AuditEvent;
use crate::auth::throttle::{Claimed, ThrottleKey};
use crate::auth::{AuthError, Identity, Refusal, Validator, Verified};
use crate::config::PlaintextPassword;
use crate::error::{ClientError, UserFacing, sqlstate};
use crate::metrics::{LoginFailure, LoginResult};
use crate::protocol::ProtocolError;
use crate::protocol::backend as be;
use crate::protocol::frame::try_read_frame;
use crate::protocol::frontend as fe;
use crate::protocol::startup::{StartupMessage, StartupPacket, try_read_startup};
use crate::stream::Stream;

/// Largest password message (the token plus framing).
const MAX_PASSWORD_MSG: usize = crate::auth::MAX_TOKEN_LEN + 1024;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("client went away during the handshake")]
    Gone,
    #[error("i/o error during the handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("client sent data after SSLRequest before the TLS handshake")]
    SslStuffing,
    #[error("direct TLS connection refused: {0}")]
    DirectTlsRefused(&'static str),
    #[error("unexpected message {0:?} during the handshake")]
    Unexpected(char),
    #[error("database {0:?} does not exist")]
    WrongDatabase(String),
    #[error("no user name given")]
    NoUser,
    #[error("protected setting {0:?} in the startup packet")]
    ProtectedStartupSetting(String),
    #[error("token over a connection without TLS from the non-loopback address {0}")]
    PlaintextRefused(SocketAddr),
    #[error("token over a connection without TLS (tls.plaintext_password = \"never\")")]
    PlaintextNeverAllowed,
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
    #[error("replication connections are not supported")]
    Replication,
    #[error("too many logins with invalid tokens for this subject from this address")]
    Throttled,
}

impl HandshakeError {
    /// The bounded reason of `rlsgate_logins_total{reason}`, or `None` when the handshake did
    /// not get as far as a login attempt (client went away, TLS or protocol trouble).
    pub fn login_failure(&self) -> Option<LoginFailure> {
        match self {
            HandshakeError::Auth(a) => Some(a.login_failure()),
            HandshakeError::Throttled => Some(LoginFailure::Throttled),
            HandshakeError::WrongDatabase(_)
            | HandshakeError::NoUser
            | HandshakeError::ProtectedStartupSetting(_)
            | HandshakeError::PlaintextRefused(_)
            | HandshakeError::PlaintextNeverAllowed
            | HandshakeError::Replication => Some(LoginFailure::Other),
            HandshakeError::Gone
            | HandshakeError::Io(_)
            | HandshakeError::Protocol(_)
            | HandshakeError::Tls(_)
            | HandshakeError::SslStuffing
            | HandshakeError::DirectTlsRefused(_)
            | HandshakeError::Unexpected(_) => None,
        }
    }
}

impl UserFacing for HandshakeError {
    fn to_client_error(&self) -> ClientError {
        match self {
            HandshakeError::Gone
            | HandshakeError::Io(_)
            | HandshakeError::Tls(_)
            | HandshakeError::SslStuffing
            | HandshakeError::DirectTlsRefused(_) => {
                ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string())
            }
            HandshakeError::Protocol(ProtocolError::UnsupportedVersion { .. }) => {
                ClientError::fatal(sqlstate::FEATURE_NOT_SUPPORTED, self.to_string())
            }
            HandshakeError::Protocol(_) | HandshakeError::Unexpected(_) => {
                ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string())
            }
            HandshakeError::WrongDatabase(db) => ClientError::fatal(
                sqlstate::INVALID_CATALOG_NAME,
                format!("database \"{db}\" does not exist"),
            )
            .with_hint("rlsgate serves only the database named in upstream.database"),
            HandshakeError::NoUser => ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "no PostgreSQL user name specified in startup packet",
            ),
            HandshakeError::ProtectedStartupSetting(name) => ClientError::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!(
                    "setting \"{name}\" at login is not allowed through rlsgate: it is managed by rlsgate, changes who the session acts as, or changes how SQL text is read"
                ),
            ),
            HandshakeError::PlaintextRefused(_) => ClientError::fatal(
                sqlstate::CONNECTION_REJECTED,
                "rlsgate refuses a token sent without TLS from a non-loopback address",
            )
            .with_hint("connect with sslmode=require"),
            HandshakeError::PlaintextNeverAllowed => ClientError::fatal(
                sqlstate::CONNECTION_REJECTED,
                "rlsgate refuses a token sent without TLS, from any address (tls.plaintext_password = \"never\")",
            )
            .with_hint("connect with sslmode=require"),
            HandshakeError::Auth(e) => e.to_client_error(),
            HandshakeError::Throttled => ClientError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                "too many logins with invalid tokens for this subject from this address; retry later",
            )
            .with_hint("a valid token is still accepted"),
            HandshakeError::Replication => ClientError::fatal(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "replication connections are not supported by rlsgate",
            ),
        }
    }
}

pub enum Handshake {
    Cancel {
        pid: i32,
        key: Vec<u8>,
        /// Closed cleanly once the cancel is sent (TLS close_notify: libpq 18 reports an error
        /// for a TLS cancel connection that just ends).
        stream: Stream,
    },
    /// A login to the admin console (database `rlsgate`, token with the admin claim).
    Admin {
        stream: Stream,
        read_buf: BytesMut,
    },
    Login(Box<LoggedIn>),
}

pub struct LoggedIn {
    pub stream: Stream,
    pub read_buf: BytesMut,
    pub identity: Identity,
    pub startup: StartupMessage,
    pub user: String,
    pub peer: SocketAddr,
}

/// Run the handshake up to a validated token. On error the caller reports it to the client
/// (see [`report`]) when a stream is still usable.
pub async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Result<Handshake, (Option<Stream>, HandshakeError)> {
    let mut stream = match accept_direct_tls(tcp, shared).await {
        Ok(s) => s,
        Err(e) => return Err((None, e)),
    };
    let mut buf = BytesMut::with_capacity(1024);
    let mut tls_done = stream.is_tls();
    let mut first = true;
    let startup = loop {
        let packet = match read_startup(&mut stream, &mut buf, std::mem::take(&mut first)).await {
            Ok(p) => p,
            // (a TLS client: a plaintext error would only be garbage to it)
            Err(e @ HandshakeError::DirectTlsRefused(_)) => return Err((None, e)),
            Err(e) => return Err((Some(stream), e)),
        };
        match packet {
            StartupPacket::SslRequest if !tls_done => {
                if !buf.is_empty() {
                    return Err((None, HandshakeError::SslStuffing));
                }
                let acceptor = shared.live().tls_acceptor.clone();
                let Stream::Plain(mut tcp) = stream else {
                    unreachable!("TLS not yet negotiated")
                };
                let Some(acceptor) = acceptor else {
                    if let Err(e) = tcp.write_all(b"N").await {
                        return Err((None, e.into()));
                    }
                    stream = Stream::Plain(tcp);
                    continue;
                };
                if let Err(e) = tcp.write_all(b"S").await {
                    return Err((None, e.into()));
                }
                // (boxed, as below: a TLS handshake's state would size every plaintext login)
                match Box::pin(acceptor.accept(tcp)).await {
                    Ok(tls) => stream = Stream::ServerTls(Box::new(tls)),
                    Err(e) => return Err((None, HandshakeError::Tls(e.to_string()))),
                }
                tls_done = true;
            }
            StartupPacket::GssEncRequest if !tls_done => {
                if let Err(e) = stream.write_all(b"N").await {
                    return Err((None, e.into()));
                }
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                return Err((Some(stream), HandshakeError::Unexpected('?')));
            }
            StartupPacket::CancelRequest { pid, key } => {
                return Ok(Handshake::Cancel { pid, key, stream });
            }
            StartupPacket::Startup(m) => break m,
        }
    };
    match login(&mut stream, &mut buf, startup, peer, shared).await {
        Ok((_, startup, _)) if startup.param("database") == Some(crate::admin::DATABASE) => {
            Ok(Handshake::Admin {
                stream,
                read_buf: buf,
            })
        }
        Ok((identity, startup, user)) => Ok(Handshake::Login(Box::new(LoggedIn {
            stream,
            read_buf: buf,
            identity,
            startup,
            user,
            peer,
        }))),
        Err(e) => Err((Some(stream), e)),
    }
}

/// The first byte of a TLS handshake record. A startup packet never starts with it (its length
/// would be hundreds of megabytes), so it marks a client that starts TLS at once.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Direct TLS (libpq 17+ `sslnegotiation=direct`), as PostgreSQL 17 does it: a client whose first
/// byte opens a TLS handshake record gets the TLS handshake at once, without an SSLRequest, and
/// must have negotiated ALPN `postgresql` (which proves it is a Postgres client, not some other
/// TLS client pointed at the port). Without `[tls]`, or without ALPN, the connection is closed
/// with nothing written: the client speaks TLS, so a plaintext ErrorResponse would only be
/// garbage to it (Postgres logs the reason and closes too). Anything else is left unread for
/// [`read_startup`].
async fn accept_direct_tls(tcp: TcpStream, shared: &Arc<Shared>) -> Result<Stream, HandshakeError> {
    let Some(acceptor) = shared.live().tls_acceptor.clone() else {
        // Without TLS there is nothing to peek for (a system call per login): a first packet
        // that opens a TLS handshake is refused when it is read (see `read_startup`).
        return Ok(Stream::Plain(tcp));
    };
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Err(HandshakeError::Gone);
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        return Ok(Stream::Plain(tcp));
    }
    let mut tls = Box::pin(acceptor.accept(tcp))
        .await
        .map_err(|e| HandshakeError::Tls(e.to_string()))?;
    if tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_POSTGRESQL) {
        let _ = tls.shutdown().await;
        return Err(HandshakeError::DirectTlsRefused(
            "the client did not negotiate ALPN \"postgresql\"",
        ));
    }
    Ok(Stream::ServerTls(Box::new(tls)))
}

async fn login(
    stream: &mut Stream,
    buf: &mut BytesMut,
    startup: StartupMessage,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Result<(Identity, StartupMessage, String), HandshakeError> {
    let mut out = BytesMut::new();
    if startup.minor > 0 || !startup.protocol_options.is_empty() {
        be::write_negotiate_version(&startup.protocol_options, &mut out);
    }
    if startup
        .param("replication")
        .is_some_and(|r| r != "false" && r != "off" && r != "0")
    {
        return Err(HandshakeError::Replication);
    }
    let user = startup
        .param("user")
        .filter(|u| !u.is_empty())
        .ok_or(HandshakeError::NoUser)?
        .to_string();
    let database = startup
        .param("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_string();
    let config = shared.config();
    let admin = database == crate::admin::DATABASE && config.auth.admin_claim.is_some();
    if database != config.upstream.database && !admin {
        return Err(HandshakeError::WrongDatabase(database));
    }
    if let Some(name) =
        startup_params::forbidden_setting(&startup.params, shared.live().guard.protected())
    {
        return Err(HandshakeError::ProtectedStartupSetting(name));
    }
    // An IPv4 client of a dual-stack listener shows as ::ffff:127.0.0.1: canonical form first.
    let loopback = peer.ip().to_canonical().is_loopback();
    match config.plaintext_password() {
        _ if stream.is_tls() => {}
        PlaintextPassword::Always => {}
        PlaintextPassword::Loopback if loopback => {}
        PlaintextPassword::Loopback => return Err(HandshakeError::PlaintextRefused(peer)),
        PlaintextPassword::Never => return Err(HandshakeError::PlaintextNeverAllowed),
    }
    be::write_auth_cleartext(&mut out);
    stream.write_all(&out).await?;
    let frame = loop {
        match try_read_frame(buf, MAX_PASSWORD_MSG) {
            Ok(Some(f)) => break f,
            Ok(None) => {}
            Err(ProtocolError::TooLarge { .. }) => {
                let key = shared.throttle.key(peer.ip(), &Claimed::Unreadable);
                return Err(refuse_unverified(
                    shared,
                    peer,
                    &user,
                    key,
                    AuthError::TooLarge,
                ));
            }
            Err(e) => return Err(e.into()),
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Gone);
        }
    };
    if frame.tag != fe::PASSWORD {
        return Err(HandshakeError::Unexpected(frame.tag as char));
    }
    let token = fe::password(frame.body())?;
    // An unreadable token never logs in: once its address's bucket for unreadable tokens is
    // locked, such a token is not even checked. Any other token is checked first, so that a
    // genuine one always gets in. (The unverified header and claims are decoded only for this
    // and for refusals: a good login decodes its token once.)
    let unreadable = shared.throttle.key(peer.ip(), &Claimed::Unreadable);
    if shared.throttle.locked(&unreadable) && Validator::meta(token).claimed == Claimed::Unreadable
    {
        return Err(throttled(shared, peer));
    }
    let refusal = match shared.live().validator.verify(token, &user).await {
        Ok(verified) if admin && !verified.identity.admin => Refusal {
            error: AuthError::BadClaim("admin claim".into()),
            signature_verified: true,
        },
        Ok(Verified { identity, kid }) => {
            shared.metrics.login(LoginResult::Ok);
            shared.audit.record(AuditEvent::LoginOk {
                peer: peer.to_string(),
                user: user.clone(),
                tenant: identity.tenant.to_string(),
                kid,
                jti: identity.jti.clone(),
                subject: identity.subject.clone(),
            });
            return Ok((identity, startup, user));
        }
        Err(refusal) => refusal,
    };
    let meta = Validator::meta(token);
    if refusal.signature_verified {
        return Err(refuse_verified(shared, peer, user, &meta, refusal.error));
    }
    let key = shared.throttle.key(peer.ip(), &meta.claimed);
    shared.audit.record(AuditEvent::LoginFailed {
        peer: peer.to_string(),
        user: Some(user.clone()),
        reason: refusal.error.to_string(),
        kid: meta.kid,
        jti: meta.jti,
    });
    Err(refuse_unverified(shared, peer, &user, key, refusal.error))
}

/// A token whose signature verified but whose claims do not let it in (expired, not yet valid,
/// issuer, tenant, admin claim…): its own error, never counted by the throttle.
fn refuse_verified(
    shared: &Shared,
    peer: SocketAddr,
    user: String,
    meta: &crate::auth::TokenMeta,
    error: AuthError,
) -> HandshakeError {
    shared
        .metrics
        .login(LoginResult::Failed(error.login_failure()));
    shared.audit.record(AuditEvent::LoginFailed {
        peer: peer.to_string(),
        user: Some(user),
        reason: error.to_string(),
        kid: meta.kid.clone(),
        jti: meta.jti.clone(),
    });
    error.into()
}

/// A token anybody could have sent (malformed, bad signature, unknown key, wrong algorithm…):
/// counted under `key`, or refused as throttled once `key` is locked.
fn refuse_unverified(
    shared: &Shared,
    peer: SocketAddr,
    user: &str,
    key: ThrottleKey,
    error: AuthError,
) -> HandshakeError {
    if shared.throttle.locked(&key) {
        return throttled(shared, peer);
    }
    tracing::debug!(user, error = %error, "token refused (counted by the login throttle)");
    shared.throttle.failed(key);
    shared
        .metrics
        .login(LoginResult::Failed(error.login_failure()));
    error.into()
}

fn throttled(shared: &Shared, peer: SocketAddr) -> HandshakeError {
    shared
        .metrics
        .login(LoginResult::Failed(LoginFailure::Throttled));
    shared.audit.record(AuditEvent::LoginThrottled {
        peer: peer.to_string(),
    });
    HandshakeError::Throttled
}

/// Read one startup packet. `first`: the connection's first packet, which must not open a TLS
/// handshake (a client using direct TLS where rlsgate has no `[tls]`: see
/// [`accept_direct_tls`]).
async fn read_startup(
    stream: &mut Stream,
    buf: &mut BytesMut,
    first: bool,
) -> Result<StartupPacket, HandshakeError> {
    loop {
        if first && buf.first() == Some(&TLS_HANDSHAKE_RECORD) && !stream.is_tls() {
            return Err(HandshakeError::DirectTlsRefused("TLS is not configured"));
        }
        if let Some(p) = try_read_startup(buf)? {
            return Ok(p);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Gone);
        }
    }
}

/// Send a fatal error to the client (best effort) before closing.
pub async fn report(stream: &mut Stream, err: &ClientError) {
    let mut out = BytesMut::new();
    be::write_error(err, &mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
    close(stream).await;
}

/// End the connection cleanly: over TLS a close_notify first, as Postgres does, so that clients
/// (libpq 18 among them) do not take the end for a truncation attack. Bounded: a client that
/// does not read cannot hold the task.
pub async fn close(stream: &mut Stream) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.shutdown()).await;
}
