//! What the checks read from the catalog, loaded once as the upstream role (so `has_*_privilege`
//! and `pg_has_role` answer for the role the proxy uses), with `search_path = pg_catalog` so that
//! every name Postgres prints back (`pg_get_expr`, `pg_get_indexdef`, `regprocedure`) is
//! schema-qualified and fix SQL works from any session.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use super::DoctorError;
use super::expr::{Expr, ExprCtx};
use crate::guard::protected::ProtectedSet;

/// Schemas never audited.
const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

#[derive(Debug, Clone)]
pub(crate) struct Column {
    pub name: String,
    /// `quote_ident(name)`.
    pub ident: String,
    pub type_name: String,
    /// Identity or sequence-default column: a surrogate key that says nothing about a tenant.
    pub surrogate: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `quote_ident(name)` (unqualified).
    pub ident: String,
    /// Schema-qualified, quoted.
    pub qname: String,
    pub rls: bool,
    pub force: bool,
    pub owner: String,
    pub owner_is_role: bool,
    /// The role is (or is a member of) the owner.
    pub owner_reachable: bool,
    pub can_select: bool,
    pub can_insert: bool,
    pub can_update: bool,
    pub can_delete: bool,
    pub columns: Vec<Column>,
    /// The tenant column, when the table has one.
    pub tenant_col: Option<usize>,
    /// The foreign key through which a table without a tenant column belongs to a tenant.
    pub tenant_via: Option<usize>,
}

impl Table {
    pub fn is_tenant(&self) -> bool {
        self.tenant_col.is_some() || self.tenant_via.is_some()
    }

    pub fn any_privilege(&self) -> bool {
        self.can_select || self.can_insert || self.can_update || self.can_delete
    }

