//! Who is connected: one entry per logged-in client (for the admin console's SHOW CLIENTS,
//! SHOW TENANTS and KILL), plus per-tenant counters. Bounded: entries live as long as clients.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

/// Most tenants with their own counters; more are counted under "other".
const MAX_TENANT_STATS: usize = 10_000;

pub const STATE_IDLE: u8 = 0;
pub const STATE_ACTIVE: u8 = 1;
pub const STATE_WAITING: u8 = 2;

pub struct ClientEntry {
    pub conn_id: u64,
    /// (the identity's: one copy per client)
    pub tenant: std::sync::Arc<str>,
    pub user: String,
    /// (formatted when shown: most clients are never listed)
    pub peer: std::net::SocketAddr,
    pub since: SystemTime,
    pub state: AtomicU8,
    /// Upstream connection currently held (0 = none).
    pub server_id: AtomicU64,
    /// Set by the admin console's KILL.
    pub killed: AtomicBool,
    /// When the client's token expires, leeway included (seconds since the Unix epoch).
    pub expires_at: AtomicU64,
    /// Wakes the session to look at `killed`, its token's expiry and rlsgate's shutdown. One
    /// per client instead of a timer and two cancellation futures: an idle session waits on its
    /// socket and this alone.
    pub wake: Wake,
    /// How long the client has been quiet, on the registry's clock (see [`Quiet`]).
    pub quiet: Quiet,
}

/// How long a client has said nothing, counted in ticks of the registry's clock (once a
/// second): a client quiet for a whole tick is asked to rest (its session shrinks to what it
/// needs between transactions, see `Session::park`). No timer per session: the tick that already
/// looks for expired tokens moves the mark, the session clears it when its client speaks.
#[derive(Default)]
pub struct Quiet(AtomicU8);

impl Quiet {
    /// The client spoke since the last tick.
    const HEARD: u8 = 0;
    /// A tick passed without a word.
    const ONE_TICK: u8 = 1;
    /// A whole tick passed without a word: the session was asked to rest (once per quiet spell).
    const RESTING: u8 = 2;

    /// The client spoke (a load, and a store only at the first word after a quiet spell).
    pub fn heard(&self) {
        if self.0.load(Ordering::Relaxed) != Self::HEARD {
            self.0.store(Self::HEARD, Ordering::Relaxed);
        }
    }

    /// The session may rest now (asked to, and nothing was heard since).
    pub fn resting(&self) -> bool {
        self.0.load(Ordering::Relaxed) == Self::RESTING
    }

    /// The session rests: the clock leaves it alone.
    pub fn parked(&self) {
        self.0.store(Self::RESTING, Ordering::Relaxed);
    }

    /// The session woke from its rest: if nothing comes from the client (a wake-up with nothing
    /// to read), the next tick sends it back to rest.
    pub fn resumed(&self) {
        self.0.store(Self::ONE_TICK, Ordering::Relaxed);
    }

