//! Server messages: forwarded untouched unless the front of the expect queue says they answer
//! something rlsgate injected. ReadyForQuery updates the transaction state.

use std::sync::Arc;

use super::expect::{After, BlockEdge, Expect};
use super::frontend::Ahead;
use super::unit::Wrap;
use super::{CopyState, ServerEnding, Session, SessionError, tx::Settle};
use super::{Piece, PieceKind};
use crate::pool::HeldSettings;
use crate::protocol::backend::{self as be, TxStatus};
use crate::protocol::frame::FrameRef;
use crate::protocol::frontend as fe;

fn unexpected(tag: u8, front: &Expect) -> SessionError {
    SessionError::UpstreamProtocol(format!(
        "unexpected message {:?} while expecting {front:?}",
        tag as char
    ))
}

impl Session {
    pub(super) fn handle_server(&mut self, frame: FrameRef<'_>) -> Result<(), SessionError> {
        let tag = frame.tag;
        if let Some(Expect::HiddenQuery { what }) = self.expect.front() {
            return match tag {
                be::READY_FOR_QUERY => self.on_ready(frame),
                be::ERROR_RESPONSE => {
                    let what = *what;
                    let n = be::notice_fields(frame.body()).unwrap_or_default();
                    if what == super::KEEP_CONTEXT {
                        // (the unit behind it brings its own context: nothing is lost)
                        tracing::debug!(code = %n.code, message = %n.message, "keeping the tenant context on the connection failed");
                        self.keep_context_failed();
                        return Ok(());
                    }
                    if what == super::SEAL {
                        // The connection may hold no seal or a broken one: the session ends
                        // and the connection is closed (a reply is still in flight).
                        if let Some(server) = self.server.as_mut() {
                            server.conn().sealed = None;
                        }
                        return Err(SessionError::Injection(format!(
                            "sealing the connection for the tenant failed: {} {}",
                            n.code, n.message
                        )));
                    }
                    if what == super::SEQUENCE_DISCARD || what == super::SETTINGS_RESET {
                        // The connection still holds the previous client's sequence values or
                        // settings (another tenant's, maybe), and the client's unit is right
                        // behind: none of its replies may reach the client. The session ends
                        // and the connection is closed (a reply is still in flight).
                        tracing::error!(what, code = %n.code, message = %n.message, "a statement rlsgate runs between clients failed; ending the session");
                        return Err(SessionError::Cleanup(format!(
                            "{what}: {} {}",
                            n.code, n.message
                        )));
                    }
                    tracing::warn!(what, code = %n.code, message = %n.message, "a statement rlsgate runs itself failed");
                    if let Some(server) = self.server.as_mut() {
                        let conn = server.conn();
                        // What the connection holds is unknown: reset before the next
                        // transaction, and clean it completely before another client.
                        conn.settings = HeldSettings::Unknown;
                        if what != "settings replay" {
                            conn.dirty_session = true;
                        }
                    }
                    Ok(())
                }
                _ => Ok(()),
            };
        }
        if let Some(Expect::WrapCommit { .. }) = self.expect.front() {
            return match tag {
                be::READY_FOR_QUERY => {
                    self.release_held(true);
                    self.on_ready(frame)
                }
                be::ERROR_RESPONSE => {
                    self.release_held(false);
                    self.on_error(frame)
                }
                be::COMMAND_COMPLETE => {
                    if frame.body() == b"ROLLBACK\0" {
                        self.tx.fail();
                    }
                    self.release_held(true);
                    Ok(())
                }
                // notices (e.g. "there is no transaction in progress") and the like are ours
                _ => Ok(()),
            };
        }
        if tag == be::COMMAND_COMPLETE
            && self.shared.sealer.is_some()
            && frame.body().starts_with(b"DISCARD")
            && let Some(server) = self.server.as_mut()
        {
            // DISCARD SEQUENCES / ALL cleared the backend's seal: sealed again before the next
            // unit that starts a transaction.
            server.conn().sealed = None;
        }
        if self.config.upstream.transaction_wrap && tag != be::READY_FOR_QUERY {
            // Whatever comes now follows the held completion (if any) at the client.
            self.release_held(true);
            if tag == be::COMMAND_COMPLETE
                && matches!(
                    self.expect.front(),
                    Some(Expect::Query {
                        after: After::Swallow,
                        ..
                    })
                )
                && let Some(Expect::WrapCommit { held, after, .. }) = self.expect.get_mut(1)
                && matches!(after, After::Forward | After::FinishSplit)
            {
                // transaction_wrap: the Query's completion waits for rlsgate's COMMIT. (Not for
                // a piece of a split Query that more pieces follow: Postgres completes it before
                // the client's own COMMIT after it runs.)
                if frame.body() == b"ROLLBACK\0" {
                    self.tx.fail();
                }
                *held = Some(bytes::Bytes::copy_from_slice(frame.bytes));
                return Ok(());
            }
        }
        tracing::trace!(tag = %(tag as char), front = ?self.expect.front(), "server message");
        match tag {
            be::NOTICE_RESPONSE if matches!(self.expect.front(), Some(Expect::Inject { .. })) => {
                // "SET LOCAL can only be used in transaction blocks": ours, not the client's.
                return Ok(());
            }
            be::PARAMETER_STATUS => {
                let (k, v) = be::parameter_status(frame.body())
                    .map_err(|e| SessionError::UpstreamProtocol(e.to_string()))?;
                if let Some(what) = crate::guard::policy::unexpected_lexer_report(k, v) {
                    // Some route changed how the server reads text: nothing the guard checked
                    // can be trusted on this connection any more. End the session; the
                    // connection is closed (a reply is in flight, so it is never reused).
                    return Err(SessionError::LexerChanged(what));
                }
                self.client_out.extend_from_slice(frame.bytes);
                return Ok(());
            }
            be::NOTICE_RESPONSE => {
                self.client_out.extend_from_slice(frame.bytes);
                return Ok(());
            }
            be::NOTIFICATION => {
                if self.hears_notifications() {
                    self.client_out.extend_from_slice(frame.bytes);
                } else if let Some(server) = self.server.as_mut() {
                    // The connection listens for someone else (something out of the guard's
                    // sight ran LISTEN on it): not this client's to hear. It is reset (DISCARD
                    // ALL, which unlistens) before anyone else gets it: one warning per taint.
                    let conn = server.conn();
                    if std::mem::replace(&mut conn.dirty_session, true) {
                        tracing::debug!(server_id = conn.id, "dropped another notification");
                    } else {
                        tracing::warn!(
                            server_id = conn.id,
                            "dropped a notification the client did not listen for; the connection is reset before reuse"
                        );
                    }
                }
                return Ok(());
            }
            be::ERROR_RESPONSE => return self.on_error(frame),
            be::COPY_IN => self.enter_copy_in(),
            be::READY_FOR_QUERY => return self.on_ready(frame),
            _ => {}
        }
        let Some(front) = self.expect.front_mut() else {
            return Err(SessionError::UpstreamProtocol(format!(
                "unsolicited message {:?}",
                tag as char
            )));
        };
        let (forward, done) = match front {
            Expect::Inject { remaining, .. } => match tag {
                be::PARSE_COMPLETE | be::BIND_COMPLETE | be::DATA_ROW | be::CLOSE_COMPLETE => {
                    (false, false)
                }
                be::COMMAND_COMPLETE => {
                    *remaining -= 1;
                    (false, *remaining == 0)
                }
                _ => return Err(unexpected(tag, front)),
            },
            Expect::Hidden { tag: want, .. } if *want == tag => (false, true),
            Expect::One { tag: want, .. } if *want == tag => (true, true),
            Expect::Rebind { .. } if tag == be::BIND_COMPLETE => (true, true),
            Expect::Raise { .. } => match tag {
                be::PARSE_COMPLETE | be::BIND_COMPLETE => (false, false),
                _ => return Err(unexpected(tag, front)),
            },
            Expect::DescribeStatement { prepared } => match tag {
                be::PARAMETER_DESCRIPTION => {
                    *front = Expect::DescribePortal {
                        prepared: prepared.take(),
                    };
                    (true, false)
                }
                _ => return Err(unexpected(tag, front)),
            },
            Expect::DescribePortal { .. } => match tag {
                be::ROW_DESCRIPTION | be::NO_DATA => (true, true),
                _ => return Err(unexpected(tag, front)),
            },
            Expect::Execute { .. } => (
                true,
                matches!(
                    tag,
                    be::COMMAND_COMPLETE | be::EMPTY_QUERY | be::PORTAL_SUSPENDED
                ),
            ),
            Expect::Query { .. } => (true, false),
            Expect::Sync { .. }
            | Expect::HiddenQuery { .. }
            | Expect::WrapCommit { .. }
            | Expect::Hidden { .. }
            | Expect::One { .. }
            | Expect::Rebind { .. }
            | Expect::Synthetic(_)
            | Expect::Reply(_) => {
                return Err(unexpected(tag, front));
            }
        };
        if tag == be::COMMAND_COMPLETE && frame.body() == b"ROLLBACK\0" {
            // The transaction did not commit (ROLLBACK, or a COMMIT of a failed transaction).
            self.tx.fail();
        }
        if forward {
            self.client_out.extend_from_slice(frame.bytes);
        }
        if done {
            self.expect.pop_front();
            self.emit_synthetic();
        }
        Ok(())
    }

