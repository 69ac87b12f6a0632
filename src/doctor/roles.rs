//! The upstream role: attributes that bypass RLS, ownership, roles it can become, and defaults
//! for protected settings (`ALTER ROLE/DATABASE … SET`, the server configuration).

use tokio_postgres::Client;

use super::Severity::Critical;
use super::{Ctx, DoctorError, Finding};

pub(crate) async fn check(
    client: &Client,
    ctx: &Ctx,
    out: &mut Vec<Finding>,
) -> Result<(), DoctorError> {
    let role = &ctx.role_ident;
    if ctx.superuser {
        ctx.push(
            out,
            Critical,
            "role-superuser",
            format!("role {role}"),
            "The upstream role is a superuser: superusers bypass every RLS policy, so every \
             client sees every tenant's rows."
                .into(),
            format!("ALTER ROLE {role} NOSUPERUSER;"),
        );
    }
    if ctx.bypassrls {
        ctx.push(
            out,
            Critical,
            "role-bypassrls",
            format!("role {role}"),
            "The upstream role has BYPASSRLS: no policy applies to it, so every client sees \
             every tenant's rows."
                .into(),
            format!("ALTER ROLE {role} NOBYPASSRLS;"),
        );
    }
    owned_tables(ctx, out);
    if !ctx.superuser {
        can_become(client, ctx, out).await?;
    }
    protected_defaults(client, ctx, out).await?;
    Ok(())
}

fn owned_tables(ctx: &Ctx, out: &mut Vec<Finding>) {
    for t in ctx
        .catalog
        .tables
        .iter()
        .filter(|t| t.is_tenant() && t.owner_is_role)
    {
        ctx.push(
            out,
            Critical,
            "role-owns-table",
            format!("table {}", t.qname),
            format!(
                "The upstream role owns this tenant table. An owner can DISABLE or NO FORCE row \
                 level security, drop or rewrite the policies, and without FORCE is exempt from \
                 them. Hand the table to {} and grant the role only data access.",
                ctx.admin
            ),
            format!(
                "{}\nGRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {};",
                ctx.owner_transfer(&format!("ALTER TABLE {}", t.qname)),
                t.qname,
                ctx.role_ident
            ),
        );
    }
}

/// Roles the upstream role is a member of (so it can `SET ROLE` to them) that are superuser,
/// BYPASSRLS, or own a tenant table.
async fn can_become(client: &Client, ctx: &Ctx, out: &mut Vec<Finding>) -> Result<(), DoctorError> {
    let rows = client
        .query(
            "SELECT r.rolname::text, quote_ident(r.rolname), r.rolsuper, r.rolbypassrls,
                    ARRAY(SELECT quote_ident(pg_get_userbyid(m.member)) FROM pg_auth_members m
                           WHERE m.roleid = r.oid AND pg_has_role(current_user, m.member, 'MEMBER')
                           ORDER BY 1)
               FROM pg_roles r
              WHERE r.rolname <> current_user AND pg_has_role(current_user, r.oid, 'MEMBER')
              ORDER BY 1",
            &[],
        )
        .await?;
    for r in rows {
        let ident: String = r.get(1);
        let (sup, bypass): (bool, bool) = (r.get(2), r.get(3));
        let owned: Vec<&str> = ctx
            .catalog
            .tables
            .iter()
            .filter(|t| t.is_tenant() && t.owner == ident)
            .map(|t| t.qname.as_str())
            .collect();
        let what = if sup {
            "is a superuser".to_string()
        } else if bypass {
            "has BYPASSRLS".to_string()
        } else if !owned.is_empty() {
            format!("owns tenant tables ({})", owned.join(", "))
        } else {
            continue;
        };
        let via: Vec<String> = r.get(4);
        let fix = via
            .iter()
            .map(|m| format!("REVOKE {ident} FROM {m};"))
            .collect::<Vec<_>>()
            .join("\n");
        ctx.push(
            out,
            Critical,
            "role-can-become",
            format!("role {ident}"),
            format!(
                "The upstream role is a member of {ident}, which {what}. Any SQL that reaches \
                 the database as the upstream role (a function, a future guard gap) can \
                 SET ROLE {ident} and, with inherited privileges, already acts with its rights."
            ),
            fix,
        );
    }
    Ok(())
}

/// Defaults for protected settings: a value that survives outside the transactions rlsgate
/// starts, so statements it sends without context (or a missed injection) run as that tenant.
async fn protected_defaults(
    client: &Client,
    ctx: &Ctx,
    out: &mut Vec<Finding>,
) -> Result<(), DoctorError> {
    let rows = client
        .query(
            "SELECT s.setdatabase <> 0, s.setrole <> 0,
                    quote_ident(coalesce(pg_get_userbyid(s.setrole), '')),
                    quote_ident(coalesce(d.datname, '')), c
               FROM pg_db_role_setting s
               LEFT JOIN pg_database d ON d.oid = s.setdatabase
               CROSS JOIN LATERAL unnest(s.setconfig) c
              WHERE (s.setdatabase = 0 OR d.datname = current_database())
                AND (s.setrole = 0 OR s.setrole = (SELECT oid FROM pg_roles WHERE rolname = current_user))",
            &[],
        )
        .await?;
    let mut explained = Vec::new();
    for r in rows {
        let (has_db, has_role): (bool, bool) = (r.get(0), r.get(1));
        let (role, db, entry): (String, String, String) = (r.get(2), r.get(3), r.get(4));
        let Some((name, value)) = entry.split_once('=') else {
            continue;
        };
        if !ctx.protected.is_protected(name) {
            continue;
        }
        explained.push(name.to_ascii_lowercase());
        let (object, fix) = match (has_role, has_db) {
            (true, true) => (
                format!("role {role} in database {db}"),
                format!("ALTER ROLE {role} IN DATABASE {db} RESET {name};"),
            ),
            (true, false) => (
                format!("role {role}"),
                format!("ALTER ROLE {role} RESET {name};"),
            ),
            (false, true) => (
                format!("database {db}"),
                format!("ALTER DATABASE {db} RESET {name};"),
            ),
            (false, false) => (
                "all roles".to_string(),
                format!("ALTER ROLE ALL RESET {name};"),
            ),
        };
        ctx.push(
            out,
            Critical,
            "protected-default",
            format!("{object}: {name}"),
            format!(
                "Protected setting {name} has a default ({value:?}). Outside the transactions \
                 rlsgate starts (and after every one of them) the session falls back to it, so \
                 statements without injected context run as that tenant instead of seeing nothing."
            ),
            fix,
        );
    }
    // Values from postgresql.conf / ALTER SYSTEM show in a fresh session.
    for name in &ctx.context_settings {
        if explained.contains(name) {
            continue;
        }
        let row = client
            .query_one("SELECT coalesce(current_setting($1, true), '')", &[name])
            .await?;
        let value: String = row.get(0);
        if value.is_empty() {
            continue;
        }
        ctx.push(
            out,
            Critical,
            "protected-default",
            format!("server configuration: {name}"),
            format!(
                "Protected setting {name} is {value:?} in a fresh session (postgresql.conf, \
                 ALTER SYSTEM or the connection's options). Statements without injected context \
                 run as that tenant."
            ),
            format!(
                "ALTER SYSTEM RESET {name};\nSELECT pg_reload_conf();\n\
                 -- and remove {name} from postgresql.conf if it is set there"
            ),
        );
    }
    Ok(())
}
