//! The bytes rlsgate sends upstream on its own: the tenant context (DESIGN §3) and what stands
//! in for a refused statement.
//!
//! The context is a statement prepared once per server connection and from then on only bound
//! and executed, pipelined ahead of the client's messages (no Sync): no per-transaction Parse
//! or plan. Two forms:
//! - `SELECT pg_catalog.set_config('<guc>', $1, true), …` with the values as bind parameters,
//!   one statement for every tenant, when the connection's role may call `set_config`. Postgres
//!   logs nothing for it.
//! - `SET LOCAL <guc> = '<value>'` (one statement per setting and tenant) otherwise, and always
//!   with `citus_propagate_set` (Citus forwards `SET` commands to its workers, not function
//!   calls). Outside a transaction block Postgres answers each with a WARNING ("SET LOCAL can
//!   only be used in transaction blocks"), which rlsgate swallows but the server log keeps
//!   unless `log_min_messages` is raised for the role.

use std::hash::BuildHasher;
use std::sync::Arc;

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

/// One of rlsgate's own statements: its server-side name, the Parse that creates it on a
/// connection that lacks it, and the Bind + Execute (unnamed portal) that runs it.
#[derive(Debug)]
pub struct OwnStatement {
    pub name: Arc<str>,
    pub parse: Bytes,
    pub run: Bytes,
    /// Length of its text (the connection's statement budget counts it).
    pub text_len: usize,
}

impl OwnStatement {
    fn new(
        hasher: &impl BuildHasher,
        sql: &str,
        param_types: &[u8],
        params: &[u8],
    ) -> Result<Self, ProtocolError> {
        // 128 bits, keyed per process: a collision would run another tenant's statement.
        let name = format!(
            "rg_ctx_{:016x}{:016x}",
            hasher.hash_one((1u8, sql)),
            hasher.hash_one((2u8, sql))
        );
        let mut parse = BytesMut::new();
        fe::write_parse(&name, sql, param_types, &mut parse)?;
        OwnStatement::with_parse(Arc::from(name), parse.freeze(), params, sql.len())
    }

    /// A statement of rlsgate's own whose parameters change with every run (see
    /// [`OwnStatement::write_run`]); its `run` binds none.
    pub fn prepared(hasher: &impl BuildHasher, sql: &str) -> Result<Self, ProtocolError> {
        OwnStatement::new(hasher, sql, &[0, 0], &text_params(&[])?)
    }

    /// Bind (unnamed portal, text parameters `values`) + Execute of this statement.
    pub fn write_run(&self, values: &[&str], out: &mut BytesMut) -> Result<(), ProtocolError> {
        fe::write_bind("", &self.name, &text_params(values)?, out)?;
        fe::write_execute("", out)
    }

    /// The statement `name` whose Parse message is `parse`, bound with `params`.
    fn with_parse(
        name: Arc<str>,
        parse: Bytes,
        params: &[u8],
        text_len: usize,
    ) -> Result<Self, ProtocolError> {
        let mut run = BytesMut::new();
        fe::write_bind("", &name, params, &mut run)?;
        fe::write_execute("", &mut run)?;
        Ok(OwnStatement {
            name,
            parse,
            run: run.freeze(),
            text_len,
        })
    }
}

/// transaction_wrap's `BEGIN` and `COMMIT`, prepared once per server connection like the
/// context and bound per transaction: no ReadyForQuery (and so no flush of the server's output)
/// of their own. The same for every session.
#[derive(Debug)]
pub struct WrapStatements {
    pub begin: OwnStatement,
    pub commit: OwnStatement,
}

impl WrapStatements {
    pub fn new(hasher: &impl BuildHasher) -> Result<Self, ProtocolError> {
        let none = text_params(&[])?;
        Ok(WrapStatements {
            begin: OwnStatement::new(hasher, "BEGIN", &[0, 0], &none)?,
            commit: OwnStatement::new(hasher, "COMMIT", &[0, 0], &none)?,
        })
    }
}

/// The `set_config` form's text depends only on the configured setting names, so sessions share
/// its name and Parse message (one copy per process instead of one per client): the last text
/// built, kept here.
#[derive(Default)]
pub struct SharedParse(std::sync::Mutex<Option<SharedEntry>>);

