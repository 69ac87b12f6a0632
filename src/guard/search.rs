//! The walk over a whole parse tree (its serde form, so no node type is skipped): every
//! statement node, function reference, relation reference and name is checked against
//! [`super::policy`]. The first denial stops the walk.

use pg_query::protobuf::{DiscardMode, TransactionStmtKind, VariableSetKind};
use serde_json::Value;

use super::GuardOptions;
use super::classify::{Denial, SessionReset, Verdict, analyze_depth};
use super::pinned::forbidden_relation_name;
use super::policy::{self, FunctionRule, KindRule, NameKind, RelationRule};
use super::tree::{const_string, folded, func_name, parse_bool, unwrap_node};
use crate::error::sqlstate;

/// How deep SQL inside SQL (`query_to_xml('…')`) is followed before it is denied.
const MAX_NESTED_SQL: u32 = 4;

pub(super) struct Search<'a> {
    pub opts: &'a GuardOptions,
    pub depth: u32,
    pub verdict: Verdict,
    pub session_state: Option<&'static str>,
    pub session_set: bool,
    pub session_sets: usize,
    pub reset: Option<SessionReset>,
    /// `DEALLOCATE ALL` appears (only allowed as a lone simple Query).
    pub deallocate_all: bool,
    /// Inside a statement whose parts are stored and run later (view, rule, default, …).
    stored: u32,
    /// The set_config call of a pinned `SELECT set_config(name, …) FROM pg_settings WHERE
    /// name = '…'` in the statement being walked (see [`super::pinned`]).
    pub pinned: Option<PinnedCall>,
}

/// One set_config call whose setting name the WHERE clause pins to a literal.
pub(super) struct PinnedCall {
    /// The call's node in the tree being walked: compared by address only (never read), so
    /// that the pinned name applies to exactly that call and not to another set_config(name, …)
    /// elsewhere in the statement.
    call: *const Value,
    /// The literal, as written.
    name: String,
}

impl PinnedCall {
    pub fn new(call: &Value, name: String) -> Self {
        PinnedCall { call, name }
    }

    fn is(&self, call: &Value) -> bool {
        std::ptr::eq(self.call, call)
    }
}

impl<'a> Search<'a> {
    pub fn new(opts: &'a GuardOptions, depth: u32) -> Self {
        Search {
            opts,
            depth,
            verdict: Verdict::Allow,
            session_state: None,
            session_set: false,
            session_sets: 0,
            reset: None,
            deallocate_all: false,
            stored: 0,
            pinned: None,
        }
    }

