//! `rlsgate check`: audits the database side of tenant isolation, connected as the upstream role
//! itself (so every privilege question is answered for the role the proxy uses).
//!
//! Each [`Finding`] names a check (stable kebab-case id), its [`Severity`], the object, why it
//! matters and the SQL that fixes it (to be run by an administrator). Critical findings break
//! isolation outright; warnings weaken it or leak through side channels. The checks are grouped
//! by what they read: [`roles`] (the role and its settings), [`tables`] (RLS state, keys, views),
//! [`policies`] (what policies cover and read), [`functions`] (functions and database-wide
//! privileges). `serve` runs the same checks at start-up ([`startup_check`]).

mod catalog;
mod citus;
mod connect;
mod expr;
mod functions;
mod hardened;
mod policies;
mod report;
mod roles;
mod tables;

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::Config;
use crate::guard::protected::ProtectedSet;
use catalog::Catalog;
#[cfg(test)]
pub(crate) use citus::CITUS_PROPAGATE_SET;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
    /// Nothing to fix in the database, but something clients must do differently (the fix is
    /// what to run instead). Does not change the exit code.
    Note,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable kebab-case id, e.g. `rls-not-forced`.
    pub check: &'static str,
    /// The object, e.g. `table public.customers`.
    pub object: String,
    pub why: String,
    /// SQL that fixes it, run as an administrator.
    pub fix: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub database: String,
    pub role: String,
    pub tenant_setting: String,
    pub tenant_columns: Vec<String>,
    pub findings: Vec<Finding>,
}

#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("cannot connect to the upstream database as {user}: {reason}")]
    Connect { user: String, reason: String },
    #[error("catalog query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("upstream TLS configuration: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("the checks did not finish within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Internal(String),
}

impl Report {
    pub fn criticals(&self) -> usize {
        self.count(Severity::Critical)
    }

    pub fn warnings(&self) -> usize {
        self.count(Severity::Warning)
    }

    fn count(&self, s: Severity) -> usize {
        self.findings.iter().filter(|f| f.severity == s).count()
    }

    /// 2 with a critical finding, 1 with warnings when `strict`, else 0.
    pub fn exit_code(&self, strict: bool) -> u8 {
        if self.criticals() > 0 {
            2
        } else if strict && self.warnings() > 0 {
            1
        } else {
            0
        }
    }

    /// The findings for one check id.
    pub fn by_check(&self, check: &str) -> Vec<&Finding> {
        self.findings.iter().filter(|f| f.check == check).collect()
    }

    /// A readable report grouped by severity; ANSI colours when `color`.
    pub fn render_text(&self, color: bool) -> String {
        report::render(self, color)
    }

    /// The report as JSON, with `criticals` and `warnings` counts.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            report: &'a Report,
            criticals: usize,
            warnings: usize,
        }
        let out = Out {
            report: self,
            criticals: self.criticals(),
            warnings: self.warnings(),
        };
        serde_json::to_string_pretty(&out).unwrap_or_else(|_| "{}".into())
    }
}

/// What every check group gets.
pub(crate) struct Ctx {
    pub role: String,
    /// `quote_ident(role)`.
    pub role_ident: String,
    pub database_ident: String,
    pub superuser: bool,
    pub bypassrls: bool,
    pub tenant_setting: String,
    pub protected: ProtectedSet,
    /// Every `[context]` setting, lower case.
    pub context_settings: Vec<String>,
    pub role_mode: bool,
    pub catalog: Catalog,
    /// A role to hand objects to that the upstream role cannot reach, and SQL creating it
    /// first when none exists.
    pub admin: String,
    pub admin_setup: String,
}

impl Ctx {
    pub fn push(
        &self,
        out: &mut Vec<Finding>,
        severity: Severity,
        check: &'static str,
        object: String,
        why: String,
        fix: String,
    ) {
        out.push(Finding {
            severity,
            check,
            object,
            why,
            fix,
        });
    }

    /// `ALTER … OWNER TO <admin>` preceded by the admin role's creation when needed.
    pub fn owner_transfer(&self, alter: &str) -> String {
        format!("{}{alter} OWNER TO {};", self.admin_setup, self.admin)
    }
}

