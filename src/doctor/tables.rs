//! Tenant tables: RLS enabled and forced, keys and indexes that respect the tenant column, and
//! views that read tenant tables with their owner's rights.

use std::collections::{HashMap, HashSet, VecDeque};

use tokio_postgres::Client;

use super::Severity::{Critical, Warning};
use super::catalog::{Index, Table};
use super::{Ctx, DoctorError, Finding};

pub(crate) async fn check(
    client: &Client,
    ctx: &Ctx,
    out: &mut Vec<Finding>,
) -> Result<(), DoctorError> {
    rls_state(ctx, out);
    unique_keys(ctx, out);
    foreign_keys(ctx, out);
    tenant_indexes(ctx, out);
    views(client, ctx, out).await
}

fn describe_tenancy(ctx: &Ctx, t: &Table) -> String {
    match (t.tenant_column(), t.tenant_via) {
        (Some(c), _) => format!("has the tenant column {}", c.ident),
        (None, Some(fk)) => {
            let parent = ctx
                .catalog
                .table(ctx.catalog.fks[fk].ref_table)
                .map(|p| p.qname.as_str())
                .unwrap_or("?");
            format!("belongs to a tenant through its foreign key to {parent}")
        }
        _ => String::new(),
    }
}

fn rls_state(ctx: &Ctx, out: &mut Vec<Finding>) {
    let cat = &ctx.catalog;
    for t in cat
        .tables
        .iter()
        .filter(|t| t.is_tenant() && t.any_privilege())
    {
        if !t.rls {
            let mut fix = format!(
                "ALTER TABLE {q} ENABLE ROW LEVEL SECURITY;\nALTER TABLE {q} FORCE ROW LEVEL SECURITY;",
                q = t.qname
            );
            let has_policy = cat
                .policies
                .iter()
                .any(|p| p.table == t.oid && p.applies && p.permissive);
            if !has_policy
                && let Some(pred) = cat.tenant_predicate(t.oid, None, &ctx.tenant_setting, 0)
            {
                fix.push_str(&format!(
                    "\nCREATE POLICY tenant_isolation ON {}\n    USING ({pred})\n    WITH CHECK ({pred});",
                    t.qname
                ));
            }
            ctx.push(
                out,
                Critical,
                "rls-disabled",
                format!("table {}", t.qname),
                format!(
                    "The table {} but row level security is disabled, and the upstream role \
                     can access it: every client reads and writes every tenant's rows.",
                    describe_tenancy(ctx, t)
                ),
                fix,
            );
        } else if !t.force && t.owner_reachable && !ctx.superuser {
            ctx.push(
                out,
                Critical,
                "rls-not-forced",
                format!("table {}", t.qname),
                format!(
                    "Row level security is enabled but not forced, and the upstream role is \
                     (or can become) the owner {}: owners are exempt from non-forced policies.",
                    t.owner
                ),
                format!("ALTER TABLE {} FORCE ROW LEVEL SECURITY;", t.qname),
            );
        }
    }
}

/// Whether a key column (a name, or an expression's text) is the tenant column.
fn is_tenant_key(key: &str, tenant_ident: &str, tenant_name: &str) -> bool {
    let k = key.trim();
    k == tenant_ident || k == tenant_name
}

/// `…(a, b)…` → `…(<col>, a, b)…`: the first parenthesis after `marker` (or the first at all).
fn prepend_column(def: &str, marker: &str, col: &str) -> Option<String> {
    let from = if marker.is_empty() {
        0
    } else {
        def.find(marker)? + marker.len()
    };
    let open = from + def[from..].find('(')?;
    Some(format!("{}({col}, {}", &def[..open], &def[open + 1..]))
}

fn unique_keys(ctx: &Ctx, out: &mut Vec<Finding>) {
    let cat = &ctx.catalog;
    for ix in cat.indexes.iter().filter(|i| i.unique) {
        let Some(t) = cat.table(ix.table) else {
            continue;
        };
        let Some(col) = t.tenant_column() else {
            continue;
        };
        if !t.any_privilege()
            || ix
                .keys
                .iter()
                .any(|k| is_tenant_key(k, &col.ident, &col.name))
        {
            continue;
        }
        // Generated surrogate keys reveal nothing about another tenant's data.
        let surrogate = ix.keys.iter().all(|k| {
            t.columns
                .iter()
                .any(|c| c.surrogate && (c.ident == k.trim() || c.name == k.trim()))
        });
        if surrogate {
            continue;
        }
        let Some(fix) = unique_fix(t, ix, &col.ident) else {
            continue;
        };
        ctx.push(
            out,
            Warning,
            "unique-without-tenant",
            format!("index {} on {}", ix.qname, t.qname),
            format!(
                "Unique across all tenants ({}): inserting a value another tenant already uses \
                 fails with a duplicate-key error, which tells a client that the value exists \
                 in some other tenant. Make it unique per tenant.",
                ix.keys.join(", ")
            ),
            fix,
        );
    }
}