    /// A tick of the registry's clock: `true` = the client has been quiet for a whole tick (wake
    /// its session to rest).
    fn tick(&self) -> bool {
        match self.0.load(Ordering::Relaxed) {
            Self::HEARD => {
                // (a word heard meanwhile wins: it stores HEARD after this)
                let _ = self.0.compare_exchange(
                    Self::HEARD,
                    Self::ONE_TICK,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                false
            }
            Self::ONE_TICK => self
                .0
                .compare_exchange(
                    Self::ONE_TICK,
                    Self::RESTING,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok(),
            _ => false,
        }
    }
}

/// A wake-up call for one session: cheaper to wait on than tokio's `Notify` (no lock to take
/// and release on every wait of the session loop, which waits several times per transaction).
#[derive(Default)]
pub struct Wake {
    woken: AtomicBool,
    waker: AtomicWaker,
}

impl Wake {
    /// Wake the session (now if it waits, else at its next wait).
    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once after each [`Wake::wake`]. The caller then reads what it was woken for (the
    /// flags are the truth; a wake-up only makes the session look).
    pub fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        // registered before the flag is read: a wake() in between wakes this waker
        self.waker.register(cx.waker());
        if self.woken.load(Ordering::Acquire) {
            self.woken.store(false, Ordering::Relaxed);
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl ClientEntry {
    /// Ask the session to end (admin console KILL).
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.wake.wake();
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// The client's token (leeway included) has expired at `now` (seconds since the Unix epoch).
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.load(Ordering::Relaxed) < now
    }
}

#[derive(Default, Clone, Copy)]
pub struct TenantStats {
    pub transactions: u64,
    pub denials: u64,
}

#[derive(Default)]
pub struct Registry {
    clients: Mutex<HashMap<u64, Arc<ClientEntry>>>,
    /// Most clients at once since [`Registry::take_peak`] last ran.
    peak: AtomicUsize,
    /// (foldhash: looked up per transaction; tenant names come from verified tokens)
    tenants: Mutex<HashMap<String, TenantStats, foldhash::fast::RandomState>>,
}

/// Removes the entry when the session ends.
pub struct Registration {
    registry: Arc<Registry>,
    pub entry: Arc<ClientEntry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut c) = self.registry.clients.lock() {
            c.remove(&self.entry.conn_id);
        }
    }
}

impl Registry {
    pub fn register(
        self: &Arc<Self>,
        conn_id: u64,
        tenant: &std::sync::Arc<str>,
        user: String,
        peer: std::net::SocketAddr,
        expires_at: u64,
    ) -> Registration {
        let entry = Arc::new(ClientEntry {
            conn_id,
            tenant: std::sync::Arc::clone(tenant),
            user,
            peer,
            since: SystemTime::now(),
            state: AtomicU8::new(STATE_IDLE),
            server_id: AtomicU64::new(0),
            killed: AtomicBool::new(false),
            expires_at: AtomicU64::new(expires_at),
            wake: Wake::default(),
            quiet: Quiet::default(),
        });
        if let Ok(mut c) = self.clients.lock() {
            c.insert(conn_id, Arc::clone(&entry));
            self.peak.fetch_max(c.len(), Ordering::Relaxed);
        }
        Registration {
            registry: Arc::clone(self),
            entry,
        }
    }

    /// Most clients at once since the last call (clients that came and went between two calls
    /// count too); starts the next period at the current count.
    pub fn take_peak(&self) -> usize {
        let now = self.count();
        self.peak.swap(now, Ordering::Relaxed).max(now)
    }

    /// Logged-in clients now.
    pub fn count(&self) -> usize {
        self.clients.lock().map(|c| c.len()).unwrap_or(0)
    }

    pub fn clients(&self) -> Vec<Arc<ClientEntry>> {
        let mut v: Vec<_> = self
            .clients
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|e| e.conn_id);
        v
    }

    /// Disconnect every client of a tenant; returns how many.
    pub fn kill_tenant(&self, tenant: &str) -> usize {
        let victims: Vec<_> = self
            .clients()
            .into_iter()
            .filter(|e| &*e.tenant == tenant)
            .collect();
        for v in &victims {
            v.kill();
        }
        victims.len()
    }

    /// The registry's clock, called once a second: wake every session whose token has expired
    /// (`now` in seconds since the Unix epoch; an idle session ends then, see `Session::serve`)
    /// and every session whose client has been quiet for a whole tick (it rests then).
    pub fn tick(&self, now: u64) {
        // (both looked at: the quiet mark moves on every tick)
        self.wake_where(|e| e.quiet.tick() | e.expired(now));
    }

    /// Wake every session (rlsgate is shutting down: idle ones end now).
    pub fn wake_all(&self) {
        self.wake_where(|_| true);
    }

    fn wake_where(&self, pick: impl Fn(&ClientEntry) -> bool) {
        if let Ok(c) = self.clients.lock() {
            for e in c.values().filter(|e| pick(e)) {
                e.wake.wake();
            }
        }
    }

    fn bump(&self, tenant: &str, f: impl FnOnce(&mut TenantStats)) {
        let Ok(mut t) = self.tenants.lock() else {
            return;
        };
        // (a key is allocated only for a tenant seen for the first time, not per transaction)
        if let Some(stats) = t.get_mut(tenant) {
            return f(stats);
        }
        let key = if t.len() < MAX_TENANT_STATS {
            tenant
        } else {
            "other"
        };
        f(t.entry(key.to_string()).or_default());
    }

    pub fn transaction(&self, tenant: &str) {
        self.bump(tenant, |s| s.transactions += 1);
    }

    pub fn denial(&self, tenant: &str) {
        self.bump(tenant, |s| s.denials += 1);
    }

    /// (tenant, connected clients, stats), by tenant name.
    pub fn tenants(&self) -> Vec<(String, usize, TenantStats)> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for c in self.clients() {
            *counts.entry(c.tenant.to_string()).or_default() += 1;
        }
        let stats = self.tenants.lock().map(|t| t.clone()).unwrap_or_default();
        let mut names: Vec<String> = counts.keys().chain(stats.keys()).cloned().collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|n| {
                let c = counts.get(&n).copied().unwrap_or(0);
                let s = stats.get(&n).copied().unwrap_or_default();
                (n, c, s)
            })
            .collect()
    }

    pub fn state_name(state: u8) -> &'static str {
        match state {
            STATE_ACTIVE => "active",
            STATE_WAITING => "waiting",
            _ => "idle",
        }
    }

    pub fn set_state(entry: &ClientEntry, state: u8, server_id: u64) {
        entry.state.store(state, Ordering::Relaxed);
        entry.server_id.store(server_id, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake as TaskWake, Waker};

    struct Counter(AtomicUsize);

    impl TaskWake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A wake-up is never lost: one that comes before the wait makes the wait ready, one that
    /// comes during the wait wakes the waiter, and each is seen once.
    #[test]
    fn a_wake_up_is_seen_once_whether_it_comes_before_or_during_the_wait() {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        let wake = Wake::default();
        assert!(wake.poll_woken(&mut cx).is_pending());
        wake.wake();
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "the waiting task is woken"
        );
        assert!(wake.poll_woken(&mut cx).is_ready());
        assert!(wake.poll_woken(&mut cx).is_pending(), "seen once");
        // before the next wait: kept for it
        wake.wake();
        assert!(wake.poll_woken(&mut cx).is_ready());
        assert!(wake.poll_woken(&mut cx).is_pending());
    }
}
