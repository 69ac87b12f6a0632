//! Citus: the tenant context must reach the worker nodes (DESIGN §3, "Distributed upstream").
//!
//! Citus forwards `SET LOCAL` to the workers of a transaction only inside an explicit block and
//! only when `citus.propagate_set_commands` is `local` before the `SET LOCAL` runs. Rather than
//! reason about settings, [`probe`] makes the tenant `SET LOCAL` exactly the way rlsgate does and
//! reads it back on a worker. Tenant tables should also be distributed by the tenant column, so a
//! tenant's rows (and its transactions) stay on one node, and `COPY <distributed table> TO` cannot
//! see the context at all (Citus copies the shards outside the transaction).

use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio_postgres::Client;

use super::{Ctx, DoctorError, Finding, Severity};
use crate::config::Config;

/// The statement rlsgate injects first with `citus_propagate_set` (`session::inject`, whose unit
/// test keeps the two equal): the probe sends the very same text.
pub(crate) const CITUS_PROPAGATE_SET: &str = "SET LOCAL citus.propagate_set_commands = 'local'";

/// The Citus extension's version, if it is installed in this database.
pub(crate) async fn version(client: &Client) -> Result<Option<String>, DoctorError> {
    let row = client
        .query_opt(
            "SELECT extversion::text FROM pg_extension WHERE extname = 'citus'",
            &[],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

pub(crate) async fn check(
    client: &Client,
    config: &Config,
    ctx: &Ctx,
    findings: &mut Vec<Finding>,
) -> Result<(), DoctorError> {
    let Some(version) = version(client).await? else {
        return Ok(());
    };
    let upstream = &config.upstream;
    if !upstream.transaction_wrap {
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
    let mode: Option<String> = client
        .query_one(
            "SELECT current_setting('citus.propagate_set_commands', true)",
            &[],
        )
        .await?
        .get(0);
    let mode = mode.unwrap_or_else(|| "unset".into());
    let reached = match probe(client, ctx, upstream.citus_propagate_set).await {
        Ok(Probe::Worker { node, seen, marker }) if seen.as_deref() == Some(marker) => Ok(node),
        Ok(Probe::Worker { node, seen, .. }) => Err(format!(
            "A transaction made the way rlsgate makes it (BEGIN; {}SET LOCAL {} = '…'; then a \
             query routed to worker {node}) showed the worker {}: the tenant context does not \
             reach the workers, so RLS on distributed tables fails closed (no rows, every \
             insert rejected).",
            if upstream.citus_propagate_set {
                format!("{CITUS_PROPAGATE_SET}; ")
            } else {
                String::new()
            },
            ctx.tenant_setting,
            match seen {
                Some(v) if v.is_empty() => "an empty setting".to_string(),
                Some(v) => format!("the value {}", escape_literal(&v)),
                None => "no setting".to_string(),
            },
        )),
        Ok(Probe::Inconclusive(reason)) => {
            tracing::debug!(reason, "citus worker probe inconclusive");
            // Without a worker to ask: the documented rule.
            if upstream.citus_propagate_set || mode == "local" {
                Ok(String::new())
            } else {
                Err(
                    "The tenant's SET LOCAL is not propagated to worker nodes unless \
                     citus.propagate_set_commands is 'local' when it runs."
                        .into(),
                )
            }
        }
        Err(e) => Err(format!(
            "The probe that reads the tenant setting back on a worker failed: {e}"
        )),
    };
    if let Err(why) = reached {
        let db: String = client
            .query_one("SELECT current_database()::text", &[])
            .await?
            .get(0);
        let fix = if upstream.citus_propagate_set {
            // rlsgate already sends it first: something else is wrong (an old Citus, a
            // function or trigger resetting it); the server-side setting is the other lever.
            format!(
                "-- rlsgate already sends {CITUS_PROPAGATE_SET} first; also set it server-side:\n\
                 ALTER DATABASE {} SET citus.propagate_set_commands = 'local';",
                escape_identifier(&db)
            )
        } else {
            format!(
                "ALTER DATABASE {} SET citus.propagate_set_commands = 'local';\n\
                 -- or in the rlsgate config: [upstream] citus_propagate_set = true",
                escape_identifier(&db)
            )
        };
        findings.push(Finding {
            severity: Severity::Critical,
            check: "citus-propagate-set",
            object: format!("setting citus.propagate_set_commands = {mode}"),
            why,
            fix,
        });
    }
    distribution_columns(client, ctx, findings).await?;
    copy_to(client, findings).await
}

enum Probe {
    /// The query ran on `node`, which saw `seen` as the tenant setting (`marker` was set).
    Worker {
        node: String,
        seen: Option<String>,
        marker: &'static str,
    },
    /// No hash-distributed table to route a query to, or the query ran on the coordinator.
    Inconclusive(&'static str),
}

/// Make the tenant `SET LOCAL` inside a block as rlsgate does in wrap mode (its
/// `CITUS_PROPAGATE_SET` first when configured), then run a query that Citus executes on a
/// worker inside that transaction, and return what the worker saw.
///
/// The query is a router query on a hash-distributed table the role can read: the filter pins
/// the distribution column to one constant, so Citus sends the whole statement, target list
/// included, to the one shard that holds that value (`EXPLAIN VERBOSE` shows the task's query
/// with `current_setting('app.current_store_id', true)` in it and `Node: host=<worker>`). The
/// aggregate makes it return one row even though RLS filters every row out; `inet_server_addr/
/// port` and `pg_backend_pid` tell that it did run on another server than this session's. A
/// multi-shard query would not do: Citus evaluates a target list without columns on the
/// coordinator. (The unwrapped form — SET LOCAL pipelined into an implicit transaction — never
/// reaches the workers; `citus-without-wrap` covers it.)
async fn probe(client: &Client, ctx: &Ctx, propagate: bool) -> Result<Probe, DoctorError> {
    let tenant_columns: Vec<String> = ctx.catalog.tenant_columns.iter().cloned().collect();
    let tables = client
        .query(
            "SELECT p.logicalrelid::regclass::text, quote_ident(a.attname), t.typcategory::text,
                    t.oid = 'uuid'::regtype, format_type(a.atttypid, a.atttypmod)
               FROM pg_dist_partition p
               JOIN pg_attribute a ON a.attrelid = p.logicalrelid
                AND a.attname = column_to_column_name(p.logicalrelid, p.partkey)
               JOIN pg_type t ON t.oid = a.atttypid
              WHERE p.partmethod = 'h' AND has_table_privilege(p.logicalrelid, 'SELECT')
              ORDER BY a.attname::text = ANY($1) DESC, 1",
            &[&tenant_columns],
        )
        .await?;
    // The tenant value the probe sets, a constant of the distribution column's type (usually
    // the tenant column: a policy may cast the setting to it), which routes the query to one
    // shard. No tenant is expected to have it; RLS lets the probe count no rows anyway.
    let target = tables.iter().find_map(|r| {
        let (table, column, category, uuid, ty): (String, String, String, bool, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let marker = match (category.as_str(), uuid) {
            (_, true) => "00000000-0000-4000-8000-726c73676174",
            ("N", _) => "-726",
            ("S", _) => "rlsgate-check-probe",
            _ => return None,
        };
        Some((
            table,
            column,
            marker,
            format!("{}::{ty}", escape_literal(marker)),
        ))
    });
    let Some((table, column, marker, value)) = target else {
        return Ok(Probe::Inconclusive(
            "no hash-distributed table with a text, number or uuid distribution column",
        ));
    };
    // One statement per message, as rlsgate sends them (never several in one Query: Citus
    // replays a whole multi-statement string on the workers).
    client.batch_execute("BEGIN").await?;
    let result = async {
        if propagate {
            client.batch_execute(CITUS_PROPAGATE_SET).await?;
        }
        client
            .batch_execute(&format!(
                "SET LOCAL {} = {}",
                ctx.tenant_setting,
                escape_literal(marker)
            ))
            .await?;
        let here = client
            .query_one(
                "SELECT host(inet_server_addr()), inet_server_port(), pg_backend_pid()",
                &[],
            )
            .await?;
        let there = client
            .query_one(
                &format!(
                    "SELECT current_setting({}, true), host(inet_server_addr()), \
                            inet_server_port(), pg_backend_pid(), count(*) \
                       FROM {table} WHERE {column} = {value}",
                    escape_literal(&ctx.tenant_setting)
                ),
                &[],
            )
            .await?;
        let key = |r: &tokio_postgres::Row, at: usize| -> (Option<String>, Option<i32>, i32) {
            (r.get(at), r.get(at + 1), r.get(at + 2))
        };
        if key(&here, 0) == key(&there, 1) {
            return Ok::<_, DoctorError>(Probe::Inconclusive("the probe ran on the coordinator"));
        }
        let (addr, port, _) = key(&there, 1);
        Ok(Probe::Worker {
            node: format!(
                "{}:{}",
                addr.as_deref().unwrap_or("local"),
                port.map(|p| p.to_string()).unwrap_or_default()
            ),
            seen: there.get(0),
            marker,
        })
    }
    .await;
    client.batch_execute("ROLLBACK").await?;
    result
}

/// Tenant tables distributed by another column than their tenant column.
async fn distribution_columns(
    client: &Client,
    ctx: &Ctx,
    findings: &mut Vec<Finding>,
) -> Result<(), DoctorError> {
    let rows = client
        .query(
            "SELECT logicalrelid::oid, logicalrelid::regclass::text,
                    column_to_column_name(logicalrelid, partkey)::text
               FROM pg_dist_partition WHERE partmethod = 'h'",
            &[],
        )
        .await?;
    for row in rows {
        let (oid, table, column): (u32, String, String) = (row.get(0), row.get(1), row.get(2));
        // The table's own tenant column (catalog), not a name guessed from the setting.
        let Some(tenant) = ctx.catalog.table(oid).and_then(|t| t.tenant_column()) else {
            continue;
        };
        if tenant.name == column {
            continue;
        }
        findings.push(Finding {
            severity: Severity::Warning,
            check: "citus-distribution-column",
            object: format!(
                "table {table} distributed by {}",
                escape_identifier(&column)
            ),
            why: format!(
                "A tenant table not distributed by its tenant column ({}) spreads one tenant's \
                 rows and transactions over several nodes. Redistributing needs every unique \
                 constraint (see unique-without-tenant) and foreign key to include that column.",
                tenant.ident
            ),
            fix: format!(
                "SELECT alter_distributed_table({}, distribution_column := {});",
                escape_literal(&table),
                escape_literal(&tenant.name)
            ),
        });
    }
    Ok(())
}

/// `COPY <distributed table> TO STDOUT` reads the shards over connections outside the client's
/// transaction, so the workers never see the tenant: 0 rows (measured on Citus 13.2, fails
/// closed). `COPY (SELECT …) TO` runs as a query in the transaction and works. Nothing on the
/// database side changes this, so it is a note, with the statement to use instead.
async fn copy_to(client: &Client, findings: &mut Vec<Finding>) -> Result<(), DoctorError> {
    let rows = client
        .query(
            "SELECT logicalrelid::regclass::text FROM pg_dist_partition
              WHERE partmethod = 'h' AND has_table_privilege(logicalrelid, 'SELECT')
              ORDER BY 1",
            &[],
        )
        .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let tables: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    findings.push(Finding {
        severity: Severity::Note,
        check: "citus-copy-to",
        object: format!("COPY … TO on {} distributed table(s)", tables.len()),
        why:
            "COPY <distributed table> TO STDOUT returns no rows through rlsgate: Citus copies the \
              shards over connections outside the transaction, where the tenant context is not \
              set. Export with COPY (SELECT …) TO STDOUT, which runs inside the transaction."
                .into(),
        fix: tables
            .iter()
            .map(|t| format!("COPY (SELECT * FROM {t}) TO STDOUT;"))
            .collect::<Vec<_>>()
            .join("\n"),
    });
    Ok(())
}
