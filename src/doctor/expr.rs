//! Policy expressions, read with the real Postgres grammar: does an expression restrict rows to
//! the tenant, which columns it compares with the tenant setting, and where it calls
//! `current_setting()` per row or casts a possibly empty setting.
//!
//! Expressions come from `pg_get_expr(polqual, polrelid)`; they are parsed as `SELECT <expr>` and
//! walked in libpg_query's serde form (as the guard does), so no node type is missed by the
//! generic searches.

use std::collections::HashSet;

use serde_json::Value;

use crate::guard::protected::ProtectedSet;
use crate::guard::tree::{const_string, func_name, unwrap_node};

const PREFIX: &str = "SELECT ";

/// What the analysis needs to know about the database and the configuration.
pub(crate) struct ExprCtx<'a> {
    /// The tenant setting, lower case (`app.current_store_id`).
    pub tenant_setting: &'a str,
    pub protected: &'a ProtectedSet,
    /// Lower-case names of functions whose body reads the tenant setting.
    pub tenant_functions: &'a HashSet<String>,
    /// Role mode (`SET LOCAL ROLE` per tenant): `current_user` identifies the tenant too.
    pub role_mode: bool,
    /// Tenant tables with RLS enabled, as lower-case `schema.name` and `name`: a subquery over
    /// one of them inherits its policy.
    pub rls_tables: &'a HashSet<String>,
}

/// A `current_setting()` call on a protected setting that a warning check cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SettingCall {
    /// Byte range of the call in the expression text.
    pub start: usize,
    pub end: usize,
    /// Not inside a scalar subquery, so evaluated once per row.
    pub per_row: bool,
    /// Cast straight to a non-text type (`::uuid`): fails on `''`.
    pub cast_to: Option<String>,
}

pub(crate) struct Expr {
    text: String,
    root: Value,
}

impl Expr {
    pub fn parse(text: &str) -> Option<Expr> {
        let sql = format!("{PREFIX}{text}");
        let parsed = pg_query::parse(&sql, pg_query::ParserOptions::DEFAULT).ok()?;
        let tree = serde_json::to_value(&parsed.protobuf).ok()?;
        let root = tree
            .get("stmts")?
            .get(0)?
            .get("stmt")?
            .get("node")?
            .get("SelectStmt")?
            .get("target_list")?
            .get(0)?
            .get("node")?
            .get("ResTarget")?
            .get("val")?
            .clone();
        Some(Expr {
            text: text.to_string(),
            root,
        })
    }

    /// Whether every row the expression accepts is tied to the tenant setting.
    pub fn requires_tenant(&self, ctx: &ExprCtx) -> bool {
        requires(&self.root, ctx)
    }

    /// Columns compared with `=` to an expression that reads the tenant setting.
    pub fn tenant_columns(&self, ctx: &ExprCtx, out: &mut HashSet<String>) {
        collect_tenant_columns(&self.root, ctx, out);
    }

    /// Calls of `current_setting()` on protected settings, with what is wrong with them.
    pub fn setting_calls(&self, ctx: &ExprCtx) -> Vec<SettingCall> {
        let mut calls = Vec::new();
        let mut casts = Vec::new();
        walk_calls(&self.root, false, ctx, &mut calls, &mut casts);
        let mut out: Vec<SettingCall> = Vec::new();
        for (start, per_row) in calls {
            let Some(start) = start.checked_sub(PREFIX.len()) else {
                continue;
            };
            let Some(end) = call_end(&self.text, start) else {
                continue;
            };
            let cast_to = casts
                .iter()
                .find(|(l, _)| l.checked_sub(PREFIX.len()) == Some(start))
                .map(|(_, t)| t.clone());
            if !out.iter().any(|c| c.start == start) {
                out.push(SettingCall {
                    start,
                    end,
                    per_row,
                    cast_to,
                });
            }
        }
        out
    }