    /// A COPY FROM STDIN was sent: what the client sends next waits for the server's answer.
    pub(super) fn copy_sent(&mut self) {
        if self.copy == CopyState::Off {
            self.copy = CopyState::Awaited;
        }
    }

    /// The server left COPY FROM STDIN (or never entered it): still awaited while a later COPY
    /// sent may be unanswered.
    pub(super) fn leave_copy_in(&mut self) {
        if self.copy == CopyState::In {
            self.copy = match self.expect.iter().any(Expect::awaits_copy) {
                true => CopyState::Awaited,
                false => CopyState::Off,
            };
        }
    }

    /// The server entered COPY FROM STDIN: Syncs the client sent after the COPY (drivers send one
    /// right behind Execute) are ignored by the server until CopyDone, so expect no reply to them.
    fn enter_copy_in(&mut self) {
        self.copy = CopyState::In;
        if let Some(Expect::Query { copy, .. } | Expect::Execute { copy }) = self.expect.front_mut()
        {
            // answered: the server reads COPY data now
            *copy = false;
        }
        let before = self.expect.len();
        let mut first = true;
        let mut rearm = false;
        self.expect.retain(|e| {
            let keep = first || !matches!(e, Expect::Sync { .. });
            if !keep
                && matches!(
                    e,
                    Expect::Sync {
                        after: After::SwallowThenCommit | After::Swallow
                    }
                )
            {
                rearm = true;
            }
            first = false;
            keep
        });
        if rearm {
            // the wrapped unit ends at the client's next Sync (after CopyDone)
            self.unit.wrap = Wrap::BlockCopy;
        }
        self.in_flight -= before - self.expect.len();
    }

