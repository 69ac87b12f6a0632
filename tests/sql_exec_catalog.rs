//! Every function that runs SQL given to it as text, found from the live catalog, must be denied
//! by the guard when its SQL is not a constant the guard can check.
//!
//! The list is found, not written down: the test installs every extension available to the server,
//! then, as an unprivileged role, calls every function that takes a text-like argument (`text`,
//! `varchar`, `bpchar`, `cstring`, `name`, `refcursor`) with a probe in that argument and sample
//! values elsewhere. A probe is SQL (or an SQL fragment, for functions that paste their arguments
//! into a query) calling `nextval('public.ps')`: a sequence moves even when the statement then
//! fails or is rolled back, and even when the SQL runs in another backend (dblink), so a probe
//! that was *executed* is seen whatever happens next. (`set_config(…, true)` would only show
//! through calls that succeed: crosstab or connectby fail after running the probe because its
//! result has the wrong shape.) What the probe cannot trigger (a query only planned, or run later
//! through a cursor) is added from [`STATIC`], matched on the C symbol. A new server version or a
//! new extension whose function runs one of the probes therefore fails this test until the guard
//! knows it; the test prints the whole set it found (`--nocapture`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rlsgate::config::GuardConfig;
use rlsgate::guard::Guard;
use tokio_postgres::{Client, NoTls};

const PROBE_ROLE: &str = "sqlexec_probe";
const PROBE_PASSWORD: &str = "sqlexec-probe-password";
/// What each probe runs; replaced by [`EVIL`] for the constant-argument guard check.
const TRIGGER: &str = "nextval('public.ps')";
const EVIL: &str = "set_config('app.current_store_id','x',true)";
/// Probes (all shorter than 64 bytes, so they survive `name` arguments). Whole queries, with the
/// result shapes ts_stat (one tsvector), ts_rewrite (two tsquery) and crosstab (three text
/// columns) want, then fragments for functions that build a query from their arguments: an
/// expression, a condition, a FROM item, and an expression that comments out the rest.
const PROBES: &[&str] = &[
    "select nextval('public.ps')",
    "select nextval('public.ps')::text::tsvector",
    "select nextval('public.ps')::text::tsquery, 'a'::tsquery",
    "select 'a'::text, 'a'::text, nextval('public.ps')::text",
    "nextval('public.ps')",
    "nextval('public.ps') > 0",
    "(select nextval('public.ps')) a",
    "nextval('public.ps') --",
];
/// The value of the other text-like arguments when one is probed: a table `a` with a column `a`
/// exists, and in a database with dblink a connection named `a` is open.
const OTHER_TEXT: &str = "a";
/// Never called: they sleep, signal backends, touch files or server-wide state, or change the
/// probing session itself. (Most refuse an unprivileged role anyway.)
const SKIP_NAMES: &[&str] = &[
    "set_config",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_log_backend_memory_contexts",
    "pg_import_system_collations",
    "pg_notify",
    "pg_prewarm",
    "pg_logical_emit_message",
    "pg_truncate_visibility_map",
    "heap_force_kill",
    "heap_force_freeze",
    "pg_logdir_ls",
    "pg_stat_file",
];
const SKIP_PREFIXES: &[&str] = &[
    "pg_sleep",
    "pg_read_",
    "pg_file_",
    "pg_ls_",
    "lo_import",
    "lo_export",
    "pg_backup_",
    "pg_create_",
    "pg_drop_replication",
    "pg_copy_",
    "pg_replication_origin",
    "pg_stat_reset",
    "pg_advisory",
    "pg_wal_replay",
];
/// Column definition lists tried for functions returning `record` (several check the shape before
/// running anything: crosstab wants 3+ columns, connectby `key, parent, level int[, branch][, serial int]`).
const COLDEFS: &[&str] = &[
    "a text",
    "a text, b text, c text",
    "a text, b text, c int",
    "a text, b text, c int, d text",
    "a text, b text, c int, d int",
    "a text, b text, c int, d text, e int",
];
/// How SQL reaches a function found statically (by the C symbol in `prosrc`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// A whole query.
    Query,
    /// Pasted unquoted into a query the function builds (identifiers, conditions).
    Fragment,
}
/// C functions known from the PostgreSQL and contrib sources to run SQL taken from their text
/// arguments (1-based positions; empty = every text-like argument). Matched on `prosrc` of
/// `LANGUAGE c`/`internal` functions, so a wrapper under another name (crosstab2…) is found too. These cover
/// what the probe cannot trigger: query_to_xmlschema only plans its query (SPI_cursor_open without
/// a fetch); dblink_open only DECLAREs a cursor (dblink_fetch runs it); dblink_fetch/dblink_close
/// paste the cursor name into FETCH/CLOSE; connectby and xpath_table paste several arguments.
const STATIC: &[(&str, &[usize], Kind)] = &[
    ("query_to_xml", &[1], Kind::Query),
    ("query_to_xmlschema", &[1], Kind::Query),
    ("query_to_xml_and_xmlschema", &[1], Kind::Query),
    ("ts_stat1", &[1], Kind::Query),
    ("ts_stat2", &[1], Kind::Query),
    ("tsquery_rewrite_query", &[2], Kind::Query),
    ("crosstab", &[1], Kind::Query),
    ("crosstab_hash", &[1, 2], Kind::Query),
    ("connectby_text", &[1, 2, 3], Kind::Fragment),
    ("connectby_text_serial", &[1, 2, 3, 4], Kind::Fragment),
    ("xpath_table", &[1, 2, 3, 5], Kind::Fragment),
    ("dblink_record", &[], Kind::Query),
    ("dblink_exec", &[], Kind::Query),
    ("dblink_open", &[], Kind::Query),
    ("dblink_send_query", &[], Kind::Query),
    ("dblink_fetch", &[], Kind::Fragment),
    ("dblink_close", &[], Kind::Fragment),
];
const TEXT_LIKE: &[&str] = &["text", "varchar", "bpchar", "cstring", "name", "refcursor"];

