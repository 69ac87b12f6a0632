//! Client messages: where units of work start, where the tenant context is injected, how
//! prepared statements are mapped to server names, and how denials are answered.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::expect::{After, BlockEdge, Expect};
use super::inject;
use super::statements::{self, MAX_STATEMENT_BYTES, MAX_STATEMENTS, Prepared, server_name};
use super::unit::{Reapply, Skip, Wrap};
use super::{CopyState, Flow, Piece, PieceKind, Predicted, Session, SessionError, Split};
use crate::audit::AuditEvent;
use crate::config::{PoolMode, SessionStatePolicy};
use crate::error::{ClientError, UserFacing, sqlstate};
use crate::guard::{Analysis, SessionReset, TxEffect, Verdict, reauth_token};
use crate::pool::PoolError;
use crate::protocol::backend::{self as be, TxStatus};
use crate::protocol::frame::Frame;
use crate::protocol::frontend as fe;

/// A refusal decided by the proxy.
pub(super) struct Refusal {
    pub sqlstate: &'static str,
    pub message: String,
    pub hint: Option<&'static str>,
}

impl Refusal {
    /// The ErrorResponse the client gets.
    fn error_response(&self) -> Bytes {
        let mut out = BytesMut::new();
        be::write_error(&self.client_error(), &mut out);
        out.freeze()
    }

    fn client_error(&self) -> ClientError {
        let e = ClientError::error(self.sqlstate, self.message.clone());
        match self.hint {
            Some(h) => e.with_hint(h),
            None => e,
        }
    }
}

fn protocol(e: crate::protocol::ProtocolError) -> SessionError {
    SessionError::ClientProtocol(e)
}

impl Session {
    pub(super) async fn handle_client(&mut self, frame: Frame) -> Result<Flow, SessionError> {
        if self.query_started.is_none()
            && matches!(frame.tag, fe::QUERY | fe::PARSE | fe::BIND | fe::EXECUTE)
        {
            self.query_started = Some(std::time::Instant::now());
        }
        tracing::trace!(tag = %(frame.tag as char), in_flight = self.in_flight, tx = ?self.tx, copy = ?self.copy, "client message");
        if self.unit.skipping() && !matches!(frame.tag, fe::SYNC | fe::TERMINATE) {
            // After an error Postgres ignores everything up to Sync; so do we.
            return Ok(Flow::Continue);
        }
        let ignored_in_copy = matches!(frame.tag, fe::FLUSH | fe::SYNC | fe::TERMINATE);
        if !ignored_in_copy && self.copy == CopyState::Awaited {
            // A COPY FROM STDIN was sent and the server has not said yet whether it reads data
            // now: what it makes of the next message depends on that (also of COPY data: a
            // CopyDone must not be sent before the server is in COPY, or Syncs after it would be
            // taken for ignored ones).
            if self.expect.iter().any(Expect::awaits_copy) {
                return Ok(Flow::Wait(frame));
            }
            self.copy = CopyState::Off;
        }
        let copy_traffic =
            ignored_in_copy || matches!(frame.tag, fe::COPY_DATA | fe::COPY_DONE | fe::COPY_FAIL);
        if !copy_traffic && self.copy == CopyState::In {
            return Ok(self.interrupt_copy(&frame));
        }
        match frame.tag {
            // (the rare paths boxed: the session's future is as large as its largest await, for
            // every client, also while idle)
            fe::QUERY | fe::FUNCTION_CALL if self.unit.open => {
                Box::pin(self.inside_unit(frame)).await
            }
            fe::QUERY => self.on_query(frame).await,
            fe::PARSE | fe::BIND | fe::DESCRIBE | fe::EXECUTE | fe::CLOSE => {
                self.on_extended(frame).await
            }
            fe::SYNC if self.copy == CopyState::In => {
                // Ignored by the server during COPY FROM STDIN; no ReadyForQuery will answer it.
                self.server_out.extend_from_slice(&frame.bytes);
                Ok(Flow::Continue)
            }
            fe::SYNC => Ok(self.on_sync(frame)),
            fe::COPY_DONE | fe::COPY_FAIL => {
                self.leave_copy_in();
                if self.server.is_some() {
                    self.server_out.extend_from_slice(&frame.bytes);
                }
                if let Some(Expect::Query { copy, .. }) = self.expect.front_mut() {
                    // A later statement of the same Query may be another COPY FROM STDIN: what
                    // the client sends next waits until the server says (CopyInResponse, or the
                    // Query's end).
                    *copy = true;
                    self.copy_sent();
                }
                Ok(Flow::Continue)
            }
            fe::FLUSH | fe::COPY_DATA => {
                if self.server.is_some() {
                    self.server_out.extend_from_slice(&frame.bytes);
                }
                Ok(Flow::Continue)
            }
            fe::FUNCTION_CALL => Box::pin(self.on_function_call(frame)).await,
            fe::TERMINATE => Ok(Flow::Terminate),
            other => Err(SessionError::ClientProtocol(
                crate::protocol::ProtocolError::UnknownMessage(other as char),
            )),
        }
    }

    /// Must this unit wait until in-flight replies reveal the transaction state?
    /// Also when the open extended unit needs the context again (see `reapply`): whether it can
    /// be applied depends on the state the replies tell (not in an aborted block).
    /// Likewise after a possible COMMIT/ROLLBACK AND CHAIN (`chained`).
    /// Also while a sequence discard between tenants has not answered (see `discard_inline`):
    /// should it fail, the connection still holds the previous tenant's sequence state.
    fn must_wait(&self) -> bool {
        self.in_flight > 0
            && (self.tx.predicted() == Predicted::Unknown
                || self.tx.chained()
                || (self.unit.open && self.unit.reapply.is_some())
                || self
                    .expect
                    .iter()
                    .any(|e| matches!(e, Expect::Inject { discards: true, .. })))
    }

    /// Start a unit of work: check the token, get a connection, replay settings. Returns whether
    /// the unit starts a transaction that needs the context (`Ok(Ok(true))`): in plain mode the
    /// context is injected here, ahead of the unit; with transaction_wrap the caller places it.
    /// `Err` from the pool is returned for the caller to report.
    async fn start_unit(
        &mut self,
        outside_tx: bool,
        ahead: Ahead,
    ) -> Result<Result<bool, PoolError>, SessionError> {
        let new_tx = self.server.is_none() || self.tx.predicted() == Predicted::Idle;
        if new_tx && self.token_expired() {
            return Err(SessionError::TokenExpired);
        }
        // (not for a Query inside an open unit: that one is covered by `reapply`)
        let chained = !self.unit.open && self.tx.take_chained();
        // (a connection just taken has nothing in flight; one the client holds, only between
        // transactions with nothing sent)
        let quiet = self.server.is_none()
            || (new_tx
                && !self.unit.open
                && self.in_flight == 0
                && self.expect.is_empty()
                && self.server_out.is_empty());
        if let Err(e) = self.ensure_server().await {
            tracing::warn!(error = %e, "no upstream connection for the client");
            return Ok(Err(e));
        }
        if quiet {
            self.clear_foreign_context().await?;
        }
        if !self.unit.open {
            self.end_bare_query();
        }
        // (once per unit: inside an open extended unit an error could make the server skip them)
        // A sequence discard may go into the unit's own transaction when its first statement
        // takes a snapshot anyway and runs inside a transaction.
        let discard_inline = ahead == Ahead::Snapshot && !outside_tx;
        if self.tx.predicted() == Predicted::Idle && !self.unit.open {
            if self.in_flight == 0 {
                self.sync_settings(discard_inline)?;
            } else {
                // Behind the client's own units: a discard of theirs that failed meanwhile
                // leaves the sequence state unknown.
                self.discard_sequences(discard_inline)?;
            }
        }
        let due = self.tx.predicted() == Predicted::Idle && !outside_tx;
        if due
            && !self.config.upstream.transaction_wrap
            && matches!(ahead, Ahead::Snapshot | Ahead::Unknown)
        {
            self.inject_context(ahead);
        }
        if chained
            && self.tx.predicted() == Predicted::InBlock
            && self.tx.observed() == TxStatus::InBlock
        {
            // COMMIT/ROLLBACK AND CHAIN opened this block: it has none of rlsgate's settings.
            self.inject_context(Ahead::Unknown);
        }
        Ok(Ok(due))
    }

