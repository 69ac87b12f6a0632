//! Statement classification.
//!
//! Statements are parsed by libpg_query. The top-level statement decides transaction effects and
//! whether it may run in a transaction block; the *whole* tree is then searched generically (via
//! its serde form, so no node type can be missed) for anything that could change, reset or forge a
//! protected setting, or leave session state behind on a pooled connection.

use pg_query::NodeEnum;
use pg_query::protobuf::{DiscardMode, RawStmt, TransactionStmtKind, VariableSetKind};
use serde_json::Value;

use super::GuardOptions;
use super::session_effects::{Deallocate, SettingChange, effects};
use super::tree::{const_string, func_name, unwrap_node};

/// How a statement moves the transaction state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxEffect {
    None,
    /// BEGIN / START TRANSACTION
    Begin,
    /// COMMIT / ROLLBACK / END / ABORT / PREPARE TRANSACTION
    End,
    /// COMMIT AND CHAIN and friends: the next state cannot be predicted from the text.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Byte range of the statement in the original text (without the trailing `;`).
    pub start: usize,
    pub end: usize,
    pub tx: TxEffect,
    /// VACUUM, CREATE DATABASE, CREATE INDEX CONCURRENTLY…: cannot run inside a transaction block.
    pub no_tx_block: bool,
    /// Behaves differently inside a transaction block (SAVEPOINT & co., SET LOCAL, SET
    /// TRANSACTION): transaction_wrap sends it unwrapped so the client sees what Postgres says.
    pub block_sensitive: bool,
    /// A session-level setting change the proxy can replay on other connections.
    pub setting: Option<SettingChange>,
    /// `DEALLOCATE name` / `DEALLOCATE ALL` (`Some(None)`).
    pub deallocate: Option<Deallocate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Short, bounded rule name (for logs and metrics).
    pub rule: &'static str,
    /// What was blocked and why, for the client.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(Denial),
}

/// `RESET ALL` / `DISCARD ALL`: emulated by the session (run outside any transaction, never
/// where they could clear the tenant context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionReset {
    ResetAll,
    DiscardAll,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub verdict: Verdict,
    pub statements: Vec<Statement>,
    /// State that would outlive the transaction on a pooled connection (temp table, LISTEN, …).
    pub session_state: Option<&'static str>,
    /// A session-level `SET` (or `set_config(…, false)`) of an ordinary setting.
    pub session_set: bool,
    /// A session-level setting change the proxy cannot replay (SET … FROM CURRENT,
    /// set_config with computed arguments): the connection must be reset after the client.
    pub untracked_set: bool,
    /// Whether libpg_query could parse the text.
    pub parsed: bool,
    /// The text is exactly one `RESET ALL` or `DISCARD ALL`.
    pub reset: Option<SessionReset>,
    /// A `COPY … FROM STDIN` (the server reads copy data next, not further statements).
    pub copy_from_stdin: bool,
}

impl Analysis {
    pub fn is_denied(&self) -> bool {
        matches!(self.verdict, Verdict::Deny(_))
    }

    /// Combined transaction effect of all statements, for predicting the state after the text runs.
    pub fn tx_effect(&self) -> TxEffect {
        if !self.parsed {
            return TxEffect::Unknown;
        }
        let mut effect = TxEffect::None;
        for s in &self.statements {
            match s.tx {
                TxEffect::None => {}
                other if effect == TxEffect::None => effect = other,
                _ => effect = TxEffect::Unknown,
            }
        }
        effect
    }

    /// A single statement that must not be wrapped in a transaction (no context injection).
    pub fn runs_outside_transaction(&self) -> bool {
        self.statements.len() == 1 && self.statements[0].no_tx_block
    }

