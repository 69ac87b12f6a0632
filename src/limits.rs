//! Per-tenant limits against noisy neighbours: client connections, concurrent transactions (a
//! fair share of the pool), server connections pinned by session state, and a transaction rate.
//! Excess transactions get an error at once or wait up to `checkout_timeout`, as configured; a
//! pin over the cap is refused at once (a pinned connection is not given back until its client
//! leaves, so waiting would rarely help).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{LimitsConfig, OnLimit};
use crate::error::{ClientError, sqlstate};

struct TenantState {
    clients: usize,
    transactions: Arc<Semaphore>,
    /// Server connections pinned to this tenant's clients.
    pinned: usize,
    tokens: f64,
    refilled: Instant,
}

impl TenantState {
    fn unused(&self) -> bool {
        self.clients == 0 && self.pinned == 0 && Arc::strong_count(&self.transactions) == 1
    }
}

pub struct Limits {
    cfg: LimitsConfig,
    /// Resolved from the config and the pool size (0 = unlimited).
    max_transactions: usize,
    max_pinned: usize,
    /// (foldhash: looked up twice per transaction; tenant names come from verified tokens)
    tenants: Mutex<HashMap<String, TenantState, foldhash::fast::RandomState>>,
}

/// A client slot of a tenant; released on drop.
pub struct ClientSlot {
    limits: Arc<Limits>,
    /// (the identity's: one copy per client)
    tenant: Arc<str>,
    /// The tenant's concurrent-transaction semaphore, the same for all its clients while any
    /// is connected (its entry stays as long as a slot does): taken per transaction without the
    /// map's lock. `None` once dropping.
    transactions: Option<Arc<Semaphore>>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        // (the entry goes with the last reference to its semaphore: not this one's)
        drop(self.transactions.take());
        if let Ok(mut t) = self.limits.tenants.lock()
            && let Some(s) = t.get_mut(&*self.tenant)
        {
            s.clients = s.clients.saturating_sub(1);
            if s.unused() {
                t.remove(&*self.tenant);
            }
        }
    }
}

/// A server connection pinned to one of a tenant's clients; released on drop (the client left).
pub struct PinSlot {
    limits: Arc<Limits>,
    tenant: String,
}

impl Drop for PinSlot {
    fn drop(&mut self) {
        if let Ok(mut t) = self.limits.tenants.lock()
            && let Some(s) = t.get_mut(&*self.tenant)
        {
            s.pinned = s.pinned.saturating_sub(1);
            if s.unused() {
                t.remove(&*self.tenant);
            }
        }
    }
}

/// A pin refused: the tenant already holds `cap` pinned connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinLimit {
    pub cap: usize,
}

impl Limits {
    /// Limits for a pool of `pool_size` connections (unset caps default to a share of it).
    pub fn new(cfg: LimitsConfig, pool_size: usize) -> Arc<Limits> {
        Arc::new(Limits {
            max_transactions: cfg.transactions_cap(pool_size),
            max_pinned: cfg.pinned_cap(pool_size),
            cfg,
            tenants: Mutex::new(HashMap::default()),
        })
    }

    /// Concurrent transactions per tenant in force (0 = unlimited).
    pub fn max_transactions(&self) -> usize {
        self.max_transactions
    }

    /// Pinned server connections per tenant in force (0 = unlimited).
    pub fn max_pinned(&self) -> usize {
        self.max_pinned
    }

