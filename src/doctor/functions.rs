//! Functions the role can execute that change protected settings, and database-wide privileges
//! that open routes around the proxy (DESIGN §4 hardening).

use tokio_postgres::Client;

use super::Severity::{Critical, Warning};
use super::{Ctx, DoctorError, Finding};
use crate::guard::protected::ProtectedSet;

pub(crate) async fn check(
    client: &Client,
    ctx: &Ctx,
    out: &mut Vec<Finding>,
) -> Result<(), DoctorError> {
    setting_functions(client, ctx, out).await?;
    hardening(client, ctx, out).await?;
    database_create(client, ctx, out).await?;
    schema_create(client, ctx, out).await
}

/// Grantees through which the role holds a privilege on an object (`PUBLIC` or roles it is a
/// member of), as a SQL expression over `acl` and `owner`, for REVOKE … FROM.
fn grantees_sql(acl: &str, kind: &str, owner: &str, privilege: &str) -> String {
    format!(
        "ARRAY(SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                              ELSE quote_ident(pg_get_userbyid(a.grantee)) END
                 FROM aclexplode(coalesce({acl}, acldefault('{kind}', {owner}))) a
                WHERE a.privilege_type = '{privilege}' AND a.grantee <> {owner}
                  AND (a.grantee = 0 OR pg_has_role(current_user, a.grantee, 'MEMBER')))"
    )
}

async fn setting_functions(
    client: &Client,
    ctx: &Ctx,
    out: &mut Vec<Finding>,
) -> Result<(), DoctorError> {
    let rows = client
        .query(
            &format!(
                "SELECT p.oid::regprocedure::text, l.lanname::text, p.prosecdef,
                        coalesce(p.prosrc, ''), coalesce(p.proconfig, '{{}}')::text[],
                        quote_ident(pg_get_userbyid(p.proowner)),
                        pg_has_role(current_user, p.proowner, 'MEMBER'),
                        {}, p.prokind::text
                   FROM pg_proc p
                   JOIN pg_namespace n ON n.oid = p.pronamespace
                   JOIN pg_language l ON l.oid = p.prolang
                  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                    AND has_function_privilege(p.oid, 'EXECUTE')
                  ORDER BY 1",
                grantees_sql("p.proacl", "f", "p.proowner", "EXECUTE")
            ),
            &[],
        )
        .await?;
    for r in rows {
        let (sig, lang, definer): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
        let (src, config): (String, Vec<String>) = (r.get(3), r.get(4));
        let (owner, owner_reachable): (String, bool) = (r.get(5), r.get(6));
        let grantees: Vec<String> = r.get(7);
        let mut what: Option<String> = config
            .iter()
            .filter_map(|c| c.split_once('=').map(|(n, _)| n.to_string()))
            .find(|n| ctx.protected.is_protected(n))
            .map(|n| format!("its SET clause sets {n}"));
        if what.is_none() && !matches!(lang.as_str(), "c" | "internal") {
            what = sets_protected(&src, &ctx.protected);
        }
        let Some(what) = what else { continue };
        let kind = if r.get::<_, String>(8) == "p" {
            "procedure"
        } else {
            "function"
        };
        let mut fix = String::new();
        if owner_reachable {
            fix.push_str(&ctx.owner_transfer(&format!("ALTER ROUTINE {sig}")));
            fix.push('\n');
        }
        let mut from = grantees;
        if !from.iter().any(|g| g == &ctx.role_ident) && !ctx.superuser {
            from.push(ctx.role_ident.clone());
        }
        fix.push_str(&format!(
            "REVOKE EXECUTE ON ROUTINE {sig} FROM {};",
            from.join(", ")
        ));
        ctx.push(
            out,
            Critical,
            "function-sets-protected",
            format!("{kind} {sig}"),
            format!(
                "The upstream role can execute this {lang} {kind}{}, and {what}: a client can \
                 call it through the proxy (the guard sees only a function call) and switch \
                 the tenant. Owner: {owner}.",
                if definer { " (SECURITY DEFINER)" } else { "" }
            ),
            fix,
        );
    }
    Ok(())
}