    /// Byte offsets after which a multi-statement text must be split so that the statements after a
    /// COMMIT/ROLLBACK run with the tenant context re-applied.
    pub fn split_points(&self) -> Vec<usize> {
        let n = self.statements.len();
        self.statements
            .iter()
            .enumerate()
            .filter(|(i, s)| *i + 1 < n && matches!(s.tx, TxEffect::End | TxEffect::Unknown))
            .map(|(i, _)| self.statements[i + 1].start)
            .collect()
    }
}

fn deny(rule: &'static str, message: String) -> Verdict {
    Verdict::Deny(Denial { rule, message })
}

/// Functions that run SQL given to them as text.
const SQL_EXEC_FUNCTIONS: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "ts_stat",
];
/// Functions that read through a cursor or table by name; allowed with constant arguments only.
const XML_EXPORT_PREFIXES: &[&str] = &[
    "cursor_to_xml",
    "table_to_xml",
    "schema_to_xml",
    "database_to_xml",
];
/// Session-level advisory locks survive the transaction.
const SESSION_LOCK_FUNCTIONS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];
/// Settings that change who the session is.
const ROLE_SETTINGS: &[&str] = &["role", "session_authorization"];
/// Settings that change how the server reads SQL text, which would let text parse differently
/// upstream than in the guard.
const PARSER_SETTINGS: &[&str] = &[
    "standard_conforming_strings",
    "backslash_quote",
    "client_encoding",
];

pub fn analyze(sql: &str, opts: &GuardOptions) -> Analysis {
    analyze_depth(sql, opts, 0)
}

fn analyze_depth(sql: &str, opts: &GuardOptions, depth: u32) -> Analysis {
    let parsed = match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(p) => p,
        Err(_) => return unparsable(sql, opts),
    };
    let mut analysis = Analysis {
        verdict: Verdict::Allow,
        statements: Vec::new(),
        session_state: None,
        session_set: false,
        untracked_set: false,
        parsed: true,
        reset: None,
        copy_from_stdin: false,
    };
    for raw in &parsed.protobuf.stmts {
        let (start, end) = stmt_range(raw, sql.len());
        let node = raw.stmt.as_ref().and_then(|n| n.node.as_ref());
        let (tx, no_tx_block) = node.map(top_level).unwrap_or((TxEffect::None, false));
        if let Some(NodeEnum::CopyStmt(c)) = node
            && c.is_from
            && c.filename.is_empty()
        {
            analysis.copy_from_stdin = true;
        }
        let text = sql.get(start..end).unwrap_or_default();
        let block_sensitive = match node {
            Some(NodeEnum::TransactionStmt(_)) => tx == TxEffect::None,
            Some(NodeEnum::VariableSetStmt(v)) => {
                v.is_local || v.kind == VariableSetKind::VarSetMulti as i32
            }
            _ => false,
        };
        let (setting, deallocate) = node.map(|n| effects(n, text)).unwrap_or((None, None));
        analysis.statements.push(Statement {
            start,
            end,
            tx,
            no_tx_block,
            block_sensitive,
            setting,
            deallocate,
        });
    }
    let tree = match serde_json::to_value(&parsed.protobuf) {
        Ok(t) => t,
        Err(_) => {
            analysis.verdict = deny("unclassified", "statement could not be classified".into());
            return analysis;
        }
    };
    let mut search = Search {
        opts,
        depth,
        verdict: Verdict::Allow,
        session_state: None,
        session_set: false,
        session_sets: 0,
        reset: None,
    };
    search.walk(&tree);
    analysis.verdict = search.verdict;
    analysis.session_state = search.session_state;
    analysis.session_set = search.session_set;
    let tracked = analysis
        .statements
        .iter()
        .filter(|s| s.setting.is_some())
        .count();
    analysis.untracked_set = search.session_sets > tracked;
    if let (Some(kind), Verdict::Allow) = (search.reset, &analysis.verdict) {
        if analysis.statements.len() == 1 && depth == 0 {
            analysis.reset = Some(kind);
            analysis.statements[0].no_tx_block = true;
        } else {
            analysis.verdict = deny(
                "reset_all",
                "RESET ALL / DISCARD ALL must be sent as a statement of its own through rlsgate (it would clear the tenant context)"
                    .into(),
            );
        }
    }
    analysis
}