    /// Before another unit goes behind a client's Query that has rlsgate's statements in front
    /// of it and no Sync behind it (its reply has not come): a Sync of rlsgate's own, answered
    /// unseen. Should rlsgate's statements fail (the client's cancel landing in them), the
    /// server skips the Query up to a Sync: this one, so that nothing of the next unit is
    /// skipped with it (see relay::on_injection_error).
    fn end_bare_query(&mut self) {
        let n = self.expect.len();
        if n >= 2
            && matches!(self.expect[n - 1], Expect::Query { copy: false, .. })
            && matches!(self.expect[n - 2], Expect::Inject { .. })
        {
            fe::write_sync(&mut self.server_out);
            self.expect_ready(Expect::Sync {
                after: After::Swallow,
            });
        }
    }

    /// Pipeline the tenant context: Bind + Execute of the context statements (Parsed first on a
    /// connection that lacks them). `ahead`: the client statement right after it is known to
    /// take a snapshot itself and runs outside a block, so the `set_config` form (a SELECT) may
    /// go first; otherwise the `SET LOCAL` form, which takes none (a client's `BEGIN ISOLATION
    /// LEVEL …` or `SET TRANSACTION …` must come before the transaction's first snapshot) and
    /// inside a block logs nothing either.
    pub(super) fn inject_context(&mut self, ahead: Ahead) {
        self.inject(ahead, BlockEdge::Neither);
    }

    /// Pipeline rlsgate's own statements (no Sync): the context, after transaction_wrap's
    /// `BEGIN` with `BlockEdge::Begin`; transaction_wrap's `COMMIT` alone with
    /// `BlockEdge::Commit`. Each is Parsed first on a connection that lacks it.
    pub(super) fn inject(&mut self, ahead: Ahead, block: BlockEdge) {
        let shared = Arc::clone(&self.shared);
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let conn = server.conn();
        if block == BlockEdge::Neither
            && self
                .context
                .key()
                .is_some_and(|key| conn.ambient.keeps(key))
        {
            // The connection keeps this very context (committed, see pool::Ambient): nothing to
            // send, it is in effect for the whole transaction.
            shared.metrics.injection();
            return;
        }
        let form = if conn.may_set_config && ahead == Ahead::Snapshot {
            inject::ContextForm::SetConfig
        } else {
            inject::ContextForm::SetLocal
        };
        let context = match block {
            BlockEdge::Commit => Ok(&[][..]),
            BlockEdge::Neither | BlockEdge::Begin => {
                shared.metrics.injection();
                self.context
                    .statements(form, &self.identity, &shared.stmt_hasher)
            }
        };
        let context = match context {
            Ok(statements) => statements,
            Err(e) => {
                // Not expected (values are checked at login): fail the unit, not open it
                // bare. A Parse the server cannot parse stands in for the context: its error
                // is an injection error (the session ends), and the server skips the rest of
                // the unit.
                tracing::error!(error = %e, "cannot encode the tenant context");
                let _ = fe::write_parse("", inject::REFUSED_SQL, &[], &mut self.server_out);
                conn.unnamed_owner = None;
                self.expect.push_back(Expect::Inject {
                    remaining: 1,
                    parsed: None,
                    block: BlockEdge::Neither,
                    discards: false,
                });
                return;
            }
        };
        let edge = match block {
            BlockEdge::Neither => None,
            BlockEdge::Begin => Some(&shared.wrap_statements.begin),
            BlockEdge::Commit => Some(&shared.wrap_statements.commit),
        };
        let mut parsed: Vec<Arc<str>> = Vec::new();
        for statement in edge.into_iter().chain(context) {
            if prepare_own(statement, conn, &self.expect, &mut self.server_out) {
                parsed.push(Arc::clone(&statement.name));
            }
        }
        for statement in edge.into_iter().chain(context) {
            self.server_out.extend_from_slice(&statement.run);
        }
        let remaining = usize::from(edge.is_some()) + context.len();
        if remaining > 0 {
            self.expect.push_back(Expect::Inject {
                remaining,
                parsed: (!parsed.is_empty()).then(|| parsed.into_boxed_slice()),
                block,
                discards: false,
            });
        }
    }

    /// transaction_wrap's `COMMIT` after a client's Query (or behind a Sync): bound, then a
    /// Sync of rlsgate's own for its ReadyForQuery. Inside an open extended unit (see
    /// inside_unit) it stays a Query: a Sync there would end the server's skipping after an
    /// error early, while a Query is skipped like the unit's other messages.
    pub(super) fn wrap_commit(&mut self, after: After) {
        let shared = Arc::clone(&self.shared);
        let may_sync = !self.unit.open && !self.unit.skipping() && after != After::Swallow;
        let synced = match self.server.as_mut() {
            Some(server) if may_sync => {
                let commit = &shared.wrap_statements.commit;
                prepare_own(commit, server.conn(), &self.expect, &mut self.server_out);
                self.server_out.extend_from_slice(&commit.run);
                fe::write_sync(&mut self.server_out);
                true
            }
            _ => {
                let _ = fe::write_query("COMMIT", &mut self.server_out);
                false
            }
        };
        self.expect_ready(Expect::WrapCommit {
            after,
            held: None,
            synced,
        });
    }

    /// A simple Query (or FunctionCall) inside an open extended unit: the server ends the unit's
    /// implicit transaction with it (an explicit block goes on), so the unit's next statement
    /// needs the context again (see on_bind).
    async fn inside_unit(&mut self, frame: Frame) -> Result<Flow, SessionError> {
        if self.unit.wrap == Wrap::Block && !self.must_wait() {
            // transaction_wrap: the unit so far runs in rlsgate's block. Postgres commits the
            // unit's implicit transaction when this Query ends; rlsgate's block ends here
            // instead, and the Query becomes a unit of its own (wrapped itself if it needs it),
            // so that its errors cannot abort rlsgate's block under the unit.
            self.unit.wrap = Wrap::Off;
            self.wrap_commit(After::Swallow);
            // A transaction ends inside this unit. An error before this COMMIT makes the server
            // skip it (up to the Sync), leaving rlsgate's block open: the state after the unit
            // is known only from the replies (see `after_unit`).
            self.unit.effect = combine(self.unit.effect, TxEffect::End);
        }
        let flow = if frame.tag == fe::QUERY {
            self.on_query(frame).await?
        } else {
            self.on_function_call(frame).await?
        };
        if matches!(flow, Flow::Continue) {
            self.unit.reapply = Some(Reapply::Unknown);
        }
        Ok(flow)
    }

    fn refusal_for(&self, analysis: &Analysis, sql: &str) -> Option<Refusal> {
        if let Verdict::Deny(d) = &analysis.verdict {
            if !self.shared.guard_enforced() {
                tracing::warn!(
                    rule = d.rule,
                    "guard off (test switch): denied statement sent"
                );
                return None;
            }
            tracing::info!(rule = d.rule, "statement denied by the guard");
            self.shared.metrics.denial(d.rule, &self.identity.tenant);
            self.shared.registry.denial(&self.identity.tenant);
            self.shared.audit.record(AuditEvent::StatementDenied {
                peer: self.client_entry.entry.peer.to_string(),
                user: self.client_entry.entry.user.clone(),
                tenant: self.identity.tenant.to_string(),
                rule: d.rule.to_string(),
                fingerprint: crate::audit::fingerprint(sql),
            });
            return Some(Refusal {
                sqlstate: d.sqlstate,
                message: format!("rlsgate: {}", d.message),
                hint: None,
            });
        }
        let policy = self.shared.config().server.session_state;
        if let (Some(what), PoolMode::Transaction, SessionStatePolicy::Deny) =
            (analysis.session_state, self.config.server.pool_mode, policy)
        {
            tracing::info!(what, "session state refused in transaction pooling mode");
            return Some(Refusal {
                sqlstate: sqlstate::FEATURE_NOT_SUPPORTED,
                message: format!("rlsgate: {what} is not supported in transaction pooling mode"),
                hint: Some(
                    "it would outlive the transaction on a shared connection; set server.session_state = \"pin\" or pool_mode = \"session\"",
                ),
            });
        }
        None
    }

