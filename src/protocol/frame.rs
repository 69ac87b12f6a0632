//! Framing: `tag (1 byte) + length (i32, includes itself) + body`.
//!
//! A [`Frame`] keeps the whole message as it arrived, so forwarding it is a copy of its bytes
//! (no re-encoding). Splitting a frame off the read buffer does not allocate.

use bytes::{Buf, BytesMut};

use super::ProtocolError;

pub const HEADER_LEN: usize = 5;

/// One complete message: `bytes` holds tag, length and body.
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    pub bytes: BytesMut,
}

impl Frame {
    pub fn body(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }
}

/// Split the next complete frame off `buf`, or `None` if more bytes are needed.
///
/// `max_len` caps the declared length so a hostile peer cannot make us buffer without bound.
pub fn try_read_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    let Some(total) = complete_len(buf, max_len)? else {
        return Ok(None);
    };
    Ok(Some(Frame {
        tag: buf[0],
        bytes: buf.split_to(total),
    }))
}

/// The length of the complete frame at the front of `buf` (tag included), or `None` if more
/// bytes are needed (then room for the rest of a frame whose header arrived is reserved).
/// Errors as [`try_read_frame`].
pub fn complete_len(buf: &mut BytesMut, max_len: usize) -> Result<Option<usize>, ProtocolError> {
    let complete = frame_len(buf, max_len)?;
    if complete.is_none() && buf.len() >= HEADER_LEN {
        // (the header is there: frame_len checked the declared length)
        let total = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
        buf.reserve(total - buf.len());
    }
    Ok(complete)
}

/// The length of the complete frame at the front of `buf` (tag included), or `None` if more
/// bytes are needed; [`complete_len`] without reserving room.
pub fn frame_len(buf: &[u8], max_len: usize) -> Result<Option<usize>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let declared = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if declared < 4 {
        return Err(ProtocolError::BadLength(declared.into()));
    }
    let total = declared as usize + 1;
    if total > max_len {
        return Err(ProtocolError::TooLarge {
            len: total,
            max: max_len,
        });
    }
    Ok((buf.len() >= total).then_some(total))
}

/// One complete message borrowed from a read buffer (the server's replies are handled in place
/// and only copied to the client when forwarded: no split per message).
#[derive(Debug, Clone, Copy)]
pub struct FrameRef<'a> {
    pub tag: u8,
    /// Tag, length and body.
    pub bytes: &'a [u8],
}

impl<'a> FrameRef<'a> {
    /// The complete frame at the front of `buf`, `total` bytes long (see [`complete_len`]).
    pub fn at(buf: &'a [u8], total: usize) -> Self {
        FrameRef {
            tag: buf[0],
            bytes: &buf[..total],
        }
    }

    pub fn body(&self) -> &'a [u8] {
        &self.bytes[HEADER_LEN..]
    }
}

/// Length a frame will have once complete, if its header is there (used to stream huge frames).
pub fn peek_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let mut b = &buf[1..5];
    let declared = b.get_i32();
    (declared >= 4).then_some(declared as usize + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_complete_frames_and_waits_for_partial_ones() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x09abcd\0S\0\0\0"[..]);
        let f = try_read_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(f.body(), b"abcd\0");
        assert!(try_read_frame(&mut buf, 1024).unwrap().is_none());
        buf.extend_from_slice(b"\x04");
        let f = try_read_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(f.tag, b'S');
        assert!(f.body().is_empty());
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_bad_and_oversized_lengths() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x03"[..]);
        assert_eq!(
            try_read_frame(&mut buf, 1024).unwrap_err(),
            ProtocolError::BadLength(3)
        );
        let mut buf = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert!(try_read_frame(&mut buf, 1024).is_err());
        let mut buf = BytesMut::from(&b"Q\0\x10\0\0"[..]);
        assert!(matches!(
            try_read_frame(&mut buf, 1024),
            Err(ProtocolError::TooLarge { .. })
        ));
    }
}
