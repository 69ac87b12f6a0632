//! Opening one upstream connection: TCP, TLS per `sslmode`, StartupMessage, authentication
//! (SCRAM-SHA-256, md5, cleartext, trust), then the server's ParameterStatus set and key.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend as fe;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{PoolError, ServerConn};
use crate::config::{KeepaliveConfig, SslMode, UpstreamConfig};
use crate::protocol::backend::{self as be, ServerNotice};
use crate::protocol::frame::{Frame, try_read_frame};
use crate::stream::Stream;

/// Largest message accepted from the server during the handshake.
const MAX_HANDSHAKE_MSG: usize = 1 << 20;

pub(super) async fn connect(
    cfg: &UpstreamConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
    keepalive: &KeepaliveConfig,
    sealer: Option<&crate::seal::Sealer>,
    id: u64,
) -> Result<ServerConn, PoolError> {
    let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port))
        .await
        .map_err(|e| PoolError::Connect(format!("{}:{}: {e}", cfg.host, cfg.port)))?;
    tcp.set_nodelay(true).ok();
    if let Err(e) = crate::stream::apply_keepalive(&tcp, keepalive) {
        tracing::warn!(server_id = id, error = %e, "cannot set TCP keepalive on the upstream socket");
    }
    let mut stream = negotiate_tls(tcp, cfg, tls).await?;

    let mut out = BytesMut::new();
    let params = [
        ("user", cfg.user.as_str()),
        ("database", cfg.database.as_str()),
        ("application_name", "rlsgate"),
        ("client_encoding", "UTF8"),
    ];
    fe::startup_message(params.iter().copied(), &mut out)
        .map_err(|e| PoolError::Protocol(e.to_string()))?;
    stream.write_all(&out).await.map_err(io_err)?;

    let mut buf = BytesMut::with_capacity(8192);
    authenticate(&mut stream, &mut buf, cfg).await?;

    let mut server_params = Vec::new();
    let mut backend = (0, Vec::new());
    loop {
        let frame = read_frame(&mut stream, &mut buf).await?;
        match frame.tag {
            be::PARAMETER_STATUS => {
                let (k, v) = be::parameter_status(frame.body()).map_err(proto_err)?;
                if let Some(what) = crate::guard::policy::unexpected_lexer_report(k, v) {
                    return Err(PoolError::Protocol(format!(
                        "the upstream reads SQL text with {what}; rlsgate's guard requires standard_conforming_strings = on and client_encoding UTF8 (fix the server, database or role default)"
                    )));
                }
                server_params.push((k.to_string(), v.to_string()));
            }
            be::BACKEND_KEY_DATA => backend = be::backend_key(frame.body()).map_err(proto_err)?,
            be::READY_FOR_QUERY => break,
            be::NOTICE_RESPONSE => {}
            be::ERROR_RESPONSE => return Err(server_error(&frame)),
            other => {
                return Err(PoolError::Protocol(format!(
                    "unexpected message {:?} after login",
                    other as char
                )));
            }
        }
    }
    let (may_set_config, seal_key) = probe(&mut stream, &mut buf, sealer).await?;
    let now = Instant::now();
    Ok(ServerConn {
        stream,
        read_buf: buf,
        id,
        backend_pid: backend.0,
        backend_key: backend.1.into(),
        params: server_params,
        created: now,
        last_used: now,
        prepared: Default::default(),
        sequences: super::SequenceOwner::Nobody,
        dirty_session: false,
        ambient: super::Ambient::Clear,
        unnamed_owner: None,
        settings: super::HeldSettings::Defaults,
        may_set_config,
        sealed: None,
        seal_key,
        // set by the pool (Inner::open)
        generation: 0,
    })
}

/// One query at connect: whether the role may call `pg_catalog.set_config` (the cheaper,
/// silent form of the tenant context; see `session::inject`; databases hardened as `rlsgate
/// check` suggests revoke it) and, in signed mode, which signing key the database has.
async fn probe(
    stream: &mut Stream,
    buf: &mut BytesMut,
    sealer: Option<&crate::seal::Sealer>,
) -> Result<(bool, u8), PoolError> {
    let mut sql = String::from(
        "SELECT pg_catalog.has_function_privilege('pg_catalog.set_config(text,text,boolean)', 'EXECUTE')",
    );
    if let Some(sealer) = sealer {
        sql.push_str(", ");
        sql.push_str(sealer.probe_sql().trim_start_matches("SELECT "));
    }
    let mut out = BytesMut::new();
    fe::query(&sql, &mut out).map_err(|e| PoolError::Protocol(e.to_string()))?;
    stream.write_all(&out).await.map_err(io_err)?;
    let mut answer = Vec::new();
    loop {
        let frame = read_frame(stream, buf).await?;
        match frame.tag {
            be::DATA_ROW => answer = bool_columns(frame.body()).map_err(proto_err)?,
            be::READY_FOR_QUERY => break,
            be::ERROR_RESPONSE => {
                let error = server_error(&frame);
                return Err(match (sealer, error) {
                    (Some(_), PoolError::Server { code, message }) => PoolError::Seal(format!(
                        "{code} {message} (is sql/hardened.sql installed in this database, and EXECUTE on rlsgate.key_installed granted to the pool's role?)"
                    )),
                    (_, error) => error,
                });
            }
            _ => {}
        }
    }
    let may_set_config = answer.first().copied().unwrap_or(false);
    let seal_key = match sealer {
        Some(sealer) => sealer
            .pick_key(answer.get(1..).unwrap_or_default())
            .map_err(PoolError::Seal)?,
        None => 0,
    };
    Ok((may_set_config, seal_key))
}

