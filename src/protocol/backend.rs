//! Server (backend) messages: read the few rlsgate inspects; write the ones rlsgate sends itself
//! (encoded with `pgwire`, except ParameterStatus, written in place).

use bytes::{BufMut, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::response::{ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, SecretKey,
};

use super::{Cursor, ProtocolError};
use crate::error::ClientError;

pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NOTIFICATION: u8 = b'A';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY: u8 = b'I';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const NO_DATA: u8 = b'n';
pub const DATA_ROW: u8 = b'D';
pub const COPY_IN: u8 = b'G';
pub const COPY_OUT: u8 = b'H';
pub const COPY_BOTH: u8 = b'W';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';

/// Transaction status reported by `ReadyForQuery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InBlock,
    Failed,
}

impl TxStatus {
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InBlock => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

pub fn ready_status(body: &[u8]) -> Result<TxStatus, ProtocolError> {
    match body {
        [b'I'] => Ok(TxStatus::Idle),
        [b'T'] => Ok(TxStatus::InBlock),
        [b'E'] => Ok(TxStatus::Failed),
        _ => Err(ProtocolError::Malformed("ReadyForQuery")),
    }
}

/// The fields of an ErrorResponse/NoticeResponse that logs and decisions need.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServerNotice {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn notice_fields(body: &[u8]) -> Result<ServerNotice, ProtocolError> {
    let mut c = Cursor::new(body, "ErrorResponse");
    let mut n = ServerNotice::default();
    loop {
        let field = c.u8()?;
        if field == 0 {
            return Ok(n);
        }
        let value = c.cstr()?;
        match field {
            b'V' => n.severity = value.to_string(),
            b'S' if n.severity.is_empty() => n.severity = value.to_string(),
            b'C' => n.code = value.to_string(),
            b'M' => n.message = value.to_string(),
            _ => {}
        }
    }
}

/// The authentication request code (0 ok, 3 cleartext, 5 md5, 10 SASL, 11 SASL continue, 12 SASL final).
pub fn auth_code(body: &[u8]) -> Result<(i32, &[u8]), ProtocolError> {
    let mut c = Cursor::new(body, "Authentication");
    let code = c.i32()?;
    Ok((code, c.rest()))
}

pub fn parameter_status(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    let mut c = Cursor::new(body, "ParameterStatus");
    Ok((c.cstr()?, c.cstr()?))
}

pub fn backend_key(body: &[u8]) -> Result<(i32, Vec<u8>), ProtocolError> {
    let mut c = Cursor::new(body, "BackendKeyData");
    let pid = c.i32()?;
    let key = c.rest();
    if key.len() < 4 {
        return Err(ProtocolError::Malformed("BackendKeyData"));
    }
    Ok((pid, key.to_vec()))
}

// ---- writers (pgwire encodes; encoding into a BytesMut cannot fail for these sizes) ----

fn encode<M: Message>(m: M, out: &mut BytesMut) {
    if let Err(e) = m.encode(out) {
        // Only possible for messages beyond pgwire's size limits, which we never build.
        tracing::error!(error = %e, "failed to encode a backend message");
    }
}

fn error_fields(e: &ClientError) -> Vec<(u8, String)> {
    let mut fields = vec![
        (b'S', e.severity.as_str().to_string()),
        (b'V', e.severity.as_str().to_string()),
        (b'C', e.sqlstate.to_string()),
        (b'M', e.message.clone()),
    ];
    if let Some(d) = &e.detail {
        fields.push((b'D', d.clone()));
    }
    if let Some(h) = &e.hint {
        fields.push((b'H', h.clone()));
    }
    fields
}

pub fn write_error(e: &ClientError, out: &mut BytesMut) {
    encode(ErrorResponse::new(error_fields(e)), out);
}

pub fn write_notice(severity: &str, code: &str, message: &str, out: &mut BytesMut) {
    let fields = vec![
        (b'S', severity.to_string()),
        (b'V', severity.to_string()),
        (b'C', code.to_string()),
        (b'M', message.to_string()),
    ];
    encode(NoticeResponse::new(fields), out);
}

pub fn write_auth_cleartext(out: &mut BytesMut) {
    encode(Authentication::CleartextPassword, out);
}

pub fn write_auth_ok(out: &mut BytesMut) {
    encode(Authentication::Ok, out);
}

/// ParameterStatus, written in place: pgwire's message takes owned strings, two allocations per
/// parameter and some fourteen parameters per login. `name` and `value` come from the server or
/// from the client's startup packet (C strings: no NUL inside); one that would not fit the
/// length field is skipped.
pub fn write_parameter_status(name: &str, value: &str, out: &mut BytesMut) {
    let Ok(len) = i32::try_from(4 + name.len() + 1 + value.len() + 1) else {
        return;
    };
    out.reserve(1 + len as usize);
    out.put_u8(b'S');
    out.put_i32(len);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_slice(value.as_bytes());
    out.put_u8(0);
}

pub fn write_backend_key(pid: i32, key: i32, out: &mut BytesMut) {
    encode(BackendKeyData::new(pid, SecretKey::I32(key)), out);
}

pub fn write_ready(status: TxStatus, out: &mut BytesMut) {
    let status = match status {
        TxStatus::Idle => TransactionStatus::Idle,
        TxStatus::InBlock => TransactionStatus::Transaction,
        TxStatus::Failed => TransactionStatus::Error,
    };
    encode(ReadyForQuery::new(status), out);
}