    /// Whether a notification the server delivers is the client's: only with `[guard]
    /// allow_notifications`, on a connection that is the client's alone (session pooling, or
    /// pinned by its LISTEN), never on a connection other clients' transactions share.
    fn hears_notifications(&self) -> bool {
        self.shared.config().guard.allow_notifications
            && (self.pinned.is_some()
                || self.config.server.pool_mode == crate::config::PoolMode::Session)
    }

    /// Emit replies rlsgate produces itself that have reached the front of the queue.
    fn emit_synthetic(&mut self) {
        loop {
            match self.expect.front() {
                Some(Expect::Synthetic(tag)) => be::write_empty(*tag, &mut self.client_out),
                Some(Expect::Reply(bytes)) => self.client_out.extend_from_slice(bytes),
                _ => return,
            }
            self.expect.pop_front();
        }
    }

    fn on_error(&mut self, frame: FrameRef<'_>) -> Result<(), SessionError> {
        if self.shared.sealer.is_some()
            && crate::seal::is_unsealed_error(frame.body())
            && let Some(server) = self.server.as_mut()
        {
            // Something cleared or broke the seal behind rlsgate's back (a DISCARD inside a
            // function, a stray rlsgate.enter): sealed again before the next transaction.
            tracing::warn!("the server says the connection is not sealed: sealing it again");
            server.conn().sealed = None;
        }
        let fatal = be::notice_fields(frame.body())
            .ok()
            .filter(|n| n.severity == "FATAL" || n.severity == "PANIC");
        if let Some(n) = fatal {
            // The server ends the connection (terminated backend, shutdown).
            let between_transactions = self.config.server.pool_mode
                == crate::config::PoolMode::Transaction
                && self.pinned.is_none()
                && self.expect.is_empty()
                && self.in_flight == 0
                && !self.unit.open
                && self.tx.predicted() == super::Predicted::Idle;
            if between_transactions {
                // Nothing of the client's was on it: the connection is closed and the client's
                // next transaction gets another one (see serve).
                tracing::info!(code = %n.code, message = %n.message, "upstream connection ended between transactions; closing it");
                self.server_ending = Some(ServerEnding::Quietly);
                return Ok(());
            }
            // The client's transaction or request is lost: it gets this error, and the session
            // ends with it.
            self.server_ending = Some(ServerEnding::Told);
            self.client_out.extend_from_slice(frame.bytes);
            return Err(SessionError::UpstreamClosed);
        }
        // An error ends COPY FROM STDIN on the server: what the client sends next is not data.
        self.leave_copy_in();
        // A Bind or Describe of rlsgate's statement refused because a migration changed its
        // result type: this connection's copy is retired, and the change may be news for the
        // other connections and clients.
        let stale_copy = match self.expect.front() {
            Some(Expect::One {
                tag: be::BIND_COMPLETE,
                prepared: Some(name),
                ..
            })
            | Some(Expect::DescribeStatement {
                prepared: Some(name),
            })
            | Some(Expect::DescribePortal {
                prepared: Some(name),
            }) => Some(Arc::clone(name)),
            _ => None,
        };
        if let Some(name) = stale_copy
            && stale_plan(frame.body())
            && let Some(server) = self.server.as_mut()
        {
            let prepared = &mut server.conn().prepared;
            let copy = prepared.peek_stamp(&name).unwrap_or(0);
            self.shared.pool.plan_went_stale(&name, copy);
            prepared.retire(&name);
        }
        let Some(front) = self.expect.front() else {
            // An error outside any request (e.g. the server terminating the session): pass it on.
            self.client_out.extend_from_slice(frame.bytes);
            return Ok(());
        };
        // A refused statement: the client gets the guard's error, not the server's parse error.
        let error = match front {
            Expect::Query {
                refusal: Some(error),
                ..
            }
            | Expect::Raise { error } => &error[..],
            _ => frame.bytes,
        };
        match front {
            Expect::Query { .. } | Expect::WrapCommit { .. } => {
                self.tx.fail();
                if let Some(split) = self.split.as_mut() {
                    split.failed = true;
                }
                self.client_out.extend_from_slice(error);
                Ok(())
            }
            Expect::Inject {
                block: BlockEdge::Commit,
                ..
            } => {
                // transaction_wrap's COMMIT failed (a deferred constraint, a serialization
                // failure): the transaction is over and the error is the client's. The server
                // skips to the client's Sync.
                self.tx.fail();
                self.client_out.extend_from_slice(frame.bytes);
                self.expect.pop_front();
                self.discard_until_sync();
                // A cancel (or statement_timeout) can fail the COMMIT before it ends the block:
                // the Sync's ReadyForQuery tells.
                if let Some(Expect::Sync { after }) = self.expect.front_mut()
                    && *after == After::Forward
                {
                    *after = After::CloseBlock;
                }
                Ok(())
            }
            Expect::Inject { .. } => self.on_injection_error(frame),
            _ => {
                // Extended protocol: the server now skips everything up to Sync.
                self.tx.fail();
                self.client_out.extend_from_slice(error);
                self.discard_until_sync();
                Ok(())
            }
        }
    }