    /// The expression with per-row calls wrapped in `(SELECT …)` (when `subquery`: not on Citus
    /// tables) and cast calls in `nullif(…, '')`.
    pub fn rewrite(&self, calls: &[SettingCall], subquery: bool) -> String {
        let mut calls: Vec<&SettingCall> = calls
            .iter()
            .filter(|c| (subquery && c.per_row) || c.cast_to.is_some())
            .collect();
        calls.sort_by_key(|c| std::cmp::Reverse(c.start));
        let mut text = self.text.clone();
        for c in calls {
            let mut call = text[c.start..c.end].to_string();
            if c.cast_to.is_some() {
                call = format!("nullif({call}, '')");
            }
            if subquery && c.per_row {
                call = format!("(SELECT {call})");
            }
            text.replace_range(c.start..c.end, &call);
        }
        text
    }
}

fn int(v: &Value, key: &str) -> i64 {
    v.get(key).and_then(Value::as_i64).unwrap_or(0)
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn sval(v: &Value) -> Option<&str> {
    v.get("node")?.get("String")?.get("sval")?.as_str()
}

/// The setting a `current_setting(…)` call reads (lower case); `Some("")` when not a constant.
fn current_setting_arg(call: &Value) -> Option<String> {
    if func_name(call).as_deref() != Some("current_setting") {
        return None;
    }
    let first = list(call, "args").first()?;
    Some(const_string(first).unwrap_or_default().to_ascii_lowercase())
}

/// Depth-first search for a node matching `f` (called with each node kind and body).
fn any_node(v: &Value, f: &mut dyn FnMut(&str, &Value) -> bool) -> bool {
    match v {
        Value::Object(map) => map
            .iter()
            .any(|(k, child)| f(k, child) || any_node(child, f)),
        Value::Array(items) => items.iter().any(|c| any_node(c, f)),
        _ => false,
    }
}

fn reads_tenant(v: &Value, ctx: &ExprCtx) -> bool {
    any_node(v, &mut |k, body| match k {
        "FuncCall" => {
            current_setting_arg(body).as_deref() == Some(ctx.tenant_setting)
                || func_name(body).is_some_and(|n| ctx.tenant_functions.contains(n.as_ref()))
        }
        // CURRENT_ROLE, CURRENT_USER, USER, SESSION_USER
        "SqlvalueFunction" => ctx.role_mode && (10..=13).contains(&int(body, "op")),
        _ => false,
    })
}

fn reads_protected(v: &Value, ctx: &ExprCtx) -> bool {
    any_node(v, &mut |k, body| {
        k == "FuncCall"
            && current_setting_arg(body)
                .is_some_and(|s| !s.is_empty() && ctx.protected.is_protected(&s))
    })
}

fn has_column_ref(v: &Value) -> bool {
    any_node(v, &mut |k, _| k == "ColumnRef")
}

fn requires(v: &Value, ctx: &ExprCtx) -> bool {
    match unwrap_node(v) {
        Some(("BoolExpr", b)) => {
            let args = list(b, "args");
            match int(b, "boolop") {
                1 => args.iter().any(|a| requires(a, ctx)),
                // Every branch must be tied to the tenant, or gated by another protected setting
                // (an admin flag the proxy sets from the token).
                2 => {
                    !args.is_empty()
                        && args
                            .iter()
                            .all(|a| requires(a, ctx) || reads_protected(a, ctx))
                }
                _ => false,
            }
        }
        // EXISTS (…) / x IN (SELECT …): restricted when the subquery is.
        Some(("SubLink", s)) if matches!(int(s, "sub_link_type"), 1 | 3) => {
            s.get("subselect")
                .and_then(unwrap_node)
                .is_some_and(|(k, sel)| k == "SelectStmt" && select_restricts(sel, ctx))
                || (reads_tenant(v, ctx) && has_column_ref(v))
        }
        _ => reads_tenant(v, ctx) && has_column_ref(v),
    }
}

/// A subquery restricted to the tenant: its WHERE requires it, a join condition reads it, or it
/// reads a tenant table that has its own policies.
fn select_restricts(sel: &Value, ctx: &ExprCtx) -> bool {
    if sel.get("where_clause").is_some_and(|w| requires(w, ctx)) {
        return true;
    }
    let from = sel.get("from_clause").unwrap_or(&Value::Null);
    if reads_tenant(from, ctx) {
        return true;
    }
    any_node(from, &mut |k, body| {
        if k != "RangeVar" {
            return false;
        }
        let name = body
            .get("relname")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_lowercase();
        let schema = body
            .get("schemaname")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_lowercase();
        let key = if schema.is_empty() {
            name
        } else {
            format!("{schema}.{name}")
        };
        ctx.rls_tables.contains(&key)
    })
}

fn collect_tenant_columns(v: &Value, ctx: &ExprCtx, out: &mut HashSet<String>) {
    any_node(v, &mut |k, body| {
        if k == "AExpr" {
            let is_eq =
                int(body, "kind") == 1 && list(body, "name").last().and_then(sval) == Some("=");
            if is_eq {
                let (l, r) = (
                    body.get("lexpr").unwrap_or(&Value::Null),
                    body.get("rexpr").unwrap_or(&Value::Null),
                );
                for (col, other) in [(l, r), (r, l)] {
                    if let Some(("ColumnRef", c)) = unwrap_node(col)
                        && reads_tenant(other, ctx)
                        && let Some(name) = list(c, "fields").last().and_then(sval)
                    {
                        out.insert(name.to_string());
                    }
                }
            }
        }
        false
    });
}

const TEXT_TYPES: &[&str] = &["text", "varchar", "bpchar", "char", "name", "unknown"];

/// Walk with "inside a scalar subquery" state; collects protected `current_setting` calls
/// (location, per row) and calls cast straight to a non-text type (location, type).
fn walk_calls(
    v: &Value,
    in_scalar: bool,
    ctx: &ExprCtx,
    calls: &mut Vec<(usize, bool)>,
    casts: &mut Vec<(usize, String)>,
) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let mut inner = in_scalar;
                match k.as_str() {
                    // EXPR and ARRAY sublinks without outer references run once (an InitPlan).
                    "SubLink" => inner |= matches!(int(child, "sub_link_type"), 5 | 7),
                    "FuncCall" => {
                        if let Some(s) = current_setting_arg(child)
                            && !s.is_empty()
                            && ctx.protected.is_protected(&s)
                            && let Some(loc) = child.get("location").and_then(Value::as_i64)
                        {
                            calls.push((loc.max(0) as usize, !in_scalar));
                        }
                    }
                    "TypeCast" => {
                        let ty = child
                            .get("type_name")
                            .map(|t| list(t, "names"))
                            .and_then(|n| n.last())
                            .and_then(sval)
                            .map(str::to_ascii_lowercase)
                            .unwrap_or_default();
                        if !ty.is_empty()
                            && !TEXT_TYPES.contains(&ty.as_str())
                            && let Some(loc) = child.get("arg").and_then(|a| cast_call(a, ctx))
                        {
                            casts.push((loc, ty));
                        }
                    }
                    _ => {}
                }
                walk_calls(child, inner, ctx, calls, casts);
            }
        }
        Value::Array(items) => {
            for c in items {
                walk_calls(c, in_scalar, ctx, calls, casts);
            }
        }
        _ => {}
    }
}