/// The statement text, its name and its Parse message.
type SharedEntry = (Box<str>, Arc<str>, Bytes);

impl SharedParse {
    fn get(&self, sql: &str) -> Option<(Arc<str>, Bytes)> {
        let slot = self.0.lock().ok()?;
        match slot.as_ref() {
            Some((text, name, parse)) if **text == *sql => Some((Arc::clone(name), parse.clone())),
            _ => None,
        }
    }

    fn put(&self, sql: &str, statement: &OwnStatement) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some((
                Box::from(sql),
                Arc::clone(&statement.name),
                statement.parse.clone(),
            ));
        }
    }
}

/// Which form of the context a connection gets (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextForm {
    SetConfig,
    SetLocal,
}

/// One session's tenant context in both forms.
#[derive(Debug)]
pub struct Context {
    /// The `set_config` form (`None` with `citus_propagate_set`).
    set_config: Option<OwnStatement>,
    /// The `SET LOCAL` form, built when a connection first needs it.
    set_local: Option<Arc<[OwnStatement]>>,
    /// The context a connection keeps (see `pool::Ambient`), built when a connection first gets
    /// it: `set_config(…, false)`, or `SET …` (one per setting and value) where the connection
    /// may not call `set_config`.
    kept_set_config: Option<OwnStatement>,
    kept_set: Option<Box<[OwnStatement]>>,
    citus_propagate_set: bool,
}

impl Context {
    pub fn new(
        identity: &Identity,
        citus_propagate_set: bool,
        hasher: &impl BuildHasher,
        shared: &SharedParse,
    ) -> Result<Self, ProtocolError> {
        let set_config = if citus_propagate_set {
            None
        } else {
            Some(set_config_statement(identity, hasher, shared, true)?)
        };
        Ok(Context {
            set_config,
            set_local: None,
            kept_set_config: None,
            kept_set: None,
            citus_propagate_set,
        })
    }

    /// What tells this context from every other (the `set_config` form's Bind, which carries
    /// the values): the key of a connection that keeps it ([`Ambient`]). `None` with
    /// `citus_propagate_set`.
    pub fn key(&self) -> Option<&Bytes> {
        self.set_config.as_ref().map(|s| &s.run)
    }

    /// The session-level statements a connection keeps the context with once they commit:
    /// `set_config(…, false)` in the `SetConfig` form, else a `SET` per setting (a session-level
    /// `SET` outside a block needs no privilege and draws no WARNING).
    pub fn kept_form(
        &mut self,
        form: ContextForm,
        identity: &Identity,
        hasher: &impl BuildHasher,
        shared: &SharedParse,
    ) -> Result<&[OwnStatement], ProtocolError> {
        if form == ContextForm::SetConfig {
            let statement = match self.kept_set_config.take() {
                Some(statement) => statement,
                None => set_config_statement(identity, hasher, shared, false)?,
            };
            return Ok(std::slice::from_ref(self.kept_set_config.insert(statement)));
        }
        let statements = match self.kept_set.take() {
            Some(statements) => statements,
            None => set_statements(identity, hasher)?,
        };
        Ok(self.kept_set.insert(statements))
    }

    /// The `set_config` form (`None` with `citus_propagate_set`).
    pub fn set_config(&self) -> Option<&OwnStatement> {
        self.set_config.as_ref()
    }

    /// The statements of the form a connection gets: `set_config` unless the connection may
    /// not call it (or Citus needs `SET`).
    pub fn statements(
        &mut self,
        form: ContextForm,
        identity: &Identity,
        hasher: &impl BuildHasher,
    ) -> Result<&[OwnStatement], ProtocolError> {
        if form == ContextForm::SetConfig && self.set_config.is_some() {
            return Ok(self.set_config.as_slice());
        }
        Ok(self.set_local_form(identity, hasher)?)
    }

    /// The `SET LOCAL` form, shared (pipeline lanes whose role may not call `set_config`).
    pub fn set_local_form(
        &mut self,
        identity: &Identity,
        hasher: &impl BuildHasher,
    ) -> Result<&Arc<[OwnStatement]>, ProtocolError> {
        if self.set_local.is_none() {
            self.set_local = Some(Arc::from(set_local_statements(
                identity,
                self.citus_propagate_set,
                hasher,
            )?));
        }
        Ok(self.set_local.get_or_insert_with(|| Arc::from(Vec::new())))
    }
}

