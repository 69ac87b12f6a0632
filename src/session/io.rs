//! The session's two sockets, driven together: one wake-up writes what is buffered for either
//! side and reads what either side sent, so no direction waits for another. A server blocked
//! writing a large result while the client sends a large message cannot deadlock the proxy, and
//! a client that leaves is seen even while its next message waits for replies.
//!
//! Backpressure instead of unbounded buffers: output towards a side is produced only while less
//! than [`OUT_CAP`] is waiting for it, and client bytes that cannot be handled yet are read ahead
//! only up to [`READ_AHEAD`].
//!
//! A resting client holds no buffer (its session is gone, see `park`). Between transactions an
//! awake session keeps its emptied buffers while they are small, for its next transaction (three
//! allocations and frees per transaction less), and drops larger ones ([`release_idle`]); a read
//! into an empty input buffer without room goes through the stack and allocates only what
//! arrived.

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

use super::{Session, SessionError};
use crate::registry::ClientEntry;
use crate::stream::Stream;

/// Output buffered towards one side above which no more is produced for it.
pub(super) const OUT_CAP: usize = 256 * 1024;
/// Client bytes read ahead while the frames at their front cannot be handled yet.
const READ_AHEAD: usize = 256 * 1024;
/// Free space kept in the server read buffer before each read.
const SERVER_READ_SPACE: usize = 8 * 1024;
/// Stack space a read into an empty input buffer goes through.
const STACK_READ: usize = 8 * 1024;

/// What an output buffer gets at once when a transaction first writes to it. Grown from
/// nothing message by message it was reallocated four times per transaction (`-S -M extended`:
/// ~3 000 instructions of ~30 000 per transaction, callgrind); 1 KiB is one allocation from
/// malloc's per-thread cache, and most transactions' replies fit in it.
const OUT_START: usize = 1024;

/// Give an output buffer that holds no memory [`OUT_START`] bytes (see [`release_idle`]).
pub(super) fn reserve_first(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        buf.reserve(OUT_START);
    }
}

/// The most an emptied buffer keeps between transactions: an output buffer's first
/// [`OUT_START`], and a request read into an input buffer of its own size.
const KEEP_IDLE: usize = 2 * 1024;

/// Drop a buffer's memory if it holds nothing and more than [`KEEP_IDLE`] (after a large result
/// or request); a small one is reused by the next transaction.
pub(super) fn release_idle(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > KEEP_IDLE {
        *buf = BytesMut::new();
    }
}

/// What one wake-up of the sockets did.
#[derive(Debug, Default)]
pub(super) struct Event {
    pub client_read: usize,
    pub client_closed: bool,
    pub server_read: bool,
    /// Replies (or the end) of the unit on a pipeline lane moved to the client's output.
    pub lane: bool,
}

/// One side: its stream, its input buffer, the bytes waiting to be written to it.
struct Side<'a> {
    stream: &'a mut Stream,
    input: &'a mut BytesMut,
    output: &'a mut BytesMut,
    /// Bytes were written since the last completed flush (TLS may hold them back).
    unflushed: &'a mut bool,
    read: bool,
    /// Writing out wakes the session (see [`Sockets::new`]).
    wake_on_write: bool,
    /// Free the output's memory once it is written out (between transactions).
    free_when_written: bool,
}