    /// Transaction mode, `session_state = "pin"`: before a statement that would pin the
    /// connection is sent, count the pin against the tenant's `max_pinned_per_tenant` — or refuse
    /// the statement (it is not sent, so it creates no state). One tenant opening client after
    /// client with temp tables or LISTEN would otherwise take the whole pool.
    fn pin_refusal(&mut self, analysis: &Analysis) -> Option<Refusal> {
        if analysis.session_state.is_none()
            || self.config.server.pool_mode != PoolMode::Transaction
            || self.pinned.is_some()
            || self.pin_slot.is_some()
        {
            return None;
        }
        match self.shared.limits.try_pin(&self.identity.tenant) {
            Ok(slot) => {
                self.pin_slot = Some(Box::new(slot));
                None
            }
            Err(crate::limits::PinLimit { cap }) => {
                tracing::info!(cap, "statement refused: tenant at max_pinned_per_tenant");
                Some(Refusal {
                    sqlstate: sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
                    message: format!(
                        "rlsgate: tenant \"{}\" already holds {cap} pinned server connections (limits.max_pinned_per_tenant)",
                        self.identity.tenant
                    ),
                    hint: Some(
                        "temporary tables, LISTEN, WITH HOLD cursors, SQL PREPARE and session advisory locks keep a server connection per client: close those sessions, or use pool_mode = \"session\"",
                    ),
                })
            }
        }
    }

    /// Transaction mode, `session_state = "pin"`: keep the connection for this client from now on.
    fn pin_for(&mut self, analysis: &Analysis) {
        let Some(what) = analysis.session_state else {
            return;
        };
        if self.config.server.pool_mode != PoolMode::Transaction || self.pinned.is_some() {
            return;
        }
        if self.pin_slot.is_none() {
            // every caller asks pin_refusal first; one that did not still counts (if under the cap)
            self.pin_slot = self
                .shared
                .limits
                .try_pin(&self.identity.tenant)
                .ok()
                .map(Box::new);
        }
        self.pinned = Some(what);
        let now = self
            .shared
            .pinned
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        self.shared.metrics.pin();
        tracing::info!(
            reason = what,
            pinned_clients = now,
            "pinned server connection to the client"
        );
    }

    // ---------------------------------------------------------------- simple query

    async fn on_query(&mut self, frame: Frame) -> Result<Flow, SessionError> {
        if self.must_wait() {
            return Ok(Flow::Wait(frame));
        }
        let sql = fe::query_text(frame.body()).map_err(protocol)?;
        if let Some(token) = reauth_token(sql) {
            if self.in_flight > 0 {
                return Ok(Flow::Wait(frame));
            }
            match self.reauth(&token).await {
                Ok(()) => {
                    let status = self.tx.reported(self.server.is_some());
                    be::write_single_text_row("reauth", "ok", &mut self.client_out);
                    be::write_ready(status, &mut self.client_out);
                }
                Err(e) => self.refuse_query(Refusal {
                    sqlstate: e.sqlstate,
                    message: e.message,
                    hint: None,
                }),
            }
            return Ok(Flow::Continue);
        }
        let analysis = self.shared.analyze(sql);
        if self.config.upstream.transaction_wrap
            && self.in_flight > 0
            && self.tx.predicted() == Predicted::InBlock
        {
            // transaction_wrap puts the context right after a split Query's leading BEGIN, but
            // not in an aborted block (the BEGIN fails there, and so would the context): whether
            // the block is aborted is known only once the replies in flight are in (a COPY or
            // a statement pipelined ahead may still fail it).
            if let Plan::Split(pieces) = plan_pieces(sql, &analysis, true)
                && pieces[0].kind == PieceKind::Begin
            {
                return Ok(Flow::Wait(frame));
            }
        }
        if let Some(refusal) = self.refusal_for(&analysis, sql) {
            self.refuse_query(refusal);
            return Ok(Flow::Continue);
        }
        if let Some(kind) = analysis.reset
            && let Some(refusal) = self.reset_refusal(kind)
        {
            self.refuse_query(refusal);
            return Ok(Flow::Continue);
        }
        if let [statement] = analysis.statements.as_slice()
            && let Some(target) = &statement.deallocate
        {
            if self.in_flight > 0 {
                return Ok(Flow::Wait(frame));
            }
            if self.deallocate_locally(target.as_deref()) {
                return Ok(Flow::Continue);
            }
        }
        if let Some(refusal) = self.pin_refusal(&analysis) {
            self.refuse_query(refusal);
            return Ok(Flow::Continue);
        }
        let ahead = Ahead::of(Some(&analysis));
        let due = match self
            .start_unit(analysis.runs_outside_transaction(), ahead)
            .await?
        {
            Ok(due) => due,
            Err(e) => {
                if self.pinned.is_none() {
                    self.pin_slot = None; // the statement did not run: no pin
                }
                self.local_query_error(&e.to_client_error());
                return Ok(Flow::Continue);
            }
        };
        if !due && self.unit.open && self.unit.reapply.take().is_some() {
            // The open extended unit ended its transaction before this Query (see on_bind). In
            // an aborted block the context cannot be set (and is not needed: only the end of
            // the block can run, and what follows starts a transaction that gets it).
            if self.tx.observed() != TxStatus::Failed {
                self.inject_context(ahead);
            }
        }
        if let Some(kind) = analysis.reset {
            self.apply_reset(kind);
        }
        if analysis.untracked_set || analysis.session_state.is_some() {
            self.mark_dirty();
        }
        self.pin_for(&analysis);
        let plan = plan_pieces(sql, &analysis, self.config.upstream.transaction_wrap);
        let unit = if let Plan::Split(mut pieces) = plan {
            // settings count once the last piece ends committed
            let first = pieces.remove(0);
            let last = first.kind;
            // plain mode: start_unit already applied the context for the first piece
            self.send_piece(first, due && self.config.upstream.transaction_wrap, true)?;
            self.split = Some(Box::new(Split {
                rest: pieces.into(),
                failed: false,
                last,
            }));
            self.tx.after_unit(analysis.tx_effect());
            // counted when the whole split ends (see relay::on_ready)
            SPLIT_UNIT
        } else if self.config.upstream.transaction_wrap
            && due
            && matches!(plan, Plan::Whole(PieceKind::Statements))
        {
            self.wrap_begin();
            self.server_out.extend_from_slice(&frame.bytes);
            self.forget_dropped_statements(&analysis);
            if analysis.copy_from_stdin {
                self.expect_ready(Expect::query(After::SwallowThenCommit, true));
                // rlsgate's COMMIT goes only once the COPY is over: until its answer the
                // client's next unit would land inside this block.
                self.tx.unknown();
                self.units_sent + 1
            } else {
                self.expect_ready(Expect::query(After::Swallow, false));
                self.wrap_commit(After::Forward);
                self.units_sent
            }
        } else {
            self.server_out.extend_from_slice(&frame.bytes);
            self.forget_dropped_statements(&analysis);
            let unit = self.expect_ready(Expect::query(After::Forward, analysis.copy_from_stdin));
            let begins = match self.config.upstream.transaction_wrap {
                true => matches!(plan, Plan::Whole(PieceKind::Begin)),
                false => ahead == Ahead::Begin,
            };
            if due && begins {
                // right after the client's BEGIN, inside its block: no WARNING, no snapshot
                self.inject_context(Ahead::Unknown);
            }
            self.tx.after_unit(analysis.tx_effect());
            unit
        };
        if analysis.copy_from_stdin {
            self.copy_sent();
        }
        if analysis.copy_from_stdin && self.unit.wrap != Wrap::Off && self.unit.open {
            // A COPY inside rlsgate's block around an open extended unit: the block's COMMIT
            // waits for the end of the COPY (see on_sync).
            self.unit.wrap = Wrap::BlockCopy;
        }
        self.stage_settings(unit, &analysis);
        Ok(Flow::Continue)
    }