    pub fn walk(&mut self, v: &Value) {
        match v {
            Value::Object(map) => {
                for (key, child) in map {
                    let stores = self.visit(key, child);
                    if self.is_denied() {
                        return;
                    }
                    self.stored += u32::from(stores);
                    self.walk(child);
                    self.stored -= u32::from(stores);
                    if self.is_denied() {
                        return;
                    }
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
            self.verdict = Verdict::Deny(Denial {
                rule,
                sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
                message,
            });
        }
    }

    fn session(&mut self, what: &'static str) {
        self.session_state.get_or_insert(what);
    }

    fn untracked_set(&mut self) {
        self.session_set = true;
        self.session_sets += 1;
    }

    /// Check one key of the tree; returns whether its value is a statement whose parts are
    /// stored and run later.
    fn visit(&mut self, key: &str, node: &Value) -> bool {
        match key {
            k if k.ends_with("Stmt") => {
                self.statement(k, node);
                return policy::stores_code(k);
            }
            // A relation reference (RangeVar, wrapped or as a typed field such as `relation`).
            "relname" => {
                if let Some(rel) = node.as_str() {
                    self.relation(rel);
                }
            }
            "schemaname" if node.as_str().is_some_and(policy::is_temp_schema) => {
                self.session("temporary object")
            }
            // ALTER … SET holds its VariableSetStmt as a typed field; CALL its FuncCall.
            "setstmt" => self.variable_set(node),
            "FuncCall" | "funccall" => self.func_call(node),
            // `(arg).fname` and `t.fname` call fname(arg) / fname(t): functional notation.
            "ColumnRef" => self.field_selection(node.get("fields"), 1),
            "AIndirection" => self.field_selection(node.get("indirection"), 0),
            "AlterTableCmd" => {
                if let Some(why) = node
                    .get("subtype")
                    .and_then(Value::as_i64)
                    .and_then(policy::alter_table_denial)
                {
                    self.deny("alter_table", why.into());
                }
            }
            // A name in a qualified list (`pg_temp.d` in CREATE DOMAIN, CREATE TYPE, …).
            "String"
                if node
                    .get("sval")
                    .and_then(Value::as_str)
                    .is_some_and(policy::is_temp_schema) =>
            {
                self.session("temporary object")
            }
            "relpersistence" if node.as_str() == Some("t") => self.session("temporary object"),
            // A relation named pg_settings could stand in for the settings view in a pinned
            // set_config(name, …) (see super::pinned). CREATE TABLE/VIEW/TABLE AS are refused by
            // `relation` (stored statements); SELECT INTO and renames are caught here.
            "into_clause" | "into"
                if node
                    .get("rel")
                    .and_then(|r| r.get("relname"))
                    .and_then(Value::as_str)
                    .is_some_and(forbidden_relation_name) =>
            {
                self.settings_shadow_denied()
            }
            "newname" if node.as_str().is_some_and(forbidden_relation_name) => {
                self.settings_shadow_denied()
            }
            _ => {}
        }
        false
    }

    fn statement(&mut self, kind: &str, node: &Value) {
        let int = |field: &str| node.get(field).and_then(Value::as_i64).unwrap_or(-1);
        match policy::statement_kind(kind) {
            KindRule::Deny(why) => {
                let what = kind.strip_suffix("Stmt").unwrap_or(kind);
                return self.deny(
                    "statement_kind",
                    format!("{what} statements are not allowed through rlsgate: {why}"),
                );
            }
            KindRule::Code if !self.opts.allow_create_function => {
                return self.deny(
                    "create_function",
                    "creating or changing functions, procedures, aggregates, operators, casts, conversions, types with functions or triggers is not allowed through rlsgate: that code could change the tenant context later (guard.allow_create_function)"
                        .into(),
                );
            }
            KindRule::DoBlock if !self.opts.allow_do_blocks => {
                return self.deny(
                    "do_block",
                    "DO blocks are not allowed through rlsgate: their body could change the tenant context".into(),
                );
            }
            _ => {}
        }
        match kind {
            "VariableSetStmt" => self.variable_set(node),
            "TransactionStmt" => {
                let k = int("kind");
                if [
                    TransactionStmtKind::TransStmtPrepare,
                    TransactionStmtKind::TransStmtCommitPrepared,
                    TransactionStmtKind::TransStmtRollbackPrepared,
                ]
                .iter()
                .any(|t| *t as i64 == k)
                {
                    self.deny(
                        "two_phase_commit",
                        "two-phase commit is not allowed through rlsgate: prepared transactions are shared by every tenant of the upstream role".into(),
                    );
                }
            }
            "PrepareStmt" | "ExecuteStmt" | "DeallocateStmt" => {
                let name = node.get("name").and_then(Value::as_str).unwrap_or("");
                if name
                    .to_ascii_lowercase()
                    .starts_with(policy::INTERNAL_STATEMENT_PREFIX)
                {
                    return self.deny(
                        "internal_statement",
                        format!(
                            "prepared statement names starting with \"{}\" are reserved for rlsgate",
                            policy::INTERNAL_STATEMENT_PREFIX
                        ),
                    );
                }
                match kind {
                    "PrepareStmt" => self.session("SQL PREPARE"),
                    "DeallocateStmt"
                        if node.get("isall").and_then(Value::as_bool) == Some(true) =>
                    {
                        self.deallocate_all = true;
                    }
                    _ => {}
                }
            }
            "DeclareCursorStmt" if int("options") & 0x20 != 0 && int("options") > 0 => {
                // CURSOR_OPT_HOLD = 0x0020
                self.session("DECLARE … WITH HOLD");
            }
            "ListenStmt" | "NotifyStmt" if !self.opts.allow_notifications => {
                self.notification_denied(if kind == "ListenStmt" {
                    "LISTEN"
                } else {
                    "NOTIFY"
                })
            }
            "ListenStmt" => self.session("LISTEN"),
            "DiscardStmt" if int("target") == DiscardMode::DiscardAll as i64 => {
                self.reset = Some(SessionReset::DiscardAll);
            }
            // pg_settings' update rule is set_config(): any setting, named by any expression.
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt"
                if self.targets_settings(node) =>
            {
                self.deny(
                    "settings_write",
                    "writing to pg_settings is not allowed through rlsgate: it is set_config() in disguise (use SET)".into(),
                )
            }
            "RenameStmt" | "AlterObjectSchemaStmt" => {
                let field = if kind == "RenameStmt" {
                    "rename_type"
                } else {
                    "object_type"
                };
                if policy::is_code_object(int(field)) && !self.opts.allow_create_function {
                    self.deny(
                        "create_function",
                        "renaming or moving functions, operators, aggregates and similar code is not allowed through rlsgate (guard.allow_create_function)".into(),
                    );
                }
            }
            "CommentStmt" | "GrantStmt"
                if policy::is_large_object(int("objtype")) && !self.opts.allow_large_objects =>
            {
                self.large_object_denied();
            }
            "DefineStmt"
                if policy::define_is_code(int("kind")) && !self.opts.allow_create_function =>
            {
                self.deny(
                    "create_function",
                    "CREATE AGGREGATE/OPERATOR/TYPE … binds functions to new names and is not allowed through rlsgate (guard.allow_create_function)".into(),
                );
            }
            _ => {}
        }
    }

    fn targets_settings(&self, node: &Value) -> bool {
        node.get("relation")
            .and_then(|r| r.get("relname"))
            .and_then(Value::as_str)
            .is_some_and(|n| policy::relation(&n.to_ascii_lowercase()) == RelationRule::Settings)
    }

    fn relation(&mut self, name: &str) {
        match policy::relation(&folded(name)) {
            RelationRule::Ordinary => {}
            RelationRule::Settings if self.stored > 0 => self.deny(
                "settings_write",
                "views, rules and stored queries over pg_settings are not allowed through rlsgate (they could be written to)".into(),
            ),
            RelationRule::Settings => {}
            RelationRule::Deny(rule, why) => self.deny(rule, format!("reading {name} is not allowed through rlsgate: {why}")),
            RelationRule::LargeObject if !self.opts.allow_large_objects => self.large_object_denied(),
            RelationRule::LargeObject => {}
        }
    }

    fn settings_shadow_denied(&mut self) {
        self.deny(
            "settings_write",
            "creating or renaming a relation called pg_settings is not allowed through rlsgate: it could stand in for the settings view".into(),
        );
    }

    /// LISTEN hears, and NOTIFY speaks to, every tenant's listeners: channels belong to the
    /// database. (UNLISTEN only stops the session's own listening.)
    fn notification_denied(&mut self, what: &str) {
        self.deny(
            "notification",
            format!("{what} is not allowed through rlsgate: notification channels are shared by every tenant of the database, so a listener would hear other tenants' notifications and a sender could reach other tenants' listeners (guard.allow_notifications)"),
        );
    }

    fn large_object_denied(&mut self) {
        self.deny(
            "large_object",
            "large objects are not allowed through rlsgate: they belong to the upstream role, not to a tenant, and row-level security cannot protect them (guard.allow_large_objects)".into(),
        );
    }

    /// Why changing setting `name` (lower case) to `value` (when known) is denied, if it is.
    fn setting_denial(&self, name: &str, value: Option<&str>) -> Option<(&'static str, String)> {
        if self.opts.protected.is_protected(name) {
            return Some((
                "protected_setting",
                format!(
                    "changing protected setting \"{name}\" is not allowed: it is managed by rlsgate from your token"
                ),
            ));
        }
        if policy::ROLE_SETTINGS.contains(&name) {
            return Some((
                "role_change",
                format!(
                    "changing \"{name}\" is not allowed through rlsgate: it would change who the session acts as"
                ),
            ));
        }
        if name == "idle_session_timeout" {
            return Some((
                "session_state",
                "setting \"idle_session_timeout\" would end a pooled connection while it waits in the pool for the next tenant".into(),
            ));
        }
        if name == "seed" {
            return Some((
                "session_state",
                "setting \"seed\" is setseed() under another name: the random sequence of a pooled connection would carry over to the next tenant".into(),
            ));
        }
        if policy::lexer_setting(name) && !value.is_some_and(|v| policy::lexer_value_ok(name, v)) {
            return Some((
                "parser_setting",
                format!(
                    "changing \"{name}\" is not allowed through rlsgate: it changes how SQL text is read (only the value rlsgate assumes may be set)"
                ),
            ));
        }
        None
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
        let args = node
            .get("args")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        // The value the statement sets, when it is one constant. DEFAULT/RESET return lexer
        // settings to rlsgate's own (the server defaults, which the startup check keeps).
        // (only lexer settings are judged by their value)
        let value = match (kind, args) {
            _ if !policy::lexer_setting(&name) => None,
            (k, _)
                if k == VariableSetKind::VarSetDefault as i64
                    || k == VariableSetKind::VarReset as i64 =>
            {
                Some(default_lexer_value(&name).to_string())
            }
            (k, [one]) if k == VariableSetKind::VarSetValue as i64 => {
                const_string(one).or_else(|| const_bool_text(one))
            }
            _ => None,
        };
        if let Some((rule, why)) = self.setting_denial(&name, value.as_deref()) {
            return self.deny(rule, why);
        }
        if name == "search_path"
            && args.iter().filter_map(const_string).any(|v| {
                v.split(',')
                    .any(|s| policy::is_temp_schema(s.trim().trim_matches('"')))
            })
        {
            // New objects would be created in the session's temporary schema.
            self.session("temporary object");
        }
        if kind == VariableSetKind::VarSetMulti as i64 {
            // SET SESSION CHARACTERISTICS AS TRANSACTION … outlives the transaction.
            if name == "session characteristics" {
                self.untracked_set();
            }
            return;
        }
        if !is_local {
            self.untracked_set();
        }
    }

    fn func_call(&mut self, node: &Value) {
        let Some(name) = func_name(node) else { return };
        let args = node
            .get("args")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        match policy::function(&name) {
            FunctionRule::Ordinary => {}
            FunctionRule::SetConfig => {
                let pinned = self.pinned.take_if(|p| p.is(node)).map(|p| p.name);
                self.set_config(args, pinned)
            }
            FunctionRule::RunsSql(positions) => {
                let sql_args: Vec<&Value> = match positions {
                    // every argument that could hold text (numbers cannot)
                    None => args.iter().filter(|a| !is_number(a)).collect(),
                    // ts_rewrite(tsquery, tsquery, tsquery) runs no SQL; (tsquery, text) does.
                    Some(_) if name == "ts_rewrite" && args.len() != 2 => Vec::new(),
                    Some(ps) => ps.iter().filter_map(|&i| args.get(i)).collect(),
                };
                let unsafe_arg = sql_args.iter().any(|a| !self.is_safe_sql(a))
                    || (positions.is_none() && args.is_empty())
                    || has_named_args(args);
                if unsafe_arg {
                    self.deny(
                        "sql_exec_function",
                        format!("{name}() is not allowed here: it runs SQL that rlsgate cannot check (only a constant, safe query is allowed)"),
                    );
                }
            }
            FunctionRule::Deny(rule, why) => self.deny(
                rule,
                format!("{name}() is not allowed through rlsgate: {why}"),
            ),
            FunctionRule::LargeObject if !self.opts.allow_large_objects => {
                self.large_object_denied()
            }
            FunctionRule::LargeObject => {}
            FunctionRule::SessionLock => self.session("session advisory lock"),
            FunctionRule::Notification if !self.opts.allow_notifications => {
                self.notification_denied("pg_notify()")
            }
            FunctionRule::Notification => {}
            FunctionRule::ReadsByName(kind) => self.reads_by_name(&name, kind, args),
        }
    }

    /// `table_to_xml('t'::regclass, …)` & co.: only constant arguments naming something the
    /// client could read directly.
    fn reads_by_name(&mut self, name: &str, kind: NameKind, args: &[Value]) {
        if !args.iter().all(is_constant) {
            return self.deny(
                "sql_exec_function",
                format!("{name}() is only allowed with constant arguments"),
            );
        }
        let target = args.first().and_then(const_string).unwrap_or_default();
        // `"schema"."table"` → `table`; quotes and case do not matter for the check.
        let last = target
            .rsplit('.')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"')
            .to_ascii_lowercase();
        match kind {
            NameKind::Relation if last.is_empty() || last.bytes().all(|b| b.is_ascii_digit()) => {
                self.deny(
                    "sql_exec_function",
                    format!("{name}() must name its table, not give its OID"),
                )
            }
            NameKind::Relation => self.relation(&last),
            NameKind::Schema if policy::is_system_schema(target.trim().trim_matches('"')) => self
                .deny(
                    "activity",
                    format!("{name}() of a system schema is not allowed through rlsgate: it holds other backends' activity"),
                ),
            NameKind::Schema | NameKind::Other => {}
        }
    }

    /// Names after the first element of a column reference, and in an indirection, may be
    /// functions called with field-selection syntax (`(16582::oid).lo_get`): every function the
    /// guard treats specially is denied in that form (its arguments cannot be checked there).
    fn field_selection(&mut self, names: Option<&Value>, skip: usize) {
        let Some(names) = names.and_then(Value::as_array) else {
            return;
        };
        for n in names.iter().skip(skip) {
            let Some(name) = n
                .get("node")
                .and_then(|n| n.get("String"))
                .and_then(|s| s.get("sval"))
                .and_then(Value::as_str)
            else {
                continue;
            };
            if policy::function(&folded(name)) != FunctionRule::Ordinary {
                return self.deny(
                    "field_selection_call",
                    format!("\"{name}\" in field-selection form calls {name}(), which is not allowed that way through rlsgate"),
                );
            }
        }
    }

    /// A constant string that parses and classifies as harmless.
    fn is_safe_sql(&self, arg: &Value) -> bool {
        match const_string(arg) {
            Some(sql) if self.depth < MAX_NESTED_SQL => {
                let a = analyze_depth(&sql, self.opts, self.depth + 1);
                a.parsed
                    && !a.is_denied()
                    && a.session_state.is_none()
                    && !a.session_set
                    && !a.untracked_set
                    && a.reset.is_none()
            }
            _ => false,
        }
    }

    /// `pinned`: the setting name of a pinned `set_config(name, …) FROM pg_settings` (its first
    /// argument is then the column); it is checked exactly as a constant name would be.
    fn set_config(&mut self, args: &[Value], pinned: Option<String>) {
        if has_named_args(args) {
            return self.deny(
                "set_config",
                "set_config() with named arguments is not allowed through rlsgate".into(),
            );
        }
        let Some(setting) = args.first().and_then(const_string).or(pinned) else {
            return self.deny(
                "set_config",
                "set_config() with a non-constant setting name is not allowed: rlsgate cannot tell which setting it changes".into(),
            );
        };
        let setting = setting.trim().to_ascii_lowercase();
        let value = args.get(1).and_then(const_string);
        if let Some((rule, why)) = self.setting_denial(&setting, value.as_deref()) {
            return self.deny(rule, why);
        }
        if setting == "search_path" {
            match &value {
                Some(v)
                    if v.split(',')
                        .any(|s| policy::is_temp_schema(s.trim().trim_matches('"'))) =>
                {
                    self.session("temporary object");
                }
                Some(_) => {}
                None => {
                    return self.deny(
                        "set_config",
                        "set_config('search_path', …) with a non-constant value is not allowed through rlsgate".into(),
                    );
                }
            }
        }
        let is_local = args.get(2).and_then(const_bool);
        if is_local != Some(true) {
            self.untracked_set();
        }
    }
}

/// The server default of a lexer setting (what DEFAULT/RESET give back).
fn default_lexer_value(name: &str) -> &'static str {
    match name {
        "standard_conforming_strings" => "on",
        "backslash_quote" => "safe_encoding",
        _ => "utf8",
    }
}

/// `f(a => x)`: named arguments can reorder what the guard reads positionally.
fn has_named_args(args: &[Value]) -> bool {
    args.iter()
        .any(|a| matches!(unwrap_node(a), Some(("NamedArgExpr", _))))
}

fn is_number(v: &Value) -> bool {
    match unwrap_node(v) {
        Some(("AConst", c)) => c
            .get("val")
            .is_some_and(|val| val.get("Ival").is_some() || val.get("Fval").is_some()),
        Some(("TypeCast", t)) => t.get("arg").is_some_and(is_number),
        _ => false,
    }
}

fn is_constant(v: &Value) -> bool {
    match unwrap_node(v) {
        Some(("AConst", _)) => true,
        Some(("TypeCast", t)) => t.get("arg").is_some_and(is_constant),
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
            parse_bool(val.get("Sval")?.get("sval")?.as_str()?)
        }
        ("TypeCast", t) => const_bool(t.get("arg")?),
        _ => None,
    }
}

/// `SET x = on` / `TRUE`: the parser gives a bare word or a boolean constant.
fn const_bool_text(v: &Value) -> Option<String> {
    const_bool(v).map(|b| if b { "on" } else { "off" }.to_string())
}