/// `SELECT pg_catalog.set_config('<guc>', $1, <local>), …, pg_catalog.set_config('role', $n,
/// <local>)`: the text depends only on the configured setting names (validated at config load:
/// `prefix.name`, lower-case identifier characters) and `local`, the values are bind parameters
/// (never in query text, which other backends of the role can read in `pg_stat_activity`).
fn set_config_statement(
    identity: &Identity,
    hasher: &impl BuildHasher,
    shared: &SharedParse,
    local: bool,
) -> Result<OwnStatement, ProtocolError> {
    let names = identity
        .settings
        .iter()
        .map(|(guc, _)| guc.as_str())
        .chain(identity.role.as_ref().map(|_| "role"));
    let values = identity
        .settings
        .iter()
        .map(|(_, value)| value.as_str())
        .chain(identity.role.as_deref());
    let mut sql = String::from("SELECT ");
    for (i, name) in names.enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "pg_catalog.set_config({}, ${}, {local})",
            escape_literal(name),
            i + 1
        ));
    }
    let values: Vec<&str> = values.collect();
    let params = text_params(&values)?;
    if let Some((name, parse)) = shared.get(&sql) {
        return OwnStatement::with_parse(name, parse, &params, sql.len());
    }
    let statement = OwnStatement::new(hasher, &sql, &[0, 0], &params)?;
    shared.put(&sql, &statement);
    Ok(statement)
}

/// `SET LOCAL <guc> = '<value>'` for each setting (and `SET LOCAL ROLE` in role mode), preceded
/// by [`CITUS_PROPAGATE_SET`] when `citus_propagate_set`.
fn set_local_statements(
    identity: &Identity,
    citus_propagate_set: bool,
    hasher: &impl BuildHasher,
) -> Result<Box<[OwnStatement]>, ProtocolError> {
    let mut texts = Vec::with_capacity(identity.settings.len() + 2);
    if citus_propagate_set {
        texts.push(CITUS_PROPAGATE_SET.to_string());
    }
    for (guc, value) in &identity.settings {
        texts.push(format!("SET LOCAL {guc} = {}", escape_literal(value)));
    }
    if let Some(role) = &identity.role {
        texts.push(format!("SET LOCAL ROLE {}", escape_identifier(role)));
    }
    texts
        .iter()
        .map(|sql| OwnStatement::new(hasher, sql, &[0, 0], &text_params(&[])?))
        .collect()
}

/// `SET <guc> = '<value>'` for each setting (session level: what a connection keeps).
fn set_statements(
    identity: &Identity,
    hasher: &impl BuildHasher,
) -> Result<Box<[OwnStatement]>, ProtocolError> {
    identity
        .settings
        .iter()
        .map(|(guc, value)| {
            let sql = format!("SET {guc} = {}", escape_literal(value));
            OwnStatement::new(hasher, &sql, &[0, 0], &text_params(&[])?)
        })
        .collect()
}

