//! Client (frontend) messages: read the fields rlsgate inspects, write the ones it injects.
//!
//! Readers borrow from the frame body; nothing is copied. Writers use `postgres-protocol`.

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend as fe;

use super::{Cursor, ProtocolError};

pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const CLOSE: u8 = b'C';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const TERMINATE: u8 = b'X';
pub const FUNCTION_CALL: u8 = b'F';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const PASSWORD: u8 = b'p';

/// `Query`: the SQL text.
pub fn query_text(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut c = Cursor::new(body, "Query");
    let sql = c.cstr()?;
    if !c.is_empty() {
        return Err(ProtocolError::Malformed("Query"));
    }
    Ok(sql)
}

#[derive(Debug, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a str,
    pub sql: &'a str,
    /// The raw `int16 count + int32 oids` tail, kept as bytes to re-emit verbatim.
    pub param_types: &'a [u8],
}

pub fn parse(body: &[u8]) -> Result<Parse<'_>, ProtocolError> {
    let mut c = Cursor::new(body, "Parse");
    let name = c.cstr()?;
    let sql = c.cstr()?;
    let param_types = c.rest();
    let mut t = Cursor::new(param_types, "Parse");
    let n = t.i16()?;
    if n < 0 || t.rest().len() != n as usize * 4 {
        return Err(ProtocolError::Malformed("Parse"));
    }
    Ok(Parse {
        name,
        sql,
        param_types,
    })
}

#[derive(Debug, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// Everything after the statement name (formats, parameters, result formats), re-emitted verbatim.
    pub rest: &'a [u8],
}

pub fn bind(body: &[u8]) -> Result<Bind<'_>, ProtocolError> {
    let mut c = Cursor::new(body, "Bind");
    let portal = c.cstr()?;
    let statement = c.cstr()?;
    let rest = c.rest();
    validate_bind_tail(rest)?;
    Ok(Bind {
        portal,
        statement,
        rest,
    })
}

/// Bounds-check the Bind tail so a malformed message is refused here, not by the server.
fn validate_bind_tail(rest: &[u8]) -> Result<(), ProtocolError> {
    let mut c = Cursor::new(rest, "Bind");
    let nfmt = c.i16()?;
    if nfmt < 0 {
        return Err(ProtocolError::Malformed("Bind"));
    }
    c.take(nfmt as usize * 2)?;
    let nparams = c.i16()?;
    if nparams < 0 {
        return Err(ProtocolError::Malformed("Bind"));
    }
    for _ in 0..nparams {
        let len = c.i32()?;
        if len > 0 {
            c.take(len as usize)?;
        } else if len < -1 {
            return Err(ProtocolError::Malformed("Bind"));
        }
    }
    let nres = c.i16()?;
    if nres < 0 {
        return Err(ProtocolError::Malformed("Bind"));
    }
    c.take(nres as usize * 2)?;
    if !c.is_empty() {
        return Err(ProtocolError::Malformed("Bind"));
    }
    Ok(())
}

/// The first parameter value of a (validated) Bind tail: `None` for NULL or no parameter.
pub fn bind_first_param(rest: &[u8]) -> Result<Option<&[u8]>, ProtocolError> {
    let mut c = Cursor::new(rest, "Bind");
    let nfmt = c.i16()?;
    c.take(usize::try_from(nfmt).map_err(|_| ProtocolError::Malformed("Bind"))? * 2)?;
    if c.i16()? < 1 {
        return Ok(None);
    }
    let len = c.i32()?;
    match usize::try_from(len) {
        Ok(len) => Ok(Some(c.take(len)?)),
        Err(_) => Ok(None),
    }
}

/// `Describe` and `Close`: kind (`S` statement or `P` portal) and name.
pub fn target<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a str), ProtocolError> {
    let mut c = Cursor::new(body, what);
    let kind = c.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(ProtocolError::Malformed(what));
    }
    let name = c.cstr()?;
    if !c.is_empty() {
        return Err(ProtocolError::Malformed(what));
    }
    Ok((kind, name))
}

/// `Execute`: portal name (max rows is forwarded untouched).
pub fn execute_portal(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut c = Cursor::new(body, "Execute");
    let portal = c.cstr()?;
    c.i32()?;
    Ok(portal)
}

/// `FunctionCall`: the function OID (arguments are forwarded untouched).
pub fn function_call_oid(body: &[u8]) -> Result<u32, ProtocolError> {
    let mut c = Cursor::new(body, "FunctionCall");
    Ok(c.i32()? as u32)
}

/// Password message: the cleartext password (here: the JWT).
pub fn password(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut c = Cursor::new(body, "PasswordMessage");
    let pw = c.cstr()?;
    if !c.is_empty() {
        return Err(ProtocolError::Malformed("PasswordMessage"));
    }
    Ok(pw)
}

