//! `set_config()` whose setting name is a column of `pg_settings`, pinned to one literal by the
//! WHERE clause:
//!
//! ```sql
//! SELECT set_config(name, 'view, foreign-table', false)
//! FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'
//! ```
//!
//! pg_dump ≥ 15.8 sends this at connect (a no-op on servers without the setting). The guard
//! treats exactly this shape as `set_config('<literal>', …)` with a constant name: same checks,
//! same tracking. Anything else whose first argument is not a constant stays denied.
//!
//! # Why the literal is the name that reaches set_config
//!
//! Every row the SELECT produces satisfies `name = '<literal>'`. For the real
//! `pg_catalog.pg_settings` (`name` is `text` with the database's deterministic default
//! collation) the only such row is the setting of exactly that name, so `set_config(name, …)`
//! gets the literal, or is not called at all. The residual risk is a *different* relation named
//! `pg_settings` found first (unqualified names look in `pg_temp` before `pg_catalog`, and in any
//! schema the client put ahead of `pg_catalog` in `search_path`): its `name` column could carry a
//! nondeterministic collation (accent- or punctuation-insensitive, so `'appcurrent_store_id'`
//! equals a protected name) or a custom type whose `=` is not equality. Such a relation cannot be
//! made through rlsgate: the walk refuses to create (CREATE TABLE/VIEW/TABLE AS/SELECT INTO)
//! or rename anything to `pg_settings` ([`forbidden_relation_name`]), and custom types, operators
//! and casts need `[guard] allow_create_function`. What remains is one the database
//! administrator created outside rlsgate; `FROM pg_catalog.pg_settings` is immune even to that.

use pg_query::NodeEnum;
use pg_query::protobuf::{
    AExprKind, BoolExprType, LimitOption, Node, SelectStmt, SetOperation, a_const,
};
use serde_json::Value;

/// Where the set_config call of a pinned statement sits in the serde form of its `RawStmt`
/// (the walk recognises that one call, by identity, as the pinned one).
pub(super) const CALL_POINTER: &str =
    "/stmt/node/SelectStmt/target_list/0/node/ResTarget/val/node/FuncCall";

/// The relation the pinned shape reads from.
const SETTINGS: &str = "pg_settings";

/// A name a client may not give to a relation it creates or renames: one named like the
/// settings view could stand in for it in a pinned `set_config(name, …)` (see the module docs).
pub(super) fn forbidden_relation_name(name: &str) -> bool {
    name.eq_ignore_ascii_case(SETTINGS)
}

/// The setting name a pinned statement changes, as written in its WHERE clause; `None` for any
/// statement that is not exactly the pinned shape.
pub(super) fn pinned_setting(node: &NodeEnum) -> Option<String> {
    let NodeEnum::SelectStmt(select) = node else {
        return None;
    };
    if !is_plain_select(select) {
        return None;
    }
    let visible = settings_relation(select)?;
    let [target] = select.target_list.as_slice() else {
        return None;
    };
    let Some(NodeEnum::ResTarget(target)) = &target.node else {
        return None;
    };
    if !target.indirection.is_empty() {
        return None;
    }
    let Some(NodeEnum::FuncCall(call)) = target.val.as_ref().and_then(|v| v.node.as_ref()) else {
        return None;
    };
    let plain_call = call.agg_order.is_empty()
        && call.agg_filter.is_none()
        && call.over.is_none()
        && !call.agg_within_group
        && !call.agg_star
        && !call.agg_distinct
        && !call.func_variadic;
    if !plain_call || !names_are(&call.funcname, &["set_config"], true) {
        return None;
    }
    let [setting, value, is_local] = call.args.as_slice() else {
        return None;
    };
    // the value and is_local are bare constants (no cast, no call, no parameter)
    if !is_name_column(setting, visible) || !is_constant(value) || !is_constant(is_local) {
        return None;
    }
    let literal = pinned_literal(select.where_clause.as_deref()?, visible)?;
    // Generically, over every node of the statement (so no node type can be missed): no
    // subquery, no statement, and no function call but the one set_config above.
    let tree = serde_json::to_value(select).ok()?;
    let mut census = Census::default();
    census.count(&tree);
    (census.calls == 1 && census.subqueries == 0).then_some(literal)
}

