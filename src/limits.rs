//! Per-tenant limits against noisy neighbours: client connections, concurrent transactions (a
//! fair share of the pool), and a transaction rate. Excess gets an error at once or waits up to
//! `checkout_timeout`, as configured.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{LimitsConfig, OnLimit};
use crate::error::{ClientError, sqlstate};

struct TenantState {
    clients: usize,
    transactions: Arc<Semaphore>,
    tokens: f64,
    refilled: Instant,
}

pub struct Limits {
    cfg: LimitsConfig,
    tenants: Mutex<HashMap<String, TenantState>>,
}

/// A client slot of a tenant; released on drop.
pub struct ClientSlot {
    limits: Arc<Limits>,
    tenant: String,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut t) = self.limits.tenants.lock()
            && let Some(s) = t.get_mut(&self.tenant)
        {
            s.clients = s.clients.saturating_sub(1);
            if s.clients == 0 && Arc::strong_count(&s.transactions) == 1 {
                t.remove(&self.tenant);
            }
        }
    }
}

impl Limits {
    pub fn new(cfg: LimitsConfig) -> Arc<Limits> {
        Arc::new(Limits {
            cfg,
            tenants: Mutex::new(HashMap::new()),
        })
    }

    fn state<'a>(
        &self,
        map: &'a mut HashMap<String, TenantState>,
        tenant: &str,
    ) -> &'a mut TenantState {
        map.entry(tenant.to_string())
            .or_insert_with(|| TenantState {
                clients: 0,
                transactions: Arc::new(Semaphore::new(
                    if self.cfg.max_transactions_per_tenant == 0 {
                        Semaphore::MAX_PERMITS
                    } else {
                        self.cfg.max_transactions_per_tenant
                    },
                )),
                tokens: self.cfg.transaction_rate_per_tenant.max(1) as f64,
                refilled: Instant::now(),
            })
    }

    /// A tenant's new client; FATAL 53300 over `max_clients_per_tenant`.
    pub fn join(self: &Arc<Self>, tenant: &str) -> Result<ClientSlot, ClientError> {
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
            tenant: tenant.to_string(),
        })
    }

    /// Before a transaction takes a pool connection: the tenant's rate and concurrency limits.
    /// The permit is held while the connection is.
    pub async fn begin_transaction(
        &self,
        tenant: &str,
        wait: Duration,
    ) -> Result<Option<OwnedSemaphorePermit>, ClientError> {
        let deadline = Instant::now() + wait;
        let rate = self.cfg.transaction_rate_per_tenant;
        if rate > 0 {
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
        if self.cfg.max_transactions_per_tenant == 0 {
            return Ok(None);
        }
        let sem = {
            let mut map = self.tenants.lock().map_err(|_| ClientError::internal(0))?;
            Arc::clone(&self.state(&mut map, tenant).transactions)
        };
        let permit = match self.cfg.on_limit {
            OnLimit::Error => sem.try_acquire_owned().ok(),
            OnLimit::Wait => tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()),
                sem.acquire_owned(),
            )
            .await
            .ok()
            .and_then(Result::ok),
        };
        permit.map(Some).ok_or_else(|| {
            limit_error(format!(
                "tenant \"{tenant}\" has {} transactions running (max_transactions_per_tenant)",
                self.cfg.max_transactions_per_tenant
            ))
        })
    }
}

fn limit_error(message: String) -> ClientError {
    ClientError::error(
        sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
        format!("rlsgate: {message}"),
    )
    .with_hint("retry later; the limits are in [limits]")
}