    /// Remember the session-level setting changes of a unit until it settles.
    fn stage_settings(&mut self, unit: u64, analysis: &Analysis) {
        for change in analysis
            .statements
            .iter()
            .filter_map(|s| s.setting.as_ref())
        {
            self.settings.stage(unit, change);
        }
        if analysis.reset.is_some() {
            self.settings.stage_reset_all(unit);
        }
    }

    /// SQL `DEALLOCATE` of a protocol-level statement: those live in the proxy (the server has
    /// them under other, shared names), so forget it and answer as Postgres would. Returns false
    /// when the server must see the statement (SQL-PREPAREd names, an aborted transaction).
    fn deallocate_locally(&mut self, name: Option<&str>) -> bool {
        let status = self.tx.reported(self.server.is_some());
        if status == TxStatus::Failed {
            return false;
        }
        match name {
            Some(n) if self.stmts.contains(n) && !n.is_empty() => self.stmts.remove(n),
            Some(_) => return false,
            None => {
                self.stmts.forget_all();
                if self.pinned.is_some() {
                    // SQL-PREPAREd statements live on the pinned connection: let the server drop
                    // them (and its copies of ours: see on_query).
                    return false;
                }
            }
        }
        be::write_command_complete("DEALLOCATE", &mut self.client_out);
        be::write_ready(status, &mut self.client_out);
        true
    }

    /// `RESET ALL` inside a transaction block would clear the tenant context for the rest of it.
    /// (`DISCARD ALL` there is rejected by Postgres itself.) Outside, both run without context.
    fn reset_refusal(&self, kind: SessionReset) -> Option<Refusal> {
        let in_block = self.server.is_some() && self.tx.predicted() != Predicted::Idle;
        (in_block && kind == SessionReset::ResetAll).then(|| Refusal {
            sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
            message: "rlsgate: RESET ALL inside a transaction block is not allowed: it would clear the tenant context"
                .into(),
            hint: Some("run RESET ALL outside a transaction"),
        })
    }

    /// DEALLOCATE ALL on a pinned connection (see deallocate_locally) drops rlsgate's
    /// statements too: called right after the client's text is queued, so that what went ahead
    /// of it (the context) ran first and what follows (transaction_wrap's COMMIT) is prepared
    /// again. (A Query of several statements with DEALLOCATE ALL is refused, so split Queries
    /// never carry it.)
    fn forget_dropped_statements(&mut self, analysis: &Analysis) {
        if drops_all_statements(analysis)
            && let Some(server) = self.server.as_mut()
        {
            server.conn().prepared.retire_all();
            server.conn().unnamed_owner = None;
        }
    }

    /// What RESET ALL / DISCARD ALL change in what the proxy tracks for the client.
    fn apply_reset(&mut self, kind: SessionReset) {
        if let Some(server) = self.server.as_mut() {
            // (a tenant context the connection keeps goes with it)
            server.conn().ambient.reset_sent();
        }
        // Inside a transaction block Postgres refuses DISCARD ALL (25001): nothing is dropped.
        let in_block =
            self.tx.predicted() == Predicted::InBlock || self.unit.effect == TxEffect::Begin;
        if kind != SessionReset::DiscardAll || in_block {
            return;
        }
        self.stmts.forget_all();
        if let Some(server) = self.server.as_mut() {
            let conn = server.conn();
            conn.prepared.retire_all();
            conn.unnamed_owner = None;
        }
    }

    /// Answer a refused Query. With a connection (maybe inside a transaction) the server raises
    /// the error so its state is exact; without one, nothing is open and we answer ourselves.
    fn refuse_query(&mut self, refusal: Refusal) {
        if self.unit.wrap != Wrap::Off && self.unit.open {
            // Still inside rlsgate's block around an unfinished extended unit (inside_unit ends
            // that block before a Query, except while a COPY in it is unfinished): a server-side
            // error would abort the block under the client's unit. Answered here, in order.
            let mut reply = BytesMut::from(&refusal.error_response()[..]);
            be::write_ready(TxStatus::Idle, &mut reply);
            self.push_reply(reply.freeze());
            return;
        }
        if self.server.is_some() {
            self.end_bare_query();
        }
        if self.server.is_some()
            && fe::write_query(inject::REFUSED_SQL, &mut self.server_out).is_ok()
        {
            // the error aborts a block: what follows waits to see it
            self.tx.error_sent();
            self.expect_ready(Expect::Query {
                after: After::Forward,
                copy: false,
                refusal: Some(refusal.error_response()),
            });
            return;
        }
        self.local_query_error(&refusal.client_error());
    }

    /// ErrorResponse + ReadyForQuery('I') written by the proxy (no connection is held).
    pub(super) fn local_query_error(&mut self, err: &ClientError) {
        be::write_error(err, &mut self.client_out);
        be::write_ready(TxStatus::Idle, &mut self.client_out);
    }

    /// FunctionCall names a function by OID, out of the guard's sight: only libpq's large-object
    /// functions (fixed built-in OIDs) are relayed.
    async fn on_function_call(&mut self, frame: Frame) -> Result<Flow, SessionError> {
        if self.must_wait() {
            return Ok(Flow::Wait(frame));
        }
        let oid = fe::function_call_oid(frame.body()).map_err(protocol)?;
        let large_objects = self.shared.config().guard.allow_large_objects;
        if LARGE_OBJECT_FUNCTIONS.contains(&oid) && large_objects {
            let due = match self.start_unit(false, Ahead::Unknown).await? {
                Ok(due) => due,
                Err(e) => {
                    self.local_query_error(&e.to_client_error());
                    return Ok(Flow::Continue);
                }
            };
            let wrapped = self.config.upstream.transaction_wrap && due;
            if wrapped {
                self.wrap_begin();
            }
            self.server_out.extend_from_slice(&frame.bytes);
            self.expect_ready(Expect::query(
                if wrapped {
                    After::Swallow
                } else {
                    After::Forward
                },
                false,
            ));
            if wrapped {
                self.wrap_commit(After::Forward);
            }
            return Ok(Flow::Continue);
        }
        tracing::info!(oid, "FunctionCall refused");
        if LARGE_OBJECT_FUNCTIONS.contains(&oid) {
            self.refuse_query(Refusal {
                sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
                message: "rlsgate: large objects are not allowed through rlsgate: they belong to the upstream role, not to a tenant, and row-level security cannot protect them".into(),
                hint: Some("store the data in a bytea column of a tenant table, or set guard.allow_large_objects = true"),
            });
            return Ok(Flow::Continue);
        }
        self.refuse_query(Refusal {
            sqlstate: sqlstate::FEATURE_NOT_SUPPORTED,
            message: "rlsgate: the FunctionCall protocol message is not supported (it bypasses statement checks)".into(),
            hint: Some("call the function with SELECT instead"),
        });
        Ok(Flow::Continue)
    }

    // ---------------------------------------------------------------- extended protocol