impl Side<'_> {
    /// Write as much of the output as the socket takes now; `Ok(n)` = bytes written.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let mut wrote = 0;
        while !self.output.is_empty() {
            match Pin::new(&mut *self.stream).poll_write(cx, self.output) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.output.advance(n);
                    wrote += n;
                    *self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if self.output.is_empty() && *self.unflushed {
            match Pin::new(&mut *self.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => *self.unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if self.free_when_written {
            release_idle(self.output);
        }
        if wrote > 0 {
            Poll::Ready(Ok(wrote))
        } else {
            Poll::Pending
        }
    }

    /// Read once if reading is wanted; `Ok(0)` = the peer closed.
    fn poll_read_in(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if !self.read {
            return Poll::Pending;
        }
        let spare = self.input.capacity() - self.input.len();
        if !self.input.is_empty() || spare >= STACK_READ {
            // A read that fills the buffer is followed by another (tokio keeps the socket
            // readable until a read comes back short): one message in two system calls, or a
            // second that finds nothing. Room first (the buffer goes at the next idle moment).
            if spare < STACK_READ / 2 {
                self.input.reserve(STACK_READ);
            }
            return poll_read_buf(Pin::new(&mut *self.stream), cx, self.input);
        }
        // Nothing buffered and little room (none for an idle client): wait for the bytes on the
        // stack, then keep only what came (polling must not allocate a buffer for a client that
        // says nothing, and a small leftover buffer must not split a message into two reads).
        let mut space = [MaybeUninit::<u8>::uninit(); STACK_READ];
        let mut buf = ReadBuf::uninit(&mut space);
        match Pin::new(&mut *self.stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                self.input.extend_from_slice(buf.filled());
                Poll::Ready(Ok(buf.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Both sockets of a session for one wake-up (see the module docs).
pub(super) struct Sockets<'a> {
    client: Side<'a>,
    server: Option<Side<'a>>,
    /// The unit on a pipeline lane, while the client has room for its replies.
    lane: Option<&'a crate::pipeline::Reply>,
    /// (bytes written to the client are counted here: a write alone need not wake the session)
    metrics: &'a crate::metrics::Metrics,
}

impl<'a> Sockets<'a> {
    /// The session's sockets, and its registry entry (whose `wake` the session waits on too).
    ///
    /// A wake-up returns to the session when something arrived (bytes from either side, a
    /// lane's replies, the client leaving) or when a write lets it go on: output towards a side
    /// was held back at [`OUT_CAP`], or the server's was the last thing owed before the
    /// connection can be released. Any other write only empties a buffer: the session has
    /// nothing to do after it, and waking it would cost a turn of its loop and another poll of
    /// both sockets (two per transaction: after the request goes to the server, after the
    /// replies go to the client).
    pub(super) fn new(s: &'a mut Session) -> (Sockets<'a>, &'a ClientEntry) {
        // Client frames wait (a split Query or a held frame waits for replies; output is full):
        // read ahead only so far, enough to see the client leave.
        let waiting = (s.split.is_some() && s.copy != super::CopyState::In)
            || s.pending.is_some()
            || s.server_out.len() >= OUT_CAP
            || s.client_out.len() >= OUT_CAP;
        let read_client = !waiting || s.client_buf.len() < READ_AHEAD;
        let read_server = s.client_out.len() < OUT_CAP;
        let wake_on_client_write = s.client_out.len() >= OUT_CAP;
        let wake_on_server_write = s.server_out.len() >= OUT_CAP || s.expect.is_empty();
        // (as the session loop does between transactions, for what is written after its check)
        let free_client_out = s.between_transactions() && s.pending.is_none();
        let metrics = &*s.shared.metrics;
        let Session {
            client,
            client_buf,
            client_out,
            client_unflushed,
            server,
            server_out,
            server_unflushed,
            client_entry,
            lane_reply,
            ..
        } = s;
        let lane = lane_reply.as_deref().filter(|_| read_server);
        let server = match server.as_mut() {
            Some(checkout) => {
                let conn = checkout.conn();
                if conn.read_buf.capacity() - conn.read_buf.len() < SERVER_READ_SPACE {
                    conn.read_buf.reserve(64 * 1024);
                }
                Some(Side {
                    stream: &mut conn.stream,
                    input: &mut conn.read_buf,
                    output: server_out,
                    unflushed: server_unflushed,
                    read: read_server,
                    wake_on_write: wake_on_server_write,
                    free_when_written: false,
                })
            }
            None => {
                // nowhere to send it (the connection is gone)
                server_out.clear();
                None
            }
        };
        let sockets = Sockets {
            client: Side {
                stream: client,
                input: client_buf,
                output: client_out,
                unflushed: client_unflushed,
                read: read_client,
                wake_on_write: wake_on_client_write,
                free_when_written: free_client_out,
            },
            server,
            lane,
            metrics,
        };
        (sockets, &client_entry.entry)
    }
}

impl Future for Sockets<'_> {
    type Output = Result<Event, SessionError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut event = Event::default();
        let mut progress = false;
        // A lane's replies first: written in this same wake-up.
        if let Some(reply) = this.lane
            && reply.poll_drain(cx, this.client.output).is_ready()
        {
            event.lane = true;
            progress = true;
        }
        // Writes first: they make room on both sides.
        match this.client.poll_write_out(cx) {
            Poll::Ready(Ok(n)) => {
                this.metrics.bytes(0, n as u64);
                progress |= this.client.wake_on_write;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionError::ClientIo(e))),
            Poll::Pending => {}
        }
        if let Some(server) = this.server.as_mut() {
            match server.poll_write_out(cx) {
                Poll::Ready(Ok(_)) => progress |= server.wake_on_write,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionError::UpstreamIo(e))),
                Poll::Pending => {}
            }
            match server.poll_read_in(cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(SessionError::UpstreamClosed)),
                Poll::Ready(Ok(_)) => {
                    event.server_read = true;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionError::UpstreamIo(e))),
                Poll::Pending => {}
            }
        }
        match this.client.poll_read_in(cx) {
            Poll::Ready(Ok(0)) => {
                event.client_closed = true;
                progress = true;
            }
            Poll::Ready(Ok(n)) => {
                event.client_read = n;
                progress = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionError::ClientIo(e))),
            Poll::Pending => {}
        }
        if progress {
            Poll::Ready(Ok(event))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A connected pair: the proxy's end as a [`Stream`], and the peer's.
    async fn pair() -> (Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        (Stream::Plain(ours), peer)
    }

    /// Read once through a [`Side`] into `input`, as the session loop does.
    async fn read_once(stream: &mut Stream, input: &mut BytesMut) -> usize {
        let (mut output, mut unflushed) = (BytesMut::new(), false);
        let mut side = Side {
            stream,
            input,
            output: &mut output,
            unflushed: &mut unflushed,
            read: true,
            wake_on_write: true,
            free_when_written: false,
        };
        std::future::poll_fn(|cx| side.poll_read_in(cx))
            .await
            .unwrap()
    }

    /// A message that has arrived is read in one system call also when the input buffer kept
    /// only a little room from the previous message (a read that fills the buffer would need a
    /// second one: two reads per message, or a third that finds nothing).
    #[tokio::test]
    async fn a_message_is_read_whole_whatever_room_the_buffer_kept() {
        let (mut stream, mut peer) = pair().await;
        let message = vec![b'x'; 300];
        // empty, with 10 bytes of room left over
        let mut input = BytesMut::with_capacity(100);
        input.extend_from_slice(&[0; 90]);
        let _ = input.split_to(90);
        assert_eq!(input.capacity(), 10);
        peer.write_all(&message).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(read_once(&mut stream, &mut input).await, 300);
        assert_eq!(&input[..], &message[..]);
        // the start of a message waiting for its rest, with 5 bytes of room
        let mut input = BytesMut::with_capacity(10);
        input.extend_from_slice(b"Q\0\0\x01");
        input.extend_from_slice(b"\x30");
        peer.write_all(&message).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(read_once(&mut stream, &mut input).await, 300);
        assert_eq!(input.len(), 305);
        // nothing held at all (an idle client): only what arrived is kept
        let mut input = BytesMut::new();
        peer.write_all(b"tiny").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(read_once(&mut stream, &mut input).await, 4);
        assert!(input.capacity() < 64, "{}", input.capacity());
    }
}
