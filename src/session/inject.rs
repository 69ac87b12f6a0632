//! The bytes rlsgate sends upstream on its own: the tenant context (`SET LOCAL …` as
//! Parse/Bind/Execute without Sync, DESIGN §3) and server-side raised errors for denials.

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

/// SQL that makes the server itself raise `sqlstate`/`message`, so that the transaction state,
/// the skipping of messages up to Sync and the ReadyForQuery status are exactly Postgres'.
pub fn raise_sql(sqlstate: &str, message: &str, hint: Option<&str>) -> String {
    // `$` is removed so no text can close the dollar quote; everything else is a quoted literal.
    let clean = |s: &str| s.replace('$', "");
    let mut sql = format!(
        "DO $rlsgate$ BEGIN RAISE EXCEPTION USING ERRCODE = {}, MESSAGE = {}",
        escape_literal(&clean(sqlstate)),
        escape_literal(&clean(message)),
    );
    if let Some(h) = hint {
        sql.push_str(&format!(", HINT = {}", escape_literal(&clean(h))));
    }
    sql.push_str("; END $rlsgate$");
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_sql_cannot_be_broken_out_of() {
        let sql = raise_sql("42501", "name \"x$rlsgate$; select 1 --'\"", None);
        assert_eq!(sql.matches("$rlsgate$").count(), 2);
        assert!(sql.contains("'name \"xrlsgate; select 1 --''\"'"));
    }

    #[test]
    fn context_values_are_quoted() {
        let (b, n) = settings_messages(&[("app.current_store_id".into(), "a'b".into())]).unwrap();
        assert_eq!(n, 1);
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("SET LOCAL app.current_store_id = 'a''b'"));
    }
}