/// Functions (`prokind = 'f'`) with at least one text-like argument and no pseudo-type argument
/// (polymorphic, internal, trigger…), that can be called from SQL.
const CANDIDATES: &str = r#"
select p.oid::int8, n.nspname::text, p.proname::text,
       pg_get_function_identity_arguments(p.oid),
       array(select format_type(t, null) from unnest(p.proargtypes::oid[]) with ordinality u(t, i) order by i),
       array(select ty.typname::text from unnest(p.proargtypes::oid[]) with ordinality u(t, i)
             join pg_type ty on ty.oid = u.t order by i),
       array(select ty.typcategory::text from unnest(p.proargtypes::oid[]) with ordinality u(t, i)
             join pg_type ty on ty.oid = u.t order by i),
       p.prorettype = 'record'::regtype and p.proallargtypes is null,
       coalesce((select e.extname::text from pg_depend d join pg_extension e on e.oid = d.refobjid
                 where d.classid = 'pg_proc'::regclass and d.objid = p.oid
                   and d.refclassid = 'pg_extension'::regclass and d.deptype = 'e'), ''),
       case when l.lanname in ('c', 'internal') then p.prosrc else '' end
from pg_proc p
join pg_language l on l.oid = p.prolang
join pg_namespace n on n.oid = p.pronamespace
join pg_type rt on rt.oid = p.prorettype
where p.prokind = 'f'
  and p.pronargs > 0
  and exists (select 1 from unnest(p.proargtypes::oid[]) t join pg_type ty on ty.oid = t
              where ty.typname in ('text', 'varchar', 'bpchar', 'cstring', 'name', 'refcursor')
                and ty.typnamespace = 'pg_catalog'::regnamespace)
  and not exists (select 1 from unnest(p.proargtypes::oid[]) t join pg_type ty on ty.oid = t
                  where ty.typtype = 'p' and ty.typname <> 'cstring')
  and (rt.typtype <> 'p' or rt.typname in ('record', 'void', 'cstring'))
order by p.oid
"#;

struct Function {
    schema: String,
    name: String,
    identity: String,
    types: Vec<String>,
    typnames: Vec<String>,
    categories: Vec<String>,
    /// Returns `record` without OUT parameters: needs `AS t(…)` in FROM.
    needs_coldef: bool,
    extension: String,
    /// C symbol (`prosrc`) of a `LANGUAGE c` or `internal` function.
    symbol: String,
}

impl Function {
    fn text_positions(&self) -> Vec<usize> {
        (0..self.typnames.len())
            .filter(|&i| TEXT_LIKE.contains(&self.typnames[i].as_str()))
            .collect()
    }

