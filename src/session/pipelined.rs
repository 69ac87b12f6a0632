//! Units that run on a shared, pipelined connection (see [`crate::pipeline`]).
//!
//! Between transactions, when the client's input starts with a complete unit the guard
//! classifies as plain autocommit work, the session hands the unit's messages to a lane
//! instead of checking out a connection of its own, and relays the lane's replies. The client's
//! next messages wait until the unit's ReadyForQuery (its units stay in order).

use std::sync::Arc;

use bytes::BytesMut;

use super::statements::{self, Prepared};
use super::unit::{Lanes, Skip};
use super::{CopyState, Session, SessionError};
use crate::config::PoolMode;
use crate::error::UserFacing;
use crate::guard::{Analysis, TxEffect, reauth_token};
use crate::pipeline::{ContextRun, Job, Outcome, Reply};
use crate::protocol::backend::{self as be, TxStatus};
use crate::protocol::frame::frame_len;
use crate::protocol::frontend as fe;

/// Largest unit (all its messages) sent to a lane; larger ones take the exclusive path.
const MAX_UNIT: usize = 64 * 1024;

/// What `try_pipeline` did with the client's input.
pub(super) enum Piped {
    /// Not a unit for a lane: the messages take the usual path.
    No,
    /// Sent to a lane: the session waits for its replies.
    Sent,
    /// Answered with an error here (pause or tenant limit timed out).
    Answered,
}

/// A unit at the front of the client's input that a lane may run.
struct Unit {
    len: usize,
    query: bool,
    /// The unit's last Parse of the unnamed statement.
    unnamed: Option<UnnamedParse>,
    /// The client's named statements it binds or describes (their names are rewritten to the
    /// server's).
    named: Vec<Arc<Prepared>>,
}

/// A unit's Parse of the unnamed statement.
enum UnnamedParse {
    /// The same text and parameter types as the client's unnamed statement now.
    Same,
    /// Another statement: its text, parameter types, analysis and the guard generation of that.
    New(Arc<str>, bytes::Bytes, Arc<Analysis>, u64),
}

/// Plain autocommit work: understood, allowed, no transaction control, nothing that outlives
/// the statement on the connection (settings, session state, statements dropped), no COPY FROM
/// STDIN, nothing that must run before the transaction's snapshot or outside a transaction.
fn plain(a: &Analysis) -> bool {
    a.parsed
        && !a.is_denied()
        && a.session_state.is_none()
        && !a.session_set
        && !a.untracked_set
        && a.reset.is_none()
        && !a.copy_from_stdin
        && !a.statements.is_empty()
        && a.statements.iter().all(|s| {
            s.tx == TxEffect::None
                && !s.no_tx_block
                && !s.block_sensitive
                && !s.before_snapshot
                && s.setting.is_none()
                && s.deallocate.is_none()
        })
}

/// The unit's messages with the client's statement names replaced by the server's (`named`, in
/// the order the unit uses them).
fn server_names(frames: &[u8], named: &[Arc<Prepared>]) -> Result<bytes::Bytes, SessionError> {
    let protocol = SessionError::ClientProtocol;
    let mut out = BytesMut::with_capacity(frames.len() + 64 * named.len());
    let mut named = named.iter();
    let mut pos = 0;
    while pos < frames.len() {
        let total = frame_len(&frames[pos..], usize::MAX)
            .map_err(protocol)?
            .unwrap_or(frames.len() - pos);
        let frame = &frames[pos..pos + total];
        let body = &frame[5..];
        match frame[0] {
            fe::BIND => {
                let b = fe::bind(body).map_err(protocol)?;
                match b.statement.is_empty() {
                    true => out.extend_from_slice(frame),
                    false => {
                        let p = named
                            .next()
                            .ok_or(SessionError::Injection("statement list".into()))?;
                        fe::write_bind(b.portal, &p.server_name, b.rest, &mut out)
                            .map_err(protocol)?;
                    }
                }
            }
            fe::DESCRIBE => {
                let (kind, name) = fe::target(body, "Describe").map_err(protocol)?;
                match kind == b'S' && !name.is_empty() {
                    false => out.extend_from_slice(frame),
                    true => {
                        let p = named
                            .next()
                            .ok_or(SessionError::Injection("statement list".into()))?;
                        fe::write_describe(b'S', &p.server_name, &mut out).map_err(protocol)?;
                    }
                }
            }
            _ => out.extend_from_slice(frame),
        }
        pos += total;
    }
    Ok(out.freeze())
}

impl Session {
    /// Pipelining is on for this session at all (fixed at login).
    pub(super) fn pipelining_allowed(
        shared: &crate::app::Shared,
        wrap: bool,
        mode: PoolMode,
    ) -> bool {
        shared.pipelines.enabled()
            && mode == PoolMode::Transaction
            && !wrap
            && shared.sealer.is_none()
            && !shared.config().upstream.citus_propagate_set
    }

