//! The bytes rlsgate sends upstream on its own: the tenant context (`SET LOCAL …` as
//! Parse/Bind/Execute without Sync, DESIGN §3) and what stands in for a refused statement.

use bytes::{Bytes, BytesMut};
use postgres_protocol::escape::{escape_identifier, escape_literal};

use crate::auth::Identity;

use crate::protocol::ProtocolError;
use crate::protocol::frontend as fe;

/// `SET LOCAL <guc> = '<value>'` for each setting (and `SET LOCAL ROLE` in role mode), encoded
/// once per identity. Returns the bytes and the number of statements.
pub fn context_messages(identity: &Identity) -> Result<(Bytes, usize), ProtocolError> {
    let (bytes, n) = settings_messages(&identity.settings)?;
    let Some(role) = &identity.role else {
        return Ok((bytes, n));
    };
    let mut out = BytesMut::from(&bytes[..]);
    fe::write_simple_extended(
        &format!("SET LOCAL ROLE {}", escape_identifier(role)),
        &mut out,
    )?;
    Ok((out.freeze(), n + 1))
}

fn settings_messages(settings: &[(String, String)]) -> Result<(Bytes, usize), ProtocolError> {
    let mut out = BytesMut::new();
    for (guc, value) in settings {
        // guc names are validated at config load (`prefix.name`, lower-case identifier chars).
        let sql = format!("SET LOCAL {guc} = {}", escape_literal(value));
        fe::write_simple_extended(&sql, &mut out)?;
    }
    Ok((out.freeze(), settings.len()))
}

/// What rlsgate sends in place of a refused statement: text the server cannot parse, so that it
/// fails the statement itself and the transaction state, the skipping of messages up to Sync and
/// the ReadyForQuery status are exactly Postgres'. The relay hands the client the guard's error
/// instead of the server's; nothing here depends on a procedural language or any privilege. The
/// server's log shows `syntax error at or near "rlsgate"` with this text as the statement.
pub const REFUSED_SQL: &str = "rlsgate refused this statement";

/// The (never created) statement name of the extended-protocol refusal: a named Parse leaves the
/// client's unnamed statement alone.
pub const REFUSED_STATEMENT: &str = "rg_refused";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_values_are_quoted() {
        let (b, n) = settings_messages(&[("app.current_store_id".into(), "a'b".into())]).unwrap();
        assert_eq!(n, 1);
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("SET LOCAL app.current_store_id = 'a''b'"));
    }
}