    async fn on_extended(&mut self, frame: Frame) -> Result<Flow, SessionError> {
        // A Parse is read once: the reauth check, the unit's start and on_parse share it.
        let parse = match frame.tag {
            fe::PARSE => Some(fe::parse(frame.body()).map_err(protocol)?),
            _ => None,
        };
        if self.on_reauth_message(&frame, parse.as_ref()).await? {
            return Ok(Flow::Continue);
        }
        if !self.unit.open
            && self.server.is_none()
            && frame.tag == fe::PARSE
            && self.next_is_sync()
            && self.deferred_prepare(&frame)?
        {
            return Ok(Flow::Continue);
        }
        if !self.unit.open && self.server.is_none() && frame.tag == fe::CLOSE {
            self.close_locally(&frame)?;
            return Ok(Flow::Continue);
        }
        if !self.unit.open && self.must_wait() {
            return Ok(Flow::Wait(frame));
        }
        // (once per Parse: the unit's start and on_parse share it)
        let parsed = parse.as_ref().map(|p| self.parse_analysis(p));
        if !self.unit.open {
            let first = self.unit_statement(&frame, parsed.as_ref());
            let outside_tx = first.as_ref().is_some_and(|a| a.runs_outside_transaction());
            // transaction_wrap: statements that behave differently inside a block (SAVEPOINT
            // outside a transaction, SET LOCAL, …) run as Postgres would, unwrapped; a unit that
            // starts with the client's own BEGIN gets the context right after it.
            let block_sensitive = first
                .as_ref()
                .is_some_and(|a| a.statements.first().is_some_and(|s| s.block_sensitive));
            let begins = first
                .as_ref()
                .is_some_and(|a| a.tx_effect() == TxEffect::Begin);
            let ahead = match frame.tag {
                fe::PARSE | fe::BIND => Ahead::of(first.as_deref()),
                // (runs nothing itself: in plain mode the context waits for the first Bind)
                _ if !self.config.upstream.transaction_wrap => Ahead::FirstBind,
                _ => Ahead::Unknown,
            };
            let due = match self.start_unit(outside_tx, ahead).await? {
                Ok(due) => due,
                Err(e) => {
                    self.fail_unit_locally(&e.to_client_error());
                    return Ok(Flow::Continue);
                }
            };
            if self.config.upstream.transaction_wrap && due && !block_sensitive {
                if begins {
                    // the context goes after the client's own BEGIN (see on_bind/Execute)
                    self.unit.begin_portal = Some(None);
                } else {
                    self.wrap_begin();
                    self.unit.wrap_in_block();
                }
            } else if due && ahead == Ahead::Begin {
                // plain mode too: inside the client's block the context logs no WARNING
                self.unit.begin_portal = Some(None);
            }
            // A new transaction that has no context yet: the first statement runs outside any
            // (VACUUM …), or transaction_wrap places the context later (after the client's BEGIN;
            // a block-sensitive statement goes unwrapped). Whatever else the unit binds gets it.
            let bare = self.tx.predicted() == Predicted::Idle
                && (outside_tx
                    || matches!(ahead, Ahead::Begin | Ahead::FirstBind)
                    || (self.config.upstream.transaction_wrap && (begins || block_sensitive)));
            self.unit.reapply = bare.then_some(Reapply::Outside);
            self.unit.open = true;
            self.unit.effect = TxEffect::None;
        }
        match frame.tag {
            fe::PARSE => {
                if let (Some(p), Some(parsed)) = (&parse, parsed) {
                    self.on_parse(&frame, p, parsed)?;
                }
            }
            fe::BIND => self.on_bind(&frame)?,
            fe::DESCRIBE => self.on_describe(&frame)?,
            fe::EXECUTE => {
                let portal = fe::execute_portal(frame.body()).map_err(protocol)?;
                let after_begin = matches!(&self.unit.begin_portal, Some(Some(p)) if p == portal);
                let ends = match self.ending_portals.is_empty() {
                    true => None,
                    false => self.ending_portals.get(portal).map(|(effect, _)| effect),
                };
                self.server_out.extend_from_slice(&frame.bytes);
                let copy = self.copy_portal.as_deref() == Some(portal);
                self.expect.push_back(Expect::Execute { copy });
                if copy {
                    self.copy_sent();
                }
                if after_begin {
                    self.unit.begin_portal = None;
                    self.unit.reapply = None;
                    self.inject_context(Ahead::Unknown);
                }
                if let Some(effect) = ends {
                    // Once this ran, the transaction the context was applied in is over (also
                    // for a portal bound in an earlier unit): the next statement of the unit
                    // gets the context again (see on_bind), the next unit waits for the state.
                    self.unit.effect = combine(self.unit.effect, effect);
                    self.unit.reapply = Some(match effect {
                        TxEffect::Unknown => Reapply::Unknown,
                        _ => Reapply::Outside,
                    });
                }
            }
            fe::CLOSE => self.on_close(&frame)?,
            _ => {}
        }
        Ok(Flow::Continue)
    }

    fn next_is_sync(&self) -> bool {
        self.client_buf.starts_with(&[fe::SYNC, 0, 0, 0, 4])
    }

    /// `Parse(name) + Sync` outside a transaction (PQprepare): record the statement and answer
    /// ParseComplete + ReadyForQuery without taking a connection; the statement is prepared on
    /// whichever connection first binds it. Taking a pool slot here would let clients that
    /// prepare synchronously (pgbench -M prepared) block the clients holding the slots.
    /// Returns false when the normal path must handle the message (denials, syntax errors, …).
    fn deferred_prepare(&mut self, frame: &Frame) -> Result<bool, SessionError> {
        let p = fe::parse(frame.body()).map_err(protocol)?;
        if p.name.is_empty() || self.stmts.contains(p.name) || !self.stmts.has_room(p.sql.len()) {
            return Ok(false);
        }
        let guard_epoch = self.shared.guard_epoch();
        let analysis = self.shared.analyze(p.sql);
        if !analysis.parsed
            || analysis.is_denied()
            || analysis.session_state.is_some()
            || drops_all_statements(&analysis)
        {
            return Ok(false);
        }
        let prepared = Arc::new(Prepared {
            server_name: server_name(
                &self.shared.stmt_hasher,
                &self.identity.tenant,
                p.sql,
                p.param_types,
            ),
            sql: Arc::from(p.sql),
            param_types: statements::param_types(p.param_types),
            analysis,
            stamp: self.shared.pool.plan_tick(),
            guard_epoch,
        });
        self.stmts.insert(p.name, prepared);
        let _sync = self.client_buf.split_to(5);
        be::write_empty(be::PARSE_COMPLETE, &mut self.client_out);
        be::write_ready(TxStatus::Idle, &mut self.client_out);
        Ok(true)
    }

    /// A Close outside a transaction (no connection held): answered here, without taking a
    /// connection. There are no portals then, and the server's statements are rlsgate's (shared,
    /// kept): a statement Close only makes the client's name go. Drivers such as tokio-postgres
    /// send Close + Sync for every statement they drop; the Sync then finds no unit open and is
    /// answered here too (see on_sync).
    fn close_locally(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let (kind, name) = fe::target(frame.body(), "Close").map_err(protocol)?;
        if kind == b'S' {
            self.stmts.remove(name);
        }
        be::write_empty(be::CLOSE_COMPLETE, &mut self.client_out);
        Ok(())
    }

    /// The statement the message opening a unit is about (a Parse's text, a Bind's prepared
    /// statement), classified once for the decisions taken at unit start.
    fn unit_statement(
        &self,
        frame: &Frame,
        parsed: Option<&ParseAnalysis>,
    ) -> Option<Arc<Analysis>> {
        if let Some(parsed) = parsed {
            return Some(Arc::clone(&parsed.analysis));
        }
        match frame.tag {
            fe::BIND => fe::bind(frame.body())
                .ok()
                .and_then(|b| self.stmts.get(b.statement).map(|p| Arc::clone(&p.analysis))),
            _ => None,
        }
    }

    /// No connection could be had for this unit: error now, skip to Sync, answer Sync ourselves.
    fn fail_unit_locally(&mut self, err: &ClientError) {
        be::write_error(err, &mut self.client_out);
        self.unit.skip = Skip::LocalSync;
    }

