//! A TCP relay for fault injection between rlsgate and PostgreSQL: point `[upstream] port` at
//! [`Relay::addr`]. Each direction passes, drops or stalls traffic, switchable while
//! connections are open, and [`Relay::kill_all`] resets every relayed connection.
//!
//! - [`Mode::Pass`]: bytes are forwarded.
//! - [`Mode::Drop`]: bytes are read and discarded; both TCP connections stay up and
//!   acknowledge everything (a black hole, as a partition looks to an application timeout).
//! - [`Mode::Stall`]: nothing more is read or forwarded; bytes already read are held and
//!   forwarded once the direction passes again (a hung peer: the sender's socket buffers fill).
//! - [`Mode::Rewrite`]: bytes are forwarded with every occurrence of one byte string replaced
//!   by another of the same length (e.g. a statement made to fail on the server).
//!
//! Modes apply to connections accepted later as well (a new upstream connection's startup
//! message is dropped or held like any other bytes).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Drop,
    Stall,
    Rewrite(&'static str, &'static str),
}

/// A direction of relayed traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// rlsgate → PostgreSQL.
    ToServer,
    /// PostgreSQL → rlsgate.
    ToClient,
}

pub struct Relay {
    pub addr: SocketAddr,
    to_server: watch::Sender<Mode>,
    to_client: watch::Sender<Mode>,
    /// Cancelled by [`Relay::kill_all`] (then replaced, so later connections are relayed).
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl Relay {
    /// Listen on 127.0.0.1 (a free port) and relay every connection to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let (to_server, _) = watch::channel(Mode::Pass);
        let (to_client, _) = watch::channel(Mode::Pass);
        let relay = Relay {
            addr,
            to_server,
            to_client,
            generation: Arc::new(Mutex::new(CancellationToken::new())),
            stop: CancellationToken::new(),
            accepted: Arc::new(AtomicUsize::new(0)),
            open: Arc::new(AtomicUsize::new(0)),
        };
        let ctx = Accept {
            listener,
            target,
            to_server: relay.to_server.subscribe(),
            to_client: relay.to_client.subscribe(),
            generation: Arc::clone(&relay.generation),
            stop: relay.stop.clone(),
            accepted: Arc::clone(&relay.accepted),
            open: Arc::clone(&relay.open),
        };
        tokio::spawn(ctx.run());
        relay
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set(&self, dir: Dir, mode: Mode) {
        let tx = match dir {
            Dir::ToServer => &self.to_server,
            Dir::ToClient => &self.to_client,
        };
        tx.send_replace(mode);
    }

    /// Both directions at once.
    pub fn set_both(&self, mode: Mode) {
        self.set(Dir::ToServer, mode);
        self.set(Dir::ToClient, mode);
    }

    pub fn mode(&self, dir: Dir) -> Mode {
        match dir {
            Dir::ToServer => *self.to_server.borrow(),
            Dir::ToClient => *self.to_client.borrow(),
        }
    }

    /// Reset (RST) every connection relayed right now, both sides; new ones are relayed.
    pub fn kill_all(&self) {
        let old = {
            let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *g, CancellationToken::new())
        };
        old.cancel();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections being relayed right now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Accept {
    listener: TcpListener,
    target: SocketAddr,
    to_server: watch::Receiver<Mode>,
    to_client: watch::Receiver<Mode>,
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

/// Decrements the open-connection count when a relayed connection ends.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Accept {
    async fn run(self) {
        loop {
            let accepted = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = self.listener.accept() => r,
            };
            let Ok((client, _)) = accepted else {
                continue;
            };
            self.accepted.fetch_add(1, Ordering::Relaxed);
            self.open.fetch_add(1, Ordering::Relaxed);
            let guard = OpenGuard(Arc::clone(&self.open));
            let kill = self
                .generation
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let stop = self.stop.clone();
            let (up, down) = (self.to_server.clone(), self.to_client.clone());
            let target = self.target;
            tokio::spawn(async move {
                let _guard = guard;
                let Ok(server) = TcpStream::connect(target).await else {
                    reset(&client);
                    return;
                };
                relay_one(client, server, up, down, kill, stop).await;
            });
        }
    }
}

async fn relay_one(
    mut client: TcpStream,
    mut server: TcpStream,
    up: watch::Receiver<Mode>,
    down: watch::Receiver<Mode>,
    kill: CancellationToken,
    stop: CancellationToken,
) {
    client.set_nodelay(true).ok();
    server.set_nodelay(true).ok();
    let killed = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let both =
            async { tokio::try_join!(pump(&mut cr, &mut sw, up), pump(&mut sr, &mut cw, down)) };
        tokio::select! {
            _ = kill.cancelled() => true,
            _ = stop.cancelled() => true,
            _ = both => false,
        }
    };
    if killed {
        reset(&client);
        reset(&server);
    }
}

/// Close with RST instead of FIN when dropped.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Forward `from` → `to` under `mode` until EOF (then half-close `to`) or an error.
async fn pump<R, W>(from: &mut R, to: &mut W, mut mode: watch::Receiver<Mode>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Stalled: read nothing until the mode changes.
        while *mode.borrow_and_update() == Mode::Stall {
            if mode.changed().await.is_err() {
                return Ok(());
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => r?,
            changed = mode.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                continue;
            }
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        // The mode when the bytes are through decides their fate; stalled bytes wait.
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Pass => {
                    to.write_all(&buf[..n]).await?;
                    break;
                }
                Mode::Rewrite(old, new) => {
                    assert_eq!(old.len(), new.len(), "a rewrite keeps the length");
                    let mut at = 0;
                    while let Some(i) = buf[at..n]
                        .windows(old.len())
                        .position(|w| w == old.as_bytes())
                    {
                        buf[at + i..at + i + old.len()].copy_from_slice(new.as_bytes());
                        at += i + old.len();
                    }
                    to.write_all(&buf[..n]).await?;
                    break;
                }
                Mode::Drop => break,
                Mode::Stall => {
                    if mode.changed().await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}