/// A single SELECT … FROM … WHERE …: no WITH (a CTE named pg_settings would stand in for the
/// view), no set operation, INTO, DISTINCT, GROUP BY, HAVING, WINDOW, VALUES, ORDER BY, LIMIT
/// (which could make the call not happen), or FOR UPDATE.
fn is_plain_select(s: &SelectStmt) -> bool {
    let op = SetOperation::try_from(s.op).unwrap_or(SetOperation::Undefined);
    let limit = LimitOption::try_from(s.limit_option).unwrap_or(LimitOption::Undefined);
    s.with_clause.is_none()
        && matches!(op, SetOperation::SetopNone)
        && !s.all
        && s.larg.is_none()
        && s.rarg.is_none()
        && s.into_clause.is_none()
        && s.distinct_clause.is_empty()
        && s.group_clause.is_empty()
        && !s.group_distinct
        && s.having_clause.is_none()
        && s.window_clause.is_empty()
        && s.values_lists.is_empty()
        && s.sort_clause.is_empty()
        && s.limit_offset.is_none()
        && s.limit_count.is_none()
        && matches!(limit, LimitOption::Undefined | LimitOption::Default)
        && s.locking_clause.is_empty()
}

/// The one FROM item, `pg_settings` or `pg_catalog.pg_settings`, optionally aliased (without
/// column aliases, which could give another column the name `name`): the name its columns are
/// qualified with.
fn settings_relation(s: &SelectStmt) -> Option<&str> {
    let [item] = s.from_clause.as_slice() else {
        return None;
    };
    let Some(NodeEnum::RangeVar(r)) = &item.node else {
        return None;
    };
    let schema_ok = r.schemaname.is_empty() || r.schemaname == "pg_catalog";
    // `ONLY pg_settings` (inh = false) means nothing for a view; refused as unusual.
    if !r.catalogname.is_empty() || !schema_ok || r.relname != SETTINGS || !r.inh {
        return None;
    }
    if r.relpersistence != "p" {
        return None;
    }
    match &r.alias {
        None => Some(SETTINGS),
        // (an alias called `name` would make a bare `name` harder to read; refused)
        Some(a) if a.colnames.is_empty() && !a.aliasname.is_empty() && a.aliasname != "name" => {
            Some(a.aliasname.as_str())
        }
        Some(_) => None,
    }
}

/// The column `name`, bare or qualified by the FROM item's visible name; no cast around it.
fn is_name_column(n: &Node, visible: &str) -> bool {
    let Some(NodeEnum::ColumnRef(c)) = &n.node else {
        return false;
    };
    names_are(&c.fields, &[visible, "name"], false) || names_are(&c.fields, &["name"], false)
}

/// A list of String nodes equal to `expected`; with `pg_catalog_ok`, also `pg_catalog.` + it.
fn names_are(list: &[Node], expected: &[&str], pg_catalog_ok: bool) -> bool {
    let names: Vec<&str> = list
        .iter()
        .map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Option<_>>()
        .unwrap_or_default();
    match names.split_first() {
        Some((&"pg_catalog", rest)) if pg_catalog_ok => rest == expected,
        _ => names == expected,
    }
}

fn is_constant(n: &Node) -> bool {
    matches!(&n.node, Some(NodeEnum::AConst(c)) if !c.isnull && c.val.is_some())
}

