//! The PostgreSQL wire protocol, only as much as rlsgate reads or writes. No I/O, no config.
//!
//! - [`frame`]: split a byte stream into `tag + length + body` frames (bounds-checked, capped).
//! - [`startup`]: the untagged packets a client sends first (SSLRequest, CancelRequest, StartupMessage).
//! - [`frontend`]: read the fields of the client messages the proxy inspects; write the ones it injects.
//! - [`backend`]: read the server messages the proxy inspects; write the ones it sends itself.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod startup;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message length {0} is invalid")]
    BadLength(i64),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("invalid frontend message type {0:?}")]
    UnknownMessage(char),
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion { major: u16, minor: u16 },
}

/// A bounds-checked reader over a message body.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }

    fn err(&self) -> ProtocolError {
        ProtocolError::Malformed(self.what)
    }

    pub(crate) fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let end = memchr::memchr(0, self.buf).ok_or_else(|| self.err())?;
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| self.err())?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| self.err())?;
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn i16(&mut self) -> Result<i16, ProtocolError> {
        let bytes = self.take(2)?;
        Ok(i16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, ProtocolError> {
        let bytes = self.take(4)?;
        Ok(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.err());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}