/// Text libpg_query cannot parse: Postgres will reject it too, unless it mentions something
/// sensitive, in which case it is denied rather than let through unclassified.
fn unparsable(sql: &str, opts: &GuardOptions) -> Analysis {
    let lower = sql.to_ascii_lowercase();
    let sensitive = opts.protected.mentioned_in(&lower)
        || [
            "set_config",
            "reset",
            "discard",
            "role",
            "authorization",
            "to_xml",
            "dblink",
            "ts_stat",
        ]
        .iter()
        .any(|w| lower.contains(w));
    let verdict = if sensitive {
        deny(
            "unparsable",
            "statement could not be parsed and mentions a protected setting or a context-changing command".into(),
        )
    } else {
        Verdict::Allow
    };
    Analysis {
        verdict,
        statements: Vec::new(),
        session_state: None,
        session_set: false,
        untracked_set: false,
        parsed: false,
        reset: None,
        copy_from_stdin: false,
    }
}

fn stmt_range(raw: &RawStmt, total: usize) -> (usize, usize) {
    let start = usize::try_from(raw.stmt_location).unwrap_or(0).min(total);
    let end = if raw.stmt_len <= 0 {
        total
    } else {
        start
            .saturating_add(usize::try_from(raw.stmt_len).unwrap_or(0))
            .min(total)
    };
    (start, end)
}

fn top_level(node: &NodeEnum) -> (TxEffect, bool) {
    match node {
        NodeEnum::TransactionStmt(t) => {
            let kind =
                TransactionStmtKind::try_from(t.kind).unwrap_or(TransactionStmtKind::Undefined);
            match kind {
                TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart => {
                    (TxEffect::Begin, false)
                }
                TransactionStmtKind::TransStmtCommit | TransactionStmtKind::TransStmtRollback
                    if t.chain =>
                {
                    (TxEffect::Unknown, false)
                }
                TransactionStmtKind::TransStmtCommit
                | TransactionStmtKind::TransStmtRollback
                | TransactionStmtKind::TransStmtPrepare => (TxEffect::End, false),
                TransactionStmtKind::TransStmtCommitPrepared
                | TransactionStmtKind::TransStmtRollbackPrepared => (TxEffect::None, true),
                TransactionStmtKind::TransStmtSavepoint
                | TransactionStmtKind::TransStmtRelease
                | TransactionStmtKind::TransStmtRollbackTo
                | TransactionStmtKind::Undefined => (TxEffect::None, false),
            }
        }
        NodeEnum::VacuumStmt(v) => (TxEffect::None, v.is_vacuumcmd),
        NodeEnum::CreatedbStmt(_)
        | NodeEnum::DropdbStmt(_)
        | NodeEnum::AlterSystemStmt(_)
        | NodeEnum::CreateTableSpaceStmt(_)
        | NodeEnum::DropTableSpaceStmt(_)
        | NodeEnum::CreateSubscriptionStmt(_)
        | NodeEnum::DropSubscriptionStmt(_) => (TxEffect::None, true),
        NodeEnum::IndexStmt(i) => (TxEffect::None, i.concurrent),
        NodeEnum::DropStmt(d) => (TxEffect::None, d.concurrent),
        NodeEnum::ReindexStmt(r) => (TxEffect::None, has_defelem(&r.params, "concurrently")),
        NodeEnum::ClusterStmt(c) => (TxEffect::None, c.relation.is_none()),
        _ => (TxEffect::None, false),
    }
}

fn has_defelem(params: &[pg_query::protobuf::Node], name: &str) -> bool {
    params.iter().any(
        |p| matches!(&p.node, Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case(name)),
    )
}