/// A description of the first statement in a function body that sets a protected setting:
/// `set_config(<protected or computed name>, …)` or `SET [LOCAL|SESSION] <protected> …`.
/// A lower-cased text search: also finds them inside dynamic SQL strings.
pub(crate) fn sets_protected(src: &str, protected: &ProtectedSet) -> Option<String> {
    let text = src.to_ascii_lowercase().replace('"', "");
    let bytes = text.as_bytes();
    let word_start =
        |i: usize| i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
    let mut from = 0;
    while let Some(pos) = text[from..].find("set_config") {
        let at = from + pos;
        from = at + "set_config".len();
        if !word_start(at) {
            continue;
        }
        let rest = text[from..].trim_start();
        let Some(args) = rest.strip_prefix('(') else {
            continue;
        };
        let first = first_argument(args);
        let name: String = first.chars().filter(|c| *c != '\'').collect();
        let name = name.trim();
        if protected.is_protected(name) {
            return Some(format!("it calls set_config('{name}', …)"));
        }
        let simple_literal = first.trim().starts_with('\'')
            && !first.contains("||")
            && first
                .trim()
                .trim_matches('\'')
                .chars()
                .all(|c| c != '\'' && c != ' ');
        if !simple_literal {
            return Some(format!(
                "it calls set_config({}, …) with a name computed at run time",
                first.trim()
            ));
        }
    }
    let mut from = 0;
    while let Some(pos) = text[from..].find("set") {
        let at = from + pos;
        from = at + 3;
        if !word_start(at) || !bytes.get(from).is_some_and(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let mut rest = text[from..].trim_start();
        for modifier in ["local", "session"] {
            if let Some(r) = rest.strip_prefix(modifier)
                && r.starts_with(|c: char| c.is_ascii_whitespace())
            {
                rest = r.trim_start();
            }
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
            .collect();
        if name.contains('.') && protected.is_protected(&name) {
            return Some(format!("it runs SET {name}"));
        }
    }
    None
}

/// Text of the first argument of a call whose `(` was just consumed.
fn first_argument(args: &str) -> &str {
    let mut depth = 0i32;
    let mut quoted = false;
    for (i, c) in args.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth == 0 => return &args[..i],
            ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => return &args[..i],
            _ => {}
        }
    }
    args
}

/// `set_config` callable, TEMP on the database, other tenants' query text readable.
async fn hardening(client: &Client, ctx: &Ctx, out: &mut Vec<Finding>) -> Result<(), DoctorError> {
    let functions = client
        .query(
            &format!(
                "SELECT p.oid::regprocedure::text, p.proname::text, {}
                   FROM pg_proc p
                  WHERE (p.oid = 'pg_catalog.set_config(text,text,boolean)'::regprocedure
                         OR p.oid = 'pg_catalog.pg_stat_get_activity(integer)'::regprocedure
                         OR p.oid = 'pg_catalog.pg_stat_get_backend_activity(integer)'::regprocedure
                         OR (p.proname LIKE 'pg\\_stat\\_statements%' AND EXISTS (
                               SELECT 1 FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
                                WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                  AND d.deptype = 'e' AND e.extname = 'pg_stat_statements')))
                    AND has_function_privilege(p.oid, 'EXECUTE')
                  ORDER BY 1",
                grantees_sql("p.proacl", "f", "p.proowner", "EXECUTE")
            ),
            &[],
        )
        .await?;
    for r in functions {
        let (sig, name, grantees): (String, String, Vec<String>) = (r.get(0), r.get(1), r.get(2));
        // regprocedure leaves out the visible pg_catalog schema.
        let sig = if sig.split('(').next().is_some_and(|n| n.contains('.')) {
            sig
        } else {
            format!("pg_catalog.{sig}")
        };
        let revoke = |from: Vec<String>| {
            let from = if from.is_empty() {
                vec!["PUBLIC".to_string()]
            } else {
                from
            };
            format!("REVOKE EXECUTE ON FUNCTION {sig} FROM {};", from.join(", "))
        };
        if name == "set_config" {
            ctx.push(
                out,
                Warning,
                "set-config-public",
                format!("function {sig}"),
                "The upstream role can call set_config(). The proxy's guard blocks direct calls, \
                 but SQL hidden in strings (query_to_xml('select set_config(…)') and similar) \
                 is only closed for good by revoking it. rlsgate then sets the context with \
                 SET LOCAL, which needs no privilege; outside a transaction block Postgres logs \
                 a WARNING for it, so also run ALTER ROLE <role> SET log_min_messages = 'error' \
                 (as a superuser)."
                    .into(),
                revoke(grantees),
            );
        } else {
            ctx.push(
                out,
                Warning,
                "activity-visible",
                format!("function {sig}"),
                "All tenants share the upstream role, so through this function (pg_stat_activity, \
                 pg_stat_statements) each can read the others' statement text, including the \
                 injected SET LOCAL with their tenant and any literals. Grant it to monitoring \
                 roles explicitly instead."
                    .into(),
                revoke(grantees),
            );
        }
    }
    let temp = database_privilege(client, "TEMPORARY").await?;
    if temp.held {
        let mut from = temp.grantees;
        if from.is_empty() {
            from.push("PUBLIC".into());
        }
        ctx.push(
            out,
            Warning,
            "temp-public",
            format!("database {}", ctx.database_ident),
            "The upstream role may create temporary objects: a temporary function \
             (CREATE FUNCTION pg_temp.f() … SET LOCAL app.…) changes the tenant out of the \
             guard's sight if a CREATE FUNCTION ever gets through."
                .into(),
            format!(
                "REVOKE TEMPORARY ON DATABASE {} FROM {};",
                ctx.database_ident,
                from.join(", ")
            ),
        );
    }
    Ok(())
}