    /// Drop the expectations of messages the server skips after an error, up to the next Sync.
    fn discard_until_sync(&mut self) {
        if !self.expect.iter().any(|e| matches!(e, Expect::Sync { .. })) {
            // The client has not sent its Sync yet (it flushed to read the error): whatever it
            // sends before the Sync is ignored by the server, so drop it here, unanswered.
            self.unit.skip_to_sync();
        }
        // transaction_wrap: skipped COMMITs of rlsgate's blocks minus skipped BEGINs. More
        // COMMITs than BEGINs: a block rlsgate opened before the error is still open (and now
        // failed) after the Sync.
        let mut left_open = 0isize;
        while self
            .expect
            .front()
            .is_some_and(|e| !matches!(e, Expect::Sync { .. }))
        {
            match self.expect.pop_front() {
                Some(Expect::Query { after, .. }) => self.unit_skipped(after),
                Some(Expect::WrapCommit { after, .. }) => {
                    left_open += 1;
                    self.unit_skipped(after);
                    // (only the Query form can be skipped; should a bound one be, the Parse
                    // that may have gone with it did not happen)
                    let commit = Arc::clone(&self.shared.wrap_statements.commit.name);
                    self.context_statements_lost(&[commit]);
                }
                Some(Expect::HiddenQuery { what }) if what == super::KEEP_CONTEXT => {
                    self.query_skipped();
                    self.keep_context_failed();
                }
                Some(Expect::HiddenQuery { .. }) => {
                    self.query_skipped();
                    if let Some(server) = self.server.as_mut() {
                        // a settings statement that did not run: as if it had failed
                        let conn = server.conn();
                        conn.settings = HeldSettings::Unknown;
                        conn.dirty_session = true;
                    }
                }
                // A Parse (the client's, or a hidden re-Parse) that did not happen.
                Some(Expect::One {
                    prepared,
                    client_name: Some(name),
                    ..
                }) => self.parse_skipped(prepared.as_deref(), Some(&name)),
                Some(Expect::Hidden { prepared, .. }) => {
                    self.parse_skipped(prepared.as_deref(), None)
                }
                // The statements Parsed with a skipped injection do not exist.
                Some(Expect::Inject {
                    parsed,
                    block,
                    discards,
                    ..
                }) => {
                    match block {
                        BlockEdge::Begin => left_open -= 1,
                        BlockEdge::Commit => left_open += 1,
                        BlockEdge::Neither => {}
                    }
                    self.injection_lost(parsed, discards);
                }
                // A Bind that did not happen: the portal it would have replaced is still there.
                Some(Expect::Rebind {
                    portal,
                    effect,
                    unit,
                }) => {
                    self.ending_portals.insert_missing(portal, (effect, unit));
                }
                _ => {}
            }
        }
        if left_open > 0 {
            // The block (if the error came after its BEGIN) must end after the Sync, with
            // rlsgate's COMMIT (a ROLLBACK by then), unless a COMMIT of rlsgate's already follows
            // that Sync; the Sync's ReadyForQuery tells whether it is open.
            match self.expect.front_mut() {
                Some(Expect::Sync { after }) if *after == After::Forward => {
                    *after = After::CloseBlock;
                }
                Some(_) => {}
                None => self.unit.wrap_in_block(),
            }
        }
    }