struct Search<'a> {
    opts: &'a GuardOptions,
    depth: u32,
    verdict: Verdict,
    session_state: Option<&'static str>,
    session_set: bool,
    session_sets: usize,
    reset: Option<SessionReset>,
}

impl Search<'_> {
    fn walk(&mut self, v: &Value) {
        match v {
            Value::Object(map) => {
                for (key, child) in map {
                    self.visit(key, child);
                    if self.is_denied() {
                        return;
                    }
                    self.walk(child);
                }
            }
            Value::Array(items) => {
                for child in items {
                    self.walk(child);
                    if self.is_denied() {
                        return;
                    }
                }
            }
            _ => {}
        }
    }

    fn is_denied(&self) -> bool {
        matches!(self.verdict, Verdict::Deny(_))
    }

    fn deny(&mut self, rule: &'static str, message: String) {
        if !self.is_denied() {
            self.verdict = deny(rule, message);
        }
    }

    fn session(&mut self, what: &'static str) {
        self.session_state.get_or_insert(what);
    }

    fn visit(&mut self, key: &str, node: &Value) {
        match key {
            // `setstmt` (ALTER ROLE/DATABASE/SYSTEM … SET) and `funccall` (CALL) hold these nodes
            // as typed fields rather than wrapped nodes.
            "VariableSetStmt" | "setstmt" => self.variable_set(node),
            "FuncCall" | "funccall" => self.func_call(node),
            "DoStmt" if !self.opts.allow_do_blocks => self.deny(
                "do_block",
                "DO blocks are not allowed through rlsgate: their body could change the tenant context".into(),
            ),
            "CreateFunctionStmt" if !self.opts.allow_create_function => self.deny(
                "create_function",
                "CREATE FUNCTION/PROCEDURE is not allowed through rlsgate: a function body could change the tenant context"
                    .into(),
            ),
            "LoadStmt" => self.deny("load", "LOAD is not allowed through rlsgate".into()),
            "DiscardStmt"
                if node.get("target").and_then(Value::as_i64) == Some(DiscardMode::DiscardAll as i64) => {
                    self.reset = Some(SessionReset::DiscardAll);
                }
            "ListenStmt" => self.session("LISTEN"),
            "PrepareStmt" => self.session("SQL PREPARE"),
            "DeclareCursorStmt"
                // CURSOR_OPT_HOLD = 0x0020
                if node.get("options").and_then(Value::as_i64).is_some_and(|o| o & 0x20 != 0) => {
                    self.session("DECLARE … WITH HOLD");
                }
            "relpersistence" if node.as_str() == Some("t") => self.session("temporary object"),
            _ => {}
        }
    }

    fn variable_set(&mut self, node: &Value) {
        let name = node
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_lowercase();
        let kind = node.get("kind").and_then(Value::as_i64).unwrap_or(0);
        let is_local = node
            .get("is_local")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if kind == VariableSetKind::VarResetAll as i64 {
            self.reset = Some(SessionReset::ResetAll);
            return;
        }
        if self.opts.protected.is_protected(&name) {
            return self.deny(
                "protected_setting",
                format!("changing protected setting \"{name}\" is not allowed: it is managed by rlsgate from your token"),
            );
        }
        if ROLE_SETTINGS.contains(&name.as_str()) {
            return self.deny(
                "role_change",
                format!("changing \"{name}\" is not allowed through rlsgate: it would change who the session acts as"),
            );
        }
        if PARSER_SETTINGS.contains(&name.as_str())
            && !(name == "client_encoding" && set_to_utf8(node))
        {
            return self.deny(
                "parser_setting",
                format!("changing \"{name}\" is not allowed through rlsgate: it changes how SQL text is read"),
            );
        }
        if !is_local && kind != VariableSetKind::VarSetMulti as i64 {
            self.session_set = true;
            self.session_sets += 1;
        }
    }

    fn func_call(&mut self, node: &Value) {
        let Some(name) = func_name(node) else { return };
        let args = node
            .get("args")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if name == "set_config" {
            return self.set_config(args);
        }
        if SQL_EXEC_FUNCTIONS.contains(&name.as_str()) || name.starts_with("dblink") {
            // query_to_xml & co. take the SQL first; dblink takes it first or second (after a
            // connection string), so for dblink every argument must be safe SQL.
            let sql_args = if name.starts_with("dblink") {
                args
            } else {
                &args[..args.len().min(1)]
            };
            let safe = !sql_args.is_empty() && sql_args.iter().all(|a| self.is_safe_sql(a));
            if !safe {
                self.deny(
                    "sql_exec_function",
                    format!("{name}() is not allowed here: it runs SQL that rlsgate cannot check (only a constant, safe query is allowed)"),
                );
            }
            return;
        }
        if XML_EXPORT_PREFIXES.iter().any(|p| name.starts_with(p)) && !args.iter().all(is_constant)
        {
            return self.deny(
                "sql_exec_function",
                format!("{name}() is only allowed with constant arguments"),
            );
        }
        if SESSION_LOCK_FUNCTIONS.contains(&name.as_str()) {
            self.session("session advisory lock");
        }
    }

    /// A constant string that parses and classifies as harmless.
    fn is_safe_sql(&self, arg: &Value) -> bool {
        match const_string(arg) {
            Some(sql) if self.depth < 4 => {
                let a = analyze_depth(&sql, self.opts, self.depth + 1);
                a.parsed
                    && !a.is_denied()
                    && a.session_state.is_none()
                    && !a.session_set
                    && a.reset.is_none()
            }
            _ => false,
        }
    }

    fn set_config(&mut self, args: &[Value]) {
        let Some(setting) = args.first().and_then(const_string) else {
            return self.deny(
                "set_config",
                "set_config() with a non-constant setting name is not allowed: rlsgate cannot tell which setting it changes".into(),
            );
        };
        let setting = setting.trim().to_ascii_lowercase();
        if self.opts.protected.is_protected(&setting) {
            return self.deny(
                "protected_setting",
                format!("changing protected setting \"{setting}\" is not allowed: it is managed by rlsgate from your token"),
            );
        }
        if ROLE_SETTINGS.contains(&setting.as_str()) || PARSER_SETTINGS.contains(&setting.as_str())
        {
            return self.deny(
                "role_change",
                format!("changing \"{setting}\" is not allowed through rlsgate"),
            );
        }
        let is_local = args.get(2).and_then(const_bool);
        if is_local != Some(true) {
            self.session_set = true;
            self.session_sets += 1;
        }
    }
}

