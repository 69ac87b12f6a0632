//! Policies on tenant tables: one for every command the role may run, each tied to the tenant
//! setting, reading it once per statement and surviving an empty value.

use std::collections::HashSet;

use super::Severity::{Critical, Warning};
use super::catalog::{Policy, Table};
use super::expr::{Expr, ExprCtx};
use super::{Ctx, Finding};

const COMMANDS: &[(char, &str)] = &[
    ('r', "SELECT"),
    ('a', "INSERT"),
    ('w', "UPDATE"),
    ('d', "DELETE"),
];

fn command_name(cmd: char) -> &'static str {
    COMMANDS
        .iter()
        .find(|(c, _)| *c == cmd)
        .map(|(_, n)| *n)
        .unwrap_or("ALL")
}

fn has_privilege(t: &Table, cmd: char) -> bool {
    match cmd {
        'r' => t.can_select,
        'a' => t.can_insert,
        'w' => t.can_update,
        'd' => t.can_delete,
        _ => false,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Clause {
    Using,
    Check,
}

impl Clause {
    fn sql(self) -> &'static str {
        match self {
            Clause::Using => "USING",
            Clause::Check => "WITH CHECK",
        }
    }
}

/// The expression a policy applies for a clause (`WITH CHECK` falls back to `USING` for
/// ALL/UPDATE policies, as in Postgres).
fn clause_text(p: &Policy, c: Clause) -> Option<&str> {
    match c {
        Clause::Using => p.using.as_deref(),
        Clause::Check => p.check.as_deref().or_else(|| {
            matches!(p.cmd, '*' | 'w')
                .then_some(p.using.as_deref())
                .flatten()
        }),
    }
}

pub(crate) fn check(ctx: &Ctx, out: &mut Vec<Finding>) {
    let cat = &ctx.catalog;
    let rls_tables = cat.rls_table_names();
    let ectx = ExprCtx {
        tenant_setting: &ctx.tenant_setting,
        protected: &ctx.protected,
        tenant_functions: &cat.tenant_functions,
        role_mode: ctx.role_mode,
        rls_tables: &rls_tables,
    };
    // (table oid, policy name, clause) already reported critical: its fix replaces the clause.
    let mut replaced: HashSet<(u32, String, &'static str)> = HashSet::new();
    for t in cat
        .tables
        .iter()
        .filter(|t| t.is_tenant() && t.rls && t.any_privilege())
    {
        let pols: Vec<&Policy> = cat
            .policies
            .iter()
            .filter(|p| p.table == t.oid && p.applies)
            .collect();
        let pred = cat.tenant_predicate(t.oid, None, &ctx.tenant_setting, 0);
        missing(ctx, t, &pols, pred.as_deref(), out);
        for p in pols.iter().filter(|p| p.permissive) {
            for clause in [Clause::Using, Clause::Check] {
                // An explicit clause only; a WITH CHECK falling back to USING is the same text.
                let own = match clause {
                    Clause::Using => p.using.as_deref(),
                    Clause::Check => p.check.as_deref(),
                };
                let Some(text) = own else { continue };
                let Some(e) = Expr::parse(text) else { continue };
                if e.requires_tenant(&ectx) || restricted(&pols, p, clause, &ectx) {
                    continue;
                }
                let fix = match &pred {
                    Some(pred) => format!(
                        "ALTER POLICY {} ON {} {} ({pred});",
                        p.ident,
                        t.qname,
                        clause.sql()
                    ),
                    None => format!("DROP POLICY {} ON {};", p.ident, t.qname),
                };
                replaced.insert((t.oid, p.name.clone(), clause.sql()));
                ctx.push(
                    out,
                    Critical,
                    "policy-ignores-tenant",
                    format!("policy {} on {} ({})", p.ident, t.qname, clause.sql()),
                    format!(
                        "This permissive policy ({} {}) accepts rows without tying them to \
                         {}: permissive policies are OR-ed, so it opens the table to every \
                         tenant ({}). Every branch must compare the tenant column with the \
                         setting (or be gated by another protected setting).",
                        command_name(p.cmd),
                        clause.sql(),
                        ctx.tenant_setting,
                        text
                    ),
                    fix,
                );
            }
        }
    }
    // Warnings on every policy (of a table the role can use) that reads a protected setting.
    for p in cat.policies.iter().filter(|p| p.applies) {
        let Some(t) = cat.table(p.table).filter(|t| t.any_privilege()) else {
            continue;
        };
        for clause in [Clause::Using, Clause::Check] {
            let own = match clause {
                Clause::Using => p.using.as_deref(),
                Clause::Check => p.check.as_deref(),
            };
            let Some(text) = own else { continue };
            if replaced.contains(&(t.oid, p.name.clone(), clause.sql())) {
                continue;
            }
            let Some(e) = Expr::parse(text) else { continue };
            let calls = e.setting_calls(&ectx);
            // Citus rejects subqueries in policies on its tables ("Subqueries are not supported
            // in policies on distributed tables"): there the per-row call is the only form, and
            // it runs on the workers, next to the rows.
            let subquery = cat.subquery_allowed(t.oid);
            let per_row = subquery && calls.iter().any(|c| c.per_row);
            if !per_row && calls.iter().all(|c| c.cast_to.is_none()) {
                continue;
            }
            let fix = format!(
                "ALTER POLICY {} ON {} {} ({});",
                p.ident,
                t.qname,
                clause.sql(),
                e.rewrite(&calls, subquery)
            );
            let object = format!("policy {} on {} ({})", p.ident, t.qname, clause.sql());
            if per_row {
                ctx.push(
                    out,
                    Warning,
                    "per-row-current-setting",
                    object.clone(),
                    "current_setting() is called per row: outside a scalar subquery the planner \
                     evaluates it for every row instead of once (InitPlan). Wrap it in \
                     (SELECT …)."
                        .into(),
                    fix.clone(),
                );
            }
            if let Some(ty) = calls.iter().find_map(|c| c.cast_to.clone()) {
                ctx.push(
                    out,
                    Warning,
                    "cast-of-empty-setting",
                    object,
                    format!(
                        "current_setting() is cast to {ty} directly. After a transaction that \
                         set it, the setting reads as '' (not NULL), and ''::{ty} raises an \
                         error instead of matching no rows. Use nullif(current_setting(…), '')."
                    ),
                    fix,
                );
            }
        }
    }
}

/// A restrictive policy for the same command(s) that ties the clause to the tenant.
fn restricted(pols: &[&Policy], p: &Policy, clause: Clause, ectx: &ExprCtx) -> bool {
    pols.iter().any(|r| {
        !r.permissive
            && (r.cmd == '*' || r.cmd == p.cmd)
            && clause_text(r, clause)
                .and_then(Expr::parse)
                .is_some_and(|e| e.requires_tenant(ectx))
    })
}

/// Commands the role holds a privilege for that no applicable permissive policy covers.
fn missing(ctx: &Ctx, t: &Table, pols: &[&Policy], pred: Option<&str>, out: &mut Vec<Finding>) {
    for &(cmd, name) in COMMANDS {
        if !has_privilege(t, cmd) {
            continue;
        }
        if pols
            .iter()
            .any(|p| p.permissive && (p.cmd == '*' || p.cmd == cmd))
        {
            continue;
        }
        let fix = match pred {
            Some(pred) => {
                let clauses = match cmd {
                    'a' => format!("WITH CHECK ({pred})"),
                    'w' => format!("USING ({pred})\n    WITH CHECK ({pred})"),
                    _ => format!("USING ({pred})"),
                };
                format!(
                    "CREATE POLICY tenant_{} ON {} FOR {name}\n    {clauses};",
                    name.to_ascii_lowercase(),
                    t.qname
                )
            }
            None => format!("REVOKE {name} ON {} FROM {};", t.qname, ctx.role_ident),
        };
        ctx.push(
            out,
            Critical,
            "missing-policy",
            format!("table {}: {name}", t.qname),
            format!(
                "The upstream role holds {name} on this tenant table but no policy covers \
                 {name}, so RLS silently denies it to every tenant. Either the privilege is \
                 unused (revoke it) or the application breaks and invites a quick permissive \
                 fix; add a tenant policy for it."
            ),
            fix,
        );
    }
}