    /// Between transactions, nothing held or owed: the next unit may go to a lane.
    pub(super) fn may_pipeline(&self) -> bool {
        self.lanes != Lanes::Off
            && self.server.is_none()
            && self.lane_reply.is_none()
            && self.pending.is_none()
            && self.expect.is_empty()
            && self.in_flight == 0
            && !self.unit.open
            && self.split.is_none()
            && !self.unit.skipping()
            && self.copy == CopyState::Off
            && self.pinned.is_none()
            && self.reauth.is_empty()
            && self.shared.pipelines.enabled()
            && matches!(
                self.client_buf.first(),
                Some(&(fe::QUERY | fe::PARSE | fe::BIND | fe::DESCRIBE))
            )
    }

    /// The complete unit at the front of the client's input, if a lane may run it.
    fn lane_unit(&self) -> Option<Unit> {
        let buf = &self.client_buf[..];
        let mut pos = 0;
        let mut unnamed = None;
        let mut named: Vec<Arc<Prepared>> = Vec::new();
        let mut parsed = false;
        // A named statement of the client's, if the unit may use it on a lane.
        let statement = |name: &str| -> Option<Arc<Prepared>> {
            let p = self.stmts.get(name)?;
            if !plain(&p.analysis) || self.shared.pool.stale_after(&p.server_name, p.stamp) {
                return None;
            }
            Some(Arc::clone(p))
        };
        loop {
            let total = frame_len(&buf[pos..], self.config.server.max_message_size).ok()??;
            let tag = buf[pos];
            let body = &buf[pos + 5..pos + total];
            pos += total;
            if pos > MAX_UNIT {
                return None;
            }
            match tag {
                fe::QUERY if pos == total => {
                    let sql = fe::query_text(body).ok()?;
                    if reauth_token(sql).is_some() || !plain(&self.shared.analyze(sql)) {
                        return None;
                    }
                    return Some(Unit {
                        len: pos,
                        query: true,
                        unnamed: None,
                        named,
                    });
                }
                fe::PARSE => {
                    let p = fe::parse(body).ok()?;
                    if !p.name.is_empty() {
                        return None;
                    }
                    let guard_epoch = self.shared.guard_epoch();
                    // The client's unnamed statement again (see `Statements::unnamed_again`):
                    // not a reauth, already classified.
                    let again = self.stmts.unnamed_again(p.sql, p.param_types, guard_epoch);
                    unnamed = Some(match again {
                        Some(u) if plain(&u.analysis) => UnnamedParse::Same,
                        Some(_) => return None,
                        None => {
                            if crate::guard::reauth_call(p.sql).is_some() {
                                return None;
                            }
                            let analysis = self.shared.analyze(p.sql);
                            if !plain(&analysis) {
                                return None;
                            }
                            UnnamedParse::New(
                                Arc::from(p.sql),
                                statements::param_types(p.param_types),
                                analysis,
                                guard_epoch,
                            )
                        }
                    });
                    parsed = true;
                }
                // The unnamed statement this unit Parsed, or a named one of the client's, bound
                // to the unnamed portal.
                fe::BIND => {
                    let b = fe::bind(body).ok()?;
                    if !b.portal.is_empty() {
                        return None;
                    }
                    if b.statement.is_empty() {
                        if !parsed {
                            return None;
                        }
                    } else {
                        named.push(statement(b.statement)?);
                    }
                    parsed = true;
                }
                fe::DESCRIBE => {
                    let (kind, name) = fe::target(body, "Describe").ok()?;
                    if kind == b'S' && !name.is_empty() {
                        named.push(statement(name)?);
                    } else if !parsed || !name.is_empty() {
                        return None;
                    }
                }
                fe::EXECUTE => {
                    if !parsed || !fe::execute_portal(body).ok()?.is_empty() {
                        return None;
                    }
                }
                fe::SYNC if parsed => {
                    return Some(Unit {
                        len: pos,
                        query: false,
                        unnamed,
                        named,
                    });
                }
                _ => return None,
            }
        }
    }