    fn qualified(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }

    fn label(&self) -> String {
        format!("{}.{}({})", self.schema, self.name, self.identity)
    }

    /// Sample value for argument `i`, as SQL.
    fn sample(&self, i: usize) -> String {
        let ty = &self.types[i];
        if TEXT_LIKE.contains(&self.typnames[i].as_str()) {
            return format!("{}::{ty}", literal(OTHER_TEXT));
        }
        let value = match self.typnames[i].as_str() {
            "bool" => Some("true"),
            "regconfig" | "regdictionary" => Some("simple"),
            "regclass" => Some("public.a"),
            "regtype" => Some("text"),
            "regproc" => Some("now"),
            "regprocedure" => Some("now()"),
            "regnamespace" => Some("public"),
            "regrole" => Some(PROBE_ROLE),
            "tsvector" | "tsquery" | "ltree" | "lquery" | "ltxtquery" | "citext" | "char" => {
                Some("a")
            }
            "json" | "jsonb" => Some("{}"),
            "xml" => Some("<a/>"),
            "bytea" => Some("\\x"),
            "uuid" => Some("00000000-0000-0000-0000-000000000000"),
            "hstore" => Some("a=>b"),
            "pg_lsn" => Some("0/0"),
            "tid" => Some("(0,1)"),
            "int2vector" | "oidvector" => Some("1"),
            "txid_snapshot" | "pg_snapshot" => Some("1:1:"),
            "macaddr" => Some("08:00:2b:01:02:03"),
            "macaddr8" => Some("08:00:2b:01:02:03:04:05"),
            "point" => Some("(0,0)"),
            _ => match self.categories[i].as_str() {
                "A" => Some("{}"),
                "N" | "V" => Some("1"),
                "S" => Some("a"),
                "D" => Some("now"),
                "T" => Some("1 second"),
                "B" => Some("true"),
                "R" => Some("empty"),
                "I" => Some("127.0.0.1"),
                _ => None,
            },
        };
        match value {
            Some(v) => format!("{}::{ty}", literal(v)),
            None => format!("NULL::{ty}"),
        }
    }

    /// A call with `values[i]` (SQL) as argument `i`.
    fn call(&self, name: &str, values: &[String], from: &str) -> String {
        self.call_as(name, values, from, COLDEFS[0])
    }

    fn call_as(&self, name: &str, values: &[String], from: &str, coldef: &str) -> String {
        let args = values.join(", ");
        if self.needs_coldef {
            format!("SELECT * FROM {name}({args}) AS t({coldef}){from}")
        } else {
            format!("SELECT {name}({args}){from}")
        }
    }

    /// The [`STATIC`] entry for this function's C symbol: SQL positions (0-based) and kind.
    fn known(&self) -> Option<(Vec<usize>, Kind)> {
        let (_, positions, kind) = STATIC.iter().find(|(s, _, _)| *s == self.symbol)?;
        let positions = if positions.is_empty() {
            self.text_positions()
        } else {
            positions.iter().map(|p| p - 1).collect()
        };
        Some((positions, *kind))
    }

    /// Arguments with `probe` (SQL) at `positions`, samples elsewhere.
    fn args_with(&self, positions: &[usize], probe: impl Fn(usize) -> String) -> Vec<String> {
        (0..self.types.len())
            .map(|i| {
                if positions.contains(&i) {
                    probe(i)
                } else {
                    self.sample(i)
                }
            })
            .collect()
    }

    fn skipped(&self) -> bool {
        SKIP_NAMES.contains(&self.name.as_str())
            || SKIP_PREFIXES.iter().any(|p| self.name.starts_with(p))
    }
}