    pub fn tenant_column(&self) -> Option<&Column> {
        self.tenant_col.map(|i| &self.columns[i])
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ForeignKey {
    pub ident: String,
    pub table: u32,
    pub ref_table: u32,
    pub cols: Vec<String>,
    pub ref_cols: Vec<String>,
    pub def: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Index {
    pub table: u32,
    pub qname: String,
    pub unique: bool,
    /// Key columns (names or expression text), not INCLUDE columns.
    pub keys: Vec<String>,
    pub def: String,
    /// The constraint (quoted name, definition) that owns this index.
    pub constraint: Option<(String, String)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub table: u32,
    pub name: String,
    pub ident: String,
    /// `r`, `a`, `w`, `d` or `*`.
    pub cmd: char,
    pub permissive: bool,
    /// Applies to the role (PUBLIC or a role it is a member of).
    pub applies: bool,
    pub using: Option<String>,
    pub check: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Catalog {
    pub tables: Vec<Table>,
    pub by_oid: HashMap<u32, usize>,
    pub fks: Vec<ForeignKey>,
    pub indexes: Vec<Index>,
    pub policies: Vec<Policy>,
    /// Lower-case names of functions whose body reads the tenant setting.
    pub tenant_functions: HashSet<String>,
    pub tenant_columns: HashSet<String>,
    /// Citus tables (distributed, reference, Citus-managed local): Citus rejects subqueries in
    /// their policies, so fixes compare with the setting directly.
    pub citus_tables: HashSet<u32>,
}

impl Catalog {
    pub fn table(&self, oid: u32) -> Option<&Table> {
        self.by_oid.get(&oid).map(|&i| &self.tables[i])
    }

    /// Lower-case `schema.name` and `name` of tenant tables with RLS enabled.
    pub fn rls_table_names(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        for t in self.tables.iter().filter(|t| t.is_tenant() && t.rls) {
            out.insert(format!("{}.{}", t.schema, t.name).to_lowercase());
            out.insert(t.name.to_lowercase());
        }
        out
    }

    pub async fn load(
        client: &Client,
        tenant_setting: &str,
        base_columns: &[String],
        protected: &ProtectedSet,
        role_mode: bool,
    ) -> Result<Catalog, DoctorError> {
        let mut cat = Catalog::default();
        let rows = client
            .query(
                &format!(
                    "SELECT c.oid, n.nspname::text, c.relname::text, quote_ident(c.relname),
                        quote_ident(n.nspname) || '.' || quote_ident(c.relname),
                        c.relrowsecurity, c.relforcerowsecurity,
                        quote_ident(pg_get_userbyid(c.relowner)),
                        c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user),
                        pg_has_role(current_user, c.relowner, 'MEMBER'),
                        has_any_column_privilege(c.oid, 'SELECT'),
                        has_any_column_privilege(c.oid, 'INSERT'),
                        has_any_column_privilege(c.oid, 'UPDATE'),
                        has_table_privilege(c.oid, 'DELETE')
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p') AND {SYSTEM_SCHEMAS}
                  ORDER BY 2, 3"
                ),
                &[],
            )
            .await?;
        for r in rows {
            cat.by_oid.insert(r.get(0), cat.tables.len());
            cat.tables.push(Table {
                oid: r.get(0),
                schema: r.get(1),
                name: r.get(2),
                ident: r.get(3),
                qname: r.get(4),
                rls: r.get(5),
                force: r.get(6),
                owner: r.get(7),
                owner_is_role: r.get(8),
                owner_reachable: r.get(9),
                can_select: r.get(10),
                can_insert: r.get(11),
                can_update: r.get(12),
                can_delete: r.get(13),
                columns: Vec::new(),
                tenant_col: None,
                tenant_via: None,
            });
        }

        let rows = client
            .query(
                &format!(
                    "SELECT a.attrelid, a.attname::text, quote_ident(a.attname),
                        format_type(a.atttypid, a.atttypmod),
                        a.attidentity <> '' OR coalesce(pg_get_expr(d.adbin, d.adrelid) LIKE 'nextval(%', false)
                   FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                  WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
                    AND {SYSTEM_SCHEMAS}
                  ORDER BY a.attrelid, a.attnum"
                ),
                &[],
            )
            .await?;
        for r in rows {
            if let Some(&i) = cat.by_oid.get(&r.get::<_, u32>(0)) {
                cat.tables[i].columns.push(Column {
                    name: r.get(1),
                    ident: r.get(2),
                    type_name: r.get(3),
                    surrogate: r.get(4),
                });
            }
        }

        let rows = client
            .query(
                "SELECT quote_ident(co.conname), co.conrelid, co.confrelid,
                        ARRAY(SELECT a.attname::text FROM unnest(co.conkey) WITH ORDINALITY k(n, i)
                                JOIN pg_attribute a ON a.attrelid = co.conrelid AND a.attnum = k.n
                               ORDER BY k.i),
                        ARRAY(SELECT a.attname::text FROM unnest(co.confkey) WITH ORDINALITY k(n, i)
                                JOIN pg_attribute a ON a.attrelid = co.confrelid AND a.attnum = k.n
                               ORDER BY k.i),
                        pg_get_constraintdef(co.oid)
                   FROM pg_constraint co WHERE co.contype = 'f'
                  ORDER BY co.conrelid, co.conname",
                &[],
            )
            .await?;
        for r in rows {
            let fk = ForeignKey {
                ident: r.get(0),
                table: r.get(1),
                ref_table: r.get(2),
                cols: r.get(3),
                ref_cols: r.get(4),
                def: r.get(5),
            };
            if cat.by_oid.contains_key(&fk.table) && cat.by_oid.contains_key(&fk.ref_table) {
                cat.fks.push(fk);
            }
        }

        let rows = client
            .query(
                "SELECT i.indrelid, quote_ident(n.nspname) || '.' || quote_ident(ic.relname),
                        i.indisunique,
                        ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, false)
                                FROM generate_series(1, i.indnkeyatts) k ORDER BY k),
                        pg_get_indexdef(i.indexrelid),
                        quote_ident(co.conname), pg_get_constraintdef(co.oid)
                   FROM pg_index i
                   JOIN pg_class ic ON ic.oid = i.indexrelid
                   JOIN pg_namespace n ON n.oid = ic.relnamespace
                   LEFT JOIN pg_constraint co ON co.conindid = i.indexrelid
                        AND co.conrelid = i.indrelid AND co.contype IN ('p', 'u', 'x')
                  WHERE i.indisvalid
                  ORDER BY 2",
                &[],
            )
            .await?;
        for r in rows {
            let table: u32 = r.get(0);
            if !cat.by_oid.contains_key(&table) {
                continue;
            }
            let con: Option<String> = r.get(5);
            let condef: Option<String> = r.get(6);
            cat.indexes.push(Index {
                table,
                qname: r.get(1),
                unique: r.get(2),
                keys: r.get(3),
                def: r.get(4),
                constraint: con.zip(condef),
            });
        }

        let rows = client
            .query(
                "SELECT p.polrelid, p.polname::text, quote_ident(p.polname), p.polcmd::text,
                        p.polpermissive,
                        0::oid = ANY (p.polroles) OR EXISTS (
                            SELECT 1 FROM unnest(p.polroles) r
                             WHERE r <> 0 AND pg_has_role(current_user, r, 'MEMBER')),
                        pg_get_expr(p.polqual, p.polrelid),
                        pg_get_expr(p.polwithcheck, p.polrelid)
                   FROM pg_policy p ORDER BY p.polrelid, p.polname",
                &[],
            )
            .await?;
        for r in rows {
            let table: u32 = r.get(0);
            if !cat.by_oid.contains_key(&table) {
                continue;
            }
            let cmd: String = r.get(3);
            cat.policies.push(Policy {
                table,
                name: r.get(1),
                ident: r.get(2),
                cmd: cmd.chars().next().unwrap_or('*'),
                permissive: r.get(4),
                applies: r.get(5),
                using: r.get(6),
                check: r.get(7),
            });
        }

        // Functions whose body reads the tenant setting count as reading it in policies.
        let pattern = format!("%{}%", tenant_setting.to_ascii_lowercase());
        let rows = client
            .query(
                &format!(
                    "SELECT DISTINCT lower(p.proname::text) FROM pg_proc p
                       JOIN pg_namespace n ON n.oid = p.pronamespace
                      WHERE {SYSTEM_SCHEMAS} AND lower(p.prosrc) LIKE $1"
                ),
                &[&pattern],
            )
            .await?;
        cat.tenant_functions = rows.iter().map(|r| r.get(0)).collect();

        // pg_dist_partition is readable by every role where Citus is installed.
        let citus = client
            .query_one(
                "SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL",
                &[],
            )
            .await?
            .get::<_, bool>(0);
        if citus {
            let rows = client
                .query("SELECT logicalrelid::oid FROM pg_dist_partition", &[])
                .await?;
            cat.citus_tables = rows.iter().map(|r| r.get(0)).collect();
        }
        cat.classify(tenant_setting, base_columns, protected, role_mode);
        Ok(cat)
    }

    /// Tenant columns (configured names plus columns policies compare with the tenant setting),
    /// then tenant tables: with such a column, or referencing a tenant table by foreign key.
    fn classify(
        &mut self,
        tenant_setting: &str,
        base_columns: &[String],
        protected: &ProtectedSet,
        role_mode: bool,
    ) {
        let mut columns: HashSet<String> = base_columns.iter().cloned().collect();
        let empty = HashSet::new();
        let ctx = ExprCtx {
            tenant_setting,
            protected,
            tenant_functions: &self.tenant_functions,
            role_mode,
            rls_tables: &empty,
        };
        for p in &self.policies {
            for text in [&p.using, &p.check].into_iter().flatten() {
                if let Some(e) = Expr::parse(text) {
                    e.tenant_columns(&ctx, &mut columns);
                }
            }
        }
        for t in &mut self.tables {
            t.tenant_col = t.columns.iter().position(|c| columns.contains(&c.name));
        }
        // Children of tenant tables, breadth first (shortest path to a tenant column).
        loop {
            let mut changed = false;
            for (i, fk) in self.fks.iter().enumerate() {
                let (child, parent) = (self.by_oid[&fk.table], self.by_oid[&fk.ref_table]);
                if child != parent
                    && !self.tables[child].is_tenant()
                    && self.tables[parent].is_tenant()
                {
                    self.tables[child].tenant_via = Some(i);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        self.tenant_columns = columns;
    }

    /// Whether a policy on `table` may contain a subquery (not on a Citus table).
    pub fn subquery_allowed(&self, table: u32) -> bool {
        !self.citus_tables.contains(&table)
    }

    /// A boolean SQL expression tying a row of `table` (referred to as `alias`, or unqualified
    /// when `None`) to the tenant: the tenant column, or `EXISTS` over the parent it belongs to.
    /// On a Citus table the setting is compared directly and there is no `EXISTS` form (Citus
    /// rejects subqueries in policies on distributed tables).
    pub fn tenant_predicate(
        &self,
        table: u32,
        alias: Option<&str>,
        tenant_setting: &str,
        depth: usize,
    ) -> Option<String> {
        let t = self.table(table)?;
        let qual = |col: &str| match alias {
            Some(a) => format!("{a}.{col}"),
            None => col.to_string(),
        };
        let subquery = depth > 0 || self.subquery_allowed(table);
        if let Some(col) = t.tenant_column() {
            return Some(format!(
                "{} = {}",
                qual(&col.ident),
                tenant_value(tenant_setting, &col.type_name, subquery)
            ));
        }
        if depth > 8 || !subquery {
            return None;
        }
        let fk = &self.fks[t.tenant_via?];
        let parent = self.table(fk.ref_table)?;
        let p = format!("p{}", depth + 1);
        let child_ref = alias.map(str::to_string).unwrap_or_else(|| t.ident.clone());
        let mut conds: Vec<String> = fk
            .cols
            .iter()
            .zip(&fk.ref_cols)
            .map(|(c, rc)| {
                format!(
                    "{p}.{} = {child_ref}.{}",
                    ident_of(parent, rc),
                    ident_of(t, c)
                )
            })
            .collect();
        conds.push(self.tenant_predicate(parent.oid, Some(&p), tenant_setting, depth + 1)?);
        Some(format!(
            "EXISTS (SELECT 1 FROM {} {p} WHERE {})",
            parent.qname,
            conds.join(" AND ")
        ))
    }
}

fn ident_of(t: &Table, name: &str) -> String {
    t.columns
        .iter()
        .find(|c| c.name == name)
        .map(|c| c.ident.clone())
        .unwrap_or_else(|| format!("\"{}\"", name.replace('"', "\"\"")))
}

/// `(SELECT nullif(current_setting('<setting>', true), ''))`, cast to the column type unless it
/// is text-like. Evaluated once per statement, empty (outside a transaction rlsgate started) → NULL.
/// Without `subquery` (Citus tables) the bare `nullif(…)`, evaluated per row on the workers.
pub(crate) fn tenant_value(setting: &str, type_name: &str, subquery: bool) -> String {
    let call = format!("nullif(current_setting('{setting}', true), '')");
    let base = if subquery {
        format!("(SELECT {call})")
    } else {
        call
    };
    let t = type_name.to_ascii_lowercase();
    if t == "text" || t.starts_with("character varying") {
        base
    } else {
        format!("{base}::{type_name}")
    }
}