    /// Send the unit at the front of the client's input to a lane, if it is one for a lane.
    pub(super) async fn try_pipeline(&mut self) -> Result<Piped, SessionError> {
        if self.lanes.take_not_next() {
            // (a lane gave this unit back: it runs on a connection of its own)
            return Ok(Piped::No);
        }
        let Some(unit) = self.lane_unit() else {
            return Ok(Piped::No);
        };
        let Some(statement) = self.context.set_config() else {
            return Ok(Piped::No);
        };
        let set_config = ContextRun::of(statement);
        let set_local = match self.shared.pipelines.needs_set_local() {
            true => match self
                .context
                .set_local_form(&self.identity, &self.shared.stmt_hasher)
            {
                Ok(statements) => Some(Arc::clone(statements)),
                Err(_) => return Ok(Piped::No),
            },
            false => None,
        };
        // (one clock read for the unit's start: its query time, its admission and its lane)
        let now = std::time::Instant::now();
        if !self.shared.pipelines.has_room(self.settings.wanted(), now) {
            return Ok(Piped::No);
        }
        if self.token_expired() {
            return Err(SessionError::TokenExpired);
        }
        self.query_started = Some(now);
        // (no connection of its own: the lane's)
        let now = match self.admit(now).await {
            Ok(started) => self.admitted(started, 0),
            Err(e) => return Ok(self.unit_not_admitted(&unit, &e)),
        };
        // the client's unnamed statement is this one now (a later Bind alone re-Parses it)
        let stamp = match unit.unnamed {
            Some(_) => self.shared.pool.plan_tick(),
            None => 0,
        };
        match unit.unnamed {
            Some(UnnamedParse::Same) => {
                // (it exists: lane_unit found it)
                self.stmts.refresh_unnamed(stamp);
            }
            Some(UnnamedParse::New(sql, param_types, analysis, guard_epoch)) => {
                let prepared = Arc::new(Prepared {
                    server_name: statements::unnamed(),
                    sql,
                    param_types,
                    analysis,
                    stamp,
                    guard_epoch,
                });
                self.stmts.insert("", prepared);
            }
            None => {}
        }
        let tenant = Arc::clone(&self.identity.tenant);
        let frames = self.client_buf.split_to(unit.len).freeze();
        let (frames, original) = match unit.named.is_empty() {
            true => (frames, None),
            false => (server_names(&frames, &unit.named)?, Some(frames)),
        };
        let reply = self
            .spare_reply
            .take()
            .and_then(|mut reply| Reply::reuse(&mut reply).then_some(reply))
            .unwrap_or_default();
        let job = Job {
            tenant,
            set_config,
            set_local,
            statements: unit.named,
            frames,
            original,
            reply: Arc::clone(&reply),
        };
        if let Err(job) = self
            .shared
            .pipelines
            .submit(job, self.settings.wanted(), now)
        {
            // the lanes filled up meanwhile: an exclusive connection (which admits it again)
            self.give_back(job.original.as_ref().unwrap_or(&job.frames));
            self.tenant_permit = None;
            self.held_since = None;
            return Ok(Piped::No);
        }
        self.shared.metrics.injection();
        self.cancel.slot.set_pipelined(Arc::clone(&reply));
        self.lane_reply = Some(reply);
        Ok(Piped::Sent)
    }

    /// No room for the unit (a pause or the tenant's limit timed out): answered with the error.
    fn unit_not_admitted(&mut self, unit: &Unit, e: &crate::pool::PoolError) -> Piped {
        tracing::warn!(error = %e, "no room for the client's unit");
        let err = e.to_client_error();
        if unit.query {
            let _ = self.client_buf.split_to(unit.len);
            self.local_query_error(&err);
        } else {
            // the usual path skips the unit's messages up to its Sync and answers it
            be::write_error(&err, &mut self.client_out);
            self.unit.skip = Skip::LocalSync;
        }
        Piped::Answered
    }

    /// Replies (or the end) of the unit on a lane arrived in `client_out`.
    pub(super) async fn on_lane_reply(&mut self) -> Result<(), SessionError> {
        let Some(outcome) = self.lane_reply.as_ref().and_then(|r| r.take_outcome()) else {
            return Ok(());
        };
        let now = std::time::Instant::now();
        match outcome {
            Outcome::Done => {
                if let Some(started) = self.query_started.take() {
                    self.shared
                        .metrics
                        .query_finished(now.saturating_duration_since(started));
                }
            }
            Outcome::Failed(err) => {
                be::write_error(&err, &mut self.client_out);
                be::write_ready(TxStatus::Idle, &mut self.client_out);
            }
            Outcome::Bounced(frames) => self.give_back(&frames),
            Outcome::LexerChanged(what) => {
                self.lane_reply = None;
                self.cancel.slot.clear().await;
                self.account_release();
                return Err(SessionError::LexerChanged(what));
            }
        }
        self.spare_reply = self.lane_reply.take();
        self.cancel.slot.clear().await;
        self.account_release_at(now);
        Ok(())
    }

    /// A unit no lane ran: its messages go back in front of the client's input, for the usual
    /// path.
    fn give_back(&mut self, frames: &[u8]) {
        let mut input = BytesMut::with_capacity(frames.len() + self.client_buf.len());
        input.extend_from_slice(frames);
        input.extend_from_slice(&self.client_buf);
        self.client_buf = input;
        self.lanes.not_next();
    }
}