fn ident(s: &str) -> String {
    let plain = s
        .bytes()
        .enumerate()
        .all(|(i, b)| b == b'_' || b.is_ascii_lowercase() || (i > 0 && b.is_ascii_digit()));
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What probing found for one function: (positions probed, probe index) pairs that ran SQL.
#[derive(Default)]
struct Hits {
    calls: BTreeSet<(Vec<usize>, usize)>,
}

impl Hits {
    /// Argument positions that carry SQL: those hit when probed alone, else all probed together.
    fn sql_positions(&self, f: &Function) -> Vec<usize> {
        let single: BTreeSet<usize> = self
            .calls
            .iter()
            .filter(|(p, _)| p.len() == 1)
            .map(|(p, _)| p[0])
            .collect();
        if single.is_empty() {
            f.text_positions()
        } else {
            single.into_iter().collect()
        }
    }

    /// The first probe that ran with the SQL at `pos` (or with every text argument probed).
    fn probe_for(&self, f: &Function, pos: usize) -> Option<usize> {
        self.calls
            .iter()
            .find(|(p, _)| p == &[pos])
            .or_else(|| self.calls.iter().find(|(p, _)| p == &f.text_positions()))
            .map(|(_, probe)| *probe)
    }
}

async fn connect(conn_str: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(conn_str, NoTls)
        .await
        .expect("connect to the throwaway cluster");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

struct Prober {
    conn_str: String,
    loopback: String,
    dblink: bool,
    client: Client,
    last: i64,
}

impl Prober {
    async fn new(conn_str: String, loopback: String, dblink: bool) -> Prober {
        let client = connect(&conn_str).await;
        let mut p = Prober {
            conn_str,
            loopback,
            dblink,
            client,
            last: 0,
        };
        p.setup().await;
        p
    }

    async fn setup(&mut self) {
        self.client
            .batch_execute("SET statement_timeout = '2s'; SET lock_timeout = '1s'")
            .await
            .expect("session settings");
        if self.dblink {
            self.reset_dblink().await;
        }
        self.last = self.sequence().await;
    }

    /// A loopback dblink connection named `a` and an unnamed one (dblink's "connection or
    /// connection string" argument then works with the sample `a`).
    async fn reset_dblink(&mut self) {
        let _ = self
            .client
            .batch_execute("SELECT dblink_disconnect(c) FROM unnest(dblink_get_connections()) c")
            .await;
        let _ = self
            .client
            .batch_execute("SELECT dblink_disconnect()")
            .await;
        let conn = literal(&self.loopback);
        let sql = format!("SELECT dblink_connect('a', {conn}); SELECT dblink_connect({conn})");
        if let Err(e) = self.client.batch_execute(&sql).await {
            // Only the probing of dblink suffers; the static list still covers it.
            eprintln!("dblink loopback connection failed: {e}");
        }
    }

    async fn sequence(&self) -> i64 {
        let row = self
            .client
            .query_one("SELECT last_value FROM public.ps", &[])
            .await
            .expect("read probe sequence");
        row.get(0)
    }

    /// Run `sql`; whether the sequence moved since the last look.
    async fn ran_sql(&mut self, sql: &str) -> bool {
        let _ = self.client.simple_query(sql).await;
        if self.client.is_closed() {
            // A crashed backend: start over on a new session (a crash is not an SQL hit).
            self.client = connect(&self.conn_str).await;
            self.setup().await;
            return false;
        }
        self.moved().await
    }

    async fn moved(&mut self) -> bool {
        let now = self.sequence().await;
        let moved = now != self.last;
        self.last = now;
        moved
    }
}

#[tokio::test]
async fn every_sql_executing_function_is_denied() {
    let started = Instant::now();
    let pg = support::pg();
    let db = format!("sqlexec_{}", std::process::id());
    pg.create_database(&db).expect("create database");
    let host = pg.socket_dir().display().to_string();
    let admin = connect(&format!(
        "host={host} port={} user={} dbname={db}",
        pg.port(),
        pg.superuser()
    ))
    .await;

    // Every extension this server can load, installed where the probe can call it.
    let available: Vec<String> = admin
        .query(
            "SELECT name FROM pg_available_extensions WHERE installed_version IS NULL ORDER BY name",
            &[],
        )
        .await
        .expect("available extensions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut installed = Vec::new();
    for ext in &available {
        let sql = format!("CREATE EXTENSION IF NOT EXISTS {} CASCADE", ident(ext));
        if admin.batch_execute(&sql).await.is_ok() {
            installed.push(ext.clone());
        }
    }
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{PROBE_ROLE}') THEN
                 CREATE ROLE {PROBE_ROLE} LOGIN PASSWORD '{PROBE_PASSWORD}';
               END IF;
             END $$;
             CREATE SEQUENCE public.ps;
             SELECT nextval('public.ps');
             CREATE TABLE public.a (a text);
             INSERT INTO public.a VALUES ('a');
             GRANT USAGE, SELECT, UPDATE ON SEQUENCE public.ps TO {PROBE_ROLE};
             GRANT SELECT ON public.a TO {PROBE_ROLE};"
        ))
        .await
        .expect("probe role and objects");

    let functions: Vec<Function> = admin
        .query(CANDIDATES, &[])
        .await
        .expect("candidate functions")
        .iter()
        .map(|r| Function {
            schema: r.get(1),
            name: r.get(2),
            identity: r.get(3),
            types: r.get(4),
            typnames: r.get(5),
            categories: r.get(6),
            needs_coldef: r.get(7),
            extension: r.get(8),
            symbol: r.get(9),
        })
        .collect();
    let setup_time = started.elapsed();

    let mut prober = Prober::new(
        format!(
            "host={host} port={} user={PROBE_ROLE} dbname={db}",
            pg.port()
        ),
        format!(
            "host=127.0.0.1 port={} user={PROBE_ROLE} password={PROBE_PASSWORD} dbname={db}",
            pg.port()
        ),
        installed.iter().any(|e| e == "dblink"),
    )
    .await;

    // Probe: every probe in all text-like arguments at once, then in each one alone.
    let mut found: BTreeMap<usize, Hits> = BTreeMap::new();
    let mut calls = 0usize;
    let mut skipped = Vec::new();
    let mut last_dblink: Option<usize> = None;
    for (idx, f) in functions.iter().enumerate() {
        if f.skipped() {
            skipped.push(f.label());
            continue;
        }
        if let Some(prev) = last_dblink.take() {
            // Asynchronous dblink queries (dblink_send_query) finish on their own backend.
            prober.reset_dblink().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            if prober.moved().await {
                found
                    .entry(prev)
                    .or_default()
                    .calls
                    .insert((functions[prev].text_positions(), 0));
            }
        }
        if f.extension == "dblink" {
            prober.reset_dblink().await;
            prober.moved().await;
            last_dblink = Some(idx);
        }
        let text = f.text_positions();
        let mut modes = vec![text.clone()];
        if text.len() > 1 {
            modes.extend(text.iter().map(|&i| vec![i]));
        }
        for positions in &modes {
            for (p, probe) in PROBES.iter().enumerate() {
                let args =
                    f.args_with(positions, |i| format!("{}::{}", literal(probe), f.types[i]));
                let coldefs = if f.needs_coldef {
                    COLDEFS
                } else {
                    &COLDEFS[..1]
                };
                for coldef in coldefs {
                    let sql = f.call_as(&f.qualified(), &args, "", coldef);
                    calls += 1;
                    if prober.ran_sql(&sql).await {
                        found
                            .entry(idx)
                            .or_default()
                            .calls
                            .insert((positions.clone(), p));
                    }
                }
            }
        }
    }
    if let Some(prev) = last_dblink.take() {
        prober.reset_dblink().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if prober.moved().await {
            found
                .entry(prev)
                .or_default()
                .calls
                .insert((functions[prev].text_positions(), 0));
        }
    }
    let probe_time = started.elapsed() - setup_time;

    // S: what the probe saw run SQL, plus what the C symbol says runs SQL.
    let mut set: BTreeMap<usize, (Vec<usize>, &str, Kind)> = BTreeMap::new();
    for (idx, f) in functions.iter().enumerate() {
        let probed = found.get(&idx);
        let known = f.known();
        if probed.is_none() && known.is_none() {
            continue;
        }
        let mut positions: BTreeSet<usize> = BTreeSet::new();
        if let Some(h) = probed {
            positions.extend(h.sql_positions(f));
        }
        if let Some((p, _)) = &known {
            positions.extend(p.iter().copied());
        }
        let how = match (probed.is_some(), known.is_some()) {
            (true, true) => "probe+static",
            (true, false) => "probe",
            _ => "static",
        };
        let kind = known.map(|(_, k)| k).unwrap_or_else(|| {
            // A fragment probe was needed: the function pastes its argument into a query.
            let query_hit = probed.is_some_and(|h| h.calls.iter().any(|(_, p)| *p < 4));
            if query_hit {
                Kind::Query
            } else {
                Kind::Fragment
            }
        });
        set.insert(idx, (positions.into_iter().collect(), how, kind));
    }

    eprintln!(
        "probed {} functions ({} calls, {} skipped) from {} extensions in {:?} (+{:?} setup)",
        functions.len() - skipped.len(),
        calls,
        skipped.len(),
        installed.len(),
        probe_time,
        setup_time
    );
    eprintln!("skipped: {}", skipped.join(", "));
    eprintln!("functions that run SQL given as text (S):");
    for (&idx, (positions, how, kind)) in &set {
        let f = &functions[idx];
        let shown: Vec<String> = positions.iter().map(|p| (p + 1).to_string()).collect();
        let probes: BTreeSet<usize> = found
            .get(&idx)
            .map(|h| h.calls.iter().map(|(_, p)| *p).collect())
            .unwrap_or_default();
        eprintln!(
            "  {} [{}] SQL ({kind:?}) in argument {} — {how} (probes {probes:?})",
            f.label(),
            if f.extension.is_empty() {
                "core"
            } else {
                &f.extension
            },
            shown.join(","),
        );
    }

    let mut failures = Vec::new();
    // The probe must work: these are known to run SQL text.
    let probed: BTreeSet<&str> = found.keys().map(|&i| functions[i].name.as_str()).collect();
    for known in [
        "query_to_xml",
        "query_to_xml_and_xmlschema",
        "ts_stat",
        "ts_rewrite",
    ] {
        if !probed.contains(known) {
            failures.push(format!(
                "the probe did not see {known}() run SQL: the probe is broken (it saw {probed:?})"
            ));
        }
    }

    // The guard must deny each one when the SQL is not a constant it can check, and when it is a
    // constant that changes the tenant setting.
    let guard = Guard::new(&GuardConfig::default());
    let mut denied_fns = 0;
    for (&idx, (positions, _, kind)) in &set {
        let f = &functions[idx];
        let mut statements = Vec::new();
        for name in [f.qualified(), ident(&f.name)] {
            let params = f.args_with(positions, |i| format!("$1::{}", f.types[i]));
            statements.push(f.call(&name, &params, ""));
            let columns = f.args_with(positions, |_| "s.q".to_string());
            statements.push(f.call(&name, &columns, " FROM (SELECT $1::text AS q) s"));
            let evil = f.args_with(positions, |i| {
                let probe = match found.get(&idx).and_then(|h| h.probe_for(f, i)) {
                    Some(p) => PROBES[p],
                    None if *kind == Kind::Fragment => PROBES[7],
                    None => PROBES[0],
                };
                format!("{}::{}", literal(&probe.replace(TRIGGER, EVIL)), f.types[i])
            });
            statements.push(f.call(&name, &evil, ""));
        }
        let allowed: Vec<String> = statements
            .into_iter()
            .filter(|sql| !guard.analyze(sql).is_denied())
            .collect();
        if allowed.is_empty() {
            denied_fns += 1;
        } else {
            failures.push(format!(
                "the guard allows {} which runs SQL text:\n    {}",
                f.label(),
                allowed.join("\n    ")
            ));
        }
    }
    eprintln!("guard denies {denied_fns} of {} functions in S", set.len());

    // A constant, harmless query stays usable; a constant one that forges the tenant does not.
    let harmless = "SELECT query_to_xml('select 1', true, false, '')";
    if guard.analyze(harmless).is_denied() {
        failures.push(format!(
            "a constant, harmless call must be allowed: {harmless}"
        ));
    }
    let forged = "SELECT query_to_xml('select set_config(''app.current_store_id'', ''2'', false)', true, false, '')";
    if !guard.analyze(forged).is_denied() {
        failures.push(format!(
            "a constant call forging the tenant must be denied: {forged}"
        ));
    }
    // Why it matters: SQL run this way changes the caller's own settings.
    let rows = prober
        .client
        .simple_query(
            "BEGIN; \
             SELECT query_to_xml('select set_config(''probe.hit'', ''yes'', true)', true, false, ''); \
             SELECT current_setting('probe.hit', true); \
             ROLLBACK",
        )
        .await
        .expect("set_config through query_to_xml");
    let seen: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    if seen.last().map(String::as_str) != Some("yes") {
        failures.push(format!(
            "set_config inside query_to_xml did not reach the caller's session: {seen:?}"
        ));
    }

    if started.elapsed() > Duration::from_secs(60) {
        failures.push(format!("probing took {:?}", started.elapsed()));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
