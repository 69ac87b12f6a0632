//! Cross-client pipelining (`[server] pipeline_depth` > 1): complete autocommit units of many
//! clients share a few server connections ("lanes"). A lane writes each unit behind the ones
//! still running, each with its own tenant context in front, and hands every unit's replies back
//! to its client in order. Postgres reads many units per system call, and the proxy writes and
//! reads once for many units instead of once each.
//!
//! - A unit qualifies when the session holds no connection, the client is outside a transaction,
//!   and the guard classifies it as plain autocommit work (see `session::pipelined`): no
//!   transaction control, no session-level effect, no COPY FROM STDIN, nothing it is unsure of.
//!   Everything else keeps the exclusive checkout.
//! - Each unit ends with its own ReadyForQuery (a Query, or extended messages up to their
//!   Sync): an error in one unit makes Postgres skip only to that unit's Sync.
//! - A lane fails closed: an error in anything rlsgate sent itself, a unit that leaves a
//!   transaction open, a change in how the server reads text, or a lost connection ends the lane
//!   and closes its connection. Units already written get an error (08006); units not yet
//!   written go back to their sessions and run on an exclusive connection.
//! - At most `pipeline_depth` units are written to a connection at a time; more wait in the
//!   lane's queue. A new lane opens when every lane with the client's settings has a full
//!   pipeline, up to half the pool.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use crate::error::{ClientError, sqlstate};
use crate::pool::{Ambient, CancelTarget, Checkout, HeldSettings, Pool, ServerConn};
use crate::protocol::backend as be;
use crate::protocol::frame::frame_len;
use crate::protocol::frontend as fe;
use crate::session::{OwnStatement, Prepared};

/// How long a lane keeps its connection once nothing is queued (the next units of a busy
/// workload usually arrive within it; a pool waiter waits at most this much longer).
const LINGER: Duration = Duration::from_millis(1);
/// Replies held for a client that has not taken them yet, above which the lane stops reading
/// (the units behind wait: backpressure, as on an exclusive connection).
const REPLY_CAP: usize = 256 * 1024;
/// A unit running this long at a lane's head makes the lane take no more units (they would
/// wait behind it): they go to another lane or an exclusive connection.
const SLOW_HEAD_US: u64 = 2_000;
/// Largest server message a lane accepts (Postgres' own limit is 1 GB).
const MAX_SERVER_MESSAGE: usize = (1 << 30) + 1024;
/// Free space kept in a lane's read buffer before each read.
const READ_SPACE: usize = 16 * 1024;

/// The lanes of one pool.
pub struct Pipelines {
    depth: usize,
    max_lanes: usize,
    lanes: Mutex<Vec<Arc<LaneHandle>>>,
    /// A connection may not call `set_config`: units come with the `SET LOCAL` form too.
    set_local: AtomicBool,
    pool: Pool,
    /// Units submitted since start.
    units: AtomicU64,
    /// Units run again because a cancel meant for the unit ahead of them hit them.
    reruns: AtomicU64,
    /// Origin of the lanes' `head_since`.
    epoch: std::time::Instant,
    /// `DISCARD SEQUENCES`, prepared once per connection, bound in front of a unit whose
    /// tenant differs from the one before (see `Lane::write_unit`).
    discard: OwnStatement,
}

/// What sessions see of a lane.
struct LaneHandle {
    /// The session settings its connection holds (`None`: the upstream defaults).
    key: Option<Arc<str>>,
    /// Units sent to the lane and not finished (queued or in flight).
    queued: AtomicUsize,
    /// When the unit at its head started (µs since the pipelines' epoch; 0: none running).
    head_since: AtomicU64,
    inbox: Inbox,
}

/// A lane's queue of units. Sessions push (under the lanes' lock), the lane takes: a mutex
/// and the lane's waker, uncontended in practice, instead of a channel's linked blocks and
/// atomics on every send and receive.
#[derive(Default)]
struct Inbox(Mutex<InboxState>);