/// The location of a protected `current_setting()` call that is the whole argument of a cast,
/// directly or as the single output of a scalar subquery.
fn cast_call(arg: &Value, ctx: &ExprCtx) -> Option<usize> {
    match unwrap_node(arg)? {
        ("FuncCall", f) => {
            let s = current_setting_arg(f)?;
            (!s.is_empty() && ctx.protected.is_protected(&s))
                .then(|| f.get("location").and_then(Value::as_i64))
                .flatten()
                .map(|l| l.max(0) as usize)
        }
        ("SubLink", s) if int(s, "sub_link_type") == 5 => {
            let (k, sel) = unwrap_node(s.get("subselect")?)?;
            if k != "SelectStmt" {
                return None;
            }
            let targets = list(sel, "target_list");
            let [only] = targets else { return None };
            let (_, rt) = unwrap_node(only)?;
            cast_call(rt.get("val")?, ctx)
        }
        _ => None,
    }
}

/// End (exclusive) of the function call starting at `start`: after the parenthesis matching the
/// first `(`, skipping string literals and quoted identifiers.
pub(crate) fn call_end(text: &str, start: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = start;
    let mut depth = 0usize;
    let mut quote: Option<u8> = None;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) => {
                if b == q {
                    if bytes.get(i + 1) == Some(&q) {
                        i += 1;
                    } else {
                        quote = None;
                    }
                }
            }
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'(' => depth += 1,
                b')' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            },
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_ctx<T>(f: impl FnOnce(&ExprCtx) -> T) -> T {
        let protected = ProtectedSet::new(&["app.*".to_string()]);
        let funcs = HashSet::from(["current_store".to_string()]);
        let tables = HashSet::from(["public.sales_transactions".to_string()]);
        let ctx = ExprCtx {
            tenant_setting: "app.current_store_id",
            protected: &protected,
            tenant_functions: &funcs,
            role_mode: false,
            rls_tables: &tables,
        };
        f(&ctx)
    }

    const DEMO: &str = "(store_id = ( SELECT NULLIF(current_setting('app.current_store_id'::text, true), ''::text) AS \"nullif\"))";

    #[test]
    fn demo_policy_is_tenant_bound_and_clean() {
        with_ctx(|ctx| {
            let e = Expr::parse(DEMO).unwrap();
            assert!(e.requires_tenant(ctx));
            let calls = e.setting_calls(ctx);
            assert_eq!(calls.len(), 1);
            assert!(!calls[0].per_row && calls[0].cast_to.is_none());
            let mut cols = HashSet::new();
            e.tenant_columns(ctx, &mut cols);
            assert_eq!(cols, HashSet::from(["store_id".to_string()]));
        });
    }

    #[test]
    fn permissive_shapes() {
        with_ctx(|ctx| {
            for (text, ok) in [
                ("true", false),
                ("(email ~~ '%@x'::text)", false),
                (
                    "((store_id = current_setting('app.current_store_id'::text)) OR (email IS NOT NULL))",
                    false,
                ),
                (
                    "((store_id = current_setting('app.current_store_id'::text)) OR (current_setting('app.user_role'::text, true) = 'admin'::text))",
                    true,
                ),
                (
                    "((store_id = current_setting('app.current_store_id'::text)) AND ((owner = 'x'::text) OR true))",
                    true,
                ),
                (
                    "(current_setting('app.current_store_id'::text, true) <> ''::text)",
                    false,
                ),
                (
                    "(NOT (store_id = current_setting('app.current_store_id'::text)))",
                    false,
                ),
                ("(store_id = current_store())", true),
                (
                    "(EXISTS ( SELECT 1 FROM public.sales_transactions t WHERE (t.transaction_id = x.transaction_id)))",
                    true,
                ),
                (
                    "(EXISTS ( SELECT 1 FROM public.other t WHERE (t.id = x.id)))",
                    false,
                ),
            ] {
                let e = Expr::parse(text).unwrap();
                assert_eq!(e.requires_tenant(ctx), ok, "{text}");
            }
        });
    }

    #[test]
    fn per_row_and_cast_rewrites() {
        with_ctx(|ctx| {
            let text = "(store_id = NULLIF(current_setting('app.current_store_id'::text, true), ''::text))";
            let e = Expr::parse(text).unwrap();
            let calls = e.setting_calls(ctx);
            assert!(calls[0].per_row);
            assert_eq!(
                e.rewrite(&calls, true),
                "(store_id = NULLIF((SELECT current_setting('app.current_store_id'::text, true)), ''::text))"
            );
            // Citus: no subquery; nothing else to fix.
            assert_eq!(e.rewrite(&calls, false), text);
            let text = "(store_id = ( SELECT (current_setting('app.current_store_id'::text, true))::uuid AS current_setting))";
            let e = Expr::parse(text).unwrap();
            let calls = e.setting_calls(ctx);
            assert_eq!(calls[0].cast_to.as_deref(), Some("uuid"));
            assert!(!calls[0].per_row);
            let fixed = e.rewrite(&calls, true);
            assert!(
                fixed.contains(
                    "(nullif(current_setting('app.current_store_id'::text, true), ''))::uuid"
                ),
                "{fixed}"
            );
            assert!(
                Expr::parse(&fixed).unwrap().setting_calls(ctx)[0]
                    .cast_to
                    .is_none()
            );
            // A per-row cast on a Citus table: nullif, no subquery.
            let text = "(store_id = (current_setting('app.current_store_id'::text, true))::uuid)";
            let e = Expr::parse(text).unwrap();
            let calls = e.setting_calls(ctx);
            let fixed = e.rewrite(&calls, false);
            assert!(!fixed.contains("SELECT"), "{fixed}");
            assert!(
                fixed.contains("nullif(current_setting('app.current_store_id'::text, true), '')"),
                "{fixed}"
            );
        });
    }
}