/// The tail of a Bind after the statement name: no parameter formats (all text), the values,
/// no result formats (all text).
fn text_params(values: &[&str]) -> Result<Vec<u8>, ProtocolError> {
    let count = i16::try_from(values.len()).map_err(|_| ProtocolError::Malformed("Bind"))?;
    let mut out = Vec::new();
    out.extend_from_slice(&0i16.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for value in values {
        let len = i32::try_from(value.len()).map_err(|_| ProtocolError::Malformed("Bind"))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(&0i16.to_be_bytes());
    Ok(out)
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

    fn texts(statements: &[OwnStatement]) -> Vec<String> {
        statements
            .iter()
            .map(|s| {
                let p = fe::parse(&s.parse[5..]).expect("a Parse");
                assert_eq!(p.name, &*s.name);
                p.sql.to_string()
            })
            .collect()
    }

    #[test]
    fn the_set_config_form_binds_the_values() {
        let hasher = std::collections::hash_map::RandomState::new();
        let mut id = identity();
        id.settings[0].1 = "a'b".into();
        id.role = Some("tenant_north".into());
        let mut ctx = Context::new(&id, false, &hasher, &SharedParse::default()).unwrap();
        let stmts = ctx
            .statements(ContextForm::SetConfig, &id, &hasher)
            .unwrap();
        assert_eq!(
            texts(stmts),
            [
                "SELECT pg_catalog.set_config('app.current_store_id', $1, true), pg_catalog.set_config('role', $2, true)"
            ]
        );
        let run = &stmts[0].run;
        let bind_len = u32::from_be_bytes([run[1], run[2], run[3], run[4]]) as usize;
        let b = fe::bind(&run[5..1 + bind_len]).expect("a Bind");
        assert_eq!(b.statement, &*stmts[0].name);
        let run = String::from_utf8_lossy(&stmts[0].run);
        assert!(run.contains("a'b") && run.contains("tenant_north"), "{run}");
        // the text is the same for every tenant: one statement per connection
        let other = Context::new(&identity(), false, &hasher, &SharedParse::default()).unwrap();
        assert_ne!(
            other.set_config.as_ref().map(|s| &s.name),
            None,
            "a set_config form"
        );
    }

    /// Sessions share the `set_config` form's name and Parse bytes (one copy per process); each
    /// binds its own values; another text (another set of names) gets its own.
    #[test]
    fn sessions_share_the_set_config_parse() {
        let hasher = std::collections::hash_map::RandomState::new();
        let shared = SharedParse::default();
        let north = identity();
        let mut south = identity();
        south.tenant = "south".into();
        south.settings[0].1 = "south".into();
        let mut a = Context::new(&north, false, &hasher, &shared).unwrap();
        let mut b = Context::new(&south, false, &hasher, &shared).unwrap();
        let a = &a
            .statements(ContextForm::SetConfig, &north, &hasher)
            .unwrap()[0];
        let b = &b
            .statements(ContextForm::SetConfig, &south, &hasher)
            .unwrap()[0];
        assert!(Arc::ptr_eq(&a.name, &b.name));
        assert_eq!(
            a.parse.as_ptr(),
            b.parse.as_ptr(),
            "one Parse message in memory"
        );
        assert_ne!(a.run, b.run);
        let fresh = Context::new(&south, false, &hasher, &SharedParse::default()).unwrap();
        assert_eq!(fresh.set_config.as_ref().unwrap().parse, b.parse);
        assert_eq!(fresh.set_config.as_ref().unwrap().run, b.run);
        let mut role = identity();
        role.role = Some("tenant_north".into());
        let c = Context::new(&role, false, &hasher, &shared).unwrap();
        assert_ne!(c.set_config.as_ref().unwrap().name, b.name);
    }

    #[test]
    fn citus_propagate_set_comes_first() {
        let hasher = std::collections::hash_map::RandomState::new();
        let id = identity();
        let mut ctx = Context::new(&id, true, &hasher, &SharedParse::default()).unwrap();
        // Citus forwards SET commands only: never the set_config form
        let stmts = ctx
            .statements(ContextForm::SetConfig, &id, &hasher)
            .unwrap();
        assert_eq!(
            texts(stmts),
            [
                CITUS_PROPAGATE_SET,
                "SET LOCAL app.current_store_id = 'north'"
            ]
        );
        // `rlsgate check` probes the workers with the same statement.
        assert_eq!(CITUS_PROPAGATE_SET, crate::doctor::CITUS_PROPAGATE_SET);
    }

    #[test]
    fn set_local_values_are_quoted_and_names_differ_per_value() {
        let hasher = std::collections::hash_map::RandomState::new();
        let mut id = identity();
        id.settings[0].1 = "a'b".into();
        let mut ctx = Context::new(&id, false, &hasher, &SharedParse::default()).unwrap();
        let quoted = ctx.statements(ContextForm::SetLocal, &id, &hasher).unwrap();
        assert_eq!(texts(quoted), ["SET LOCAL app.current_store_id = 'a''b'"]);
        let quoted_name = Arc::clone(&quoted[0].name);
        let north = identity();
        let mut ctx = Context::new(&north, false, &hasher, &SharedParse::default()).unwrap();
        let plain = ctx
            .statements(ContextForm::SetLocal, &north, &hasher)
            .unwrap();
        assert_ne!(plain[0].name, quoted_name);
    }
}
