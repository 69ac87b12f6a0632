//! The bytes rlsgate sends upstream on its own: the tenant context (`SET LOCAL …` as
//! Parse/Bind/Execute without Sync, DESIGN §3) and what stands in for a refused statement.

use bytes::{Bytes, BytesMut};
use postgres_protocol::escape::{escape_identifier, escape_literal};

use crate::auth::Identity;

use crate::protocol::ProtocolError;
use crate::protocol::frontend as fe;

/// What `[upstream] citus_propagate_set` adds in front of the tenant settings. Citus forwards a
/// `SET LOCAL` to the worker connections of a transaction block only when this is already in
/// effect when that `SET LOCAL` runs (measured on Citus 13.2: after the `SET LOCAL app.…` it
/// is too late, the workers get nothing).
pub const CITUS_PROPAGATE_SET: &str = "SET LOCAL citus.propagate_set_commands = 'local'";

/// `SET LOCAL <guc> = '<value>'` for each setting (and `SET LOCAL ROLE` in role mode), encoded
/// once per identity, preceded by [`CITUS_PROPAGATE_SET`] when `citus_propagate_set`. Returns
/// the bytes and the number of statements (the relay swallows that many replies).
pub fn context_messages(
    identity: &Identity,
    citus_propagate_set: bool,
) -> Result<(Bytes, usize), ProtocolError> {
    let mut out = BytesMut::new();
    let mut n = 0;
    if citus_propagate_set {
        fe::write_simple_extended(CITUS_PROPAGATE_SET, &mut out)?;
        n += 1;
    }
    let (settings, count) = settings_messages(&identity.settings)?;
    out.extend_from_slice(&settings);
    n += count;
    if let Some(role) = &identity.role {
        fe::write_simple_extended(
            &format!("SET LOCAL ROLE {}", escape_identifier(role)),
            &mut out,
        )?;
        n += 1;
    }
    Ok((out.freeze(), n))
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

    fn identity() -> Identity {
        Identity {
            tenant: "north".into(),
            subject: None,
            settings: vec![("app.current_store_id".into(), "north".into())],
            expires_at: u64::MAX,
            role: None,
            jti: None,
            admin: false,
        }
    }

    #[test]
    fn citus_propagate_set_comes_first_and_is_counted() {
        let (plain, n) = context_messages(&identity(), false).unwrap();
        assert_eq!(n, 1);
        let (citus, m) = context_messages(&identity(), true).unwrap();
        assert_eq!(m, 2);
        let text = String::from_utf8_lossy(&citus);
        let propagate = text.find(CITUS_PROPAGATE_SET).expect("propagate statement");
        let tenant = text
            .find("SET LOCAL app.current_store_id")
            .expect("tenant setting");
        assert!(propagate < tenant, "{text}");
        assert!(!String::from_utf8_lossy(&plain).contains("citus"));
        // `rlsgate check` probes the workers with the same statement.
        assert_eq!(CITUS_PROPAGATE_SET, crate::doctor::CITUS_PROPAGATE_SET);
    }

    #[test]
    fn context_values_are_quoted() {
        let (b, n) = settings_messages(&[("app.current_store_id".into(), "a'b".into())]).unwrap();
        assert_eq!(n, 1);
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("SET LOCAL app.current_store_id = 'a''b'"));
    }
}
