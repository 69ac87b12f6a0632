//! A TCP stream that may have been upgraded to TLS (client side or upstream side), and the
//! socket options rlsgate sets and inspects on the TCP socket underneath.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::KeepaliveConfig;

/// Set SO_KEEPALIVE (and TCP_KEEPIDLE/TCP_KEEPINTVL/TCP_KEEPCNT where non-zero) and, where
/// non-zero, TCP_USER_TIMEOUT on `tcp` from the `[server] tcp_*` keys. With keepalive off,
/// SO_KEEPALIVE is cleared.
pub fn apply_keepalive(tcp: &TcpStream, cfg: &KeepaliveConfig) -> io::Result<()> {
    apply_keepalive_to(SockRef::from(tcp), cfg)
}

fn apply_keepalive_to(sock: SockRef<'_>, cfg: &KeepaliveConfig) -> io::Result<()> {
    if cfg.enabled {
        let mut params = TcpKeepalive::new();
        if !cfg.idle.is_zero() {
            params = params.with_time(cfg.idle);
        }
        if !cfg.interval.is_zero() {
            params = params.with_interval(cfg.interval);
        }
        if cfg.count != 0 {
            params = params.with_retries(cfg.count);
        }
        sock.set_tcp_keepalive(&params)?;
    } else {
        sock.set_keepalive(false)?;
    }
    #[cfg(target_os = "linux")]
    if !cfg.user_timeout.is_zero() {
        sock.set_tcp_user_timeout(Some(cfg.user_timeout))?;
    }
    Ok(())
}

/// The options every client socket gets: TCP_NODELAY and the `[server] tcp_*` keepalive keys.
///
/// Linux copies a listening socket's options to each socket it accepts, so they are set once on
/// the listener and read back from the next accepted socket. When that socket reports what the
/// listener reports, later sockets need no setsockopt at all (before: five per login); when it
/// does not (another kernel), every socket gets them set as before.
#[derive(Debug)]
pub struct ClientSocketOptions {
    /// What the listener was given (a reload that changes the keys sets the listener again).
    applied: Option<KeepaliveConfig>,
    inheritance: Inheritance,
}

/// Whether accepted sockets arrive with the listener's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inheritance {
    /// Not yet seen on an accepted socket since the listener's options were set; `misses`
    /// sockets arrived without them (they may have been queued before the listener had them).
    Unchecked { misses: u8 },
    /// They do: nothing to set per socket.
    Inherited,
    /// They do not (or reading them failed): each socket gets them.
    PerSocket,
}

impl Default for ClientSocketOptions {
    fn default() -> Self {
        ClientSocketOptions {
            applied: None,
            inheritance: Inheritance::Unchecked { misses: 0 },
        }
    }
}

impl ClientSocketOptions {
    /// Give `tcp`, just accepted on `listener`, the options of `cfg`.
    pub fn apply(
        &mut self,
        listener: &tokio::net::TcpListener,
        tcp: &TcpStream,
        cfg: &KeepaliveConfig,
    ) -> io::Result<()> {
        if self.applied.as_ref() != Some(cfg) {
            // The socket in hand was cloned from the listener before this: it gets them below.
            self.applied = Some(*cfg);
            let on_listener = set_client_options(SockRef::from(listener), cfg);
            self.inheritance = match on_listener {
                Ok(()) => Inheritance::Unchecked { misses: 0 },
                Err(_) => Inheritance::PerSocket,
            };
            return set_client_options(SockRef::from(tcp), cfg);
        }
        match self.inheritance {
            Inheritance::Inherited => Ok(()),
            Inheritance::PerSocket => set_client_options(SockRef::from(tcp), cfg),
            Inheritance::Unchecked { misses } => {
                let arrived = client_options(SockRef::from(tcp))
                    .ok()
                    .filter(|got| client_options(SockRef::from(listener)).ok() == Some(*got));
                if arrived.is_some() {
                    self.inheritance = Inheritance::Inherited;
                    tracing::debug!("accepted sockets inherit the listener's TCP options");
                    return Ok(());
                }
                self.inheritance = if misses + 1 >= MAX_INHERITANCE_MISSES {
                    tracing::debug!(
                        "accepted sockets do not inherit the listener's TCP options; setting them per socket"
                    );
                    Inheritance::PerSocket
                } else {
                    Inheritance::Unchecked { misses: misses + 1 }
                };
                set_client_options(SockRef::from(tcp), cfg)
            }
        }
    }
}

/// Accepted sockets that may arrive without the listener's options (connections queued before
/// the listener got them) before rlsgate concludes they are not inherited.
const MAX_INHERITANCE_MISSES: u8 = 16;

fn set_client_options(sock: SockRef<'_>, cfg: &KeepaliveConfig) -> io::Result<()> {
    sock.set_tcp_nodelay(true)?;
    apply_keepalive_to(sock, cfg)
}

/// TCP_NODELAY and the keepalive options, as the kernel reports them.
fn client_options(sock: SockRef<'_>) -> io::Result<(bool, SocketKeepalive)> {
    Ok((sock.tcp_nodelay()?, socket_keepalive(sock)?))
}

