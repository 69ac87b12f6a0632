//! What a top-level statement does to session state the proxy keeps for its client:
//! session-level settings (replayed on every server connection the client gets) and
//! `DEALLOCATE` of protocol-level prepared statements (which live in the proxy, not the server).

use pg_query::NodeEnum;
use pg_query::protobuf::{Node, VariableSetKind, a_const};
use postgres_protocol::escape::escape_literal;

/// A session-level setting change the proxy can replay exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingChange {
    /// `name` (lower case) and the SQL that sets it.
    Set { name: String, sql: String },
    /// `RESET name` / `SET name TO DEFAULT`.
    Reset { name: String },
}

/// `DEALLOCATE name` (`Some`) or `DEALLOCATE ALL` (`None`).
pub type Deallocate = Option<String>;

/// Effects of one top-level statement; `text` is the statement's own text, `pinned` the setting
/// name of a pinned `SELECT set_config(name, …) FROM pg_settings WHERE name = '…'`.
pub(super) fn effects(
    node: &NodeEnum,
    text: &str,
    pinned: Option<&str>,
) -> (Option<SettingChange>, Option<Deallocate>) {
    match node {
        NodeEnum::VariableSetStmt(v) if !v.is_local => {
            let name = v.name.to_ascii_lowercase();
            let kind = VariableSetKind::try_from(v.kind).unwrap_or(VariableSetKind::Undefined);
            let change = match kind {
                VariableSetKind::VarSetValue => Some(SettingChange::Set {
                    name,
                    sql: text.trim().to_string(),
                }),
                VariableSetKind::VarSetDefault | VariableSetKind::VarReset => {
                    Some(SettingChange::Reset { name })
                }
                _ => None,
            };
            (change, None)
        }
        NodeEnum::SelectStmt(s)
            if s.target_list.len() == 1 && s.from_clause.is_empty() && s.where_clause.is_none() =>
        {
            (
                s.target_list
                    .first()
                    .and_then(|t| set_config_call(t, SettingName::Argument)),
                None,
            )
        }
        NodeEnum::SelectStmt(s) if s.target_list.len() == 1 => (
            pinned.and_then(|name| {
                s.target_list
                    .first()
                    .and_then(|t| set_config_call(t, SettingName::Pinned(name)))
            }),
            None,
        ),
        NodeEnum::DeallocateStmt(d) => (None, Some((!d.isall).then(|| d.name.clone()))),
        _ => (None, None),
    }
}

/// The token of `SELECT rlsgate.reauth('<jwt>')`, sent alone as a simple Query. Parsed without the
/// verdict cache so tokens are never kept in it.
pub fn reauth_token(sql: &str) -> Option<String> {
    match reauth_call(sql)? {
        ReauthArg::Token(t) => Some(t),
        ReauthArg::Param => None,
    }
}

/// The argument of `SELECT rlsgate.reauth(…)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReauthArg {
    /// The token, written in the text.
    Token(String),
    /// `$1` (optionally cast): the token comes as the first bind parameter.
    Param,
}

/// Whether `sql` contains "reauth" in any case: the cheap test before parsing, run on every
/// extended-protocol Parse (no lower-cased copy of the text).
fn mentions_reauth(sql: &str) -> bool {
    let b = sql.as_bytes();
    memchr::memchr2_iter(b'r', b'R', b).any(|i| {
        b.get(i..i + 6)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"reauth"))
    })
}

/// `SELECT rlsgate.reauth('<jwt>')` or `SELECT rlsgate.reauth($1)`, alone.
pub fn reauth_call(sql: &str) -> Option<ReauthArg> {
    let head = sql.trim_start();
    if !head
        .as_bytes()
        .get(..6)
        .is_some_and(|h| h.eq_ignore_ascii_case(b"select"))
        || !mentions_reauth(sql)
    {
        return None;
    }
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok()?;
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return None;
    };
    let Some(NodeEnum::SelectStmt(s)) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else {
        return None;
    };
    if s.target_list.len() != 1 || !s.from_clause.is_empty() || s.where_clause.is_some() {
        return None;
    }
    let Some(NodeEnum::ResTarget(t)) = &s.target_list[0].node else {
        return None;
    };
    let Some(NodeEnum::FuncCall(f)) = t.val.as_ref().and_then(|v| v.node.as_ref()) else {
        return None;
    };
    let names: Vec<String> = f
        .funcname
        .iter()
        .filter_map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.to_ascii_lowercase()),
            _ => None,
        })
        .collect();
    if names != ["rlsgate", "reauth"] || f.args.len() != 1 {
        return None;
    }
    let mut arg = f.args[0].node.as_ref()?;
    if let NodeEnum::TypeCast(t) = arg {
        arg = t.arg.as_ref()?.node.as_ref()?;
    }
    if let NodeEnum::ParamRef(p) = arg {
        return (p.number == 1).then_some(ReauthArg::Param);
    }
    const_str(&f.args[0]).map(ReauthArg::Token)
}