    /// An injection failed or was skipped: the statements Parsed with it may not exist, and if
    /// it was the sequence discard between tenants, what the connection holds is unknown.
    fn injection_lost(&mut self, parsed: Option<Box<[Arc<str>]>>, discards: bool) {
        if let Some(names) = parsed {
            self.context_statements_lost(&names);
        }
        if discards && let Some(server) = self.server.as_mut() {
            server.conn().sequences = crate::pool::SequenceOwner::Unknown;
        }
    }

    /// Context statements whose Parse may not have happened: prepared again when next needed
    /// (closing whatever may be there first).
    fn context_statements_lost(&mut self, names: &[Arc<str>]) {
        if let Some(server) = self.server.as_mut() {
            for name in names {
                server.conn().prepared.retire(name);
            }
        }
    }

    /// A Query inside an unsynced extended unit is skipped as well (also rlsgate's own
    /// BEGIN/COMMIT around it): no ReadyForQuery will come for it. The unit counts as done; a
    /// split Query ends, none of its pieces having run.
    fn unit_skipped(&mut self, after: After) {
        self.query_skipped();
        if matches!(after, After::ContinueSplit | After::FinishSplit) {
            self.split = None;
            self.settings
                .retag(super::frontend::SPLIT_UNIT, self.units_done);
        }
    }

    /// Bookkeeping for a Query the server skipped (it waits for a Sync after an error).
    fn query_skipped(&mut self) {
        self.in_flight -= 1;
        self.units_done += 1;
    }