/// The tenant setting: the `[context]` key mapped to the tenant claim.
pub fn tenant_setting(config: &Config) -> String {
    config
        .context
        .settings
        .iter()
        .find(|(_, claim)| **claim == config.auth.tenant_claim)
        .map(|(k, _)| k.to_ascii_lowercase())
        .unwrap_or_else(|| "app.current_store_id".into())
}

/// Column names that mark a tenant table before policies are read: the tenant setting without
/// its prefix and `current_` (`app.current_store_id` → `store_id`), and the tenant claim's last
/// path element.
pub fn base_tenant_columns(config: &Config) -> Vec<String> {
    let setting = tenant_setting(config);
    let mut out = Vec::new();
    let last = setting.rsplit('.').next().unwrap_or(&setting);
    let derived = last.strip_prefix("current_").unwrap_or(last);
    if !derived.is_empty() {
        out.push(derived.to_string());
    }
    let claim = config.auth.tenant_claim.rsplit('.').next().unwrap_or("");
    if !claim.is_empty() && !out.iter().any(|c| c == claim) {
        out.push(claim.to_string());
    }
    out
}

/// Run every check against the configured upstream, as the configured upstream role.
pub async fn run(config: &Config) -> Result<Report, DoctorError> {
    let limit = config.upstream.connect_timeout + Duration::from_secs(60);
    match tokio::time::timeout(limit, run_inner(config)).await {
        Ok(r) => r,
        Err(_) => Err(DoctorError::Timeout(limit)),
    }
}

async fn run_inner(config: &Config) -> Result<Report, DoctorError> {
    let client = connect::connect(&config.upstream).await?;
    let ctx = load_ctx(&client, config).await?;
    let mut findings = Vec::new();
    roles::check(&client, &ctx, &mut findings).await?;
    tables::check(&client, &ctx, &mut findings).await?;
    policies::check(&ctx, &mut findings);
    // A superuser may do anything; the privilege checks would only repeat role-superuser.
    if !ctx.superuser {
        functions::check(&client, &ctx, &mut findings).await?;
    }
    citus::check(&client, config, &ctx, &mut findings).await?;
    let hasher = std::collections::hash_map::RandomState::new();
    if let Some(sealer) = crate::seal::Sealer::from_config(&config.context, &hasher)
        .map_err(|e| DoctorError::Internal(e.to_string()))?
    {
        hardened::check(&client, &sealer, &ctx, &mut findings).await?;
    }
    findings.sort_by(|a, b| {
        (a.severity, check_rank(a.check), &a.object).cmp(&(
            b.severity,
            check_rank(b.check),
            &b.object,
        ))
    });
    findings.dedup();
    let mut tenant_columns: Vec<String> = ctx.catalog.tenant_columns.iter().cloned().collect();
    tenant_columns.sort();
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    Ok(Report {
        database,
        role: ctx.role,
        tenant_setting: ctx.tenant_setting,
        tenant_columns,
        findings,
    })
}

/// Every check id, in report order.
pub const CHECKS: &[&str] = &[
    "citus-without-wrap",
    "citus-propagate-set",
    "signed-citus",
    "signed-setup-missing",
    "signed-key-missing",
    "signed-key-reachable",
    "signed-owner-reachable",
    "signed-verifier-unsafe",
    "signed-tenant-function",
    "signed-policy-unverified",
    "role-superuser",
    "role-bypassrls",
    "role-owns-table",
    "role-can-become",
    "rls-disabled",
    "rls-not-forced",
    "missing-policy",
    "policy-ignores-tenant",
    "function-sets-protected",
    "view-bypasses-rls",
    "protected-default",
    "database-create",
    "set-config-public",
    "temp-public",
    "activity-visible",
    "schema-create",
    "unique-without-tenant",
    "fk-without-tenant",
    "no-tenant-index",
    "per-row-current-setting",
    "cast-of-empty-setting",
    "citus-distribution-column",
    "citus-copy-to",
];

fn check_rank(id: &str) -> usize {
    CHECKS.iter().position(|c| *c == id).unwrap_or(CHECKS.len())
}

