//! The session's two sockets, driven together: one wake-up writes what is buffered for either
//! side and reads what either side sent, so no direction waits for another. A server blocked
//! writing a large result while the client sends a large message cannot deadlock the proxy, and
//! a client that leaves is seen even while its next message waits for replies.
//!
//! Backpressure instead of unbounded buffers: output towards a side is produced only while less
//! than [`OUT_CAP`] is waiting for it, and client bytes that cannot be handled yet are read ahead
//! only up to [`READ_AHEAD`].
//!
//! An idle client holds no buffer: a read into an empty input buffer goes through the stack and
//! allocates only what arrived, and the session drops emptied buffers between transactions
//! ([`release_idle`]).

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

/// Drop a buffer's memory if it holds nothing (an idle client keeps no buffers).
pub(super) fn release_idle(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}

/// What one wake-up of the sockets did.
#[derive(Debug, Default)]
pub(super) struct Event {
    pub client_read: usize,
    pub client_wrote: usize,
    pub client_closed: bool,
    pub server_read: bool,
}

/// One side: its stream, its input buffer, the bytes waiting to be written to it.
struct Side<'a> {
    stream: &'a mut Stream,
    input: &'a mut BytesMut,
    output: &'a mut BytesMut,
    /// Bytes were written since the last completed flush (TLS may hold them back).
    unflushed: &'a mut bool,
    read: bool,
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
        if !self.input.is_empty() || self.input.capacity() > 0 {
            return poll_read_buf(Pin::new(&mut *self.stream), cx, self.input);
        }
        // Nothing buffered and no memory held: wait for the bytes on the stack, then keep
        // only what came (polling must not allocate a buffer for a client that says nothing).
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
}

impl<'a> Sockets<'a> {
    /// The session's sockets, and its registry entry (whose `wake` the session waits on too).
    pub(super) fn new(s: &'a mut Session) -> (Sockets<'a>, &'a ClientEntry) {
        // Client frames wait (a split Query or a held frame waits for replies; output is full):
        // read ahead only so far, enough to see the client leave.
        let waiting = (s.split.is_some() && !s.copy_in)
            || s.pending.is_some()
            || s.server_out.len() >= OUT_CAP
            || s.client_out.len() >= OUT_CAP;
        let read_client = !waiting || s.client_buf.len() < READ_AHEAD;
        let read_server = s.client_out.len() < OUT_CAP;
        let Session {
            client,
            client_buf,
            client_out,
            client_unflushed,
            server,
            server_out,
            server_unflushed,
            client_entry,
            ..
        } = s;
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
            },
            server,
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
        // Writes first: they make room on both sides.
        match this.client.poll_write_out(cx) {
            Poll::Ready(Ok(n)) => {
                event.client_wrote = n;
                progress = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionError::ClientIo(e))),
            Poll::Pending => {}
        }
        if let Some(server) = this.server.as_mut() {
            match server.poll_write_out(cx) {
                Poll::Ready(Ok(_)) => progress = true,
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