    /// A Parse that did not happen: the server does not have that statement (named), or its
    /// unnamed statement is no longer known; a client's named statement is forgotten too.
    fn parse_skipped(&mut self, server_name: Option<&str>, client_name: Option<&str>) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let conn = server.conn();
        match server_name {
            // An older copy may remain (a Close before the Parse was skipped too): closed
            // before the statement is prepared again.
            Some(name) => conn.prepared.retire(name),
            None => conn.unnamed_owner = None,
        }
        if let Some(c) = client_name.filter(|c| !c.is_empty()) {
            self.stmts.remove(c);
        }
    }

    /// rlsgate's statements ahead of a client's unit failed: the client's cancel (or its
    /// statement_timeout) landed in them, or they met a block rlsgate's own COMMIT left open
    /// (see on_ready); anything else is not expected with validated settings. The server now
    /// skips everything up to the next Sync: the client's unit gets the error, as if its first
    /// statement had failed, and the session goes on.
    fn on_injection_error(&mut self, frame: FrameRef<'_>) -> Result<(), SessionError> {
        let notice = be::notice_fields(frame.body()).ok();
        let code = notice.as_ref().map_or("", |n| n.code.as_str());
        let detail = notice
            .as_ref()
            .map(|n| format!("{} {}", n.code, n.message))
            .unwrap_or_default();
        // The failed injection, and rlsgate's statements right behind it (the context behind a
        // sequence discard): the server skips them all.
        let mut failed = None;
        while let Some(Expect::Inject {
            parsed,
            block,
            discards,
            ..
        }) = self.expect.pop_front_if(|e| {
            matches!(e, Expect::Inject { block, .. } if failed.is_none() || *block == BlockEdge::Neither)
        }) {
            failed.get_or_insert(block);
            self.injection_lost(parsed, discards);
        }
        let block = failed.unwrap_or(BlockEdge::Neither);
        let aborted_block = code == crate::error::sqlstate::IN_FAILED_SQL_TRANSACTION;
        let cancelled = code == crate::error::sqlstate::QUERY_CANCELED;
        if self.expect.is_empty() {
            // Behind the client's last statement, already answered: one that ended in an
            // aborted block (the client has its error: no disagreement), or the client's BEGIN
            // (its block is aborted now; its next statement is told so by the server). The
            // server skips to a Sync: one of rlsgate's own, answered unseen.
            if aborted_block || cancelled {
                tracing::debug!(error = %detail, "tenant context not applied behind the client's last statement");
            } else {
                tracing::error!(error = %detail, "injecting the tenant context failed");
            }
            fe::write_sync(&mut self.server_out);
            self.expect_ready(Expect::Sync {
                after: After::Swallow,
            });
            return Ok(());
        }
        // transaction_wrap's BEGIN can only meet an aborted block that rlsgate's COMMIT left
        // (rlsgate opens its block only when the client is outside one): the unit was
        // pipelined behind the one whose COMMIT was interrupted.
        let leftover_block = aborted_block && block == BlockEdge::Begin;
        let replaced;
        let error = if leftover_block {
            let e = crate::error::ClientError::error(
                crate::error::sqlstate::QUERY_CANCELED,
                "canceling statement due to user request",
            )
            .with_detail("rlsgate: a cancel or timeout interrupted the COMMIT of an earlier unit; this unit, sent behind it, did not run");
            let mut out = bytes::BytesMut::new();
            be::write_error(&e, &mut out);
            replaced = out;
            &replaced[..]
        } else {
            frame.bytes
        };
        if cancelled || leftover_block {
            tracing::debug!(error = %detail, "the tenant context was cancelled; the server skips the unit");
        } else {
            tracing::error!(error = %detail, "injecting the tenant context failed");
        }
        match (self.expect.front(), self.expect.get(1)) {
            (Some(Expect::Query { .. }), behind) => {
                // The server skips the client's Query without a word, up to the next Sync,
                // whose ReadyForQuery ends the Query: rlsgate's own (sent now, or already
                // behind the Query: see start_unit), or that of transaction_wrap's COMMIT
                // (skipped as well).
                match behind {
                    None => fe::write_sync(&mut self.server_out),
                    Some(Expect::Sync {
                        after: After::Swallow,
                    }) => {
                        self.expect.remove(1);
                        self.query_skipped();
                    }
                    Some(Expect::WrapCommit { synced: true, .. }) => {
                        self.expect.pop_front();
                        self.query_skipped();
                    }
                    Some(_) => return Err(SessionError::Injection(detail)),
                }
                self.client_out.extend_from_slice(error);
                self.tx.fail();
                if let Some(split) = self.split.as_mut() {
                    split.failed = true;
                }
                Ok(())
            }
            _ => {
                self.client_out.extend_from_slice(error);
                self.tx.fail();
                self.discard_until_sync();
                Ok(())
            }
        }
    }

    fn on_ready(&mut self, frame: FrameRef<'_>) -> Result<(), SessionError> {
        let status = be::ready_status(frame.body())
            .map_err(|e| SessionError::UpstreamProtocol(e.to_string()))?;
        let Some(front) = self.expect.pop_front() else {
            return Err(SessionError::UpstreamProtocol(
                "unsolicited ReadyForQuery".into(),
            ));
        };
        let own_commit = matches!(front, Expect::WrapCommit { .. });
        let after = match front {
            Expect::Sync { after }
            | Expect::Query { after, .. }
            | Expect::WrapCommit { after, .. } => after,
            Expect::HiddenQuery { what } => {
                if what == super::KEEP_CONTEXT
                    && let Some(server) = self.server.as_mut()
                {
                    // (no error came: it committed; after one, `failed` left it unconfirmed)
                    server.conn().ambient.confirmed();
                }
                if !self
                    .expect
                    .iter()
                    .any(|e| matches!(e, Expect::HiddenQuery { .. }))
                {
                    // rlsgate's own statements are done: the client's may be cancelled now
                    self.cancel.slot.release_hold();
                }
                After::Swallow
            }
            other => return Err(unexpected(be::READY_FOR_QUERY, &other)),
        };
        self.in_flight -= 1;
        self.units_done += 1;
        self.leave_copy_in();
        // transaction_wrap: rlsgate's block outlived the COMMIT meant to end it (a cancel or a
        // statement_timeout interrupted that COMMIT before it ended the block, or an error in
        // rlsgate's statements ahead of it made the server skip it). The client never opened a
        // block: it gets the idle ReadyForQuery Postgres would give it.
        let own_block_left = (own_commit || after == After::CloseBlock) && status != TxStatus::Idle;
        let split_ends = match after {
            After::FinishSplit => true,
            After::ContinueSplit => self
                .split
                .as_ref()
                .is_none_or(|s| s.failed || s.rest.is_empty()),
            After::Forward | After::Swallow | After::SwallowThenCommit | After::CloseBlock => false,
        };
        if split_ends {
            self.settings
                .retag(super::frontend::SPLIT_UNIT, self.units_done);
        }
        // Only a reply to the last thing in flight tells the state after the client's work; not
        // one that arrives while the client's extended unit is still open (e.g. the Z of
        // transaction_wrap's BEGIN, sent ahead of a unit whose Sync has not come yet).
        let settle = self
            .tx
            .on_ready(status, self.in_flight == 0 && !self.unit.open);
        self.settle_settings(settle);
        if status == TxStatus::Idle && !self.ending_portals.is_empty() {
            // No transaction, so no portals: those bound before this unit's end are gone.
            self.ending_portals.forget_up_to(self.units_done);
        }
        if own_block_left {
            self.close_own_block();
        }
        let forward = match after {
            After::Swallow => false,
            After::ContinueSplit => !self.continue_split(status)?,
            After::SwallowThenCommit => {
                // COPY FROM STDIN inside rlsgate's block: its COMMIT could not be pipelined (the
                // server would read it as part of the copy), so it goes now; the client's next
                // unit waits for its answer (it must not run inside this block).
                self.wrap_commit(After::Forward);
                self.tx.unknown();
                false
            }
            After::FinishSplit => {
                self.split = None;
                true
            }
            After::Forward | After::CloseBlock => true,
        };
        if forward {
            if let Some(started) = self.query_started.take() {
                self.shared.metrics.query_finished(started.elapsed());
            }
            if own_block_left {
                be::write_ready(TxStatus::Idle, &mut self.client_out);
            } else {
                self.client_out.extend_from_slice(frame.bytes);
            }
        }
        // replies rlsgate produces itself may be queued right behind this entry
        self.emit_synthetic();
        Ok(())
    }

    /// Close rlsgate's block that outlived its COMMIT (see on_ready) with rlsgate's COMMIT (a
    /// ROLLBACK in the aborted block), answered unseen. It goes behind whatever was sent since:
    /// units the client pipelined meanwhile meet the aborted block and fail (see
    /// on_injection_error); the next ones wait for the block's end.
    fn close_own_block(&mut self) {
        tracing::debug!("transaction_wrap's COMMIT did not end its block; closing it");
        self.tx.fail();
        self.tx.unknown();
        if self.unit.open {
            // The client's next extended unit is half sent: the COMMIT must not land inside
            // it. Its first statement fails in the aborted block; rlsgate's COMMIT follows its
            // Sync (see on_sync).
            self.unit.wrap_in_block();
            return;
        }
        self.wrap_commit(After::Swallow);
    }

    /// A unit ended: its setting changes count if its transaction committed.
    fn settle_settings(&mut self, settle: Settle) {
        match settle {
            Settle::Open => {}
            Settle::Discard => {
                if self.settings.discard_through(self.units_done)
                    && let Some(server) = self.server.as_mut()
                {
                    // Some of them may have taken effect all the same (a SET before a ROLLBACK
                    // TO SAVEPOINT, a piece of a split Query that committed before a later one
                    // failed): what the connection holds is unknown now, so it gets RESET ALL
                    // (and the client's replay) before the next transaction.
                    server.conn().settings = HeldSettings::Unknown;
                }
            }
            Settle::Commit => {
                if let Some(reset) = self.settings.commit_through(self.units_done)
                    && let Some(server) = self.server.as_mut()
                {
                    // After RESET/DISCARD ALL the connection holds upstream defaults, not the
                    // client's startup settings: force a replay before the next transaction.
                    server.conn().settings = if reset {
                        HeldSettings::Unknown
                    } else {
                        HeldSettings::wanted(self.settings.wanted())
                    };
                }
            }
        }
    }

    /// Send the next piece of a split Query. `Ok(true)` = the ReadyForQuery is swallowed.
    fn continue_split(&mut self, status: TxStatus) -> Result<bool, SessionError> {
        let Some(split) = self.split.as_mut() else {
            return Ok(false);
        };
        if split.failed {
            self.split = None;
            return Ok(false);
        }
        let Some(piece) = split.rest.pop_front() else {
            self.split = None;
            return Ok(false);
        };
        let more = !split.rest.is_empty();
        // Still in a block after a piece that ends with COMMIT/ROLLBACK (plain mode splits only
        // there) or with other transaction control (transaction_wrap): AND CHAIN opened a block
        // without the context.
        let chained = status == TxStatus::InBlock
            && piece.kind == PieceKind::Statements
            && (!self.config.upstream.transaction_wrap || split.last == PieceKind::Control);
        split.last = piece.kind;
        if chained {
            self.inject_context(Ahead::Unknown);
        }
        self.send_piece(piece, status == TxStatus::Idle, more)?;
        Ok(true)
    }

    /// Send one piece of a split Query; `idle` = no transaction is open before it.
    pub(super) fn send_piece(
        &mut self,
        piece: Piece,
        idle: bool,
        more: bool,
    ) -> Result<(), SessionError> {
        let after = After::for_piece(more);
        match piece.kind {
            PieceKind::Begin => {
                self.write_client_query(&piece.text, after)?;
                // the context goes right after the client's own BEGIN, inside its block — not
                // in an aborted block, where the BEGIN fails (25P02) and so would the context
                if self.config.upstream.transaction_wrap && self.tx.observed() != TxStatus::Failed {
                    self.inject_context(Ahead::Unknown);
                }
            }
            PieceKind::Control => self.write_client_query(&piece.text, after)?,
            // (a COPY piece runs unwrapped, with the context of plain mode: rlsgate's COMMIT
            // could not follow it before the COPY ends)
            PieceKind::Statements
                if idle && self.config.upstream.transaction_wrap && !piece.copy =>
            {
                self.wrap_begin();
                self.write_client_query(&piece.text, After::Swallow)?;
                // (DEALLOCATE ALL is refused in a Query of several statements)
                self.wrap_commit(after);
            }
            PieceKind::Statements => {
                if idle {
                    self.inject_context(Ahead::Unknown);
                }
                fe::write_query(&piece.text, &mut self.server_out)
                    .map_err(SessionError::ClientProtocol)?;
                self.expect_ready(Expect::query(after, piece.copy));
                if piece.copy {
                    self.copy_sent();
                }
            }
        }
        self.tx.unknown();
        Ok(())
    }

    /// transaction_wrap: pass on (`forward`) or drop the wrapped Query's held completion.
    fn release_held(&mut self, forward: bool) {
        let slot = self.expect.iter_mut().take(2).find_map(|e| match e {
            Expect::WrapCommit { held, .. } => held.take(),
            _ => None,
        });
        if let Some(bytes) = slot
            && forward
        {
            self.client_out.extend_from_slice(&bytes);
        }
    }

    fn write_client_query(&mut self, sql: &str, after: After) -> Result<(), SessionError> {
        fe::write_query(sql, &mut self.server_out).map_err(SessionError::ClientProtocol)?;
        self.expect_ready(Expect::query(after, false));
        Ok(())
    }

    /// transaction_wrap: open rlsgate's block and apply the context inside it.
    pub(super) fn wrap_begin(&mut self) {
        self.inject(Ahead::Unknown, BlockEdge::Begin);
    }
}

/// `0A000 cached plan must not change result type`: a prepared statement's table changed shape
/// (ALTER TABLE … ADD/DROP COLUMN). Postgres keeps refusing the statement until it is prepared
/// again.
fn stale_plan(body: &[u8]) -> bool {
    be::notice_fields(body).is_ok_and(|n| {
        n.code == crate::error::sqlstate::FEATURE_NOT_SUPPORTED
            && n.message
                .starts_with("cached plan must not change result type")
    })
}
