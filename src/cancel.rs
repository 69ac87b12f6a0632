//! Cancel keys: rlsgate hands each client its own (pid, key) and maps it to the upstream backend
//! serving that client *right now*. A cancel never reaches a backend that has since moved on to
//! another client: releasing a connection waits for any cancel in flight for it. Nor does it
//! reach rlsgate's own statements run ahead of the client's (the sequence discard, the settings
//! reset and replay): the statements behind one that a cancel failed would run on the previous
//! client's state, so a cancel waits until they are done.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, RwLock};

use crate::pipeline::Reply;
use crate::pool::CancelTarget;

const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// Where a client's cancel goes.
#[derive(Clone)]
enum Target {
    /// The backend of the connection the client holds.
    Server(CancelTarget),
    /// That backend, still running rlsgate's own statements ahead of the client's: a cancel
    /// waits (see [`CancelSlot::hold`]).
    Held(CancelTarget),
    /// The client's unit on a shared, pipelined connection: its lane knows when it runs.
    Pipelined(Arc<Reply>),
}

#[derive(Default)]
pub struct CancelSlot {
    target: Mutex<Option<Target>>,
    /// Cancels hold it shared while they are delivered; release takes it exclusively.
    gate: RwLock<()>,
    /// A held target was released or cleared (cancels waiting on it look again).
    changed: Notify,
}

impl CancelSlot {
    pub fn set(&self, target: CancelTarget) {
        if let Ok(mut t) = self.target.lock() {
            *t = Some(Target::Server(target));
        }
    }

    /// rlsgate's own statements now run ahead of the client's: cancels wait until
    /// [`CancelSlot::release_hold`].
    pub fn hold(&self) {
        if let Ok(mut t) = self.target.lock()
            && let Some(Target::Server(target)) = &*t
        {
            *t = Some(Target::Held(target.clone()));
        }
    }

    /// rlsgate's own statements are done: the client's run now.
    pub fn release_hold(&self) {
        if let Ok(mut t) = self.target.lock()
            && let Some(Target::Held(target)) = &*t
        {
            *t = Some(Target::Server(target.clone()));
            self.changed.notify_waiters();
        }
    }

    /// The client's unit runs on a pipeline lane (see [`crate::pipeline`]).
    pub fn set_pipelined(&self, reply: Arc<Reply>) {
        if let Ok(mut t) = self.target.lock() {
            *t = Some(Target::Pipelined(reply));
        }
    }

    /// Forget the backend; waits until no cancel for it is still being delivered.
    pub async fn clear(&self) {
        // No cancel in flight (the usual case): the gate is taken at once. Waiting is boxed:
        // the lock's future would size every session's future, also while the client is idle.
        let _exclusive = match self.gate.try_write() {
            Ok(exclusive) => exclusive,
            Err(_) => Box::pin(self.gate.write()).await,
        };
        if let Ok(mut t) = self.target.lock()
            && let Some(Target::Held(_)) = t.take()
        {
            self.changed.notify_waiters();
        }
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
}

/// Removes the client's key from the registry when the client goes away.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub key: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.registry.slots.lock() {
            slots.remove(&(self.pid, self.key));
        }
    }
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>) -> Registration {
        let slot = Arc::new(CancelSlot::default());
        loop {
            let pid = rand::random::<i32>() & 0x7fff_ffff;
            let key = rand::random::<i32>();
            let Ok(mut slots) = self.slots.lock() else {
                continue;
            };
            if slots.contains_key(&(pid, key)) || pid == 0 {
                continue;
            }
            slots.insert((pid, key), Arc::clone(&slot));
            return Registration {
                registry: Arc::clone(self),
                pid,
                key,
                slot,
            };
        }
    }

    /// Handle a CancelRequest: unknown keys are ignored silently, as Postgres does.
    pub async fn cancel(&self, pid: i32, key: &[u8]) {
        let Ok(key) = <[u8; 4]>::try_from(key) else {
            return;
        };
        let key = i32::from_be_bytes(key);
        let slot = self
            .slots
            .lock()
            .ok()
            .and_then(|s| s.get(&(pid, key)).cloned());
        let Some(slot) = slot else {
            tracing::debug!("cancel request with an unknown key ignored");
            return;
        };
        loop {
            // (registered before looking, so a release in between is not missed)
            let changed = slot.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            {
                let _shared = slot.gate.read().await;
                let target = slot.target.lock().ok().and_then(|t| t.clone());
                match target {
                    Some(Target::Server(target)) => {
                        forward(&target).await;
                        return;
                    }
                    Some(Target::Pipelined(reply)) => {
                        // (its lane sends it when that is safe: see `Reply::request_cancel`)
                        reply.request_cancel();
                        return;
                    }
                    Some(Target::Held(_)) => {}
                    None => return,
                }
            }
            // rlsgate's own statements run (usually well under a millisecond)
            if tokio::time::timeout(Duration::from_secs(5), changed)
                .await
                .is_err()
            {
                tracing::warn!(
                    "a cancel request waited too long for rlsgate's own statements; dropped"
                );
                return;
            }
        }
    }
}