#[derive(Default)]
struct InboxState {
    jobs: VecDeque<Job>,
    /// The lane, when it waits for a unit.
    waker: Option<Waker>,
    /// The lane is gone: nothing more is queued.
    closed: bool,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a unit and wake the lane; `Err` gives it back when the lane is gone.
    #[allow(
        clippy::result_large_err,
        reason = "the unit goes back to its session by value, rarely"
    )]
    fn push(&self, job: Job) -> Result<(), Job> {
        let waker = {
            let mut s = self.lock();
            if s.closed {
                return Err(job);
            }
            s.jobs.push_back(job);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// The next unit, or `Pending` (woken by the next push).
    fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Job> {
        let mut s = self.lock();
        if let Some(job) = s.jobs.pop_front() {
            return Poll::Ready(job);
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The lane is gone: what is still queued goes back to its sessions, and later pushes fail.
    fn close(&self, queued: &AtomicUsize) {
        let jobs = {
            let mut s = self.lock();
            s.closed = true;
            s.waker = None;
            std::mem::take(&mut s.jobs)
        };
        for job in jobs {
            queued.fetch_sub(1, Ordering::Relaxed);
            job.bounce();
        }
    }
}

/// Closes its lane's inbox when the lane's task ends, however it ends (a panic included), so
/// that no unit waits in it for nobody.
struct InboxCloser(Arc<LaneHandle>);

impl Drop for InboxCloser {
    fn drop(&mut self) {
        self.0.inbox.close(&self.0.queued);
    }
}

/// One client's unit for a lane.
pub struct Job {
    pub tenant: Arc<str>,
    /// The tenant context's `set_config` form (see `session::inject`).
    pub set_config: ContextRun,
    /// Its `SET LOCAL` form, once a lane found a connection that may not call `set_config`
    /// (see [`Pipelines::needs_set_local`]).
    pub set_local: Option<Arc<[OwnStatement]>>,
    /// The client's named statements the unit binds or describes (prepared on the lane's
    /// connection first if it lacks them).
    pub statements: Vec<Arc<Prepared>>,
    /// The client's messages: a Query, or extended messages up to a Sync (named statements
    /// under their server names).
    pub frames: Bytes,
    /// The messages as the client sent them, when `frames` renamed statements.
    pub original: Option<Bytes>,
    pub reply: Arc<Reply>,
}

impl Job {
    /// Not run: the client's messages go back to its session.
    fn bounce(self) {
        let frames = self.original.unwrap_or(self.frames);
        self.reply.end(Outcome::Bounced(frames));
    }
}

/// The `set_config` form of the tenant context: rlsgate's statement and its Bind + Execute
/// with this tenant's values.
pub struct ContextRun {
    pub name: Arc<str>,
    pub parse: Bytes,
    pub run: Bytes,
    pub text_len: usize,
}

/// How a unit ended.
#[derive(Debug)]
pub enum Outcome {
    /// Its ReadyForQuery was delivered.
    Done,
    /// Not written to any server: the session runs these messages itself.
    Bounced(Bytes),
    /// Written, but its lane failed before the unit's end: the client gets this error.
    Failed(ClientError),
    /// The unit changed how the server reads SQL text (see `guard::policy`): its session ends.
    LexerChanged(String),
}

/// Where a lane puts one unit's replies for its session.
#[derive(Default)]
pub struct Reply {
    state: Mutex<ReplyState>,
    /// The session gave up waiting (query_timeout): the lane's server is not answering.
    timed_out: AtomicBool,
    /// The client asked to cancel the unit (the lane decides whether it may be sent).
    cancel_wanted: AtomicBool,
}

#[derive(Default)]
struct ReplyState {
    buf: BytesMut,
    end: Option<Outcome>,
    session: Option<Waker>,
    lane: Option<Waker>,
    /// The session no longer reads: replies are dropped.
    gone: bool,
    /// While the unit is at the head of its lane: the lane, woken for a cancel.
    running_on: Option<Waker>,
}

impl Reply {
    fn lock(&self) -> MutexGuard<'_, ReplyState> {
        // (nothing panics while holding it; a poisoned lock still holds consistent data)
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Session side: move what arrived to `out`. Ready when bytes moved or the unit ended (see
    /// [`Reply::take_outcome`]).
    pub fn poll_drain(&self, cx: &mut Context<'_>, out: &mut BytesMut) -> Poll<()> {
        let mut s = self.lock();
        let mut ready = s.end.is_some();
        if !s.buf.is_empty() {
            if out.is_empty() {
                std::mem::swap(out, &mut s.buf);
            } else {
                out.extend_from_slice(&s.buf);
                s.buf.clear();
            }
            if let Some(lane) = s.lane.take() {
                lane.wake();
            }
            ready = true;
        }
        if ready {
            return Poll::Ready(());
        }
        match &s.session {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.session = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Session side: how the unit ended, once all its replies were drained.
    pub fn take_outcome(&self) -> Option<Outcome> {
        let mut s = self.lock();
        if !s.buf.is_empty() {
            return None;
        }
        s.end.take()
    }

    /// Session side: the client left (or its query_timeout passed): drop the replies.
    pub fn abandon(&self, timed_out: bool) {
        let lane = {
            let mut s = self.lock();
            s.gone = true;
            s.buf = BytesMut::new();
            s.lane.take()
        };
        if timed_out {
            self.timed_out.store(true, Ordering::Release);
        }
        if let Some(lane) = lane {
            lane.wake();
        }
    }

    /// Cancel side: the client asked to cancel the unit. Its lane sends the cancel to the
    /// server once the unit runs, if no other client's unit is in flight behind it (a cancel
    /// reaches whatever the backend runs when it arrives: never another client's unit).
    pub fn request_cancel(&self) {
        let s = self.lock();
        if s.end.is_some() {
            return;
        }
        self.cancel_wanted.store(true, Ordering::Release);
        if let Some(lane) = &s.running_on {
            lane.wake_by_ref();
        }
    }

    /// Lane side: more replies. Returns false when the client holds `REPLY_CAP` or more
    /// (the lane then waits for the session to drain them).
    fn deliver(&self, bytes: &[u8], end: Option<Outcome>, lane: &Waker) -> bool {
        let mut s = self.lock();
        if !s.gone {
            s.buf.extend_from_slice(bytes);
        }
        let done = end.is_some();
        if done {
            s.end = end;
            s.running_on = None;
            self.cancel_wanted.store(false, Ordering::Relaxed);
        }
        let room = s.gone || done || s.buf.len() < REPLY_CAP;
        if !room {
            s.lane = Some(lane.clone());
        }
        if let Some(w) = s.session.take() {
            w.wake();
        }
        room
    }

    /// Lane side: is there room again for replies?
    fn has_room(&self, lane: &Waker) -> bool {
        let mut s = self.lock();
        let room = s.gone || s.buf.len() < REPLY_CAP;
        if !room {
            s.lane = Some(lane.clone());
        }
        room
    }

    /// Lane side: the unit reached the head of its lane (a cancel request wakes `lane`).
    fn running(&self, lane: &Waker) {
        self.lock().running_on = Some(lane.clone());
    }

    fn end(&self, outcome: Outcome) {
        self.deliver(&[], Some(outcome), Waker::noop());
    }

    /// Make a finished unit's `Reply` ready for its session's next unit, if nothing else holds
    /// it any more (its lane and the cancel slot let go once the unit ended).
    pub fn reuse(this: &mut Arc<Reply>) -> bool {
        let Some(reply) = Arc::get_mut(this) else {
            return false;
        };
        *reply.timed_out.get_mut() = false;
        *reply.cancel_wanted.get_mut() = false;
        let s = reply.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if s.buf.capacity() > REUSED_BUF_MAX {
            // (a large result's buffer is not kept for an idle client)
            s.buf = BytesMut::new();
        } else {
            s.buf.clear();
        }
        s.end = None;
        s.lane = None;
        s.gone = false;
        s.running_on = None;
        // (`session` stays: the same task waits on the next unit)
        true
    }
}

/// The largest reply buffer a reused `Reply` keeps.
const REUSED_BUF_MAX: usize = 8 * 1024;

impl ContextRun {
    pub fn of(statement: &OwnStatement) -> ContextRun {
        ContextRun {
            name: Arc::clone(&statement.name),
            parse: statement.parse.clone(),
            run: statement.run.clone(),
            text_len: statement.text_len,
        }
    }
}

impl Pipelines {
    pub fn new(depth: usize, pool_size: usize, pool: Pool, discard: OwnStatement) -> Pipelines {
        Pipelines {
            discard,
            depth: depth.max(1),
            max_lanes: (pool_size / 2).max(1),
            lanes: Mutex::new(Vec::new()),
            set_local: AtomicBool::new(false),
            pool,
            units: AtomicU64::new(0),
            reruns: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        }
    }

    /// Units may be pipelined at all.
    /// rlsgate's prepared `DISCARD SEQUENCES` (also used on exclusive connections).
    pub fn discard_statement(&self) -> &OwnStatement {
        &self.discard
    }

    pub fn enabled(&self) -> bool {
        self.depth > 1
    }

    /// Units must bring the context's `SET LOCAL` form (the upstream role may not call
    /// `set_config`).
    pub fn needs_set_local(&self) -> bool {
        self.set_local.load(Ordering::Relaxed) || self.pool.set_config_denied()
    }

    fn lanes(&self) -> MutexGuard<'_, Vec<Arc<LaneHandle>>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lanes open now.
    pub fn lane_count(&self) -> usize {
        self.lanes().len()
    }

    /// Units sent to lanes since start.
    pub fn units(&self) -> u64 {
        self.units.load(Ordering::Relaxed)
    }

    /// Units run again because a cancel meant for the unit ahead of them hit them.
    pub fn reruns(&self) -> u64 {
        self.reruns.load(Ordering::Relaxed)
    }

    fn now_us(&self) -> u64 {
        self.us_at(std::time::Instant::now())
    }

    /// `at` in microseconds since the lanes' epoch (never 0: that means "no unit running").
    fn us_at(&self, at: std::time::Instant) -> u64 {
        (at.saturating_duration_since(self.epoch).as_micros() as u64).max(1)
    }

    /// A lane that takes a unit with `settings` now: room in its pipeline, no slow unit at its
    /// head.
    fn open_to(&self, l: &LaneHandle, settings: Option<&Arc<str>>, now: u64) -> bool {
        l.key.as_deref() == settings.map(|s| &**s)
            && l.queued.load(Ordering::Relaxed) < self.depth
            && match l.head_since.load(Ordering::Relaxed) {
                0 => true,
                since => now.saturating_sub(since) < SLOW_HEAD_US,
            }
    }

    /// Whether a unit with these settings would find a lane `now`.
    pub fn has_room(&self, settings: Option<&Arc<str>>, now: std::time::Instant) -> bool {
        let lanes = self.lanes();
        let now = self.us_at(now);
        lanes.len() < self.max_lanes || lanes.iter().any(|l| self.open_to(l, settings, now))
    }

    /// Queue a unit on the lane with the least work among those open to it, or on a new lane
    /// while fewer than half the pool are lanes. `Err` gives the unit back when no lane takes
    /// it (it then takes an exclusive connection).
    #[allow(
        clippy::result_large_err,
        reason = "the unit goes back to its session by value, rarely"
    )]
    pub fn submit(
        self: &Arc<Self>,
        job: Job,
        settings: Option<&Arc<str>>,
        now: std::time::Instant,
    ) -> Result<(), Job> {
        let mut lanes = self.lanes();
        let now = self.us_at(now);
        let best = lanes
            .iter()
            .filter(|l| self.open_to(l, settings, now))
            .min_by_key(|l| l.queued.load(Ordering::Relaxed))
            .cloned();
        let lane = match best {
            Some(lane) => lane,
            None if lanes.len() < self.max_lanes => {
                let lane = self.spawn_lane(settings.cloned());
                lanes.push(Arc::clone(&lane));
                lane
            }
            None => return Err(job),
        };
        lane.queued.fetch_add(1, Ordering::Relaxed);
        self.units.fetch_add(1, Ordering::Relaxed);
        if let Err(job) = lane.inbox.push(job) {
            // (the lane's task is gone without removing itself: only if it panicked)
            lanes.retain(|l| !Arc::ptr_eq(l, &lane));
            job.bounce();
        }
        Ok(())
    }

    fn spawn_lane(self: &Arc<Self>, key: Option<Arc<str>>) -> Arc<LaneHandle> {
        let handle = Arc::new(LaneHandle {
            key,
            queued: AtomicUsize::new(0),
            head_since: AtomicU64::new(0),
            inbox: Inbox::default(),
        });
        tokio::spawn(run_lane(Arc::clone(self), Arc::clone(&handle)));
        handle
    }

    /// Remove a lane that has nothing queued; false when a unit arrived meanwhile.
    fn retire_if_idle(&self, lane: &Arc<LaneHandle>) -> bool {
        let mut lanes = self.lanes();
        if lane.queued.load(Ordering::Relaxed) > 0 {
            return false;
        }
        lanes.retain(|l| !Arc::ptr_eq(l, lane));
        true
    }

    fn remove(&self, lane: &Arc<LaneHandle>) {
        self.lanes().retain(|l| !Arc::ptr_eq(l, lane));
    }
}

/// Why a lane ended early.
#[derive(Debug, thiserror::Error)]
enum LaneError {
    #[error("upstream i/o: {0}")]
    Io(std::io::Error),
    #[error("upstream closed the connection")]
    Closed,
    #[error("upstream protocol violation: {0}")]
    Protocol(String),
    #[error("the tenant context failed: {0}")]
    Context(String),
    #[error("a pipelined unit left the connection in transaction state {0:?}")]
    LeftOpen(char),
    #[error("the server ended the connection: {0}")]
    Fatal(String),
    #[error("the upstream now reads SQL text with {0}")]
    LexerChanged(String),
    #[error("no answer from the upstream within query_timeout")]
    TimedOut,
    #[error("could not prepare the connection: {0}")]
    Setup(String),
}

/// A client's unit in flight (boxed in the lane's queue): the replies to rlsgate's messages in front of it are swallowed
/// (`ctx` for the sequence discard and the context: Parse, Close, BindComplete,
/// CommandComplete; `prep` for the client's statements Parsed on this connection and evicted
/// ones Closed), then everything up to its ReadyForQuery goes to the client.
struct UnitRoute {
    job: Job,
    ctx: usize,
    prep: usize,
    /// Its `DISCARD SEQUENCES` is not confirmed yet (see `Lane::unconfirmed_discards`).
    discards: bool,
    /// A simple Query: no Sync of its own. Should one of rlsgate's messages in front of it
    /// fail, the server skips everything up to the next Sync (see `Lane::skip_behind_head`).
    bare_query: bool,
    /// Told that it runs (a cancel request for it wakes the lane).
    running: bool,
    /// In flight behind a unit a cancel was sent for: the cancel may land on this unit
    /// instead. Its replies are held until its end; if the cancel hit it, it runs again.
    at_risk: bool,
    /// The cancel meant for another unit hit this one.
    hit: bool,
    /// Replies held while `at_risk`.
    held: BytesMut,
    /// The statements this unit Parses or Closes in front of the client's messages: should one
    /// of those fail (or be cancelled), the server skips the rest, so whether each exists is
    /// unknown; they are retired (closed before they are prepared again).
    unsure: Vec<Arc<str>>,
}

struct Lane {
    pipes: Arc<Pipelines>,
    me: Arc<LaneHandle>,
    checkout: Checkout,
    cancel_target: CancelTarget,
    routes: VecDeque<Box<UnitRoute>>,
    units_in_flight: usize,
    out: BytesMut,
    input: BytesMut,
    /// A reported setting changed under the lane: take no more units; reset the connection
    /// before it goes back to the pool.
    retiring: bool,
    /// The head unit's client holds `REPLY_CAP` of replies: reading waits.
    blocked: bool,
    /// A cancel request on its way to the server: no unit is written until it is delivered
    /// (it must reach the unit it is for, or an idle backend, which ignores it).
    cancel_task: Option<tokio::task::JoinHandle<()>>,
    /// A unit taken from the queue while the lane was idle, written at the next step.
    next: Option<Job>,
    /// Units a cancel meant for another unit hit: written again first (they committed
    /// nothing: an error ends a unit's implicit transaction).
    again: VecDeque<Job>,
    /// Units in flight whose `DISCARD SEQUENCES` has not answered yet. It runs in the unit's
    /// implicit transaction, so its failure (a cancel or a statement timeout landing in it)
    /// makes the server skip that unit; a unit behind it of the same tenant must not count on
    /// it, so while one is unconfirmed every unit written brings its own.
    unconfirmed_discards: usize,
    /// Units were taken but not written yet (see `poll_step`).
    write_deferred: bool,
}

async fn run_lane(pipes: Arc<Pipelines>, me: Arc<LaneHandle>) {
    // (however the task ends, what is still queued goes back to its sessions)
    let _closer = InboxCloser(Arc::clone(&me));
    let checkout = match pipes.pool.checkout().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no upstream connection for a pipeline lane");
            // (no more units; the closer sends back what was queued)
            pipes.remove(&me);
            return;
        }
    };
    let mut checkout = checkout;
    if let Err(e) = Box::pin(prepare(checkout.conn(), me.key.as_ref())).await {
        tracing::warn!(error = %e, "could not prepare a connection for a pipeline lane");
        // (no more units; the closer sends back what was queued)
        pipes.remove(&me);
        return;
    }
    let cancel_target = pipes.pool.cancel_target(checkout.conn_ref());
    let input = std::mem::take(&mut checkout.conn().read_buf);
    tracing::debug!(server_id = checkout.conn_ref().id, "pipeline lane opened");
    let mut lane = Lane {
        pipes,
        me,
        checkout,
        cancel_target,
        routes: VecDeque::new(),
        units_in_flight: 0,
        out: BytesMut::new(),
        input,
        retiring: false,
        blocked: false,
        cancel_task: None,
        next: None,
        again: VecDeque::new(),
        unconfirmed_discards: 0,
        write_deferred: false,
    };
    let mut linger: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        match std::future::poll_fn(|cx| lane.poll_step(cx)).await {
            // nothing queued, nothing in flight
            Ok(()) if lane.retiring => {
                lane.pipes.remove(&lane.me);
                lane.bounce_queued();
                lane.close_clean();
                return;
            }
            Ok(()) => {
                let sleep = linger.get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
                sleep.as_mut().reset(tokio::time::Instant::now() + LINGER);
                let inbox = &lane.me.inbox;
                let next = tokio::select! {
                    biased;
                    job = std::future::poll_fn(|cx| inbox.poll_pop(cx)) => Some(job),
                    () = sleep.as_mut() => None,
                };
                match next {
                    Some(job) => lane.next = Some(job),
                    None if lane.pipes.retire_if_idle(&lane.me) => {
                        lane.close_clean();
                        return;
                    }
                    None => {}
                }
            }
            Err(e) => {
                lane.fail(e);
                return;
            }
        }
    }
}

/// `0A000 cached plan must not change result type` (see `session::relay`).
fn stale_plan(n: &be::ServerNotice) -> bool {
    n.code == sqlstate::FEATURE_NOT_SUPPORTED
        && n.message
            .starts_with("cached plan must not change result type")
}

/// `57014`: a cancel request landed (by the SQLSTATE alone: the message depends on the server's
/// `lc_messages`). A statement timeout has the same code: such a unit simply runs once more.
fn user_cancel(n: &be::ServerNotice) -> bool {
    n.code == sqlstate::QUERY_CANCELED
}

/// Give the connection the lane's settings (and close statements it evicted) before any unit.
async fn prepare(conn: &mut ServerConn, key: Option<&Arc<str>>) -> Result<(), LaneError> {
    let mut out = BytesMut::new();
    let mut readies = 0;
    let closes = conn.prepared.take_to_close();
    if !closes.is_empty() {
        for name in closes {
            fe::write_close(b'S', &name, &mut out).map_err(|e| LaneError::Setup(e.to_string()))?;
        }
        fe::write_sync(&mut out);
        readies += 1;
    }
    // A tenant context kept on the connection (see pool::Ambient) must not be under other
    // tenants' units: RESET ALL takes it off.
    let kept = conn.ambient != Ambient::Clear;
    if !conn.settings.matches(key) || kept {
        if conn.settings != HeldSettings::Defaults || kept {
            fe::write_query("RESET ALL", &mut out).map_err(|e| LaneError::Setup(e.to_string()))?;
            readies += 1;
        }
        if let Some(replay) = key {
            fe::write_query(replay, &mut out).map_err(|e| LaneError::Setup(e.to_string()))?;
            readies += 1;
        }
        conn.settings = HeldSettings::wanted(key);
    }
    if readies == 0 {
        return Ok(());
    }
    conn.stream.write_all(&out).await.map_err(LaneError::Io)?;
    conn.stream.flush().await.map_err(LaneError::Io)?;
    let mut failed = None;
    while readies > 0 {
        let Some(total) = frame_len(&conn.read_buf, MAX_SERVER_MESSAGE)
            .map_err(|e| LaneError::Protocol(e.to_string()))?
        else {
            conn.read_buf.reserve(READ_SPACE);
            if conn
                .stream
                .read_buf(&mut conn.read_buf)
                .await
                .map_err(LaneError::Io)?
                == 0
            {
                return Err(LaneError::Closed);
            }
            continue;
        };
        match conn.read_buf[0] {
            be::READY_FOR_QUERY => readies -= 1,
            be::ERROR_RESPONSE => {
                let n = be::notice_fields(&conn.read_buf[5..total]).unwrap_or_default();
                failed = Some(format!("{} {}", n.code, n.message));
            }
            _ => {}
        }
        conn.read_buf.advance(total);
    }
    match failed {
        Some(e) => {
            conn.settings = HeldSettings::Unknown;
            Err(LaneError::Setup(e))
        }
        None => {
            conn.ambient = Ambient::Clear;
            Ok(())
        }
    }
}

impl Lane {
    fn depth(&self) -> usize {
        self.pipes.depth
    }

    /// Units taken from the inbox that never ran go back to their sessions (those still in it
    /// go back as the lane's task ends: see `InboxCloser`).
    fn bounce_queued(&mut self) {
        let next = self.next.take();
        let again = std::mem::take(&mut self.again);
        for job in again.into_iter().chain(next) {
            self.me.queued.fetch_sub(1, Ordering::Relaxed);
            job.bounce();
        }
    }

    /// Take queued units (up to the depth), write, read, route replies; ready when nothing is
    /// queued or in flight (or the lane failed).
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LaneError>> {
        loop {
            let mut progress = false;
            if let Some(task) = self.cancel_task.as_mut()
                && Pin::new(task).poll(cx).is_ready()
            {
                self.cancel_task = None;
                progress = true;
            }
            self.maybe_cancel(cx.waker());
            let mut taken = 0;
            while !self.retiring
                && self.cancel_task.is_none()
                && self.units_in_flight < self.depth()
            {
                let job = match self.again.pop_front().or_else(|| self.next.take()) {
                    Some(job) => job,
                    None => match self.me.inbox.poll_pop(cx) {
                        Poll::Ready(job) => job,
                        Poll::Pending => break,
                    },
                };
                self.write_unit(job, cx.waker())?;
                taken += 1;
                progress = true;
            }
            // The server is still busy with earlier units: let the sessions that are ready run
            // first and add theirs, for one write (and one read on the server) for all of them.
            // Once per batch: the task is polled again at the back of the run queue.
            let defer = taken > 0 && !self.write_deferred && self.units_in_flight > taken;
            self.write_deferred = defer;
            if self
                .routes
                .iter()
                .any(|u| u.job.reply.timed_out.load(Ordering::Acquire))
            {
                return Poll::Ready(Err(LaneError::TimedOut));
            }
            let stream = &mut self.checkout.conn().stream;
            while !defer && !self.out.is_empty() {
                match Pin::new(&mut *stream).poll_write(cx, &self.out) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(LaneError::Io(
                            std::io::ErrorKind::WriteZero.into(),
                        )));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.out.advance(n);
                        progress = true;
                        if self.out.is_empty() {
                            // TLS holds bytes back until flushed
                            if let Poll::Ready(Err(e)) = Pin::new(&mut *stream).poll_flush(cx) {
                                return Poll::Ready(Err(LaneError::Io(e)));
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(LaneError::Io(e))),
                    Poll::Pending => break,
                }
            }
            if self.blocked
                && let Some(u) = self.routes.front()
                && u.job.reply.has_room(cx.waker())
            {
                self.blocked = false;
                progress = true;
            }
            if !self.blocked && !self.input.is_empty() {
                self.route(cx.waker())?;
                // (a unit that became the head may have a cancel waiting)
                self.maybe_cancel(cx.waker());
            }
            if !self.blocked && !self.routes.is_empty() {
                if self.input.capacity() - self.input.len() < READ_SPACE {
                    self.input.reserve(READ_SPACE * 4);
                }
                let stream = &mut self.checkout.conn().stream;
                match poll_read_buf(Pin::new(stream), cx, &mut self.input) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(LaneError::Closed)),
                    Poll::Ready(Ok(_)) => {
                        self.route(cx.waker())?;
                        self.maybe_cancel(cx.waker());
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(LaneError::Io(e))),
                    Poll::Pending => {}
                }
            }
            if defer {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.routes.is_empty()
                && self.out.is_empty()
                && self.cancel_task.is_none()
                && self.next.is_none()
                && self.again.is_empty()
                && !progress
            {
                return Poll::Ready(Ok(()));
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Write one unit: DISCARD SEQUENCES when the tenant changes, the context and the client's
    /// named statements (each Parsed first on a connection that lacks it), the client's messages.
    fn write_unit(&mut self, job: Job, waker: &Waker) -> Result<(), LaneError> {
        if job
            .statements
            .iter()
            .any(|p| self.pipes.pool.stale_after(&p.server_name, p.stamp))
        {
            // A migration changed a statement's result type since the session looked: the
            // session refuses it as Postgres would (0A000).
            self.me.queued.fetch_sub(1, Ordering::Relaxed);
            job.bounce();
            return Ok(());
        }
        let conn = self.checkout.conn();
        let set_local = !conn.may_set_config;
        if set_local && job.set_local.is_none() {
            // (the sessions send the SET LOCAL form from now on)
            self.pipes.set_local.store(true, Ordering::Relaxed);
            self.me.queued.fetch_sub(1, Ordering::Relaxed);
            job.bounce();
            return Ok(());
        }
        // (name, Parse, Bind + Execute, text length) of each context statement
        let set_config = (!set_local).then(|| {
            let c = &job.set_config;
            (&c.name, &c.parse, &c.run, c.text_len)
        });
        let context = || {
            set_config.into_iter().chain(
                job.set_local
                    .iter()
                    .flat_map(|l| l.iter())
                    .filter(move |_| set_local)
                    .map(|s| (&s.name, &s.parse, &s.run, s.text_len)),
            )
        };
        let protocol = |e: crate::protocol::ProtocolError| LaneError::Protocol(e.to_string());
        // Another tenant's sequence state (lastval(), currval()) must not show: discarded in
        // front of the unit, in its implicit transaction (should the discard fail, the server
        // skips the unit).
        // (a discard that failed left the connection's sequence state unknown: the next unit
        // brings one whatever its tenant, here or wherever the connection goes next)
        let mut discards = self.unconfirmed_discards > 0;
        discards |= conn.sequences.hand_to(&job.tenant);
        let discard = &self.pipes.discard;
        let discard = discards.then_some((
            &discard.name,
            &discard.parse,
            &discard.run,
            discard.text_len,
        ));
        let mut ctx = 0;
        let mut unsure = Vec::new();
        for (name, parse, _, text_len) in discard.into_iter().chain(context()) {
            if !conn.prepared.contains(name) {
                if conn.prepared.take_copy(name) {
                    fe::write_close(b'S', name, &mut self.out).map_err(protocol)?;
                    ctx += 1;
                }
                self.out.extend_from_slice(parse);
                conn.prepared.insert(Arc::clone(name), text_len, 0);
                unsure.push(Arc::clone(name));
                ctx += 1;
            }
        }
        for (_, _, run, _) in discard.into_iter().chain(context()) {
            self.out.extend_from_slice(run);
            // BindComplete, CommandComplete (a row and notices are swallowed too)
            ctx += 2;
        }
        if discards {
            self.unconfirmed_discards += 1;
        }
        let mut prep = 0;
        for statement in &job.statements {
            // Missing, or older than the client's prepare (it may predate a migration the
            // client has seen): prepared again, hidden.
            let name = &statement.server_name;
            if conn
                .prepared
                .stamp_of(name)
                .is_none_or(|copy| copy < statement.stamp)
            {
                if conn.prepared.take_copy(name) {
                    fe::write_close(b'S', name, &mut self.out).map_err(protocol)?;
                    prep += 1;
                }
                fe::write_parse(name, &statement.sql, &statement.param_types, &mut self.out)
                    .map_err(protocol)?;
                let stamp = self.pipes.pool.plan_tick();
                conn.prepared
                    .insert(Arc::clone(name), statement.sql.len(), stamp);
                unsure.push(Arc::clone(name));
                prep += 1;
            }
        }
        for name in conn.prepared.take_to_close() {
            fe::write_close(b'S', &name, &mut self.out).map_err(protocol)?;
            unsure.push(name);
            prep += 1;
        }
        self.out.extend_from_slice(&job.frames);
        let bare_query = job.frames.first() == Some(&fe::QUERY);
        // (a client's Parse of the unnamed statement replaced whatever was there)
        conn.unnamed_owner = None;
        self.routes.push_back(Box::new(UnitRoute {
            job,
            ctx,
            prep,
            discards,
            bare_query,
            running: false,
            at_risk: false,
            hit: false,
            held: BytesMut::new(),
            unsure,
        }));
        self.units_in_flight += 1;
        self.mark_head(waker);
        Ok(())
    }

    /// Send the cancel the head unit's client asked for. Postgres cancels whatever the backend
    /// runs when the request arrives (a backend waiting for input ignores it): if the head ends
    /// first, the cancel may land on a unit behind it. Those units are marked at risk: their
    /// replies are held until their end, and one the cancel hit runs again (it committed
    /// nothing). No unit is written until the request is delivered, so none written later is
    /// at risk.
    fn maybe_cancel(&mut self, waker: &Waker) {
        if self.cancel_task.is_some() {
            return;
        }
        let Some(head) = self.routes.front_mut() else {
            return;
        };
        if !head.running || !head.job.reply.cancel_wanted.load(Ordering::Acquire) {
            return;
        }
        head.job.reply.cancel_wanted.store(false, Ordering::Relaxed);
        if head.at_risk {
            // An earlier cancel for the unit ahead may land here too; either way this unit's
            // client asked for one: a 57014 is its answer now, not a reason to run it again.
            head.at_risk = false;
            let held = std::mem::take(&mut head.held);
            if !held.is_empty() {
                head.job.reply.deliver(&held, None, waker);
            }
        }
        for u in self.routes.iter_mut().skip(1) {
            u.at_risk = true;
        }
        let target = self.cancel_target.clone();
        self.cancel_task = Some(tokio::spawn(async move {
            let sent =
                tokio::time::timeout(Duration::from_secs(5), crate::cancel::send_cancel(&target))
                    .await;
            tracing::info!(
                backend_pid = target.pid,
                ok = matches!(sent, Ok(Ok(()))),
                "forwarded a cancel request to a pipeline lane"
            );
        }));
    }

    /// The unit at the head runs now: a cancel request for it wakes the lane, and the lane
    /// counts as slow once it has run `SLOW_HEAD_US`.
    fn mark_head(&mut self, waker: &Waker) {
        match self.routes.front_mut() {
            Some(u) if !u.running => {
                u.running = true;
                u.job.reply.running(waker);
                self.me
                    .head_since
                    .store(self.pipes.now_us(), Ordering::Relaxed);
            }
            Some(_) => {}
            None => self.me.head_since.store(0, Ordering::Relaxed),
        }
    }

    /// Hand every complete reply in the input to its unit's client.
    fn route(&mut self, waker: &Waker) -> Result<(), LaneError> {
        let mut pos = 0;
        // start of the run of frames going to the head unit's client
        let mut run_from: Option<usize> = None;
        let result = loop {
            let total = match frame_len(&self.input[pos..], MAX_SERVER_MESSAGE) {
                Ok(Some(n)) => n,
                Ok(None) => break Ok(()),
                Err(e) => break Err(LaneError::Protocol(e.to_string())),
            };
            let tag = self.input[pos];
            let frame = &self.input[pos..pos + total];
            let body = &frame[5..];
            let Some(u) = self.routes.front_mut() else {
                // asynchronous messages between units (a notice, a reported setting)
                if matches!(
                    tag,
                    be::NOTICE_RESPONSE | be::PARAMETER_STATUS | be::NOTIFICATION
                ) {
                    if tag == be::NOTIFICATION {
                        // (listening for someone else: see below)
                        self.retiring = true;
                    }
                    pos += total;
                    continue;
                }
                break Err(LaneError::Protocol(format!(
                    "unsolicited message {:?}",
                    tag as char
                )));
            };
            let error =
                (tag == be::ERROR_RESPONSE).then(|| be::notice_fields(body).unwrap_or_default());
            if let Some(n) = &error
                && matches!(n.severity.as_str(), "FATAL" | "PANIC")
            {
                break Err(LaneError::Fatal(format!("{} {}", n.code, n.message)));
            }
            let mut skip_behind = false;
            if let Some(n) = &error
                && (u.ctx > 0 || u.prep > 0)
            {
                // One of rlsgate's messages in front of the client's failed: the server skips
                // the rest of the unit up to its Sync (past a Query, up to the next Sync: see
                // `skip_behind_head`), so none of the client's statements ran, and whether the
                // statements this unit Parsed or Closed exist is unknown (they are closed
                // before they are prepared again).
                let in_context = u.ctx > 0;
                u.ctx = 0;
                u.prep = 0;
                skip_behind = u.bare_query;
                if std::mem::take(&mut u.discards) {
                    // (it may not have run)
                    self.unconfirmed_discards -= 1;
                    self.checkout.conn().sequences = crate::pool::SequenceOwner::Unknown;
                }
                let prepared = &mut self.checkout.conn().prepared;
                for name in u.unsure.drain(..) {
                    prepared.retire(&name);
                }
                // A cancel (the client's own, or one meant for the unit ahead: see `hit`)
                // may land in the context, and a client's statement may fail to Parse (e.g.
                // its table is gone): the client's error. Any other failure of the context
                // ends the lane (fail closed).
                if in_context && !user_cancel(n) {
                    break Err(LaneError::Context(format!("{} {}", n.code, n.message)));
                }
                tracing::debug!(code = %n.code, in_context, "a statement rlsgate runs in front of a unit failed; the server skips the unit");
            }
            if tag == be::NOTIFICATION {
                // A unit on a lane runs no LISTEN (session state): the connection listens for
                // someone else, out of the guard's sight. Not this client's to hear; the lane
                // takes no more units, and its connection is reset (DISCARD ALL, which
                // unlistens) before it is reused.
                if std::mem::replace(&mut self.retiring, true) {
                    tracing::debug!("dropped another notification on a retiring lane");
                } else {
                    tracing::warn!(
                        "dropped a notification on a shared connection; the lane retires and its connection is reset"
                    );
                }
                // (what came before it in the run goes now, as at the end of the input)
                if let Some(from) = run_from.take()
                    && pos > from
                    && !u.job.reply.deliver(&self.input[from..pos], None, waker)
                {
                    self.blocked = true;
                }
                pos += total;
                continue;
            }
            if u.at_risk && error.as_ref().is_some_and(user_cancel) {
                // the cancel meant for the unit ahead: the server skips this unit up to its
                // Sync; it runs again
                u.hit = true;
            }
            if u.ctx > 0 {
                match tag {
                    be::PARSE_COMPLETE
                    | be::BIND_COMPLETE
                    | be::CLOSE_COMPLETE
                    | be::COMMAND_COMPLETE => {
                        u.ctx -= 1;
                        if u.ctx == 0 && std::mem::take(&mut u.discards) {
                            self.unconfirmed_discards -= 1;
                        }
                    }
                    be::DATA_ROW | be::NOTICE_RESPONSE => {}
                    other => {
                        break Err(LaneError::Protocol(format!(
                            "unexpected message {:?} in reply to the tenant context",
                            other as char
                        )));
                    }
                }
                pos += total;
                continue;
            }
            if u.prep > 0 {
                match tag {
                    be::PARSE_COMPLETE | be::CLOSE_COMPLETE => u.prep -= 1,
                    be::NOTICE_RESPONSE => {}
                    other => {
                        break Err(LaneError::Protocol(format!(
                            "unexpected message {:?} in reply to a statement's Parse",
                            other as char
                        )));
                    }
                }
                pos += total;
                continue;
            }
            match tag {
                be::ERROR_RESPONSE => {
                    if let Some(n) = &error
                        && stale_plan(n)
                        && !u.job.statements.is_empty()
                    {
                        // A migration changed a statement's result type: this copy is retired
                        // (and, when the culprit is known, reported).
                        let prepared = &mut self.checkout.conn().prepared;
                        if let [only] = u.job.statements.as_slice() {
                            let copy = prepared.peek_stamp(&only.server_name).unwrap_or(0);
                            self.pipes.pool.plan_went_stale(&only.server_name, copy);
                        }
                        for statement in &u.job.statements {
                            prepared.retire(&statement.server_name);
                        }
                    }
                }
                be::PARAMETER_STATUS => {
                    let (k, v) = match be::parameter_status(body) {
                        Ok(kv) => kv,
                        Err(e) => break Err(LaneError::Protocol(e.to_string())),
                    };
                    if let Some(what) = crate::guard::policy::unexpected_lexer_report(k, v) {
                        break Err(LaneError::LexerChanged(what));
                    }
                    // A reported setting changed on a shared connection: no more units here;
                    // the connection is reset before it is reused.
                    self.retiring = true;
                }
                be::COPY_IN | be::COPY_BOTH => {
                    break Err(LaneError::Protocol(
                        "a pipelined unit started COPY FROM STDIN".into(),
                    ));
                }
                _ => {}
            }
            if u.at_risk {
                if !u.hit {
                    u.held.extend_from_slice(frame);
                }
                if u.held.len() >= REPLY_CAP && !u.hit {
                    // too much to hold: handed over (the unit can no longer run again)
                    u.at_risk = false;
                    let held = std::mem::take(&mut u.held);
                    u.job.reply.deliver(&held, None, waker);
                }
            } else if !u.hit {
                run_from.get_or_insert(pos);
            }
            if tag == be::READY_FOR_QUERY {
                let status = body.first().copied().unwrap_or(0);
                if status != b'I' {
                    break Err(LaneError::LeftOpen(status as char));
                }
                let Some(u) = self.routes.pop_front() else {
                    break Err(LaneError::Protocol("lost the unit in flight".into()));
                };
                self.units_in_flight -= 1;
                let UnitRoute { job, hit, held, .. } = *u;
                if hit {
                    tracing::debug!(
                        "a cancel meant for another unit hit this one; running it again"
                    );
                    self.pipes.reruns.fetch_add(1, Ordering::Relaxed);
                    self.again.push_back(job);
                } else {
                    let from = run_from.take().unwrap_or(pos);
                    let bytes = match held.is_empty() {
                        true => &self.input[from..pos + total],
                        false => &held[..],
                    };
                    job.reply.deliver(bytes, Some(Outcome::Done), waker);
                    self.me.queued.fetch_sub(1, Ordering::Relaxed);
                }
                self.mark_head(waker);
            }
            if skip_behind {
                self.skip_behind_head();
            }
            pos += total;
        };
        if let (Some(from), Some(u)) = (run_from, self.routes.front())
            && pos > from
            && !u.job.reply.deliver(&self.input[from..pos], None, waker)
        {
            self.blocked = true;
        }
        self.input.advance(pos);
        result
    }

    /// The head unit is a simple Query and one of rlsgate's messages in front of it failed (it
    /// had the error): the server now skips every message up to the next Sync. The units
    /// behind it up to the first one with a Sync of its own never run (that Sync's
    /// ReadyForQuery ends the head unit): they are written again. With no such unit in flight,
    /// a Sync of rlsgate's own ends the skipping.
    fn skip_behind_head(&mut self) {
        let mut synced = false;
        while !synced && self.routes.len() > 1 {
            let Some(v) = self.routes.remove(1) else {
                break;
            };
            synced = !v.bare_query;
            self.units_in_flight -= 1;
            let UnitRoute {
                job,
                discards,
                unsure,
                ..
            } = *v;
            if discards {
                self.unconfirmed_discards -= 1;
                self.checkout.conn().sequences = crate::pool::SequenceOwner::Unknown;
            }
            let prepared = &mut self.checkout.conn().prepared;
            for name in unsure {
                prepared.retire(&name);
            }
            self.pipes.reruns.fetch_add(1, Ordering::Relaxed);
            self.again.push_back(job);
        }
        if !synced {
            fe::write_sync(&mut self.out);
        }
        tracing::debug!("units skipped by the server behind a failed one are written again");
    }

    /// The lane cannot go on: units in flight get an error, queued ones go back to their
    /// sessions, the connection is closed.
    fn fail(mut self, e: LaneError) {
        tracing::warn!(error = %e, server_id = self.checkout.conn_ref().id, "pipeline lane failed; closing its upstream connection");
        self.pipes.remove(&self.me);
        let err = ClientError::error(
            sqlstate::CONNECTION_FAILURE,
            "rlsgate: the shared upstream connection running this statement failed; it may or may not have committed",
        )
        .with_detail(e.to_string());
        // the unit that changed how the server reads text ends its session
        let mut culprit = match &e {
            LaneError::LexerChanged(what) => Some(what.clone()),
            _ => None,
        };
        for u in self.routes.drain(..) {
            {
                u.job.reply.end(match culprit.take() {
                    Some(what) => Outcome::LexerChanged(what),
                    None => Outcome::Failed(err.clone()),
                });
            }
        }
        self.bounce_queued();
        // dropping the checkout closes the connection
    }

    /// Nothing in flight: the connection goes back to the pool (reset first if a reported
    /// setting changed under it).
    fn close_clean(mut self) {
        let input = std::mem::take(&mut self.input);
        let conn = self.checkout.conn();
        conn.read_buf = input;
        conn.read_buf.clear();
        if self.retiring {
            conn.settings = HeldSettings::Unknown;
            conn.dirty_session = true;
        }
        tracing::debug!(server_id = conn.id, "pipeline lane closed");
        self.checkout.release();
    }
}