/// The keepalive-related options of a socket as the kernel reports them (getsockopt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketKeepalive {
    /// SO_KEEPALIVE
    pub enabled: bool,
    /// TCP_KEEPIDLE
    pub idle: Duration,
    /// TCP_KEEPINTVL
    pub interval: Duration,
    /// TCP_KEEPCNT
    pub count: u32,
    /// TCP_USER_TIMEOUT (zero = off); always zero off Linux.
    pub user_timeout: Duration,
}

/// Read back what [`apply_keepalive`] set (for tests and diagnostics).
pub fn keepalive_of(tcp: &TcpStream) -> io::Result<SocketKeepalive> {
    socket_keepalive(SockRef::from(tcp))
}

/// [`keepalive_of`] for any socket (e.g. one found by its file descriptor).
pub fn socket_keepalive(sock: SockRef<'_>) -> io::Result<SocketKeepalive> {
    #[cfg(target_os = "linux")]
    let user_timeout = sock.tcp_user_timeout()?.unwrap_or_default();
    #[cfg(not(target_os = "linux"))]
    let user_timeout = Duration::ZERO;
    Ok(SocketKeepalive {
        enabled: sock.keepalive()?,
        idle: sock.tcp_keepalive_time()?,
        interval: sock.tcp_keepalive_interval()?,
        count: sock.tcp_keepalive_retries()?,
        user_timeout,
    })
}

/// What a non-blocking look at the socket of a connection that should be idle shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleProbe {
    /// Nothing to read: the peer has said nothing since the last exchange.
    Quiet,
    /// Bytes are waiting although nothing was asked (e.g. a FATAL before the peer closes).
    Readable,
    /// The peer closed the connection (EOF).
    Closed,
    /// The socket reports an error (e.g. ECONNRESET).
    Failed(io::ErrorKind),
}

pub enum Stream {
    Plain(TcpStream),
    /// We are the TLS server (client connections).
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// We are the TLS client (upstream connections).
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::ServerTls(s) => s.get_ref().0,
            Stream::ClientTls(s) => s.get_ref().0,
        }
    }

    /// Peek (MSG_PEEK | MSG_DONTWAIT: nothing consumed) at the raw TCP socket. On a connection
    /// that is idle between exchanges anything but [`IdleProbe::Quiet`] means the peer spoke
    /// unprompted or hung up. Under TLS the bytes are still encrypted, but any record arriving
    /// on an idle connection (an alert, close_notify, data) means the same.
    ///
    /// No syscall unless the runtime has seen the socket become readable since it was last
    /// drained (an epoll event: bytes, FIN or RST arrived): a connection taken from the pool for
    /// every transaction costs nothing here while its server says nothing. A peek that finds
    /// nothing clears that readiness.
    pub fn probe_idle(&self) -> IdleProbe {
        let tcp = self.tcp();
        let sock = SockRef::from(tcp);
        let mut byte = [MaybeUninit::<u8>::uninit(); 1];
        loop {
            let peek = || sock.recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT);
            return match tcp.try_io(tokio::io::Interest::READABLE, peek) {
                Ok(0) => IdleProbe::Closed,
                Ok(_) => IdleProbe::Readable,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => IdleProbe::Quiet,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => IdleProbe::Failed(e.kind()),
            };
        }
    }

    /// The keepalive options of the TCP socket underneath (getsockopt).
    pub fn keepalive(&self) -> io::Result<SocketKeepalive> {
        keepalive_of(self.tcp())
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On Linux the listener's options reach accepted sockets: after the first socket the
    /// proxy stops setting them one by one, and every socket still carries them.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cfg = KeepaliveConfig {
            enabled: true,
            idle: Duration::from_secs(33),
            interval: Duration::from_secs(4),
            count: 2,
            user_timeout: Duration::from_secs(21),
        };
        let mut options = ClientSocketOptions::default();
        let mut held = Vec::new();
        for i in 0..3 {
            let client = TcpStream::connect(addr).await.expect("connect");
            let (accepted, _) = listener.accept().await.expect("accept");
            options.apply(&listener, &accepted, &cfg).expect("options");
            let (nodelay, keepalive) = client_options(SockRef::from(&accepted)).expect("read");
            assert!(nodelay, "socket {i}: TCP_NODELAY");
            assert_eq!(
                keepalive,
                SocketKeepalive {
                    enabled: true,
                    idle: cfg.idle,
                    interval: cfg.interval,
                    count: cfg.count,
                    user_timeout: cfg.user_timeout,
                },
                "socket {i}"
            );
            held.push((client, accepted));
        }
        assert_eq!(options.inheritance, Inheritance::Inherited);
        // a new configuration goes to the listener and starts the check again
        let off = KeepaliveConfig {
            enabled: false,
            ..cfg
        };
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        options.apply(&listener, &accepted, &off).expect("options");
        assert!(!keepalive_of(&accepted).expect("read").enabled);
        assert_eq!(options.inheritance, Inheritance::Unchecked { misses: 0 });
    }
}