/// What the role holds of a privilege on the current database.
struct DatabasePrivilege {
    held: bool,
    /// The role is (a member of) the database's owner.
    owner_reachable: bool,
    /// The grants it holds the privilege through, for REVOKE … FROM (see [`grantees_sql`]).
    grantees: Vec<String>,
}

async fn database_privilege(
    client: &Client,
    privilege: &str,
) -> Result<DatabasePrivilege, DoctorError> {
    let row = client
        .query_one(
            &format!(
                "SELECT has_database_privilege(d.oid, '{privilege}'),
                        pg_has_role(current_user, d.datdba, 'MEMBER'), {}
                   FROM pg_database d WHERE d.datname = current_database()",
                grantees_sql("d.datacl", "d", "d.datdba", privilege)
            ),
            &[],
        )
        .await?;
    Ok(DatabasePrivilege {
        held: row.get(0),
        owner_reachable: row.get(1),
        grantees: row.get(2),
    })
}

/// `CREATE` on the database lets the role create schemas, among them one named after itself:
/// `"$user"` comes first in the default search_path, so its tables and functions would stand
/// in for those of `public` in every tenant's statements.
async fn database_create(
    client: &Client,
    ctx: &Ctx,
    out: &mut Vec<Finding>,
) -> Result<(), DoctorError> {
    let create = database_privilege(client, "CREATE").await?;
    if !create.held || ctx.superuser {
        // (a superuser is reported as role-superuser)
        return Ok(());
    }
    let owner = create
        .owner_reachable
        .then(|| ctx.owner_transfer(&format!("ALTER DATABASE {}", ctx.database_ident)));
    let revoke = (!create.grantees.is_empty()).then(|| {
        format!(
            "REVOKE CREATE ON DATABASE {} FROM {};",
            ctx.database_ident,
            create.grantees.join(", ")
        )
    });
    let fix = owner
        .into_iter()
        .chain(revoke)
        .collect::<Vec<_>>()
        .join("\n");
    ctx.push(
        out,
        Critical,
        "database-create",
        format!("database {}", ctx.database_ident),
        "The upstream role may create schemas. A schema named after the role (\"$user\", first \
         in the default search_path) would take the place of public's tables and functions in \
         every tenant's statements: a tenant could create one through the proxy and capture \
         what the others read and write."
            .into(),
        fix,
    );
    Ok(())
}

async fn schema_create(
    client: &Client,
    ctx: &Ctx,
    out: &mut Vec<Finding>,
) -> Result<(), DoctorError> {
    let rows = client
        .query(
            &format!(
                "SELECT quote_ident(n.nspname), pg_has_role(current_user, n.nspowner, 'MEMBER'), {}
                   FROM pg_namespace n
                  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                    AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
                    AND has_schema_privilege(n.oid, 'CREATE')
                  ORDER BY 1",
                grantees_sql("n.nspacl", "n", "n.nspowner", "CREATE")
            ),
            &[],
        )
        .await?;
    for r in rows {
        let (schema, owner_reachable, grantees): (String, bool, Vec<String>) =
            (r.get(0), r.get(1), r.get(2));
        if ctx.superuser {
            // Reported as role-superuser; a superuser can create anywhere.
            break;
        }
        let mut fix = String::new();
        if owner_reachable {
            fix.push_str(&ctx.owner_transfer(&format!("ALTER SCHEMA {schema}")));
            fix.push('\n');
        }
        let mut from = grantees;
        if !from.iter().any(|g| g == &ctx.role_ident) {
            from.push(ctx.role_ident.clone());
        }
        fix.push_str(&format!(
            "REVOKE CREATE ON SCHEMA {schema} FROM {};",
            from.join(", ")
        ));
        ctx.push(
            out,
            Warning,
            "schema-create",
            format!("schema {schema}"),
            "The upstream role can create objects here: tables it owns (exempt from RLS), \
             functions or operators that shadow others on the search_path, views with its \
             rights. The proxy's role needs data access only."
                .into(),
            fix,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_setting_changes_in_bodies() {
        let p = ProtectedSet::new(&["app.*".to_string()]);
        let hit = |s: &str| sets_protected(s, &p).is_some();
        assert!(hit(
            "BEGIN PERFORM set_config('app.current_store_id', $1, false); END"
        ));
        assert!(hit(
            "begin perform pg_catalog.set_config ( 'APP.current_store_id', p, true); end"
        ));
        assert!(hit("select set_config($1, $2, false)"));
        assert!(hit("select set_config('app.' || 'x', $2, false)"));
        assert!(hit(
            "execute 'select set_config(''app.current_store_id'', ''x'', true)'"
        ));
        assert!(hit(
            "EXECUTE format('SET LOCAL app.current_store_id = %L', $1)"
        ));
        assert!(hit("SET SESSION \"app\".\"current_store_id\" TO 'x'"));
        assert!(!hit("select set_config('search_path', 'public', true)"));
        assert!(!hit("UPDATE t SET total = 0; SET search_path = public"));
        assert!(!hit("select current_setting('app.current_store_id', true)"));
        assert!(!hit("SELECT offset_config FROM settings"));
    }
}