fn write_err(_: std::io::Error) -> ProtocolError {
    // postgres-protocol only fails on embedded NULs or lengths beyond i32.
    ProtocolError::Malformed("outgoing")
}

pub fn write_query(sql: &str, out: &mut BytesMut) -> Result<(), ProtocolError> {
    fe::query(sql, out).map_err(write_err)
}

/// `CopyFail` with a reason rlsgate writes itself (no NUL in it).
pub fn write_copy_fail(reason: &str, out: &mut BytesMut) {
    let reason = reason.replace('\0', "");
    out.put_u8(COPY_FAIL);
    out.put_i32((4 + reason.len() + 1) as i32);
    out.put_slice(reason.as_bytes());
    out.put_u8(0);
}

/// `Parse` with a given name and the param-type tail copied from the client's message.
pub fn write_parse(
    name: &str,
    sql: &str,
    param_types: &[u8],
    out: &mut BytesMut,
) -> Result<(), ProtocolError> {
    if name.contains('\0') || sql.contains('\0') {
        return Err(ProtocolError::Malformed("Parse"));
    }
    let len = 4 + name.len() + 1 + sql.len() + 1 + param_types.len();
    let len = i32::try_from(len).map_err(|_| ProtocolError::Malformed("Parse"))?;
    out.put_u8(PARSE);
    out.put_i32(len);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_slice(sql.as_bytes());
    out.put_u8(0);
    out.put_slice(param_types);
    Ok(())
}

/// `Bind` re-targeted at another statement name, everything else verbatim.
pub fn write_bind(
    portal: &str,
    statement: &str,
    rest: &[u8],
    out: &mut BytesMut,
) -> Result<(), ProtocolError> {
    let len = 4 + portal.len() + 1 + statement.len() + 1 + rest.len();
    let len = i32::try_from(len).map_err(|_| ProtocolError::Malformed("Bind"))?;
    out.put_u8(BIND);
    out.put_i32(len);
    out.put_slice(portal.as_bytes());
    out.put_u8(0);
    out.put_slice(statement.as_bytes());
    out.put_u8(0);
    out.put_slice(rest);
    Ok(())
}

/// `Describe` of a statement under another name.
pub fn write_describe(kind: u8, name: &str, out: &mut BytesMut) -> Result<(), ProtocolError> {
    fe::describe(kind, name, out).map_err(write_err)
}

/// `Close` of a statement or portal.
pub fn write_close(kind: u8, name: &str, out: &mut BytesMut) -> Result<(), ProtocolError> {
    fe::close(kind, name, out).map_err(write_err)
}

/// `Execute` of a portal, all rows.
pub fn write_execute(portal: &str, out: &mut BytesMut) -> Result<(), ProtocolError> {
    fe::execute(portal, 0, out).map_err(write_err)
}

/// Parse + Bind + Execute of a parameterless statement on the unnamed statement/portal, no Sync.
pub fn write_simple_extended(sql: &str, out: &mut BytesMut) -> Result<(), ProtocolError> {
    write_parse("", sql, &[0, 0], out)?;
    write_bind("", "", &[0, 0, 0, 0, 0, 0], out)?;
    fe::execute("", 0, out).map_err(write_err)
}

pub fn write_sync(out: &mut BytesMut) {
    fe::sync(out);
}

pub fn write_terminate(out: &mut BytesMut) {
    fe::terminate(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_bind_round_trip() {
        let mut out = BytesMut::new();
        write_parse("s1", "select $1", &[0, 1, 0, 0, 0, 23], &mut out).unwrap();
        let p = parse(&out[5..]).unwrap();
        assert_eq!(
            (p.name, p.sql, p.param_types),
            ("s1", "select $1", &[0u8, 1, 0, 0, 0, 23][..])
        );

        let mut out = BytesMut::new();
        let tail = [0, 0, 0, 1, 0, 0, 0, 2, b'4', b'2', 0, 0];
        write_bind("", "s1", &tail, &mut out).unwrap();
        let b = bind(&out[5..]).unwrap();
        assert_eq!((b.portal, b.statement, b.rest), ("", "s1", &tail[..]));
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        assert!(parse(b"s1\0select").is_err());
        assert!(parse(b"s1\0select\0\0\x02\0\0\0\x17").is_err());
        assert!(bind(b"\0s1\0\0\0\0\x01\0\0\x10\0").is_err());
        assert!(bind(b"\0s1\0\xff\xff").is_err());
        assert!(target(b"Xname\0", "Describe").is_err());
        assert!(query_text(b"select 1").is_err());
        assert!(execute_portal(b"\0\0").is_err());
    }
}