/// The one literal the WHERE clause pins `name` to: the clause is `name = '<literal>'` or an
/// AND (nested ANDs included) with such a conjunct. Several conjuncts must agree; OR, NOT and
/// everything else pin nothing.
fn pinned_literal(clause: &Node, visible: &str) -> Option<String> {
    let mut literals: Vec<&str> = Vec::new();
    collect_pins(clause, visible, &mut literals);
    let (first, rest) = literals.split_first()?;
    rest.iter().all(|l| l == first).then(|| first.to_string())
}

fn collect_pins<'n>(clause: &'n Node, visible: &str, out: &mut Vec<&'n str>) {
    match &clause.node {
        Some(NodeEnum::BoolExpr(b)) if b.boolop == BoolExprType::AndExpr as i32 => {
            for conjunct in &b.args {
                collect_pins(conjunct, visible, out);
            }
        }
        Some(NodeEnum::AExpr(e))
            if e.kind == AExprKind::AexprOp as i32 && names_are(&e.name, &["="], true) =>
        {
            let (Some(l), Some(r)) = (e.lexpr.as_deref(), e.rexpr.as_deref()) else {
                return;
            };
            let literal = if is_name_column(l, visible) {
                string_literal(r)
            } else if is_name_column(r, visible) {
                string_literal(l)
            } else {
                None
            };
            out.extend(literal);
        }
        _ => {}
    }
}

/// A bare string literal (`'x'`, `E'x'`, `$$x$$`); no cast, no COLLATE.
fn string_literal(n: &Node) -> Option<&str> {
    match &n.node {
        Some(NodeEnum::AConst(c)) if !c.isnull => match &c.val {
            Some(a_const::Val::Sval(s)) => Some(s.sval.as_str()),
            _ => None,
        },
        _ => None,
    }
}

/// Counts, over the serde form of a statement, the function calls and anything that is or
/// holds another statement.
#[derive(Default)]
struct Census {
    calls: usize,
    subqueries: usize,
}