    /// Refuse an extended message: the server raises the error (exact state), then everything up
    /// to Sync is skipped, as Postgres does after an error.
    pub(super) fn refuse_extended(&mut self, refusal: Refusal) -> Result<(), SessionError> {
        self.unit.skip_to_sync();
        let Some(server) = self.server.as_mut() else {
            self.unit.skip = Skip::LocalSync;
            be::write_error(&refusal.client_error(), &mut self.client_out);
            return Ok(());
        };
        server.conn().unnamed_owner = None;
        fe::write_parse(
            inject::REFUSED_STATEMENT,
            inject::REFUSED_SQL,
            &[0, 0],
            &mut self.server_out,
        )
        .map_err(protocol)?;
        self.expect.push_back(Expect::Raise {
            error: refusal.error_response(),
        });
        Ok(())
    }

    /// A Parse's analysis: the client's unnamed statement's own when the Parse repeats it (see
    /// `Statements::unnamed_again`), else the guard's.
    fn parse_analysis(&self, p: &fe::Parse<'_>) -> ParseAnalysis {
        let guard_epoch = self.shared.guard_epoch();
        if p.name.is_empty()
            && let Some(u) = self.stmts.unnamed_again(p.sql, p.param_types, guard_epoch)
        {
            return ParseAnalysis {
                analysis: Arc::clone(&u.analysis),
                guard_epoch,
                again: true,
            };
        }
        ParseAnalysis {
            analysis: self.shared.analyze(p.sql),
            guard_epoch,
            again: false,
        }
    }

    fn on_parse(
        &mut self,
        frame: &Frame,
        p: &fe::Parse<'_>,
        parsed: ParseAnalysis,
    ) -> Result<(), SessionError> {
        let ParseAnalysis {
            analysis,
            guard_epoch,
            again,
        } = parsed;
        if let Some(refusal) = self.refusal_for(&analysis, p.sql) {
            return self.refuse_extended(refusal);
        }
        if drops_all_statements(&analysis) {
            // The server would drop every statement of the connection, rlsgate's included.
            return self.refuse_extended(Refusal {
                sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
                message: "rlsgate: DEALLOCATE ALL must be sent as a simple query of its own through rlsgate (it would drop statements rlsgate manages)".into(),
                hint: None,
            });
        }
        if !p.name.is_empty() && self.stmts.contains(p.name) {
            return self.refuse_extended(Refusal {
                sqlstate: sqlstate::DUPLICATE_PREPARED_STATEMENT,
                message: format!("prepared statement \"{}\" already exists", p.name),
                hint: None,
            });
        }
        if !p.name.is_empty() && !self.stmts.has_room(p.sql.len()) {
            return self.refuse_extended(Refusal {
                sqlstate: sqlstate::PROGRAM_LIMIT_EXCEEDED,
                message: format!(
                    "rlsgate: too many prepared statements (limits: {MAX_STATEMENTS} statements, {} MiB of text per client)",
                    MAX_STATEMENT_BYTES >> 20
                ),
                hint: Some("close statements that are no longer used"),
            });
        }
        if let Some(refusal) = self.pin_refusal(&analysis) {
            return self.refuse_extended(refusal);
        }
        if analysis.untracked_set || analysis.session_state.is_some() {
            self.mark_dirty();
        }
        self.pin_for(&analysis);
        let server_name = if p.name.is_empty() {
            // Forwarded as the server's unnamed statement: no name of its own to compute.
            statements::unnamed()
        } else {
            server_name(
                &self.shared.stmt_hasher,
                &self.identity.tenant,
                p.sql,
                p.param_types,
            )
        };
        let stamp = self.shared.pool.plan_tick();
        // The unnamed statement again (every execution of most drivers): refreshed in place.
        let refreshed = if again {
            self.stmts.refresh_unnamed(stamp)
        } else {
            None
        };
        let seq = match refreshed {
            Some(seq) => seq,
            None => {
                let prepared = Arc::new(Prepared {
                    server_name: Arc::clone(&server_name),
                    sql: Arc::from(p.sql),
                    param_types: statements::param_types(p.param_types),
                    analysis,
                    stamp,
                    guard_epoch,
                });
                self.stmts.insert(p.name, prepared)
            }
        };
        let id = self.id;
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let conn = server.conn();
        if p.name.is_empty() {
            self.server_out.extend_from_slice(&frame.bytes);
            conn.unnamed_owner = Some((id, seq));
            self.expect.push_back(Expect::One {
                tag: be::PARSE_COMPLETE,
                prepared: None,
                client_name: Some("".into()),
            });
        } else {
            // Always a Parse of its own, even when the connection has a copy: that copy may
            // predate a migration (one nobody reported yet) that this client has seen.
            let stamp = self.shared.pool.plan_tick();
            prepare_copy(
                conn,
                &server_name,
                p.sql,
                p.param_types,
                stamp,
                &mut self.server_out,
                &mut self.expect,
            )?;
            self.expect.push_back(Expect::One {
                tag: be::PARSE_COMPLETE,
                prepared: Some(server_name),
                client_name: Some(p.name.into()),
            });
        }
        Ok(())
    }

    /// Make sure the statement exists on the current connection (re-Parse it hidden if not) and
    /// return the name to use there.
    fn ensure_prepared(
        &mut self,
        client_name: &str,
    ) -> Result<Option<Arc<Prepared>>, SessionError> {
        let Some(prepared) = self.stmts.get(client_name).cloned() else {
            return Ok(None);
        };
        let id = self.id;
        let unnamed_seq = self.stmts.unnamed.as_ref().map(|(_, seq)| *seq);
        let Some(server) = self.server.as_mut() else {
            return Ok(None);
        };
        let conn = server.conn();
        if prepared.analysis.untracked_set || prepared.analysis.session_state.is_some() {
            conn.dirty_session = true;
        }
        if client_name.is_empty() {
            let owner = unnamed_seq.map(|seq| (id, seq));
            if conn.unnamed_owner != owner || owner.is_none() {
                fe::write_parse(
                    "",
                    &prepared.sql,
                    &prepared.param_types,
                    &mut self.server_out,
                )
                .map_err(protocol)?;
                conn.unnamed_owner = owner;
                self.expect.push_back(Expect::Hidden {
                    tag: be::PARSE_COMPLETE,
                    prepared: None,
                });
            }
        } else if conn
            .prepared
            .stamp_of(&prepared.server_name)
            .is_none_or(|copy| copy < prepared.stamp)
        {
            // Missing, or older than the client's prepare (it may predate a migration the
            // client has seen): prepared again, hidden.
            let stamp = self.shared.pool.plan_tick();
            prepare_copy(
                conn,
                &prepared.server_name,
                &prepared.sql,
                &prepared.param_types,
                stamp,
                &mut self.server_out,
                &mut self.expect,
            )?;
            self.expect.push_back(Expect::Hidden {
                tag: be::PARSE_COMPLETE,
                prepared: Some(Arc::clone(&prepared.server_name)),
            });
        }
        Ok(Some(prepared))
    }

    fn unknown_statement(&mut self, name: &str) -> Result<(), SessionError> {
        self.refuse_extended(Refusal {
            sqlstate: sqlstate::INVALID_SQL_STATEMENT_NAME,
            message: format!("prepared statement \"{name}\" does not exist"),
            hint: None,
        })
    }

