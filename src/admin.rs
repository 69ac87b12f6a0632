//! The admin console: database `rlsgate`, a token with `auth.admin_claim = true`, and
//! PgBouncer-style commands over the wire protocol, answered as ordinary result sets:
//! `SHOW POOLS|CLIENTS|SERVERS|TENANTS|CONFIG`, `RELOAD`, `RECONNECT`, `PAUSE`, `RESUME`, `KILL <tenant>`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::app::Shared;
use crate::error::{ClientError, sqlstate};
use crate::protocol::backend::{self as be, TxStatus};
use crate::protocol::frame::try_read_frame;
use crate::protocol::frontend as fe;
use crate::registry::Registry;
use crate::stream::Stream;

/// The database name that selects the admin console.
pub const DATABASE: &str = "rlsgate";

const MAX_ADMIN_MESSAGE: usize = 64 * 1024;

pub async fn run(mut stream: Stream, mut buf: BytesMut, shared: Arc<Shared>) {
    let mut out = BytesMut::new();
    be::write_auth_ok(&mut out);
    for (k, v) in [
        ("server_version", "15.0 (rlsgate admin)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        be::write_parameter_status(k, v, &mut out);
    }
    be::write_backend_key(0, 0, &mut out);
    be::write_ready(TxStatus::Idle, &mut out);
    loop {
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        let frame = loop {
            match try_read_frame(&mut buf, MAX_ADMIN_MESSAGE) {
                Ok(Some(f)) => break f,
                Ok(None) => {}
                Err(_) => return,
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        match frame.tag {
            fe::QUERY => {
                let sql = fe::query_text(frame.body()).unwrap_or_default().to_string();
                if let Err(e) = command(&sql, &shared, &mut out).await {
                    be::write_error(&e, &mut out);
                }
                be::write_ready(TxStatus::Idle, &mut out);
            }
            fe::TERMINATE => return,
            fe::SYNC => {
                be::write_error(
                    &ClientError::error(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console supports simple queries only",
                    ),
                    &mut out,
                );
                be::write_ready(TxStatus::Idle, &mut out);
            }
            _ => {}
        }
    }
}

fn table(columns: &[&str], rows: Vec<Vec<String>>, out: &mut BytesMut) {
    be::write_row_description(columns, out);
    let n = rows.len();
    for r in rows {
        be::write_data_row(&r, out);
    }
    be::write_command_complete(&format!("SHOW {n}"), out);
}

fn epoch(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_default()
}

async fn command(sql: &str, shared: &Arc<Shared>, out: &mut BytesMut) -> Result<(), ClientError> {
    let text = sql.trim().trim_end_matches(';').trim();
    let words: Vec<String> = text
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let config = shared.config();
    match words.as_slice() {
        ["SHOW", "POOLS"] => {
            let clients = shared.registry.clients();
            let waiting = clients
                .iter()
                .filter(|c| {
                    c.state.load(std::sync::atomic::Ordering::Relaxed)
                        == crate::registry::STATE_WAITING
                })
                .count();
            table(
                &[
                    "database",
                    "user",
                    "pool_size",
                    "idle",
                    "active",
                    "waiting_clients",
                    "pinned_clients",
                    "paused",
                ],
                vec![vec![
                    config.upstream.database.clone(),
                    config.upstream.user.clone(),
                    config.upstream.pool_size.to_string(),
                    shared.pool.idle_count().to_string(),
                    shared.pool.in_use().to_string(),
                    waiting.to_string(),
                    shared
                        .pinned
                        .load(std::sync::atomic::Ordering::Relaxed)
                        .to_string(),
                    shared.is_paused().to_string(),
                ]],
                out,
            );
        }
        ["SHOW", "CLIENTS"] => {
            let rows = shared
                .registry
                .clients()
                .into_iter()
                .map(|c| {
                    vec![
                        c.conn_id.to_string(),
                        c.tenant.to_string(),
                        c.user.clone(),
                        Registry::state_name(c.state.load(std::sync::atomic::Ordering::Relaxed))
                            .to_string(),
                        c.peer.to_string(),
                        epoch(c.since),
                    ]
                })
                .collect();
            table(
                &["conn_id", "tenant", "user", "state", "peer", "since"],
                rows,
                out,
            );
        }
        ["SHOW", "SERVERS"] => {
            let mut rows: Vec<Vec<String>> = shared
                .registry
                .clients()
                .into_iter()
                .filter_map(|c| {
                    let id = c.server_id.load(std::sync::atomic::Ordering::Relaxed);
                    (id != 0).then(|| {
                        vec![
                            id.to_string(),
                            "active".into(),
                            c.conn_id.to_string(),
                            c.tenant.to_string(),
                        ]
                    })
                })
                .collect();
            rows.extend(
                shared
                    .pool
                    .idle_ids()
                    .into_iter()
                    .map(|id| vec![id.to_string(), "idle".into(), String::new(), String::new()]),
            );
            table(&["server_id", "state", "client", "tenant"], rows, out);
        }
        ["SHOW", "TENANTS"] => {
            let rows = shared
                .registry
                .tenants()
                .into_iter()
                .map(|(t, c, s)| {
                    let pinned = shared.limits.pinned(&t);
                    vec![
                        t,
                        c.to_string(),
                        pinned.to_string(),
                        s.transactions.to_string(),
                        s.denials.to_string(),
                    ]
                })
                .collect();
            table(
                &["tenant", "clients", "pinned", "transactions", "denials"],
                rows,
                out,
            );
        }
        ["SHOW", "CONFIG"] => {
            let rows = [
                ("server.listen", config.server.listen.to_string()),
                (
                    "server.pool_mode",
                    format!("{:?}", config.server.pool_mode).to_lowercase(),
                ),
                (
                    "server.session_state",
                    format!("{:?}", config.server.session_state).to_lowercase(),
                ),
                (
                    "server.max_client_conn",
                    config.server.max_client_conn.to_string(),
                ),
                (
                    "server.idle_in_transaction_timeout",
                    format!("{:?}", config.server.idle_in_transaction_timeout),
                ),
                ("upstream.host", config.upstream.host.clone()),
                ("upstream.port", config.upstream.port.to_string()),
                ("upstream.database", config.upstream.database.clone()),
                ("upstream.user", config.upstream.user.clone()),
                ("upstream.pool_size", config.upstream.pool_size.to_string()),
                (
                    "upstream.checkout_timeout",
                    format!("{:?}", config.upstream.checkout_timeout),
                ),
                (
                    "upstream.transaction_wrap",
                    config.upstream.transaction_wrap.to_string(),
                ),
                ("auth.algorithms", config.auth.algorithms.join(",")),
                ("auth.tenant_claim", config.auth.tenant_claim.clone()),
                (
                    "context.mode",
                    format!("{:?}", config.context.mode).to_lowercase(),
                ),
                ("guard.protected", config.guard.protected.join(",")),
                // in force (resolved from the pool size when unset; 0 = unlimited)
                (
                    "limits.max_transactions_per_tenant",
                    shared.limits.max_transactions().to_string(),
                ),
                (
                    "limits.max_pinned_per_tenant",
                    shared.limits.max_pinned().to_string(),
                ),
            ]
            .into_iter()
            .map(|(k, v)| vec![k.to_string(), v])
            .collect();
            table(&["key", "value"], rows, out);
        }
        ["RELOAD"] => {
            let notes = shared.reload_from_file().await.map_err(|e| {
                ClientError::error(
                    sqlstate::INTERNAL_ERROR,
                    format!("reload refused, old configuration stays: {e}"),
                )
            })?;
            for n in notes {
                be::write_notice("NOTICE", "01000", &n, out);
            }
            be::write_command_complete("RELOAD", out);
        }
        ["RECONNECT"] => {
            let closed = shared.pool.reconnect();
            be::write_notice(
                "NOTICE",
                "01000",
                &format!(
                    "{closed} idle upstream connections closed; busy ones close when released"
                ),
                out,
            );
            be::write_command_complete("RECONNECT", out);
        }
        ["PAUSE"] => {
            shared.set_paused(true);
            be::write_command_complete("PAUSE", out);
        }
        ["RESUME"] => {
            shared.set_paused(false);
            be::write_command_complete("RESUME", out);
        }
        ["KILL", _] => {
            let tenant = text.split_whitespace().nth(1).unwrap_or_default();
            let n = shared.registry.kill_tenant(tenant);
            be::write_command_complete(&format!("KILL {n}"), out);
        }
        _ => {
            return Err(ClientError::error(sqlstate::SYNTAX_ERROR, format!("unknown admin command: {text}")).with_hint(
                "SHOW POOLS | SHOW CLIENTS | SHOW SERVERS | SHOW TENANTS | SHOW CONFIG | RELOAD | RECONNECT | PAUSE | RESUME | KILL <tenant>",
            ));
        }
    }
    Ok(())
}