impl Census {
    fn count(&mut self, v: &Value) {
        match v {
            Value::Object(map) => {
                for (key, child) in map {
                    match key.as_str() {
                        "FuncCall" | "funccall" => self.calls += 1,
                        "SubLink" | "RangeSubselect" | "RangeFunction" | "CommonTableExpr" => {
                            self.subqueries += 1
                        }
                        k if k.ends_with("Stmt") => self.subqueries += 1,
                        _ => {}
                    }
                    self.count(child);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| self.count(i)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::classify::{Analysis, Verdict, analyze};
    use super::super::{GuardOptions, SettingChange};
    use crate::config::GuardConfig;
    use crate::guard::protected::ProtectedSet;

    const PG_DUMP: &str = "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'";

    fn run(sql: &str) -> Analysis {
        let config = GuardConfig::default();
        let opts = GuardOptions {
            protected: ProtectedSet::new(&config.protected),
            allow_do_blocks: false,
            allow_create_function: false,
            allow_large_objects: false,
            allow_notifications: false,
        };
        analyze(sql, &opts)
    }

    fn rule(sql: &str) -> &'static str {
        match run(sql).verdict {
            Verdict::Deny(d) => {
                assert_eq!(d.sqlstate, "42501", "{sql}: {}", d.message);
                d.rule
            }
            Verdict::Allow => panic!("allowed: {sql}"),
        }
    }

    /// The session-level change the proxy tracks for a one-statement text.
    fn tracked(sql: &str) -> Option<SettingChange> {
        let a = run(sql);
        assert!(!a.is_denied(), "{sql}: {:?}", a.verdict);
        assert!(!a.untracked_set, "{sql}: untracked");
        a.statements[0].setting.clone()
    }

    #[test]
    fn pg_dumps_statement_is_a_tracked_conditional_set() {
        let Some(SettingChange::Set { name, sql }) = tracked(PG_DUMP) else {
            panic!("not tracked");
        };
        assert_eq!(name, "restrict_nonsystem_relation_kind");
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(name, 'view, foreign-table', false) FROM pg_catalog.pg_settings WHERE name = 'restrict_nonsystem_relation_kind'"
        );
        // the replay is itself the pinned shape, and allowed
        assert!(tracked(&sql).is_some());
    }

    #[test]
    fn pinned_spellings_that_are_accepted() {
        for sql in [
            "select set_config(name, 'view', false) from pg_catalog.pg_settings where name = 'restrict_nonsystem_relation_kind'",
            "SELECT pg_catalog.set_config(s.name, 'view', false) FROM pg_settings s WHERE 'restrict_nonsystem_relation_kind' = s.name",
            "SELECT set_config(pg_settings.name, 'view', false) AS x FROM pg_settings WHERE pg_settings.name = 'restrict_nonsystem_relation_kind'",
            "SELECT set_config(name, '4MB', 'false') FROM pg_settings WHERE name = 'work_mem' AND setting <> '1'",
            "SELECT set_config(name, '4MB', false) FROM pg_settings WHERE (name = 'work_mem' AND true) AND name = 'work_mem'",
            "SELECT set_config(name, '4MB', false) FROM pg_settings WHERE name OPERATOR(pg_catalog.=) 'work_mem'",
        ] {
            let Some(SettingChange::Set { name, .. }) = tracked(sql) else {
                panic!("not tracked: {sql}");
            };
            assert!(
                ["restrict_nonsystem_relation_kind", "work_mem"].contains(&name.as_str()),
                "{sql}: {name}"
            );
        }
        // SET LOCAL equivalent: nothing to track, nothing left behind
        let a =
            run("SELECT set_config(name, '4MB', true) FROM pg_settings WHERE name = 'work_mem'");
        assert!(!a.is_denied() && !a.untracked_set && !a.session_set);
        assert_eq!(a.statements[0].setting, None);
        // one statement of several
        let a = run(&format!("SELECT 1; {PG_DUMP}"));
        assert!(!a.is_denied() && !a.untracked_set, "{a:?}");
        assert!(a.statements[1].setting.is_some());
    }

    #[test]
    fn a_pinned_name_passes_the_checks_of_a_constant_name() {
        for (setting, value, expected) in [
            ("app.current_store_id", "'south'", "protected_setting"),
            ("APP.Current_Store_ID", "'south'", "protected_setting"),
            (" app.current_store_id", "'south'", "protected_setting"),
            ("app.anything", "'x'", "protected_setting"),
            ("role", "'rlsgate_owner'", "role_change"),
            ("session_authorization", "'postgres'", "role_change"),
            ("standard_conforming_strings", "'off'", "parser_setting"),
            ("client_encoding", "'sjis'", "parser_setting"),
            ("backslash_quote", "'on'", "parser_setting"),
            ("idle_session_timeout", "'1'", "session_state"),
            ("seed", "'0.5'", "session_state"),
        ] {
            for is_local in ["false", "true"] {
                let sql = format!(
                    "SELECT set_config(name, {value}, {is_local}) FROM pg_settings WHERE name = '{setting}'"
                );
                assert_eq!(rule(&sql), expected, "{sql}");
            }
        }
        assert!(matches!(
            run("SELECT set_config(name, 'app.x', false) FROM pg_settings WHERE name = 'app.current_store_id'").verdict,
            Verdict::Deny(d) if d.message.contains("protected setting \"app.current_store_id\"")
        ));
    }

    #[test]
    fn shapes_that_do_not_pin_the_name_stay_denied() {
        let denied = [
            // the WHERE clause does not pin one literal
            "SELECT set_config(name, 'x', false) FROM pg_settings",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' OR name = 'app.current_store_id'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE NOT name <> 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name IN ('work_mem')",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = ANY(ARRAY['work_mem'])",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name LIKE 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name ~ 'app'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name::text = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE lower(name) = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem'::text",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' COLLATE \"C\"",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name COLLATE \"C\" = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' AND name = 'app.current_store_id'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = $1",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name <> 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name IS DISTINCT FROM 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE setting = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = name",
            // the first argument is not the bare column
            "SELECT set_config(name::text, 'x', false) FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(lower(name), 'x', false) FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(setting, 'x', false) FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name || '', 'x', false) FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(other.name, 'x', false) FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(pg_settings.name, 'x', false) FROM pg_settings s WHERE s.name = 'work_mem'",
            "SELECT set_config(setting => 'x', setting_name => name, is_local => false) FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, setting, false) FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, lower('X'), false) FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false)::int FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false), 1 FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(VARIADIC ARRAY[name, 'x', 'false']) FROM pg_settings WHERE name = 'work_mem'",
            // a CTE, a subquery or another relation could stand in for the view
            "WITH pg_settings AS (SELECT 'app.current_store_id' AS name) SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM (SELECT 'app.current_store_id' AS name) pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM public.pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_temp.pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM other_db.pg_catalog.pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM \"PG_SETTINGS\" WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM my_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM ONLY pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings AS s(setting, name) WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings, pg_settings p2 WHERE pg_settings.name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings JOIN pg_roles r ON true WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings, LATERAL (SELECT 1) l WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' AND EXISTS (SELECT 1)",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' AND name = (SELECT 'work_mem')",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' AND set_config(name, 'y', false) IS NOT NULL",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' AND length(setting) > 0",
            // set operations and clauses that change which rows (or how often) the call sees
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' UNION SELECT 'y'",
            "SELECT 'y' UNION ALL SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' GROUP BY name",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' GROUP BY name HAVING true",
            "SELECT DISTINCT ON (name) set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) OVER () FROM pg_settings WHERE name = 'work_mem'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' WINDOW w AS ()",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' ORDER BY 1",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' LIMIT 0",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' OFFSET 1",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' FOR UPDATE",
            "SELECT set_config(name, 'x', false) INTO t FROM pg_settings WHERE name = 'work_mem'",
            // not a top-level SELECT of its own
            "SELECT (SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem')",
            "EXPLAIN ANALYZE SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem'",
            "INSERT INTO t SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem'",
            "DECLARE c CURSOR FOR SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem'",
            "PREPARE p AS SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem'",
            "SELECT query_to_xml('SELECT set_config(name, ''x'', false) FROM pg_settings WHERE name = ''work_mem''', true, true, '')",
        ];
        for sql in denied {
            let a = run(sql);
            assert!(a.is_denied(), "allowed: {sql}");
            let Verdict::Deny(d) = &a.verdict else {
                unreachable!()
            };
            assert_eq!(d.sqlstate, "42501", "{sql}: {}", d.message);
        }
        assert!(matches!(
            run("SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'work_mem' OR name = 'app.current_store_id'").verdict,
            Verdict::Deny(d) if d.message.contains("non-constant setting name")
        ));
    }

    #[test]
    fn relations_called_pg_settings_cannot_be_made() {
        for sql in [
            "CREATE TEMP TABLE pg_settings (name text)",
            "CREATE TABLE public.pg_settings (name text COLLATE \"C\")",
            "CREATE TEMP VIEW pg_settings AS SELECT 'app.current_store_id' AS name",
            "CREATE TEMP TABLE pg_settings AS SELECT 'app.current_store_id' AS name",
            "CREATE MATERIALIZED VIEW pg_settings AS SELECT 'x' AS name",
            "SELECT 'app.current_store_id' AS name INTO TEMP pg_settings",
            "SELECT 'x' AS name INTO public.PG_Settings",
            "ALTER TABLE customers RENAME TO pg_settings",
            "ALTER VIEW v RENAME TO pg_settings",
        ] {
            assert_eq!(rule(sql), "settings_write", "{sql}");
        }
        // reading pg_settings, and copying it elsewhere, are as before
        assert!(!run("SELECT name, setting FROM pg_settings WHERE name = 'work_mem'").is_denied());
        assert!(!run("SELECT * INTO TEMP my_copy FROM pg_settings").is_denied());
    }
}
