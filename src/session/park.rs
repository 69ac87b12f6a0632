//! A client that has been quiet for a while rests as a [`Parked`] record: what its session must
//! keep between transactions (its socket, identity, prepared statements, settings, registry and
//! cancel entries, limits), without the transaction machinery, the buffers, the tenant context's
//! messages or the tracing span. The task that serves the client holds the record and waits on
//! the socket and the registry's wake-up call; the first byte from the client (or a
//! wake-up: KILL, the token's expiry, shutdown) turns it back into a [`Session`].
//!
//! Only a session at rest is parked: no server connection, nothing in flight or buffered, no
//! open unit, no pin (see [`Session::parkable`]); anything else keeps the session as it is.
//! Parking is asked for by the registry's clock (`registry::Quiet`), once per quiet spell of a
//! second or two, so it costs nothing to a client that keeps talking.
//!
//! Memory per idle client (1 000 idle plaintext clients): 3.4 KB as a session, ≈ 1.9 KB parked.

use std::sync::Arc;

use bytes::BytesMut;

use super::tx::{CopyState, Predicted, Tx};
use super::unit::{Lanes, Unit};
use super::{Session, SessionError, inject, settings::Settings, statements::Statements};
use crate::app::Shared;
use crate::auth::Identity;
use crate::config::Config;
use crate::guard::TxEffect;
use crate::stream::Stream;

/// What a resting client keeps (see the module docs). Every field of [`Session`] is either here
/// or known to be in its initial state when parked ([`Session::parkable`]).
pub(super) struct Parked {
    shared: Arc<Shared>,
    id: u64,
    client: Stream,
    identity: Identity,
    /// (`None` when empty, as for most clients)
    reauth: Option<Box<super::reauth::ReauthState>>,
    /// (`None` when nothing was ever prepared)
    stmts: Option<Box<Statements>>,
    settings: Settings,
    units_sent: u64,
    units_done: u64,
    client_entry: crate::registry::Registration,
    tracker: crate::metrics::ClientTracker,
    tenant_slot: crate::limits::ClientSlot,
    cancel: crate::cancel::Registration,
    shutdown: tokio_util::sync::CancellationToken,
    /// The config at login: the session's timeouts, limits and modes come from it (a reload
    /// applies to new sessions).
    config: Arc<Config>,
    unit_effect: TxEffect,
    tx: Tx,
    lanes: Lanes,
}

/// What a session's fields are given at login that the record does not hold.
pub(super) struct Login {
    pub client: Stream,
    /// Client bytes that came with the login (a client may pipeline its first query).
    pub read_buf: BytesMut,
    pub identity: Identity,
    pub settings: Settings,
    pub client_entry: crate::registry::Registration,
    pub tracker: crate::metrics::ClientTracker,
    pub tenant_slot: crate::limits::ClientSlot,
    pub cancel: crate::cancel::Registration,
}

