//! `[context] mode = "signed"`: the database side of the hardened mode (sql/hardened.sql).
//!
//! What makes a forged tenant setting fail closed, checked as the upstream role itself: the
//! objects exist; `rlsgate.enter` and `rlsgate.key_installed` are SECURITY DEFINER with a
//! `search_path` of `pg_catalog, pg_temp`; everything is owned by a role the upstream role cannot
//! become; the key table, the nonce table and the seal's setval/nextval are out of its reach;
//! `rlsgate.tenant()` is the schema-qualified PL/pgSQL verifier reading the configured tenant
//! setting; a configured signing key is installed; and every policy takes the tenant from
//! `rlsgate.tenant()` rather than from the setting itself.

use tokio_postgres::Client;

use super::{Ctx, DoctorError, Finding, Severity};
use crate::seal::Sealer;

/// Functions sql/hardened.sql creates (name, argument types).
const FUNCTIONS: &[(&str, &str)] = &[
    ("enter", "text, bigint, bigint, text, bytea"),
    ("tenant", ""),
    ("key_installed", "text"),
    ("install_key", "text"),
    ("remove_key", "text"),
];

/// Relations sql/hardened.sql creates.
const RELATIONS: &[&str] = &["keys", "backend_nonce", "seal"];

pub(crate) async fn check(
    client: &Client,
    sealer: &Sealer,
    ctx: &Ctx,
    out: &mut Vec<Finding>,
) -> Result<(), DoctorError> {
    if let Some(version) = super::citus::version(client).await? {
        ctx.push(
            out,
            Severity::Critical,
            "signed-citus",
            format!("extension citus {version}"),
            "signed mode does not cover Citus: policies of distributed tables run on the worker \
             nodes, whose connections rlsgate does not seal, so rlsgate.tenant() refuses every \
             query there (and Citus refuses sub-selects in their policies)"
                .into(),
            "-- in the rlsgate config:\n[context]\nmode = \"plain\"".into(),
        );
    }
    let install = format!(
        "-- as a superuser, in this database:\n\\i sql/hardened.sql   -- psql -v app_role={} -f sql/hardened.sql",
        ctx.role_ident
    );
    let functions = client
        .query(
            "SELECT p.proname::text, oidvectortypes(p.proargtypes), p.prosecdef,
                    coalesce(array_to_string(p.proconfig, '|'), ''), l.lanname::text,
                    p.provolatile::text, pg_get_userbyid(p.proowner)::text,
                    pg_has_role(current_user, p.proowner, 'MEMBER'),
                    has_function_privilege(p.oid, 'EXECUTE'), p.prosrc
               FROM pg_proc p
               JOIN pg_namespace n ON n.oid = p.pronamespace
               JOIN pg_language l ON l.oid = p.prolang
              WHERE n.nspname = 'rlsgate'",
            &[],
        )
        .await?;
    let relations = client
        .query(
            "SELECT c.relname::text, pg_get_userbyid(c.relowner)::text,
                    pg_has_role(current_user, c.relowner, 'MEMBER'), c.relkind::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'rlsgate' AND c.relname = ANY($1)",
            &[&RELATIONS],
        )
        .await?;
    let missing: Vec<String> = FUNCTIONS
        .iter()
        .filter(|(name, args)| {
            !functions
                .iter()
                .any(|r| r.get::<_, String>(0) == *name && r.get::<_, String>(1) == *args)
        })
        .map(|(name, args)| format!("function rlsgate.{name}({args})"))
        .chain(
            RELATIONS
                .iter()
                .filter(|name| !relations.iter().any(|r| r.get::<_, String>(0) == **name))
                .map(|name| format!("rlsgate.{name}")),
        )
        .collect();
    if !missing.is_empty() {
        ctx.push(
            out,
            Severity::Critical,
            "signed-setup-missing",
            missing.join(", "),
            "context.mode = \"signed\" needs sql/hardened.sql in this database: without it every \
             connection is refused"
                .into(),
            install,
        );
        return Ok(());
    }
    for row in &functions {
        let name: String = row.get(0);
        let definer: bool = row.get(2);
        let config_text: String = row.get(3);
        let language: String = row.get(4);
        let volatility: String = row.get(5);
        let owner: String = row.get(6);
        let reachable: bool = row.get(7);
        let executable: bool = row.get(8);
        let source: String = row.get(9);
        let object = format!("function rlsgate.{name}");
        if reachable {
            ctx.push(
                out,
                Severity::Critical,
                "signed-owner-reachable",
                object.clone(),
                format!(
                    "owned by {owner}, which {} is or can become: it could redefine the verifier",
                    ctx.role
                ),
                format!(
                    "ALTER FUNCTION rlsgate.{name} OWNER TO rlsgate_owner;  -- a NOLOGIN role {} is not a member of",
                    ctx.role_ident
                ),
            );
        }
        let safe_path = config_text
            .split('|')
            .any(|c| c == "search_path=pg_catalog, pg_temp");
        if (name == "enter" || name == "key_installed") && !(definer && safe_path) {
            ctx.push(
                out,
                Severity::Critical,
                "signed-verifier-unsafe",
                object.clone(),
                "must be SECURITY DEFINER (it reads the key table) with search_path = pg_catalog, \
                 pg_temp (so no object of the caller's can stand in for the ones it uses)"
                    .into(),
                format!(
                    "ALTER FUNCTION rlsgate.{name} SECURITY DEFINER SET search_path = pg_catalog, pg_temp;"
                ),
            );
        }
        if (name == "install_key" || name == "remove_key") && executable {
            ctx.push(
                out,
                Severity::Critical,
                "signed-key-reachable",
                object.clone(),
                format!(
                    "{} may install or remove signing keys: it could seal any tenant",
                    ctx.role
                ),
                format!(
                    "REVOKE ALL ON FUNCTION rlsgate.{name}(text) FROM PUBLIC, {};",
                    ctx.role_ident
                ),
            );
        }
        if name == "tenant" {
            let reads = format!("current_setting('{}', true)", ctx.tenant_setting);
            let sound = language == "plpgsql"
                && !definer
                && config_text.is_empty()
                && volatility == "s"
                && source.contains(&reads)
                && source.contains("pg_catalog.currval('rlsgate.seal'::pg_catalog.regclass)")
                && source.contains("OPERATOR(pg_catalog.=)")
                && source.contains("RAISE EXCEPTION");
            if !sound {
                ctx.push(
                    out,
                    Severity::Critical,
                    "signed-tenant-function",
                    object.clone(),
                    format!(
                        "not the verifier of sql/hardened.sql for the tenant setting {}: it must be \
                         a STABLE PL/pgSQL function without SECURITY DEFINER or SET, every name and \
                         operator schema-qualified, comparing the seal with {reads} and raising \
                         otherwise",
                        ctx.tenant_setting
                    ),
                    format!(
                        "-- reinstall it (edit the setting name in sql/hardened.sql if yours differs):\n{install}"
                    ),
                );
            }
        }
    }
    for row in &relations {
        let name: String = row.get(0);
        let owner: String = row.get(1);
        let reachable: bool = row.get(2);
        if reachable {
            ctx.push(
                out,
                Severity::Critical,
                "signed-owner-reachable",
                format!("rlsgate.{name}"),
                format!("owned by {owner}, which {} is or can become", ctx.role),
                format!("ALTER TABLE rlsgate.{name} OWNER TO rlsgate_owner;"),
            );
        }
    }
    let row = client
        .query_one(
            "SELECT has_table_privilege('rlsgate.keys', 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE'),
                    has_table_privilege('rlsgate.backend_nonce', 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE'),
                    has_sequence_privilege('rlsgate.seal', 'UPDATE,USAGE'),
                    has_sequence_privilege('rlsgate.seal', 'SELECT'),
                    has_function_privilege('rlsgate.enter(text, bigint, bigint, text, bytea)', 'EXECUTE'),
                    has_function_privilege('rlsgate.key_installed(text)', 'EXECUTE'),
                    has_function_privilege('rlsgate.tenant()', 'EXECUTE')",
            &[],
        )
        .await?;
    let [keys, nonces, seal_write, seal_read, enter, probe, tenant]: [bool; 7] =
        std::array::from_fn(|i| row.get(i));
    for (bad, object, why, fix) in [
        (
            keys,
            "rlsgate.keys",
            "holds the signing keys: whoever reads or writes it can seal any tenant",
            "REVOKE ALL ON rlsgate.keys FROM PUBLIC",
        ),
        (
            nonces,
            "rlsgate.backend_nonce",
            "whoever can change it can replay a seal",
            "REVOKE ALL ON rlsgate.backend_nonce FROM PUBLIC",
        ),
        (
            seal_write,
            "rlsgate.seal",
            "setval/nextval on the seal forge it",
            "REVOKE UPDATE, USAGE ON SEQUENCE rlsgate.seal FROM PUBLIC",
        ),
    ] {
        if bad {
            ctx.push(
                out,
                Severity::Critical,
                "signed-key-reachable",
                object.into(),
                format!("{} may use it: it {why}", ctx.role),
                format!("{fix}, {};", ctx.role_ident),
            );
        }
    }
    for (granted, what) in [
        (seal_read, "SELECT ON SEQUENCE rlsgate.seal"),
        (
            enter,
            "EXECUTE ON FUNCTION rlsgate.enter(text, bigint, bigint, text, bytea)",
        ),
        (probe, "EXECUTE ON FUNCTION rlsgate.key_installed(text)"),
        (tenant, "EXECUTE ON FUNCTION rlsgate.tenant()"),
    ] {
        if !granted {
            ctx.push(
                out,
                Severity::Critical,
                "signed-setup-missing",
                what.into(),
                format!(
                    "{} lacks it: sealing or the policies fail for every transaction",
                    ctx.role
                ),
                format!("GRANT {what} TO {};", ctx.role_ident),
            );
        }
    }
    if probe {
        let mut installed = Vec::new();
        for id in sealer.key_ids() {
            let row = client
                .query_one("SELECT rlsgate.key_installed($1)", &[&id])
                .await?;
            installed.push(row.get::<_, bool>(0));
        }
        match sealer.pick_key(&installed) {
            Ok(0) => {}
            Ok(_) => ctx.push(
                out,
                Severity::Warning,
                "signed-key-missing",
                format!("signing key {}", sealer.key_ids()[0]),
                "a key rotation is half done: rlsgate seals with previous_signing_key until the \
                 database has signing_key"
                    .into(),
                sealer.install_hint(),
            ),
            Err(why) => ctx.push(
                out,
                Severity::Critical,
                "signed-key-missing",
                format!("signing keys {}", sealer.key_ids().join(", ")),
                why,
                sealer.install_hint(),
            ),
        }
    }
    policies(ctx, out);
    Ok(())
}

/// Every policy that reads the tenant must take it from `rlsgate.tenant()`: one that reads the
/// setting itself accepts a forged one.
fn policies(ctx: &Ctx, out: &mut Vec<Finding>) {
    let reads_setting = format!("current_setting('{}'", ctx.tenant_setting);
    let column = ctx
        .catalog
        .tenant_columns
        .iter()
        .min()
        .cloned()
        .unwrap_or_else(|| "store_id".into());
    for p in ctx.catalog.policies.iter().filter(|p| p.applies) {
        let Some(&t) = ctx.catalog.by_oid.get(&p.table) else {
            continue;
        };
        let table = &ctx.catalog.tables[t];
        let texts = [p.using.as_deref(), p.check.as_deref()];
        let direct = texts.iter().flatten().any(|e| {
            e.to_ascii_lowercase().contains(&reads_setting)
                || ctx
                    .catalog
                    .tenant_functions
                    .iter()
                    .filter(|f| *f != "rlsgate.tenant" && *f != "tenant")
                    .any(|f| e.to_ascii_lowercase().contains(&format!("{f}(")))
        });
        if direct {
            ctx.push(
                out,
                Severity::Critical,
                "signed-policy-unverified",
                format!("policy {} on {}", p.ident, table.qname),
                format!(
                    "reads {} itself, so a forged setting passes; in signed mode policies take the \
                     tenant from rlsgate.tenant(), which refuses a setting rlsgate did not seal",
                    ctx.tenant_setting
                ),
                format!(
                    "ALTER POLICY {} ON {} USING ({column} = (SELECT rlsgate.tenant())) WITH CHECK ({column} = (SELECT rlsgate.tenant()));  -- adapt to the policy's own condition",
                    p.ident, table.qname
                ),
            );
        }
    }
}
