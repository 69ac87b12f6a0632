//! Citus: tenant context must reach the worker nodes (DESIGN §3, "Distributed upstream").
//! Citus forwards `SET LOCAL` to workers only inside an explicit block and only when
//! `citus.propagate_set_commands` is `local`; tenant tables should be distributed by the tenant
//! column so a tenant's rows (and its transactions) stay on one node.

use tokio_postgres::Client;

use super::{DoctorError, Finding, Severity};
use crate::config::Config;

pub async fn check(
    client: &Client,
    config: &Config,
    tenant_columns: &[String],
    findings: &mut Vec<Finding>,
) -> Result<(), DoctorError> {
    let citus = client
        .query_opt(
            "SELECT extversion::text FROM pg_extension WHERE extname = 'citus'",
            &[],
        )
        .await?;
    let Some(row) = citus else { return Ok(()) };
    let version: String = row.get(0);
    if !config.upstream.transaction_wrap {
        findings.push(Finding {
            severity: Severity::Critical,
            check: "citus-without-wrap",
            object: format!("extension citus {version}"),
            why: "Citus forwards SET LOCAL to workers only inside an explicit transaction block; without \
                  transaction_wrap the tenant context reaches the coordinator only, and RLS on distributed \
                  tables fails closed (no rows, every insert rejected)"
                .into(),
            fix: "-- in the rlsgate config:\n[upstream]\ntransaction_wrap = true".into(),
        });
    }
    if !config.upstream.citus_propagate_set {
        let mode: Option<String> = client
            .query_one(
                "SELECT current_setting('citus.propagate_set_commands', true)",
                &[],
            )
            .await?
            .get(0);
        if mode.as_deref() != Some("local") {
            let db: String = client
                .query_one("SELECT current_database()::text", &[])
                .await?
                .get(0);
            findings.push(Finding {
                severity: Severity::Critical,
                check: "citus-propagate-set",
                object: format!("setting citus.propagate_set_commands = {}", mode.as_deref().unwrap_or("unset")),
                why: "the tenant's SET LOCAL is not propagated to worker nodes unless citus.propagate_set_commands \
                      is 'local'"
                    .into(),
                fix: format!(
                    "ALTER DATABASE {} SET citus.propagate_set_commands = 'local';\n-- or in the rlsgate config: [upstream] citus_propagate_set = true",
                    postgres_protocol::escape::escape_identifier(&db)
                ),
            });
        }
    }
    let rows = client
        .query(
            "SELECT logicalrelid::regclass::text, column_to_column_name(logicalrelid, partkey)::text, \
                    EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = logicalrelid AND NOT a.attisdropped \
                            AND a.attname::text = ANY($1)) \
             FROM pg_dist_partition WHERE partmethod = 'h'",
            &[&tenant_columns],
        )
        .await?;
    for row in rows {
        let (table, column, has_tenant): (String, Option<String>, bool) =
            (row.get(0), row.get(1), row.get(2));
        let column = column.unwrap_or_default();
        if has_tenant && !tenant_columns.contains(&column) {
            let tenant = tenant_columns
                .first()
                .cloned()
                .unwrap_or_else(|| "store_id".into());
            findings.push(Finding {
                severity: Severity::Warning,
                check: "citus-distribution-column",
                object: format!("table {table} distributed by {column}"),
                why: "a tenant table not distributed by the tenant column spreads one tenant's rows and \
                      transactions over several nodes"
                    .into(),
                fix: format!(
                    "SELECT alter_distributed_table({}, distribution_column := {});",
                    postgres_protocol::escape::escape_literal(&table),
                    postgres_protocol::escape::escape_literal(&tenant)
                ),
            });
        }
    }
    Ok(())
}