async fn load_ctx(client: &Client, config: &Config) -> Result<Ctx, DoctorError> {
    // Read-only, and names printed back schema-qualified.
    client
        .batch_execute(
            "SET default_transaction_read_only = on; SET search_path = pg_catalog; \
             SET statement_timeout = '30s'",
        )
        .await?;
    let row = client
        .query_one(
            "SELECT current_user::text, quote_ident(current_user), quote_ident(current_database()),
                    r.rolsuper, r.rolbypassrls
               FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let tenant_setting = tenant_setting(config);
    let mut patterns = config.guard.protected.clone();
    patterns.extend(config.context.settings.keys().cloned());
    let protected = ProtectedSet::new(&patterns);
    let role_mode = config.auth.role_claim.is_some() || config.auth.role_template.is_some();
    let catalog = Catalog::load(
        client,
        &tenant_setting,
        &base_tenant_columns(config),
        &protected,
        role_mode,
    )
    .await?;
    let (admin, admin_setup) = admin_role(client).await?;
    Ok(Ctx {
        role: row.get(0),
        role_ident: row.get(1),
        database_ident: row.get(2),
        superuser: row.get(3),
        bypassrls: row.get(4),
        tenant_setting,
        protected,
        context_settings: config
            .context
            .settings
            .keys()
            .map(|k| k.to_ascii_lowercase())
            .collect(),
        role_mode,
        catalog,
        admin,
        admin_setup,
    })
}

/// Who should own what the upstream role must not: the database owner when the role cannot
/// reach it, else an existing unreachable `rlsgate_owner`, else a new NOLOGIN role.
async fn admin_role(client: &Client) -> Result<(String, String), DoctorError> {
    let rows = client
        .query(
            "SELECT quote_ident(r.rolname), pg_has_role(current_user, r.oid, 'MEMBER')
               FROM pg_roles r
              WHERE r.oid = (SELECT datdba FROM pg_database WHERE datname = current_database())
                 OR r.rolname IN ('rlsgate_owner', 'rlsgate_table_owner')
              ORDER BY r.oid = (SELECT datdba FROM pg_database WHERE datname = current_database()) DESC,
                       r.rolname",
            &[],
        )
        .await?;
    if let Some(r) = rows.iter().find(|r| !r.get::<_, bool>(1)) {
        return Ok((r.get(0), String::new()));
    }
    let taken: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let name = [
        "rlsgate_owner",
        "rlsgate_table_owner",
        "rlsgate_admin_owner",
    ]
    .into_iter()
    .find(|n| !taken.iter().any(|t| t == n))
    .unwrap_or("rlsgate_admin_owner");
    Ok((name.to_string(), format!("CREATE ROLE {name} NOLOGIN;\n")))
}

/// `serve` start-up: run the checks; critical findings refuse the start unless `allow_unsafe`,
/// the rest is logged. An unreachable database only logs a warning (the pool reports errors to
/// clients later).
pub async fn startup_check(config: &Config, allow_unsafe: bool) -> Result<(), String> {
    let report = match run(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "rlsgate check could not run at start-up; starting anyway");
            return Ok(());
        }
    };
    let criticals = report.criticals();
    if criticals > 0 && !allow_unsafe {
        use std::io::IsTerminal;
        eprintln!("{}", report.render_text(std::io::stderr().is_terminal()));
        return Err(format!(
            "refusing to start: {criticals} critical finding(s) in the database's RLS setup \
             (fix them, or start with --allow-unsafe)"
        ));
    }
    for f in &report.findings {
        match f.severity {
            Severity::Warning => {
                tracing::warn!(check = f.check, object = %f.object, fix = %f.fix, "{}", f.why)
            }
            Severity::Critical => {
                tracing::error!(check = f.check, object = %f.object, fix = %f.fix, "{}", f.why)
            }
            Severity::Note => {
                tracing::info!(check = f.check, object = %f.object, instead = %f.fix, "{}", f.why)
            }
        }
    }
    if criticals > 0 {
        tracing::error!(
            criticals,
            "rlsgate check found critical problems; starting anyway (--allow-unsafe)"
        );
    } else {
        tracing::info!(
            warnings = report.warnings(),
            "rlsgate check: no critical findings"
        );
    }
    Ok(())
}
