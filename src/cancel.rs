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
use tokio::sync::Notify;

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
    state: Mutex<SlotState>,
    /// A held target was released or cleared (cancels waiting on it look again).
    changed: Notify,
    /// The last cancel being delivered to the backend is done (a release waiting for it goes on).
    delivered: Notify,
}

#[derive(Default)]
struct SlotState {
    target: Option<Target>,
    /// Cancels on their way to the backend of `target`, or of the one just cleared (counted when
    /// they read it, under the same lock: a release that took the target sees them).
    delivering: usize,
}

impl CancelSlot {
    fn set_target(&self, target: Target) {
        if let Ok(mut s) = self.state.lock() {
            s.target = Some(target);
        }
    }

    pub fn set(&self, target: CancelTarget) {
        self.set_target(Target::Server(target));
    }

    /// rlsgate's own statements now run ahead of the client's: cancels wait until
    /// [`CancelSlot::release_hold`].
    pub fn hold(&self) {
        if let Ok(mut s) = self.state.lock()
            && let Some(Target::Server(target)) = &s.target
        {
            s.target = Some(Target::Held(target.clone()));
        }
    }

    /// rlsgate's own statements are done: the client's run now.
    pub fn release_hold(&self) {
        if let Ok(mut s) = self.state.lock()
            && let Some(Target::Held(target)) = &s.target
        {
            s.target = Some(Target::Server(target.clone()));
            self.changed.notify_waiters();
        }
    }

    /// The client's unit runs on a pipeline lane (see [`crate::pipeline`]).
    pub fn set_pipelined(&self, reply: Arc<Reply>) {
        self.set_target(Target::Pipelined(reply));
    }

    /// Forget the backend; waits until no cancel for it is still being delivered.
    pub async fn clear(&self) {
        let delivering = match self.state.lock() {
            Ok(mut s) => {
                if let Some(Target::Held(_)) = s.target.take() {
                    self.changed.notify_waiters();
                }
                s.delivering
            }
            Err(_) => 0,
        };
        if delivering > 0 {
            // (boxed: rare, and the wait would size every session's future, also while idle)
            Box::pin(self.until_delivered()).await;
        }
    }

    async fn until_delivered(&self) {
        loop {
            // (registered before looking, so the last delivery ending in between is not missed)
            let done = self.delivered.notified();
            let mut done = std::pin::pin!(done);
            done.as_mut().enable();
            if self.state.lock().map_or(0, |s| s.delivering) == 0 {
                return;
            }
            done.await;
        }
    }

    /// The target a cancel goes to now; a backend's counts the cancel as being delivered until
    /// the returned guard is dropped.
    fn target_for_cancel(&self) -> (Option<Target>, Option<Delivering<'_>>) {
        let Ok(mut s) = self.state.lock() else {
            return (None, None);
        };
        let target = s.target.clone();
        if !matches!(target, Some(Target::Server(_))) {
            return (target, None);
        }
        s.delivering += 1;
        (target, Some(Delivering(self)))
    }
}

/// A cancel on its way to a client's backend (see [`CancelSlot::clear`]).
struct Delivering<'a>(&'a CancelSlot);

impl Drop for Delivering<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.delivering -= 1;
            if s.delivering == 0 {
                self.0.delivered.notify_waiters();
            }
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
            match slot.target_for_cancel() {
                (Some(Target::Server(target)), _delivering) => {
                    forward(&target).await;
                    return;
                }
                (Some(Target::Pipelined(reply)), _) => {
                    // (its lane sends it when that is safe: see `Reply::request_cancel`)
                    reply.request_cancel();
                    return;
                }
                (Some(Target::Held(_)), _) => {}
                (None, _) => return,
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

    /// Releasing a connection waits while a cancel for its backend is still on its way: the
    /// backend must not have moved on to another client when the cancel lands.
    #[tokio::test]
    async fn a_release_waits_for_a_cancel_being_delivered() {
        let (listener, target) = listener().await;
        let registry = Arc::new(CancelRegistry::default());
        let r = registry.register();
        r.slot.set(target);
        let cancel = fire(&registry, &r);
        // the "server" takes the request and keeps the connection open: still being delivered
        let (mut server_side, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("the cancel connects")
            .unwrap();
        let mut msg = [0u8; 16];
        server_side.read_exact(&mut msg).await.unwrap();
        let release = tokio::spawn(async move {
            r.slot.clear().await;
            r
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !release.is_finished(),
            "released while a cancel was delivered"
        );
        drop(server_side);
        let r = tokio::time::timeout(Duration::from_secs(5), release)
            .await
            .expect("released once the cancel was delivered")
            .unwrap();
        cancel.await.unwrap();
        // nothing in flight: at once, and later cancels find no backend
        tokio::time::timeout(Duration::from_millis(100), r.slot.clear())
            .await
            .expect("nothing to wait for");
        fire(&registry, &r).await.unwrap();
        assert_eq!(next_pid(&listener, Duration::from_millis(200)).await, None);
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