/// The newest protocol version rlsgate speaks, as a full protocol version number (3.0).
pub const PROTOCOL_3_0: i32 = 3 << 16;

/// NegotiateProtocolVersion as PostgreSQL 15 sends it to a client that asked for a newer minor
/// version (3.1, 3.2, … 3.65535) or for `_pq_.` options: the full version number of 3.0
/// (196608, not the bare minor 0, which libpq 18 reads as version 0.0 and gives up) and the
/// option names it did not recognise, in the client's order.
pub fn write_negotiate_version(unsupported: &[String], out: &mut BytesMut) {
    encode(
        NegotiateProtocolVersion::new(PROTOCOL_3_0, unsupported.to_vec()),
        out,
    );
}

pub fn write_command_complete(tag: &str, out: &mut BytesMut) {
    out.put_u8(COMMAND_COMPLETE);
    out.put_i32((4 + tag.len() + 1) as i32);
    out.put_slice(tag.as_bytes());
    out.put_u8(0);
}

/// RowDescription of text columns.
pub fn write_row_description(columns: &[&str], out: &mut BytesMut) {
    let len = 4 + 2 + columns.iter().map(|c| c.len() + 1 + 18).sum::<usize>();
    out.put_u8(ROW_DESCRIPTION);
    out.put_i32(len as i32);
    out.put_i16(columns.len() as i16);
    for c in columns {
        out.put_slice(c.as_bytes());
        out.put_u8(0);
        out.put_i32(0);
        out.put_i16(0);
        out.put_i32(25);
        out.put_i16(-1);
        out.put_i32(-1);
        out.put_i16(0);
    }
}

/// DataRow of text values.
pub fn write_data_row(values: &[String], out: &mut BytesMut) {
    let len = 4 + 2 + values.iter().map(|v| 4 + v.len()).sum::<usize>();
    out.put_u8(DATA_ROW);
    out.put_i32(len as i32);
    out.put_i16(values.len() as i16);
    for v in values {
        out.put_i32(v.len() as i32);
        out.put_slice(v.as_bytes());
    }
}

/// A one-column, one-row text result: RowDescription + DataRow + CommandComplete.
pub fn write_single_text_row(column: &str, value: &str, out: &mut BytesMut) {
    write_text_row_description(column, out);
    write_text_row(value, out);
    write_command_complete("SELECT 1", out);
}

/// RowDescription of one text column.
pub fn write_text_row_description(column: &str, out: &mut BytesMut) {
    out.put_u8(ROW_DESCRIPTION);
    out.put_i32((4 + 2 + column.len() + 1 + 4 + 2 + 4 + 2 + 4 + 2) as i32);
    out.put_i16(1);
    out.put_slice(column.as_bytes());
    out.put_u8(0);
    out.put_i32(0); // table oid
    out.put_i16(0); // column number
    out.put_i32(25); // text
    out.put_i16(-1);
    out.put_i32(-1);
    out.put_i16(0); // text format
}

/// DataRow of one text value (the same bytes in text and binary format).
pub fn write_text_row(value: &str, out: &mut BytesMut) {
    out.put_u8(DATA_ROW);
    out.put_i32((4 + 2 + 4 + value.len()) as i32);
    out.put_i16(1);
    out.put_i32(value.len() as i32);
    out.put_slice(value.as_bytes());
}

/// ParameterDescription of `params` text parameters.
pub fn write_text_parameters(params: u16, out: &mut BytesMut) {
    out.put_u8(PARAMETER_DESCRIPTION);
    out.put_i32(4 + 2 + 4 * i32::from(params));
    out.put_u16(params);
    for _ in 0..params {
        out.put_i32(25);
    }
}

/// A message with an empty body (ParseComplete, BindComplete, CloseComplete, NoData).
pub fn write_empty(tag: u8, out: &mut BytesMut) {
    out.put_u8(tag);
    out.put_i32(4);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::sqlstate;

    /// The in-place ParameterStatus is byte for byte pgwire's.
    #[test]
    fn parameter_status_matches_pgwire() {
        for (name, value) in [
            ("server_version", "15.20"),
            ("application_name", ""),
            ("", ""),
        ] {
            let mut ours = BytesMut::new();
            write_parameter_status(name, value, &mut ours);
            let mut theirs = BytesMut::new();
            pgwire::messages::startup::ParameterStatus::new(name.into(), value.into())
                .encode(&mut theirs)
                .expect("encode");
            assert_eq!(ours, theirs, "{name}={value}");
        }
    }

    #[test]
    fn error_round_trip() {
        let mut out = BytesMut::new();
        write_error(
            &ClientError::fatal(sqlstate::INVALID_AUTHORIZATION, "token expired"),
            &mut out,
        );
        assert_eq!(out[0], ERROR_RESPONSE);
        let n = notice_fields(&out[5..]).unwrap();
        assert_eq!(
            (n.severity.as_str(), n.code.as_str(), n.message.as_str()),
            ("FATAL", "28000", "token expired")
        );
    }

    #[test]
    fn ready_for_query_round_trip() {
        let mut out = BytesMut::new();
        write_ready(TxStatus::Failed, &mut out);
        assert_eq!(&out[..], b"Z\0\0\0\x05E");
        assert_eq!(ready_status(&out[5..]).unwrap(), TxStatus::Failed);
        assert!(ready_status(b"X").is_err());
    }
}