/// `SET client_encoding = 'UTF8'` (the only encoding the guard reads).
fn set_to_utf8(node: &Value) -> bool {
    let args = node
        .get("args")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    match args {
        [one] => const_string(one).is_some_and(|v| {
            matches!(
                v.to_ascii_lowercase().as_str(),
                "utf8" | "utf-8" | "unicode"
            )
        }),
        _ => false,
    }
}

fn const_bool(v: &Value) -> Option<bool> {
    match unwrap_node(v)? {
        ("AConst", c) => {
            let val = c.get("val")?;
            if let Some(b) = val.get("Boolval") {
                return Some(b.get("boolval").and_then(Value::as_bool).unwrap_or(false));
            }
            let s = val.get("Sval")?.get("sval")?.as_str()?.to_ascii_lowercase();
            match s.as_str() {
                "t" | "true" | "on" | "yes" | "1" => Some(true),
                "f" | "false" | "off" | "no" | "0" => Some(false),
                _ => None,
            }
        }
        ("TypeCast", t) => const_bool(t.get("arg")?),
        _ => None,
    }
}

fn is_constant(v: &Value) -> bool {
    match unwrap_node(v) {
        Some(("AConst", _)) => true,
        Some(("TypeCast", t)) => t.get("arg").is_some_and(is_constant),
        _ => false,
    }
}