    fn on_bind(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let b = fe::bind(frame.body()).map_err(protocol)?;
        if let Some(why) = self.unit.reapply
            && self.server.is_some()
            && let Some(analysis) = self.stmts.get(b.statement).map(|p| Arc::clone(&p.analysis))
        {
            self.reapply_context(why, &analysis, b.portal);
        }
        if let Some(p) = self.stmts.get(b.statement)
            && !b.statement.is_empty()
            && self.shared.pool.stale_after(&p.server_name, p.stamp)
        {
            // Postgres fails this client's copy of the statement after the migration as well.
            return self.refuse_extended(Refusal {
                sqlstate: sqlstate::FEATURE_NOT_SUPPORTED,
                message: "cached plan must not change result type".into(),
                hint: Some("prepare the statement again"),
            });
        }
        let Some(prepared) = self.ensure_prepared(b.statement)? else {
            return self.unknown_statement(b.statement);
        };
        if let Some(kind) = prepared.analysis.reset {
            if let Some(refusal) = self.reset_refusal(kind) {
                return self.refuse_extended(refusal);
            }
            self.apply_reset(kind);
        }
        let effect = prepared.analysis.tx_effect();
        self.unit.effect = combine(self.unit.effect, effect);
        if self.unit.wrap != Wrap::Off && prepared.analysis.copy_from_stdin {
            self.unit.wrap = Wrap::BlockCopy;
        }
        let analysis = Arc::clone(&prepared.analysis);
        if analysis.copy_from_stdin {
            self.copy_portal = Some(b.portal.into());
        } else if self.copy_portal.as_deref() == Some(b.portal) {
            self.copy_portal = None;
        }
        self.stage_settings(self.units_sent + 1, &analysis);
        if b.statement.is_empty() {
            self.server_out.extend_from_slice(&frame.bytes);
        } else {
            fe::write_bind(
                b.portal,
                &prepared.server_name,
                b.rest,
                &mut self.server_out,
            )
            .map_err(protocol)?;
        }
        // Executing this portal ends the transaction (or runs outside one): remember it, for as
        // long as the server may hold it.
        let ends = matches!(effect, TxEffect::End | TxEffect::Unknown)
            || analysis.statements.first().is_some_and(|s| s.no_tx_block);
        let replaced = if ends {
            let unit = self.units_sent + 1;
            self.ending_portals.insert(b.portal.into(), (effect, unit));
            None
        } else if self.ending_portals.is_empty() {
            None
        } else {
            self.ending_portals.remove(b.portal)
        };
        self.expect.push_back(match replaced {
            Some((effect, unit)) => Expect::Rebind {
                portal: b.portal.into(),
                effect,
                unit,
            },
            // (the server statement, should the server refuse its plan)
            None => Expect::One {
                tag: be::BIND_COMPLETE,
                prepared: (!b.statement.is_empty()).then(|| Arc::clone(&prepared.server_name)),
                client_name: None,
            },
        });
        Ok(())
    }

    /// Before a Bind in a unit whose transaction may be over (or that started without the
    /// context): apply the context again, unless this statement runs outside a transaction or
    /// only ends one (then the next statement gets it; an injection before a ROLLBACK would also
    /// fail in an aborted block).
    fn reapply_context(&mut self, why: Reapply, analysis: &Analysis, portal: &str) {
        let first = analysis.statements.first();
        let effect = analysis.tx_effect();
        let ends = effect == TxEffect::End || (effect == TxEffect::Unknown && analysis.parsed);
        if ends || first.is_some_and(|s| s.no_tx_block) {
            return;
        }
        if effect == TxEffect::Begin {
            // inside the client's block, after its BEGIN (see Execute): no WARNING there
            self.unit.begin_portal = Some(Some(portal.to_string()));
            return;
        }
        self.unit.reapply = None;
        if self.unit.wrap != Wrap::Off
            && why == Reapply::Outside
            && !first.is_some_and(|s| s.block_sensitive)
        {
            // The client's COMMIT/ROLLBACK closed rlsgate's block: open another one for the rest
            // of the unit (closed by rlsgate's COMMIT after the Sync), so that the context is set
            // inside a block, as transaction_wrap needs it.
            self.inject(Ahead::Unknown, BlockEdge::Begin);
            return;
        }
        // Otherwise pipelined as at a unit's start (in a chained block: inside it).
        let ahead = match why {
            Reapply::Outside => Ahead::of(Some(analysis)),
            Reapply::Unknown => Ahead::Unknown,
        };
        self.inject_context(ahead);
    }

    fn on_describe(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let (kind, name) = fe::target(frame.body(), "Describe").map_err(protocol)?;
        if kind == b'P' {
            self.server_out.extend_from_slice(&frame.bytes);
            self.expect
                .push_back(Expect::DescribePortal { prepared: None });
            return Ok(());
        }
        let Some(prepared) = self.ensure_prepared(name)? else {
            return self.unknown_statement(name);
        };
        let server_name = (!name.is_empty()).then(|| Arc::clone(&prepared.server_name));
        fe::write_describe(
            b'S',
            server_name.as_deref().unwrap_or(""),
            &mut self.server_out,
        )
        .map_err(protocol)?;
        self.expect.push_back(Expect::DescribeStatement {
            prepared: server_name,
        });
        Ok(())
    }

    fn on_close(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let (kind, name) = fe::target(frame.body(), "Close").map_err(protocol)?;
        if kind == b'P' {
            self.server_out.extend_from_slice(&frame.bytes);
            self.expect.push_back(Expect::One {
                tag: be::CLOSE_COMPLETE,
                prepared: None,
                client_name: None,
            });
            return Ok(());
        }
        // Server statements are shared and stay; the client's name is forgotten.
        self.stmts.remove(name);
        self.push_synthetic(be::CLOSE_COMPLETE);
        Ok(())
    }

    fn on_sync(&mut self, frame: Frame) -> Flow {
        let skip = std::mem::replace(&mut self.unit.skip, Skip::No);
        self.unit.reapply = None;
        if skip == Skip::LocalSync && self.server.is_none() {
            self.unit.open = false;
            be::write_ready(TxStatus::Idle, &mut self.client_out);
            return Flow::Continue;
        }
        if self.server.is_none() {
            // A bare Sync outside any unit: Postgres answers ReadyForQuery.
            be::write_ready(TxStatus::Idle, &mut self.client_out);
            return Flow::Continue;
        }
        self.unit.begin_portal = None;
        // Where transaction_wrap's COMMIT goes, if the unit ran in rlsgate's block; and whether
        // the block's end is known only from the replies (the next unit then waits for them).
        let (after, commit_behind, block_end_unknown) =
            match std::mem::replace(&mut self.unit.wrap, Wrap::Off) {
                Wrap::Off => (After::Forward, false, false),
                // (see the wrapped COPY Query in on_query)
                Wrap::BlockCopy => (After::SwallowThenCommit, false, true),
                Wrap::Block if skip != Skip::No || !self.client_buf.is_empty() => {
                    // The server skips to this Sync after an error (it would skip a COMMIT ahead of it
                    // too), or the client pipelines (its next message is here already): the COMMIT
                    // follows the Sync, so the next unit can follow at once.
                    (After::Swallow, true, false)
                }
                Wrap::Block => {
                    // The COMMIT goes ahead of the client's Sync, whose ReadyForQuery is then the
                    // client's: one ReadyForQuery (one flush of the server's output) for the unit. An
                    // error in the unit makes the server skip that COMMIT and leaves the block open, to
                    // be closed after the Sync (see discard_until_sync).
                    self.inject(Ahead::Unknown, BlockEdge::Commit);
                    (After::Forward, false, true)
                }
            };
        self.server_out.extend_from_slice(&frame.bytes);
        self.expect_ready(Expect::Sync { after });
        if commit_behind {
            self.wrap_commit(After::Forward);
        }
        self.unit.open = false;
        let effect = std::mem::replace(&mut self.unit.effect, TxEffect::None);
        self.tx.after_unit(effect);
        if block_end_unknown {
            self.tx.unknown();
        }
        Flow::Continue
    }

    /// Another message during COPY FROM STDIN: Postgres fails the COPY with it (the message is
    /// consumed, not run). The same happens here without sending it: a CopyFail naming it.
    fn interrupt_copy(&mut self, frame: &Frame) -> Flow {
        self.leave_copy_in();
        let reason = format!(
            "unexpected message type 0x{:02X} during COPY from stdin",
            frame.tag
        );
        tracing::debug!(%reason, "COPY interrupted by the client");
        fe::write_copy_fail(&reason, &mut self.server_out);
        Flow::Continue
    }

