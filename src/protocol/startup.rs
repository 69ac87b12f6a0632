//! The untagged packets that open a connection: `length (i32) + code (i32) + payload`.

use bytes::BytesMut;

use super::{Cursor, ProtocolError};

/// Largest startup packet accepted (Postgres itself allows 10000 bytes).
pub const MAX_STARTUP_LEN: usize = 10_000;

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;

#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    /// The key is 4 bytes in protocol 3.0; 3.2 allows up to 256.
    CancelRequest {
        pid: i32,
        key: Vec<u8>,
    },
    Startup(StartupMessage),
}

#[derive(Debug, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(String, String)>,
    /// `_pq_.*` protocol options the client asked for; we support none and say so.
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Read the next startup packet from `buf`, or `None` if more bytes are needed.
pub fn try_read_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let declared = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if declared < 8 {
        return Err(ProtocolError::BadLength(declared.into()));
    }
    let len = declared as usize;
    if len > MAX_STARTUP_LEN {
        return Err(ProtocolError::TooLarge {
            len,
            max: MAX_STARTUP_LEN,
        });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let packet = buf.split_to(len);
    parse_packet(&packet[4..]).map(Some)
}

fn parse_packet(body: &[u8]) -> Result<StartupPacket, ProtocolError> {
    let mut c = Cursor::new(body, "startup");
    let code = c.i32()?;
    match code {
        SSL_REQUEST if c.is_empty() => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST if c.is_empty() => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST => {
            let pid = c.i32()?;
            let key = c.rest();
            if key.len() < 4 || key.len() > 256 {
                return Err(ProtocolError::Malformed("CancelRequest"));
            }
            Ok(StartupPacket::CancelRequest {
                pid,
                key: key.to_vec(),
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            let mut params = Vec::new();
            let mut protocol_options = Vec::new();
            loop {
                let key = c.cstr()?;
                if key.is_empty() {
                    break;
                }
                let value = c.cstr()?;
                if let Some(opt) = key.strip_prefix("_pq_.") {
                    protocol_options.push(format!("_pq_.{opt}"));
                } else {
                    params.push((key.to_string(), value.to_string()));
                }
            }
            if !c.is_empty() {
                return Err(ProtocolError::Malformed("StartupMessage"));
            }
            Ok(StartupPacket::Startup(StartupMessage {
                major,
                minor,
                params,
                protocol_options,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&((payload.len() + 8) as i32).to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn reads_ssl_cancel_and_startup() {
        assert_eq!(
            try_read_startup(&mut packet(SSL_REQUEST, b"")).unwrap(),
            Some(StartupPacket::SslRequest)
        );
        let p = try_read_startup(&mut packet(CANCEL_REQUEST, &[0, 0, 0, 7, 1, 2, 3, 4])).unwrap();
        assert_eq!(
            p,
            Some(StartupPacket::CancelRequest {
                pid: 7,
                key: vec![1, 2, 3, 4]
            })
        );
        let p = try_read_startup(&mut packet(
            196_608,
            b"user\0bob\0database\0app\0_pq_.x\0y\0\0",
        ))
        .unwrap();
        let Some(StartupPacket::Startup(m)) = p else {
            panic!("expected startup")
        };
        assert_eq!(m.param("user"), Some("bob"));
        assert_eq!(m.param("database"), Some("app"));
        assert_eq!(m.protocol_options, vec!["_pq_.x".to_string()]);
    }

    #[test]
    fn rejects_garbage() {
        assert!(try_read_startup(&mut BytesMut::from(&[0u8, 0, 0, 2][..])).is_err());
        assert!(try_read_startup(&mut BytesMut::from(&[0u8, 1, 0, 0][..])).is_err());
        assert!(try_read_startup(&mut packet(196_608, b"user\0bob")).is_err());
        assert!(try_read_startup(&mut packet(1 << 16, b"\0")).is_err());
        assert!(try_read_startup(&mut packet(CANCEL_REQUEST, &[0, 0, 0, 7])).is_err());
    }
}