async fn forward(target: &CancelTarget) {
    match tokio::time::timeout(Duration::from_secs(5), send_cancel(target)).await {
        Ok(Ok(())) => tracing::info!(backend_pid = target.pid, "forwarded cancel request"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not forward cancel request"),
        Err(_) => tracing::warn!("forwarding a cancel request timed out"),
    }
}

pub(crate) async fn send_cancel(target: &CancelTarget) -> std::io::Result<()> {
    let mut stream = TcpStream::connect((&*target.host, target.port)).await?;
    let mut msg = BytesMut::with_capacity(16 + target.key.len());
    msg.put_i32(12 + target.key.len() as i32);
    msg.put_i32(CANCEL_REQUEST_CODE);
    msg.put_i32(target.pid);
    msg.put_slice(&target.key);
    stream.write_all(&msg).await?;
    // The server closes the connection once it has processed the request.
    let mut sink = [0u8; 16];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A stand-in for the server's postmaster: accepts cancel requests and says which pid each
    /// was for.
    async fn listener() -> (TcpListener, CancelTarget) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = CancelTarget {
            host: Arc::from("127.0.0.1"),
            port: listener.local_addr().unwrap().port(),
            pid: 4242,
            key: Arc::from(&[1u8, 2, 3, 4][..]),
        };
        (listener, target)
    }

    async fn next_pid(listener: &TcpListener, within: Duration) -> Option<i32> {
        let (mut s, _) = tokio::time::timeout(within, listener.accept())
            .await
            .ok()?
            .ok()?;
        let mut msg = [0u8; 16];
        s.read_exact(&mut msg).await.ok()?;
        Some(i32::from_be_bytes([msg[8], msg[9], msg[10], msg[11]]))
    }

    fn fire(registry: &Arc<CancelRegistry>, r: &Registration) -> tokio::task::JoinHandle<()> {
        let (registry, pid, key) = (Arc::clone(registry), r.pid, r.key);
        tokio::spawn(async move { registry.cancel(pid, &key.to_be_bytes()).await })
    }

    /// A client whose backend runs rlsgate's own statements, and a cancel it sent meanwhile.
    async fn held_cancel() -> (
        TcpListener,
        Arc<CancelRegistry>,
        Registration,
        tokio::task::JoinHandle<()>,
    ) {
        let (listener, target) = listener().await;
        let registry = Arc::new(CancelRegistry::default());
        let r = registry.register();
        r.slot.set(target);
        r.slot.hold();
        let cancel = fire(&registry, &r);
        (listener, registry, r, cancel)
    }

    #[tokio::test]
    async fn a_held_target_gets_the_cancel_only_once_released() {
        let (listener, registry, r, cancel) = held_cancel().await;
        assert_eq!(
            next_pid(&listener, Duration::from_millis(200)).await,
            None,
            "forwarded while rlsgate's own statements ran"
        );
        r.slot.release_hold();
        assert_eq!(
            next_pid(&listener, Duration::from_secs(5)).await,
            Some(4242)
        );
        cancel.await.unwrap();
        // not held: at once
        let cancel = fire(&registry, &r);
        assert_eq!(
            next_pid(&listener, Duration::from_secs(5)).await,
            Some(4242)
        );
        cancel.await.unwrap();
    }

    #[tokio::test]
    async fn a_cancel_held_until_the_client_let_go_is_dropped() {
        let (listener, _registry, r, cancel) = held_cancel().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.slot.clear().await;
        tokio::time::timeout(Duration::from_secs(5), cancel)
            .await
            .expect("the waiting cancel ends")
            .unwrap();
        assert_eq!(next_pid(&listener, Duration::from_millis(200)).await, None);
    }
}