fn unique_fix(t: &Table, ix: &Index, col: &str) -> Option<String> {
    Some(match &ix.constraint {
        Some((name, def)) => format!(
            "ALTER TABLE {q} DROP CONSTRAINT {name};\nALTER TABLE {q} ADD CONSTRAINT {name} {};",
            prepend_column(def, "", col)?,
            q = t.qname
        ),
        None => format!(
            "DROP INDEX {};\n{};",
            ix.qname,
            prepend_column(&ix.def, " USING ", col)?
        ),
    })
}

fn foreign_keys(ctx: &Ctx, out: &mut Vec<Finding>) {
    let cat = &ctx.catalog;
    for fk in &cat.fks {
        let (Some(t), Some(p)) = (cat.table(fk.table), cat.table(fk.ref_table)) else {
            continue;
        };
        let (Some(tc), Some(pc)) = (t.tenant_column(), p.tenant_column()) else {
            continue;
        };
        if fk.table == fk.ref_table || fk.cols.contains(&tc.name) {
            continue;
        }
        // A companion key with the tenant column over the same columns already ties them.
        let covered = cat.fks.iter().any(|o| {
            o.table == fk.table
                && o.ref_table == fk.ref_table
                && o.cols.contains(&tc.name)
                && fk.cols.iter().all(|c| o.cols.contains(c))
        });
        if covered || !t.any_privilege() {
            continue;
        }
        let Some(def) = prepend_column(&fk.def, "", &tc.ident)
            .and_then(|d| prepend_column(&d, " REFERENCES ", &pc.ident))
        else {
            continue;
        };
        // With the tenant column in the key, SET NULL / SET DEFAULT must spare it (PG 15+).
        let def = spare_tenant_on_delete(&def, &fk.cols, t);
        let mut fix = String::new();
        let mut wanted: Vec<&str> = vec![pc.name.as_str()];
        wanted.extend(fk.ref_cols.iter().map(String::as_str));
        let has_unique = cat.indexes.iter().any(|i| {
            i.table == p.oid
                && i.unique
                && i.keys.len() == wanted.len()
                && wanted
                    .iter()
                    .all(|w| i.keys.iter().any(|k| k == w || k.trim_matches('"') == *w))
        });
        if !has_unique {
            let cols: Vec<String> = wanted
                .iter()
                .map(|w| {
                    p.columns
                        .iter()
                        .find(|c| c.name == *w)
                        .map(|c| c.ident.clone())
                        .unwrap_or_else(|| w.to_string())
                })
                .collect();
            fix.push_str(&format!(
                "ALTER TABLE {} ADD UNIQUE ({});\n",
                p.qname,
                cols.join(", ")
            ));
        }
        fix.push_str(&format!(
            "ALTER TABLE {q} DROP CONSTRAINT {n};\nALTER TABLE {q} ADD CONSTRAINT {n} {def};",
            q = t.qname,
            n = fk.ident
        ));
        ctx.push(
            out,
            Warning,
            "fk-without-tenant",
            format!("foreign key {} on {}", fk.ident, t.qname),
            format!(
                "References {} without the tenant column. Foreign-key checks bypass RLS, so a \
                 client can attach another tenant's row and probe which keys exist in other \
                 tenants. Reference ({}, …) instead.",
                p.qname, pc.ident
            ),
            fix,
        );
    }
}

fn spare_tenant_on_delete(def: &str, cols: &[String], t: &Table) -> String {
    let list: Vec<String> = cols
        .iter()
        .map(|c| {
            t.columns
                .iter()
                .find(|col| &col.name == c)
                .map(|col| col.ident.clone())
                .unwrap_or_else(|| c.clone())
        })
        .collect();
    let mut out = def.to_string();
    for action in ["ON DELETE SET NULL", "ON DELETE SET DEFAULT"] {
        if let Some(at) = out.find(action) {
            let end = at + action.len();
            if !out[end..].starts_with(" (") {
                out.insert_str(end, &format!(" ({})", list.join(", ")));
            }
        }
    }
    out
}

fn tenant_indexes(ctx: &Ctx, out: &mut Vec<Finding>) {
    let cat = &ctx.catalog;
    for t in cat.tables.iter().filter(|t| t.any_privilege()) {
        let Some(col) = t.tenant_column() else {
            continue;
        };
        let leads = cat.indexes.iter().any(|i| {
            i.table == t.oid
                && i.keys
                    .first()
                    .is_some_and(|k| is_tenant_key(k, &col.ident, &col.name))
        });
        if leads {
            continue;
        }
        ctx.push(
            out,
            Warning,
            "no-tenant-index",
            format!("table {}", t.qname),
            format!(
                "No index leads with the tenant column {}: every policy filters on it, so each \
                 query scans every tenant's rows.",
                col.ident
            ),
            format!("CREATE INDEX ON {} ({});", t.qname, col.ident),
        );
    }
}