/// The columns of a DataRow of booleans (text format), NULL as false.
fn bool_columns(body: &[u8]) -> Result<Vec<bool>, crate::protocol::ProtocolError> {
    let bad = || crate::protocol::ProtocolError::Malformed("DataRow");
    let count = body.get(..2).ok_or_else(bad)?;
    let count = u16::from_be_bytes([count[0], count[1]]);
    let mut rest = &body[2..];
    let mut columns = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let len = rest.get(..4).ok_or_else(bad)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        rest = &rest[4..];
        let Ok(len) = usize::try_from(len) else {
            columns.push(false);
            continue;
        };
        let value = rest.get(..len).ok_or_else(bad)?;
        columns.push(value == b"t");
        rest = &rest[len..];
    }
    Ok(columns)
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    cfg: &UpstreamConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Stream, PoolError> {
    let Some(tls) = tls.filter(|_| cfg.sslmode != SslMode::Disable) else {
        return Ok(Stream::Plain(tcp));
    };
    let mut req = BytesMut::new();
    fe::ssl_request(&mut req);
    tcp.write_all(&req).await.map_err(io_err)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io_err)?;
    match answer[0] {
        b'S' => {
            let name = ServerName::try_from(cfg.host.clone())
                .map_err(|_| PoolError::Tls(format!("invalid server name {:?}", cfg.host)))?;
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls));
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| PoolError::Tls(e.to_string()))?;
            Ok(Stream::ClientTls(Box::new(stream)))
        }
        b'N' if cfg.sslmode == SslMode::Prefer => Ok(Stream::Plain(tcp)),
        b'N' => Err(PoolError::Tls(
            "upstream does not support TLS but sslmode requires it".into(),
        )),
        other => Err(PoolError::Protocol(format!(
            "unexpected answer {other:#x} to SSLRequest"
        ))),
    }
}

async fn authenticate(
    stream: &mut Stream,
    buf: &mut BytesMut,
    cfg: &UpstreamConfig,
) -> Result<(), PoolError> {
    let password = || {
        cfg.password.as_deref().ok_or_else(|| {
            PoolError::Auth("upstream asked for a password but upstream.password is not set".into())
        })
    };
    let mut scram: Option<ScramSha256> = None;
    let mut out = BytesMut::new();
    loop {
        let frame = read_frame(stream, buf).await?;
        if frame.tag == be::ERROR_RESPONSE {
            return Err(server_error(&frame));
        }
        if frame.tag != be::AUTHENTICATION {
            return Err(PoolError::Protocol(format!(
                "unexpected message {:?} during authentication",
                frame.tag as char
            )));
        }
        let (code, data) = be::auth_code(frame.body()).map_err(proto_err)?;
        out.clear();
        match code {
            0 => return Ok(()),
            3 => fe::password_message(password()?.as_bytes(), &mut out)
                .map_err(|e| PoolError::Protocol(e.to_string()))?,
            5 => {
                let salt: [u8; 4] = data
                    .try_into()
                    .map_err(|_| PoolError::Protocol("bad md5 salt".into()))?;
                let hash = md5_hash(cfg.user.as_bytes(), password()?.as_bytes(), salt);
                fe::password_message(hash.as_bytes(), &mut out)
                    .map_err(|e| PoolError::Protocol(e.to_string()))?;
            }
            10 => {
                let mechanisms = data
                    .split(|&b| b == 0)
                    .filter(|m| !m.is_empty())
                    .collect::<Vec<_>>();
                if !mechanisms.contains(&SCRAM_SHA_256.as_bytes()) {
                    return Err(PoolError::Auth(
                        "upstream offers no SASL mechanism rlsgate supports".into(),
                    ));
                }
                let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                fe::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                    .map_err(|e| PoolError::Protocol(e.to_string()))?;
                scram = Some(s);
            }
            11 => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| PoolError::Protocol("SASL continue without start".into()))?;
                s.update(data)
                    .map_err(|e| PoolError::Auth(format!("SCRAM: {e}")))?;
                fe::sasl_response(s.message(), &mut out)
                    .map_err(|e| PoolError::Protocol(e.to_string()))?;
            }
            12 => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| PoolError::Protocol("SASL final without start".into()))?;
                s.finish(data)
                    .map_err(|e| PoolError::Auth(format!("SCRAM server signature: {e}")))?;
                continue;
            }
            other => {
                return Err(PoolError::Auth(format!(
                    "unsupported upstream authentication method {other}"
                )));
            }
        }
        stream.write_all(&out).await.map_err(io_err)?;
    }
}

pub(super) async fn read_frame(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<Frame, PoolError> {
    loop {
        if let Some(frame) = try_read_frame(buf, MAX_HANDSHAKE_MSG).map_err(proto_err)? {
            return Ok(frame);
        }
        if stream.read_buf(buf).await.map_err(io_err)? == 0 {
            return Err(PoolError::Connect("upstream closed the connection".into()));
        }
    }
}

fn server_error(frame: &Frame) -> PoolError {
    let n = be::notice_fields(frame.body()).unwrap_or_else(|_| ServerNotice::default());
    PoolError::Server {
        code: n.code,
        message: n.message,
    }
}

fn io_err(e: std::io::Error) -> PoolError {
    PoolError::Connect(e.to_string())
}

fn proto_err(e: crate::protocol::ProtocolError) -> PoolError {
    PoolError::Protocol(e.to_string())
}