/// Where the setting name of a `set_config()` call comes from.
#[derive(Debug, Clone, Copy)]
enum SettingName<'a> {
    /// Its first argument, a constant.
    Argument,
    /// The literal a pinned `… FROM pg_settings WHERE name = '…'` compares `name` with.
    Pinned(&'a str),
}

/// `SELECT set_config('name', 'value', false)` with constants → `SET "name" TO 'value'`.
///
/// A pinned call is replayed in its own conditional form, with everything schema-qualified:
/// like the client's statement it is a no-op where the server has no such setting (pg_dump
/// relies on that against older servers), where `SET` would fail and stop the replay.
fn set_config_call(target: &Node, name_from: SettingName<'_>) -> Option<SettingChange> {
    let Some(NodeEnum::ResTarget(t)) = &target.node else {
        return None;
    };
    let Some(NodeEnum::FuncCall(f)) = t.val.as_ref().and_then(|v| v.node.as_ref()) else {
        return None;
    };
    let last = f.funcname.last().and_then(|n| match &n.node {
        Some(NodeEnum::String(s)) => Some(s.sval.to_ascii_lowercase()),
        _ => None,
    })?;
    if last != "set_config" || f.args.len() != 3 {
        return None;
    }
    let written = match name_from {
        SettingName::Argument => const_str(&f.args[0])?,
        SettingName::Pinned(name) => name.to_string(),
    };
    let name = written.to_ascii_lowercase();
    let value = const_str(&f.args[1])?;
    let is_local = match f.args[2].node.as_ref()? {
        NodeEnum::AConst(c) => match &c.val {
            Some(a_const::Val::Boolval(b)) => b.boolval,
            Some(a_const::Val::Sval(s)) => super::tree::parse_bool(&s.sval)?,
            _ => return None,
        },
        _ => return None,
    };
    if is_local {
        return None;
    }
    let sql = match name_from {
        SettingName::Argument => super::set_sql::set_statement(&name, &value),
        SettingName::Pinned(_) => format!(
            "SELECT pg_catalog.set_config(name, {}, false) FROM pg_catalog.pg_settings WHERE name = {}",
            escape_literal(&value),
            escape_literal(&written)
        ),
    };
    Some(SettingChange::Set { name, sql })
}

fn const_str(n: &Node) -> Option<String> {
    match n.node.as_ref()? {
        NodeEnum::AConst(c) => match &c.val {
            Some(a_const::Val::Sval(s)) => Some(s.sval.clone()),
            _ => None,
        },
        NodeEnum::TypeCast(t) => const_str(t.arg.as_ref()?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reauth_is_found_in_any_case_and_place() {
        for (sql, found) in [
            ("reauth", true),
            ("REAUTH", true),
            ("select rlsgate.ReAuTh($1)", true),
            ("xreauth", true),
            ("reaut", false),
            ("select 1", false),
            ("", false),
            ("r\u{e9}auth", false),
            ("\u{e9}reauth", true),
        ] {
            assert_eq!(mentions_reauth(sql), found, "{sql:?}");
        }
        assert_eq!(
            reauth_call("SELECT RLSGATE.REAUTH($1)"),
            Some(ReauthArg::Param)
        );
    }

    /// A multi-byte character across the first six bytes is no `select` (found by the session
    /// fuzz target: the check sliced the text inside the character and panicked).
    #[test]
    fn reauth_check_takes_any_text() {
        for sql in [
            "SELE\u{ed4e} 1",
            "\u{e9}\u{e9}\u{e9}xx",
            "sel\u{1f600}",
            "  s\u{e9}",
            "x",
            "",
        ] {
            assert_eq!(reauth_call(sql), None, "{sql:?}");
            assert_eq!(reauth_token(sql), None, "{sql:?}");
        }
        assert_eq!(
            reauth_call("select rlsgate.reauth($1)"),
            Some(ReauthArg::Param)
        );
    }
}