/// Views (and materialized views) the role can read, directly or through other views, that read
/// a tenant table with their owner's rights while the owner bypasses its policies.
async fn views(client: &Client, ctx: &Ctx, out: &mut Vec<Finding>) -> Result<(), DoctorError> {
    let rows = client
        .query(
            "SELECT DISTINCT v.oid, quote_ident(n.nspname) || '.' || quote_ident(v.relname),
                    v.relkind::text, quote_ident(o.rolname), o.rolsuper, o.rolbypassrls,
                    coalesce(v.reloptions, '{}')::text[], has_table_privilege(v.oid, 'SELECT'),
                    d.refobjid, pg_has_role(v.relowner, t.relowner, 'USAGE')
               FROM pg_class v
               JOIN pg_namespace n ON n.oid = v.relnamespace
               JOIN pg_roles o ON o.oid = v.relowner
               JOIN pg_rewrite r ON r.ev_class = v.oid
               JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                    AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> v.oid
               JOIN pg_class t ON t.oid = d.refobjid
              WHERE v.relkind IN ('v', 'm')
                AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .await?;
    struct View {
        qname: String,
        matview: bool,
        owner: String,
        owner_super: bool,
        owner_bypass: bool,
        invoker: bool,
        readable: bool,
        /// (referenced relation, view owner has the rights of its owner)
        refs: Vec<(u32, bool)>,
    }
    let mut views: HashMap<u32, View> = HashMap::new();
    for r in rows {
        let oid: u32 = r.get(0);
        let options: Vec<String> = r.get(6);
        let v = views.entry(oid).or_insert_with(|| View {
            qname: r.get(1),
            matview: r.get::<_, String>(2) == "m",
            owner: r.get(3),
            owner_super: r.get(4),
            owner_bypass: r.get(5),
            invoker: options.iter().any(|o| {
                let o = o.to_ascii_lowercase();
                matches!(
                    o.as_str(),
                    "security_invoker=true"
                        | "security_invoker=on"
                        | "security_invoker=1"
                        | "security_invoker=yes"
                )
            }),
            readable: r.get(7),
            refs: Vec::new(),
        });
        v.refs.push((r.get(8), r.get(9)));
    }
    // Readable views, and the views they read in turn.
    let mut reach: HashSet<u32> = HashSet::new();
    let mut queue: VecDeque<u32> = views
        .iter()
        .filter(|(_, v)| v.readable)
        .map(|(o, _)| *o)
        .collect();
    while let Some(oid) = queue.pop_front() {
        if !reach.insert(oid) {
            continue;
        }
        for (r, _) in &views[&oid].refs {
            if views.contains_key(r) {
                queue.push_back(*r);
            }
        }
    }
    let mut reached: Vec<u32> = reach.into_iter().collect();
    reached.sort_by(|a, b| views[a].qname.cmp(&views[b].qname));
    for oid in reached {
        let v = &views[&oid];
        if v.invoker && !v.matview {
            continue;
        }
        let mut leaks = Vec::new();
        for (r, owner_rights) in &v.refs {
            let Some(t) = ctx.catalog.table(*r) else {
                continue;
            };
            if !t.is_tenant() {
                continue;
            }
            let why = if !t.rls {
                "has RLS disabled"
            } else if v.owner_super {
                "is read by a superuser owner"
            } else if v.owner_bypass {
                "is read by a BYPASSRLS owner"
            } else if !t.force && *owner_rights {
                "is read by its own owner without FORCE"
            } else {
                continue;
            };
            leaks.push(format!("{} {why}", t.qname));
        }
        if leaks.is_empty() {
            continue;
        }
        let (kind, fix) = if v.matview {
            (
                "materialized view",
                format!("REVOKE ALL ON {} FROM PUBLIC, {};", v.qname, ctx.role_ident),
            )
        } else {
            (
                "view",
                format!("ALTER VIEW {} SET (security_invoker = true);", v.qname),
            )
        };
        ctx.push(
            out,
            Critical,
            "view-bypasses-rls",
            format!("{kind} {}", v.qname),
            format!(
                "The upstream role can read this {kind}, owned by {}, which reads tenant rows \
                 with its owner's rights: {}. Every client sees every tenant's rows through it{}.",
                v.owner,
                leaks.join("; "),
                if v.matview {
                    " (a materialized view has no RLS at all)"
                } else {
                    "; security_invoker makes the view apply the caller's policies"
                }
            ),
            fix,
        );
    }
    Ok(())
}