    /// A reply rlsgate produces itself, emitted in order.
    fn push_synthetic(&mut self, tag: u8) {
        if self.expect.is_empty() {
            be::write_empty(tag, &mut self.client_out);
        } else {
            self.expect.push_back(Expect::Synthetic(tag));
        }
    }

    fn mark_dirty(&mut self) {
        if let Some(server) = self.server.as_mut() {
            server.conn().dirty_session = true;
        }
    }
}

/// Queue the Parse of one of rlsgate's own statements if the connection lacks it (closing an
/// older copy first); returns whether it did. Also when an injection still in flight Parsed it:
/// an error before that one (in the same unsynced unit) would make the server skip that Parse,
/// and a Bind would find nothing.
pub(super) fn prepare_own(
    statement: &inject::OwnStatement,
    conn: &mut crate::pool::ServerConn,
    expect: &std::collections::VecDeque<Expect>,
    out: &mut BytesMut,
) -> bool {
    let unconfirmed = expect.iter().any(|e| {
        matches!(e, Expect::Inject { parsed: Some(names), .. }
            if names.contains(&statement.name))
    });
    if !unconfirmed && conn.prepared.contains(&statement.name) {
        return false;
    }
    // (take_copy first: the name must leave every list of copies to close)
    if conn.prepared.take_copy(&statement.name) || unconfirmed {
        // (retired after a failed injection, or maybe parsed already: it may exist)
        let _ = fe::write_close(b'S', &statement.name, out);
    }
    out.extend_from_slice(&statement.parse);
    conn.prepared
        .insert(Arc::clone(&statement.name), statement.text_len, 0);
    true
}

/// Stand-in unit number for setting changes of a split Query, settled when the split ends.
pub(super) const SPLIT_UNIT: u64 = u64::MAX;

/// How a Query is sent.
enum Plan {
    /// As the client sent it (most Queries: nothing is copied); the kind of its statements.
    Whole(PieceKind),
    /// In pieces (at least two), each sent on its own.
    Split(Vec<Piece>),
}

/// How a Query is sent: whole, or in pieces so that every statement runs with the context.
/// Plain mode splits after COMMIT/ROLLBACK (DESIGN §3); transaction_wrap also isolates every
/// transaction-control statement so that ordinary pieces can be wrapped in rlsgate's own block.
fn plan_pieces(sql: &str, analysis: &Analysis, wrap: bool) -> Plan {
    // (per piece by its text: a false positive only makes rlsgate wait for the server)
    let copy = |text: &str| analysis.copy_from_stdin && text.to_ascii_lowercase().contains("stdin");
    if !wrap {
        let splits = analysis.split_points();
        if splits.is_empty() {
            return Plan::Whole(PieceKind::Statements);
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        for at in splits.into_iter().chain(std::iter::once(sql.len())) {
            let text = sql.get(start..at).unwrap_or_default();
            pieces.push(Piece {
                text: text.to_string(),
                kind: PieceKind::Statements,
                copy: copy(text),
            });
            start = at;
        }
        return Plan::Split(pieces);
    }
    let kind_of = |st: &crate::guard::Statement| match st.tx {
        TxEffect::Begin => PieceKind::Begin,
        TxEffect::End | TxEffect::Unknown => PieceKind::Control,
        TxEffect::None if st.block_sensitive => PieceKind::Control,
        TxEffect::None => PieceKind::Statements,
    };
    if !analysis.parsed {
        return Plan::Whole(PieceKind::Statements);
    }
    let mut pieces: Vec<(usize, usize, PieceKind)> = Vec::new();
    for (i, st) in analysis.statements.iter().enumerate() {
        let kind = kind_of(st);
        let end = analysis
            .statements
            .get(i + 1)
            .map(|n| n.start)
            .unwrap_or(sql.len());
        match pieces.last_mut() {
            Some(last) if kind == PieceKind::Statements && last.2 == PieceKind::Statements => {
                last.1 = end
            }
            _ => pieces.push((if i == 0 { 0 } else { st.start }, end, kind)),
        }
    }
    if pieces.len() <= 1 {
        return Plan::Whole(pieces.first().map_or(PieceKind::Statements, |p| p.2));
    }
    Plan::Split(
        pieces
            .into_iter()
            .map(|(a, b, kind)| {
                let text = sql.get(a..b).unwrap_or_default();
                Piece {
                    text: text.to_string(),
                    kind,
                    copy: copy(text),
                }
            })
            .collect(),
    )
}

/// lo_create, lo_open, lo_close, loread, lowrite, lo_lseek, lo_creat, lo_tell, lo_unlink,
/// lo_truncate, lo_lseek64, lo_tell64, lo_truncate64 (OIDs fixed in pg_proc.dat).
const LARGE_OBJECT_FUNCTIONS: &[u32] = &[
    715, 952, 953, 954, 955, 956, 957, 958, 964, 1004, 3170, 3171, 3172,
];

/// SQL `DEALLOCATE ALL`: it drops rlsgate's statements on the server too (refused in the extended
/// protocol; as a simple Query of its own it is answered by the proxy unless the connection is
/// pinned).
fn drops_all_statements(analysis: &Analysis) -> bool {
    analysis
        .statements
        .iter()
        .any(|s| matches!(s.deallocate, Some(None)))
}

fn combine(a: TxEffect, b: TxEffect) -> TxEffect {
    match (a, b) {
        (x, TxEffect::None) => x,
        (TxEffect::None, y) => y,
        _ => TxEffect::Unknown,
    }
}

/// Parse rlsgate's statement `name` on the connection, stamped `stamp`; a copy the server may
/// still have (an older one, or one retired after a migration) is closed first (a Close of a
/// missing statement is no error). The caller pushes the ParseComplete expectation.
fn prepare_copy(
    conn: &mut crate::pool::ServerConn,
    name: &Arc<str>,
    sql: &str,
    param_types: &[u8],
    stamp: u64,
    server_out: &mut BytesMut,
    expect: &mut std::collections::VecDeque<Expect>,
) -> Result<(), SessionError> {
    if conn.prepared.take_copy(name) {
        fe::write_close(b'S', name, server_out).map_err(protocol)?;
        expect.push_back(Expect::Hidden {
            tag: be::CLOSE_COMPLETE,
            prepared: None,
        });
    }
    fe::write_parse(name, sql, param_types, server_out).map_err(protocol)?;
    conn.prepared.insert(Arc::clone(name), sql.len(), stamp);
    Ok(())
}

/// What follows an injected tenant context (see `inject_context`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ahead {
    /// A client statement that takes a snapshot itself, outside a transaction block.
    Snapshot,
    /// The client's own BEGIN, alone: the context goes right after it, inside the block.
    Begin,
    /// A unit that starts with a message that runs nothing (Describe, Close, Flush): the
    /// context goes right before its first Bind (or Query), where that statement is known.
    FirstBind,
    /// Anything else, or not known.
    Unknown,
}

impl Ahead {
    /// Before the statement(s) `analysis`: `Snapshot` unless the first is transaction control
    /// or SET/RESET, or was not understood; `Begin` for a lone BEGIN/START TRANSACTION.
    pub(super) fn of(analysis: Option<&Analysis>) -> Ahead {
        let Some(a) = analysis.filter(|a| a.parsed) else {
            return Ahead::Unknown;
        };
        match a.statements.as_slice() {
            [only] if only.tx == TxEffect::Begin => Ahead::Begin,
            [first, ..] if !first.before_snapshot => Ahead::Snapshot,
            _ => Ahead::Unknown,
        }
    }
}

/// What [`Session::parse_analysis`] found for a Parse.
struct ParseAnalysis {
    analysis: Arc<Analysis>,
    /// The guard generation the analysis belongs to.
    guard_epoch: u64,
    /// The Parse repeats the client's unnamed statement (its analysis was kept).
    again: bool,
}