impl Parked {
    /// A fresh client's record (its session is made from it, as a parked one's is).
    pub(super) fn at_login(
        login: Login,
        shared: Arc<Shared>,
        id: u64,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> (Parked, BytesMut) {
        let config = shared.config();
        let lanes = if Session::pipelining_allowed(
            &shared,
            config.upstream.transaction_wrap,
            config.server.pool_mode,
        ) {
            Lanes::On
        } else {
            Lanes::Off
        };
        let parked = Parked {
            id,
            client: login.client,
            identity: login.identity,
            reauth: None,
            stmts: None,
            settings: login.settings,
            units_sent: 0,
            units_done: 0,
            client_entry: login.client_entry,
            tracker: login.tracker,
            tenant_slot: login.tenant_slot,
            cancel: login.cancel,
            shutdown,
            unit_effect: TxEffect::None,
            tx: Tx::default(),
            lanes,
            config,
            shared: Arc::clone(&shared),
        };
        (parked, login.read_buf)
    }

    /// Ready when the client sends something (or leaves) or the session is woken (KILL, the
    /// token's expiry, shutdown): the session then looks at what it is. Polled from the task's
    /// own future, with nothing stored but a reference to the record.
    pub(super) fn poll_wait(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let entry = &self.client_entry.entry;
        let woken = entry.wake.poll_woken(cx).is_ready();
        let ready = match &self.client {
            // (an error shows when the session reads)
            Stream::Plain(tcp) => woken || tcp.poll_read_ready(cx).is_ready(),
            // (not parked: see Session::parkable)
            Stream::ServerTls(_) | Stream::ClientTls(_) => true,
        };
        if ready {
            entry.quiet.resumed();
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// The session again, with everything a transaction needs in its initial state; its span is
    /// made anew (the one it had was dropped when it rested). On error, the client's socket (to
    /// tell it).
    pub(super) fn into_session(
        self,
        client_buf: BytesMut,
    ) -> Result<Box<Session>, (Stream, SessionError)> {
        let entry = &self.client_entry.entry;
        let span = crate::app::client_span(self.id, entry.peer, Some((&entry.user, &entry.tenant)));
        self.shared.metrics.resting(false);
        self.into_session_with(client_buf, span)
    }

    /// [`Parked::into_session`] with this span. The tenant context's statements are built
    /// again from the identity (as at login: the same input gives the same statements).
    pub(super) fn into_session_with(
        self,
        client_buf: BytesMut,
        span: tracing::Span,
    ) -> Result<Box<Session>, (Stream, SessionError)> {
        let config = &self.config;
        let context = match inject::Context::new(
            &self.identity,
            config.upstream.citus_propagate_set,
            &self.shared.stmt_hasher,
            &self.shared.context_parse,
        ) {
            Ok(c) => c,
            Err(e) => return Err((self.client, SessionError::Injection(e.to_string()))),
        };
        let Parked {
            shared,
            id,
            client,
            identity,
            reauth,
            stmts,
            settings,
            units_sent,
            units_done,
            client_entry,
            tracker,
            tenant_slot,
            cancel,
            shutdown,
            config,
            unit_effect,
            tx,
            lanes,
        } = self;
        let reauth = reauth.map(|r| *r).unwrap_or_default();
        let stmts = stmts.map(|s| *s).unwrap_or_default();
        // Boxed: the task that serves the client then holds a pointer, and the session is never
        // moved.
        Ok(Box::new(Session {
            shared,
            config,
            id,
            client,
            client_buf,
            // (grown on first use: an idle client holds as little as possible)
            client_out: BytesMut::new(),
            client_unflushed: false,
            server: None,
            server_out: BytesMut::new(),
            server_unflushed: false,
            identity,
            context,
            expect: Default::default(),
            reauth,
            in_flight: 0,
            // (a session rests only with nothing in flight: the prediction is idle)
            tx,
            unit: Unit::closed(unit_effect),
            ending_portals: Default::default(),
            copy: CopyState::Off,
            copy_portal: None,
            stmts,
            settings,
            units_sent,
            units_done,
            split: None,
            pinned: None,
            pin_slot: None,
            client_entry,
            tracker,
            held_since: None,
            server_heard: None,
            timer: None,
            passthrough: 0,
            query_started: None,
            tenant_permit: None,
            tenant_slot,
            pending: None,
            server_ending: None,
            cancel,
            shutdown,
            lane_reply: None,
            spare_reply: None,
            lanes,
            span,
        }))
    }
}

impl Session {
    /// At rest: nothing but what [`Parked`] keeps differs from a fresh session's state.
    pub(super) fn parkable(&self) -> bool {
        matches!(self.client, Stream::Plain(_))
            && self.server.is_none()
            && self.lane_reply.is_none()
            && self.client_buf.is_empty()
            && self.client_out.is_empty()
            && self.server_out.is_empty()
            && !self.client_unflushed
            && !self.server_unflushed
            && self.expect.is_empty()
            && self.in_flight == 0
            && self.tx.predicted() == Predicted::Idle
            && self.unit.at_rest()
            && self.ending_portals.is_empty()
            && self.copy == CopyState::Off
            && self.copy_portal.is_none()
            && self.split.is_none()
            && self.pinned.is_none()
            && self.pin_slot.is_none()
            && self.held_since.is_none()
            && self.timer.is_none()
            && self.passthrough == 0
            && self.query_started.is_none()
            && self.tenant_permit.is_none()
            && self.pending.is_none()
            && self.server_ending.is_none()
            && self.settings.settled()
    }

    /// The record a parkable session rests as (the session's memory goes).
    pub(super) fn park(self: Box<Self>) -> Parked {
        debug_assert!(self.parkable());
        let Session {
            shared,
            config,
            id,
            client,
            client_buf: _,
            client_out: _,
            client_unflushed: _,
            server: _,
            server_out: _,
            server_unflushed: _,
            identity,
            context: _,
            expect: _,
            reauth,
            in_flight: _,
            tx,
            unit,
            ending_portals: _,
            copy: _,
            copy_portal: _,
            stmts,
            settings,
            units_sent,
            units_done,
            split: _,
            pinned: _,
            pin_slot: _,
            client_entry,
            tracker,
            held_since: _,
            server_heard: _,
            timer: _,
            passthrough: _,
            query_started: _,
            tenant_permit: _,
            tenant_slot,
            pending: _,
            server_ending: _,
            cancel,
            shutdown,
            lane_reply: _,
            spare_reply: _,
            lanes,
            span: _,
        } = *self;
        // (the registry's clock leaves it alone until it resumes)
        client_entry.entry.quiet.parked();
        shared.metrics.resting(true);
        Parked {
            shared,
            config,
            id,
            client,
            identity,
            reauth: (!reauth.is_empty()).then(|| Box::new(reauth)),
            stmts: (!stmts.is_pristine()).then(|| Box::new(stmts)),
            settings,
            units_sent,
            units_done,
            client_entry,
            tracker,
            tenant_slot,
            cancel,
            shutdown,
            unit_effect: unit.effect,
            tx,
            lanes,
        }
    }
}