    fn state<'a>(
        &self,
        map: &'a mut HashMap<String, TenantState, foldhash::fast::RandomState>,
        tenant: &str,
    ) -> &'a mut TenantState {
        // A key is allocated only for a tenant seen for the first time, not per transaction.
        if !map.contains_key(tenant) {
            map.insert(tenant.to_string(), self.new_state());
        }
        map.get_mut(tenant)
            .expect("the tenant's state was inserted above")
    }

    fn new_state(&self) -> TenantState {
        TenantState {
            clients: 0,
            transactions: Arc::new(Semaphore::new(if self.max_transactions == 0 {
                Semaphore::MAX_PERMITS
            } else {
                self.max_transactions
            })),
            pinned: 0,
            tokens: self.cfg.transaction_rate_per_tenant.max(1) as f64,
            refilled: Instant::now(),
        }
    }

    /// A tenant's new client; FATAL 53300 over `max_clients_per_tenant`.
    pub fn join(self: &Arc<Self>, tenant: &Arc<str>) -> Result<ClientSlot, ClientError> {
        let mut map = self.tenants.lock().map_err(|_| ClientError::internal(0))?;
        let max = self.cfg.max_clients_per_tenant;
        let s = self.state(&mut map, tenant);
        if max > 0 && s.clients >= max {
            return Err(ClientError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!("too many connections for tenant \"{tenant}\" (limit {max})"),
            ));
        }
        s.clients += 1;
        Ok(ClientSlot {
            limits: Arc::clone(self),
            tenant: Arc::clone(tenant),
            transactions: Some(Arc::clone(&s.transactions)),
        })
    }

    /// Before a transaction of `client`'s takes a pool connection: the tenant's rate and
    /// concurrency limits. The permit is held while the connection is.
    pub async fn begin_transaction(
        &self,
        client: &ClientSlot,
        wait: Duration,
    ) -> Result<Option<OwnedSemaphorePermit>, ClientError> {
        let tenant = &*client.tenant;
        let rate = self.cfg.transaction_rate_per_tenant;
        // (the clock is read only when a limit is configured)
        let started = (rate > 0).then(Instant::now);
        if let Some(started) = started {
            let deadline = started + wait;
            loop {
                let delay = {
                    let mut map = self.tenants.lock().map_err(|_| ClientError::internal(0))?;
                    let s = self.state(&mut map, tenant);
                    let now = Instant::now();
                    s.tokens = (s.tokens
                        + now.duration_since(s.refilled).as_secs_f64() * rate as f64)
                        .min(rate as f64);
                    s.refilled = now;
                    if s.tokens >= 1.0 {
                        s.tokens -= 1.0;
                        None
                    } else {
                        Some(Duration::from_secs_f64((1.0 - s.tokens) / rate as f64))
                    }
                };
                let Some(delay) = delay else { break };
                if self.cfg.on_limit == OnLimit::Error || Instant::now() + delay > deadline {
                    return Err(limit_error(format!(
                        "tenant \"{tenant}\" is over its transaction rate ({rate}/s)"
                    )));
                }
                tokio::time::sleep(delay).await;
            }
        }
        if self.max_transactions == 0 {
            return Ok(None);
        }
        let Some(sem) = &client.transactions else {
            return Err(ClientError::internal(0));
        };
        let permit = match (Arc::clone(sem).try_acquire_owned(), self.cfg.on_limit) {
            (Ok(permit), _) => Some(permit),
            (Err(_), OnLimit::Error) => None,
            (Err(_), OnLimit::Wait) => {
                let left = started.map_or(wait, |s| wait.saturating_sub(s.elapsed()));
                tokio::time::timeout(left, Arc::clone(sem).acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        };
        permit.map(Some).ok_or_else(|| {
            limit_error(format!(
                "tenant \"{tenant}\" has {} transactions running (max_transactions_per_tenant)",
                self.max_transactions
            ))
        })
    }

    /// [`Limits::begin_transaction`] when it need not wait or refuse: no rate limit, and a free
    /// slot under `max_transactions_per_tenant` (or none configured). `None` = take the waiting
    /// way.
    pub fn try_begin_transaction(
        &self,
        client: &ClientSlot,
    ) -> Option<Option<OwnedSemaphorePermit>> {
        if self.cfg.transaction_rate_per_tenant > 0 {
            return None;
        }
        if self.max_transactions == 0 {
            return Some(None);
        }
        let sem = client.transactions.as_ref()?;
        Arc::clone(sem).try_acquire_owned().ok().map(Some)
    }

    /// Before a client's statement pins a server connection: count the pin against the tenant's
    /// `max_pinned_per_tenant`, or refuse it. Checked and counted under one lock, so concurrent
    /// clients of a tenant cannot overshoot the cap. The slot is held while the pin is.
    pub fn try_pin(self: &Arc<Self>, tenant: &str) -> Result<PinSlot, PinLimit> {
        let mut map = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let max = self.max_pinned;
        let s = self.state(&mut map, tenant);
        if max > 0 && s.pinned >= max {
            return Err(PinLimit { cap: max });
        }
        s.pinned += 1;
        Ok(PinSlot {
            limits: Arc::clone(self),
            tenant: tenant.to_string(),
        })
    }

    /// Server connections pinned to the tenant's clients now.
    pub fn pinned(&self, tenant: &str) -> usize {
        self.tenants
            .lock()
            .ok()
            .and_then(|t| t.get(tenant).map(|s| s.pinned))
            .unwrap_or(0)
    }
}

fn limit_error(message: String) -> ClientError {
    ClientError::error(
        sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
        format!("rlsgate: {message}"),
    )
    .with_hint("retry later; the limits are in [limits]")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_pinned: Option<usize>, pool_size: usize) -> Arc<Limits> {
        Limits::new(
            LimitsConfig {
                max_pinned_per_tenant: max_pinned,
                ..LimitsConfig::default()
            },
            pool_size,
        )
    }

    #[test]
    fn pins_are_capped_per_tenant_and_released_on_drop() {
        let l = limits(None, 8); // default: a quarter of the pool
        assert_eq!(l.max_pinned(), 2);
        assert_eq!(l.max_transactions(), 6);
        let a1 = l.try_pin("a").expect("first pin");
        let _a2 = l.try_pin("a").expect("second pin");
        assert_eq!(l.try_pin("a").err(), Some(PinLimit { cap: 2 }));
        assert_eq!(l.pinned("a"), 2);
        let _b = l.try_pin("b").expect("another tenant is not affected");
        drop(a1);
        assert_eq!(l.pinned("a"), 1);
        let _a3 = l.try_pin("a").expect("a pin was released");
    }

    /// A tenant's clients share one transaction cap, whichever slot they take it through, and the
    /// tenant's state goes with its last client.
    #[tokio::test]
    async fn clients_of_a_tenant_share_its_transaction_cap() {
        let l = Limits::new(
            LimitsConfig {
                max_transactions_per_tenant: Some(2),
                on_limit: OnLimit::Error,
                ..LimitsConfig::default()
            },
            8,
        );
        let wait = Duration::from_millis(10);
        let (a1, a2, b) = (
            l.join(&"a".into()).unwrap(),
            l.join(&"a".into()).unwrap(),
            l.join(&"b".into()).unwrap(),
        );
        let p1 = l.begin_transaction(&a1, wait).await.unwrap();
        let p2 = l.begin_transaction(&a2, wait).await.unwrap();
        assert!(p1.is_some() && p2.is_some());
        let Err(refused) = l.begin_transaction(&a1, wait).await else {
            panic!("over the cap");
        };
        assert!(
            refused.to_string().contains("max_transactions_per_tenant"),
            "{refused}"
        );
        assert!(
            l.begin_transaction(&b, wait).await.unwrap().is_some(),
            "another tenant"
        );
        drop(p1);
        let p3 = l.begin_transaction(&a2, wait).await.unwrap();
        // a client leaving while its tenant still runs transactions: the state stays
        drop((a1, a2, b));
        assert_eq!(l.tenants.lock().unwrap().len(), 1);
        let a = l.join(&"a".into()).unwrap();
        assert!(
            l.begin_transaction(&a, wait).await.is_err(),
            "the same cap: 2 running"
        );
        drop((p2, p3, a));
        assert!(l.tenants.lock().unwrap().is_empty());
    }

    #[test]
    fn zero_means_unlimited_pins_and_state_is_forgotten() {
        let l = limits(Some(0), 4);
        let pins: Vec<_> = (0..50)
            .map(|_| l.try_pin("a").expect("unlimited"))
            .collect();
        assert_eq!(l.pinned("a"), 50);
        drop(pins);
        assert_eq!(l.pinned("a"), 0);
        assert!(l.tenants.lock().unwrap().is_empty());
    }
}
