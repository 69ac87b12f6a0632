//! `SELECT rlsgate.reauth($1)` over the extended protocol, the way drivers pass values: the
//! statement, its portal and its answers live in rlsgate and never reach the server (there is
//! no `rlsgate` schema upstream). The simple-protocol form is handled in `on_query`.

use bytes::{Bytes, BytesMut};

use super::expect::Expect;
use super::frontend::Refusal;
use super::{Session, SessionError};
use crate::error::sqlstate;
use crate::guard::{ReauthArg, reauth_call};
use crate::protocol::ProtocolError;
use crate::protocol::backend as be;
use crate::protocol::frame::Frame;
use crate::protocol::frontend as fe;

/// Most reauth statements one client may hold (drivers prepare one, if any).
const MAX_REAUTH_STATEMENTS: usize = 8;
/// Reauth answers to the client's Describe and Execute.
const COLUMN: &str = "reauth";

/// A client's reauth statements and its bound reauth portal.
#[derive(Debug, Default)]
pub(super) struct ReauthState {
    statements: Vec<(Box<str>, ReauthArg)>,
    /// Portal name and the token bound to it (boxed: every session holds this state).
    portal: Option<Box<(Box<str>, String)>>,
}

impl ReauthState {
    fn statement(&self, name: &str) -> Option<&ReauthArg> {
        self.statements
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, a)| a)
    }

    fn forget_statement(&mut self, name: &str) -> bool {
        let before = self.statements.len();
        self.statements.retain(|(n, _)| &**n != name);
        before != self.statements.len()
    }

    fn bound(&self, portal: &str) -> bool {
        self.portal.as_deref().is_some_and(|(p, _)| &**p == portal)
    }

    /// Whether the client has nothing of reauth (the common case: one check per message).
    pub(super) fn is_empty(&self) -> bool {
        self.statements.is_empty() && self.portal.is_none()
    }
}

fn protocol(e: ProtocolError) -> SessionError {
    SessionError::ClientProtocol(e)
}

fn message(write: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::new();
    write(&mut out);
    out.freeze()
}

impl Session {
    /// An extended-protocol message about a reauth statement or portal, answered here (`true`);
    /// anything else is left to the caller (`false`).
    /// `parse` is the message read as a Parse when it is one.
    pub(super) async fn on_reauth_message(
        &mut self,
        frame: &Frame,
        parse: Option<&fe::Parse<'_>>,
    ) -> Result<bool, SessionError> {
        if let Some(p) = parse {
            return self.reauth_parse(p);
        }
        match frame.tag {
            fe::BIND if !self.reauth.is_empty() => self.reauth_bind(frame),
            fe::DESCRIBE if !self.reauth.is_empty() => self.reauth_describe(frame),
            // (boxed: the token check is rare, and its state would size every message's future)
            fe::EXECUTE if self.reauth.portal.is_some() => {
                Box::pin(self.reauth_execute(frame)).await
            }
            fe::CLOSE if !self.reauth.is_empty() => self.reauth_close(frame),
            _ => Ok(false),
        }
    }

    fn reauth_parse(&mut self, p: &fe::Parse<'_>) -> Result<bool, SessionError> {
        let repeated = p.name.is_empty()
            && self
                .stmts
                .unnamed_again(p.sql, p.param_types, self.shared.guard_epoch())
                .is_some();
        // (reauth_call tests the text cheaply before it parses it; the client's unnamed
        // statement again passed it when it was first parsed)
        let arg = if p.sql.len() < 4096 && !repeated {
            reauth_call(p.sql)
        } else {
            None
        };
        let Some(arg) = arg else {
            // An unnamed Parse replaces an unnamed reauth statement.
            if p.name.is_empty() {
                self.reauth.forget_statement("");
            }
            return Ok(false);
        };
        if !p.name.is_empty()
            && (self.stmts.contains(p.name) || self.reauth.statement(p.name).is_some())
        {
            self.refuse_extended(Refusal {
                sqlstate: sqlstate::DUPLICATE_PREPARED_STATEMENT,
                message: format!("prepared statement \"{}\" already exists", p.name),
                hint: None,
            })?;
            return Ok(true);
        }
        self.reauth.forget_statement(p.name);
        if self.reauth.statements.len() >= MAX_REAUTH_STATEMENTS {
            self.refuse_extended(Refusal {
                sqlstate: sqlstate::PROGRAM_LIMIT_EXCEEDED,
                message: format!(
                    "rlsgate: at most {MAX_REAUTH_STATEMENTS} rlsgate.reauth statements per client"
                ),
                hint: Some("close the ones no longer used"),
            })?;
            return Ok(true);
        }
        if p.name.is_empty() {
            // the client's previous unnamed statement is gone, as in Postgres
            self.stmts.remove("");
        }
        self.reauth.statements.push((p.name.into(), arg));
        self.push_reply(message(|o| be::write_empty(be::PARSE_COMPLETE, o)));
        Ok(true)
    }

    fn reauth_bind(&mut self, frame: &Frame) -> Result<bool, SessionError> {
        let b = fe::bind(frame.body()).map_err(protocol)?;
        let Some(arg) = self.reauth.statement(b.statement).cloned() else {
            // Another statement bound to the reauth portal's name replaces it.
            if self.reauth.bound(b.portal) {
                self.reauth.portal = None;
            }
            return Ok(false);
        };
        let token = match arg {
            ReauthArg::Token(t) => t,
            ReauthArg::Param => {
                let value = fe::bind_first_param(b.rest).map_err(protocol)?;
                match value.map(std::str::from_utf8) {
                    Some(Ok(t)) => t.trim().to_string(),
                    _ => {
                        self.refuse_extended(Refusal {
                            sqlstate: sqlstate::INVALID_AUTHORIZATION,
                            message: "rlsgate: reauth refused: the token parameter is missing or not text".into(),
                            hint: None,
                        })?;
                        return Ok(true);
                    }
                }
            }
        };
        self.reauth.portal = Some(Box::new((b.portal.into(), token)));
        self.push_reply(message(|o| be::write_empty(be::BIND_COMPLETE, o)));
        Ok(true)
    }

    fn reauth_describe(&mut self, frame: &Frame) -> Result<bool, SessionError> {
        let (kind, name) = fe::target(frame.body(), "Describe").map_err(protocol)?;
        let reply = match kind {
            b'S' => match self.reauth.statement(name) {
                Some(arg) => {
                    let params = u16::from(*arg == ReauthArg::Param);
                    message(|o| {
                        be::write_text_parameters(params, o);
                        be::write_text_row_description(COLUMN, o);
                    })
                }
                None => return Ok(false),
            },
            _ if self.reauth.bound(name) => message(|o| be::write_text_row_description(COLUMN, o)),
            _ => return Ok(false),
        };
        self.push_reply(reply);
        Ok(true)
    }

    async fn reauth_execute(&mut self, frame: &Frame) -> Result<bool, SessionError> {
        let portal = fe::execute_portal(frame.body()).map_err(protocol)?;
        if !self.reauth.bound(portal) {
            return Ok(false);
        }
        // A portal runs once to completion here; it stays (as a finished portal would).
        let token = self
            .reauth
            .portal
            .as_mut()
            .map(|bound| std::mem::take(&mut bound.1))
            .unwrap_or_default();
        match self.reauth(&token).await {
            Ok(()) => self.push_reply(message(|o| {
                be::write_text_row("ok", o);
                be::write_command_complete("SELECT 1", o);
            })),
            Err(e) => self.refuse_extended(Refusal {
                sqlstate: e.sqlstate,
                message: e.message,
                hint: None,
            })?,
        }
        Ok(true)
    }

    fn reauth_close(&mut self, frame: &Frame) -> Result<bool, SessionError> {
        let (kind, name) = fe::target(frame.body(), "Close").map_err(protocol)?;
        let closed = match kind {
            b'S' => self.reauth.forget_statement(name),
            _ if self.reauth.bound(name) => {
                self.reauth.portal = None;
                true
            }
            _ => false,
        };
        if closed {
            self.push_reply(message(|o| be::write_empty(be::CLOSE_COMPLETE, o)));
        }
        Ok(closed)
    }

    /// A reply rlsgate produces itself, in order behind what the server still owes.
    pub(super) fn push_reply(&mut self, bytes: Bytes) {
        if self.expect.is_empty() {
            self.client_out.extend_from_slice(&bytes);
        } else {
            self.expect.push_back(Expect::Reply(bytes));
        }
    }
}
