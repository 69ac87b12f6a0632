//! pg_dump and psql restores through rlsgate (issue 13 item 2), with the real binaries of the
//! test cluster against the real throwaway Postgres.
//!
//! pg_dump ≥ 15.8 sends `SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings
//! WHERE name = 'restrict_nonsystem_relation_kind'` at connect: the guard treats that shape (and
//! only that shape) as `set_config('<literal>', …)`. The adversarial tests send every near-miss
//! spelling and check that each is refused by rlsgate itself and that the tenant context holds.
//!
//! The test databases grant EXECUTE on `set_config` back to PUBLIC (the demo schema revokes it,
//! and pg_dump calls `set_config('search_path', '', false)` at connect): so every refusal here
//! is the guard's, not the server's, and each test would fail without the guard.

mod support;

use std::path::PathBuf;
use std::process::Output;

use support::*;
use tokio_postgres::{Client, SimpleQueryMessage};

/// What pg_dump 15.18 sends at connect.
const PG_DUMP_PINNED: &str = "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'";

const GRANT_SET_CONFIG: &str =
    "GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO PUBLIC";

/// A demo database in which the app role may call set_config (as pg_dump needs).
fn dump_db() -> String {
    let db = demo_db();
    admin_sql(&db, GRANT_SET_CONFIG);
    db
}

/// An empty database next to `source` in which the app role may create tables (a restore target).
fn empty_db(source: &str, tag: &str) -> String {
    let name = format!("{source}_{tag}");
    pg().create_database(&name).expect("create database");
    admin_sql(&name, "GRANT USAGE, CREATE ON SCHEMA public TO rlsgate_app");
    name
}

async fn proxy_for(db: &str, extra: &str) -> Proxy {
    start_proxy_with(db, &config_text(db, 1, extra)).await
}

/// Run a client binary without holding up the runtime the proxy runs on.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// `pg_dump` through the proxy as tenant `store`; panics with pg_dump's stderr on failure.
fn pg_dump(proxy: &Proxy, store: &str, args: &[&str]) -> String {
    let out = blocking(|| run_client(proxy, "pg_dump", &token(store), args));
    assert!(
        out.status.success(),
        "pg_dump {args:?} failed: {}",
        stderr(&out)
    );
    String::from_utf8(out.stdout).expect("dump is UTF-8")
}

/// `psql -v ON_ERROR_STOP=1 -f <dump>` through the proxy as tenant `store`.
fn psql_restore(proxy: &Proxy, store: &str, dump: &str) -> Output {
    let path: PathBuf = std::env::temp_dir().join(format!("rlsgate_restore_{}.sql", proxy.db));
    std::fs::write(&path, dump).expect("write dump file");
    let file = path.to_string_lossy().into_owned();
    let out = blocking(|| {
        run_client(
            proxy,
            "psql",
            &token(store),
            &["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", &file],
        )
    });
    let _ = std::fs::remove_file(&path);
    out
}

/// A plain dump made by the superuser straight from Postgres (the reference).
fn direct_dump(db: &str, args: &[&str]) -> String {
    let out = pg()
        .client_command("pg_dump")
        .args(args)
        .arg(db)
        .output()
        .expect("run pg_dump");
    assert!(out.status.success(), "direct pg_dump: {}", stderr(&out));
    String::from_utf8(out.stdout).expect("dump is UTF-8")
}

/// A dump without its `\restrict <random key>` / `\unrestrict <key>` lines (which differ on
/// every run), for comparing two dumps.
fn comparable(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Data lines of `COPY public.<table> … FROM stdin;` in a plain dump.
fn copy_rows(dump: &str, table: &str) -> Vec<String> {
    let head = format!("COPY public.{table} ");
    dump.lines()
        .skip_while(|l| !l.starts_with(&head))
        .skip(1)
        .take_while(|l| *l != "\\.")
        .map(str::to_string)
        .collect()
}

/// `INSERT INTO public.<table> …` lines of a dump made with `--inserts`.
fn insert_rows(dump: &str, table: &str) -> Vec<String> {
    let head = format!("INSERT INTO public.{table} ");
    dump.lines()
        .filter(|l| l.starts_with(&head))
        .map(str::to_string)
        .collect()
}

/// The first column of a simple query's rows.
async fn column(c: &Client, sql: &str) -> Vec<String> {
    c.simple_query(sql)
        .await
        .expect("query")
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect()
}

async fn show(c: &Client, setting: &str) -> String {
    column(c, &format!("SHOW {setting}"))
        .await
        .pop()
        .unwrap_or_default()
}

/// Tenant, and rows of `customers`, as a client sees them.
async fn tenant_view(c: &Client) -> (String, i64) {
    let tenant = column(c, "SELECT current_setting('app.current_store_id')")
        .await
        .pop()
        .unwrap_or_default();
    (tenant, count(c, "customers").await)
}

// ---------------------------------------------------------------------------------------------
// The pinned set_config itself
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_dumps_pinned_set_config_runs_and_is_replayed_like_a_constant_one() {
    let db = dump_db();
    let proxy = proxy_for(&db, "").await;
    let north = client(&proxy, "north").await;
    north
        .simple_query(PG_DUMP_PINNED)
        .await
        .expect("pg_dump's connect statement passes the guard");
    // The name is pinned to a setting this server does not have: a no-op, as in Postgres.
    north
        .simple_query(
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'no_such_setting'",
        )
        .await
        .expect("pinned to an unknown name");
    north
        .query(
            "SELECT pg_catalog.set_config(s.name, '4321kB', false) FROM pg_catalog.pg_settings s WHERE s.name = 'work_mem'",
            &[],
        )
        .await
        .expect("extended protocol, qualified spelling");
    assert_eq!(
        show(&north, "restrict_nonsystem_relation_kind").await,
        "view, foreign-table"
    );
    assert_eq!(show(&north, "work_mem").await, "4321kB");

    // Pool of 1: south takes the connection (and must not see north's settings); north gets it
    // back and must find its settings replayed: the change was tracked, not left untracked.
    let south = client(&proxy, "south").await;
    assert_eq!(show(&south, "restrict_nonsystem_relation_kind").await, "");
    assert_ne!(show(&south, "work_mem").await, "4321kB");
    assert_eq!(tenant_view(&south).await, ("south".to_string(), 2));
    assert_eq!(
        show(&north, "restrict_nonsystem_relation_kind").await,
        "view, foreign-table"
    );
    // the no-op for the unknown name replayed as a no-op (a `SET no_such_setting` would fail
    // and take the replay of work_mem down with it)
    assert_eq!(show(&north, "work_mem").await, "4321kB");
    assert_eq!(tenant_view(&north).await, ("north".to_string(), 3));
    proxy.stop().await;
}

/// Spellings that do not pin the name to one literal the guard can check, or that could read
/// something other than the settings view; each would change `app.current_store_id` (or could
/// be made to) if it ran.
const NOT_PINNED: &[&str] = &[
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'application_name' OR name = 'app.current_store_id'",
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE NOT name <> 'app.current_store_id'",
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name IN ('app.current_store_id')",
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name LIKE 'app.current_store%'",
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name::text = 'app.current_store_id'",
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE lower(name) = 'app.current_store_id'",
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'app.current_store_id' COLLATE \"C\"",
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'application_name' AND name = 'app.current_store_id'",
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'application_name' AND set_config(name, 'x', false) IS NOT NULL",
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'application_name' AND EXISTS (SELECT set_config('app.current_store_id', 'south', false))",
    "SELECT set_config(name, 'south', false) FROM pg_settings",
    "SELECT set_config(lower(name), 'south', false) FROM pg_settings WHERE name = 'application_name'",
    "SELECT set_config(name::text, 'south', false) FROM pg_settings WHERE name = 'application_name'",
    "SELECT set_config(name || '', 'south', false) FROM pg_settings WHERE name = 'application_name'",
    "SELECT set_config(setting, 'south', false) FROM pg_settings WHERE name = 'application_name'",
    "WITH pg_settings AS (SELECT 'app.current_store_id'::text AS name) SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'app.current_store_id'",
    "WITH s AS (SELECT 1) SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'application_name'",
    "SELECT set_config(name, 'south', false) FROM (SELECT 'app.current_store_id'::text AS name) pg_settings WHERE name = 'application_name' OR true",
    "SELECT set_config(name, 'south', false) FROM public.pg_settings WHERE name = 'application_name'",
    "SELECT set_config(name, 'south', false) FROM pg_temp.pg_settings WHERE name = 'application_name'",
    "SELECT set_config(name, 'south', false) FROM pg_settings s(setting, name) WHERE name = 'north'",
    "SELECT set_config(name, 'south', false) FROM pg_settings, (VALUES (1)) v WHERE name = 'application_name'",
    "SELECT set_config(name, 'south', false) FROM pg_settings JOIN pg_roles r ON true WHERE name = 'application_name'",
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'application_name' UNION SELECT set_config('app.current_store_id', 'south', false)",
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'application_name' GROUP BY name HAVING true",
    "SELECT DISTINCT ON (name) set_config(name, 'south', false) FROM pg_settings WHERE name = 'application_name'",
    "SELECT set_config(name, 'south', false) OVER () FROM pg_settings WHERE name = 'application_name'",
    "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'application_name' ORDER BY 1 LIMIT 1",
    "SELECT (SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'application_name')",
    "EXPLAIN ANALYZE SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'application_name'",
];

/// Pinned to a name the constant form is refused for: refused the same way.
const PINNED_BUT_FORBIDDEN: &[(&str, &str)] = &[
    (
        "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'app.current_store_id'",
        "protected setting \"app.current_store_id\"",
    ),
    (
        "SELECT set_config(name, 'south', true) FROM pg_catalog.pg_settings WHERE 'app.current_store_id' = name",
        "protected setting \"app.current_store_id\"",
    ),
    (
        "SELECT set_config(name, 'south', false) FROM pg_settings WHERE name = 'APP.Current_Store_ID'",
        "protected setting",
    ),
    (
        "SELECT set_config(name, 'rlsgate_owner', false) FROM pg_settings WHERE name = 'role'",
        "\"role\"",
    ),
    (
        "SELECT set_config(name, 'postgres', false) FROM pg_settings WHERE name = 'session_authorization'",
        "\"session_authorization\"",
    ),
    (
        "SELECT set_config(name, 'off', false) FROM pg_settings WHERE name = 'standard_conforming_strings'",
        "standard_conforming_strings",
    ),
    (
        "SELECT set_config(name, 'SJIS', false) FROM pg_settings WHERE name = 'client_encoding'",
        "client_encoding",
    ),
];

/// `sql` through the simple and the extended protocol: refused by rlsgate with 42501 (and a
/// message containing `why`), the tenant context intact afterwards.
async fn assert_refused(north: &Client, sql: &str, why: &str, fails: &mut Vec<String>) {
    let simple = north.simple_query(sql).await.map(|_| ());
    let extended = north.query(sql, &[]).await.map(|_| ());
    for (path, outcome) in [("simple", simple), ("extended", extended)] {
        match outcome {
            Ok(()) => fails.push(format!("{path}: allowed: {sql}")),
            Err(e) if code(&e) != "42501" || !message(&e).starts_with("rlsgate:") => {
                fails.push(format!("{path}: {} {}: {sql}", code(&e), message(&e)))
            }
            Err(e) if !message(&e).contains(why) => fails.push(format!(
                "{path}: message {:?} lacks {why:?}: {sql}",
                message(&e)
            )),
            Err(_) => {}
        }
    }
    let view = tenant_view(north).await;
    if view != ("north".to_string(), 3) {
        fails.push(format!("after {sql}: north sees {view:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_of_a_column_is_refused_unless_the_name_is_pinned_and_allowed() {
    let db = dump_db();
    let proxy = proxy_for(&db, "").await;
    let north = client(&proxy, "north").await;
    let application_name = show(&north, "application_name").await;
    let mut fails = Vec::new();
    for sql in NOT_PINNED {
        assert_refused(&north, sql, "", &mut fails).await;
    }
    for (sql, why) in PINNED_BUT_FORBIDDEN {
        assert_refused(&north, sql, why, &mut fails).await;
    }
    // The refusals left nothing behind on the one server connection.
    let south = client(&proxy, "south").await;
    assert_eq!(tenant_view(&south).await, ("south".to_string(), 2));
    assert_eq!(tenant_view(&north).await, ("north".to_string(), 3));
    assert_eq!(show(&north, "application_name").await, application_name);
    assert!(fails.is_empty(), "{}", fails.join("\n"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_relation_called_pg_settings_can_be_made_to_stand_in_for_the_view() {
    let db = dump_db();
    // What the guard must stand alone against: the server would allow all of these.
    admin_sql(
        &db,
        &format!(
            "GRANT TEMPORARY ON DATABASE {db} TO PUBLIC; \
             GRANT CREATE ON SCHEMA public TO rlsgate_app; \
             CREATE TABLE public.scratch (name text); GRANT ALL ON public.scratch TO rlsgate_app; \
             ALTER TABLE public.scratch OWNER TO rlsgate_app"
        ),
    );
    let proxy = proxy_for(&db, "").await;
    let north = client(&proxy, "north").await;
    let mut fails = Vec::new();
    for sql in [
        "CREATE TEMP TABLE pg_settings (name text)",
        "CREATE TABLE public.pg_settings (name text)",
        "CREATE TEMP VIEW pg_settings AS SELECT 'app.current_store_id'::text AS name",
        "CREATE TABLE public.pg_settings AS SELECT 'app.current_store_id'::text AS name",
        "SELECT 'app.current_store_id'::text AS name INTO TEMP pg_settings",
        "SELECT 'app.current_store_id'::text AS name INTO public.pg_settings",
        "ALTER TABLE public.scratch RENAME TO pg_settings",
    ] {
        assert_refused(&north, sql, "pg_settings", &mut fails).await;
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
    let made = admin_sql(
        &db,
        "SELECT count(*) FROM pg_class WHERE relname = 'pg_settings' AND relnamespace <> 'pg_catalog'::regnamespace",
    );
    assert_eq!(made, "0");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// pg_dump
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_only_dump_through_rlsgate_equals_the_direct_one() {
    let db = dump_db();
    let proxy = proxy_for(&db, "").await;
    let dump = pg_dump(&proxy, "north", &["--schema-only"]);
    assert_eq!(
        comparable(&dump),
        comparable(&direct_dump(&db, &["--schema-only"]))
    );
    assert!(dump.contains("CREATE TABLE public.customers"), "{dump}");
    assert!(dump.contains("CREATE POLICY tenant_isolation ON public.sales_items"));
    assert!(copy_rows(&dump, "customers").is_empty());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_data_dump_holds_only_that_tenants_rows() {
    let db = dump_db();
    let proxy = proxy_for(&db, "").await;
    for (store, customers, products, items) in [("north", 3, 4, 3), ("south", 2, 3, 2)] {
        let dump = pg_dump(
            &proxy,
            store,
            &["--data-only", "--enable-row-security", "--no-blobs"],
        );
        let rows = copy_rows(&dump, "customers");
        assert_eq!(rows.len(), customers, "{store}: {rows:?}");
        assert!(
            rows.iter().all(|r| r.split('\t').nth(1) == Some(store)),
            "{store}: {rows:?}"
        );
        assert_eq!(copy_rows(&dump, "products").len(), products, "{store}");
        assert_eq!(copy_rows(&dump, "sales_items").len(), items, "{store}");
        assert_eq!(copy_rows(&dump, "stores").len(), 1, "{store}");
        for other in ["north", "south", "east"].iter().filter(|o| **o != store) {
            assert!(
                !dump.contains(&format!("@{other}.example")),
                "{store}: {other}'s rows"
            );
        }
        // the INSERT form
        let dump = pg_dump(
            &proxy,
            store,
            &[
                "--data-only",
                "--inserts",
                "--enable-row-security",
                "--no-blobs",
            ],
        );
        let rows = insert_rows(&dump, "customers");
        assert_eq!(rows.len(), customers, "{store}: {rows:?}");
        assert!(
            rows.iter().all(|r| r.contains(&format!(", '{store}', "))),
            "{rows:?}"
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_plain_dump_works_and_row_security_off_is_refused_by_postgres() {
    let db = dump_db();
    let proxy = proxy_for(&db, "").await;
    let dump = pg_dump(&proxy, "north", &["--enable-row-security", "--no-blobs"]);
    assert!(dump.contains("CREATE TABLE public.sales_items"));
    assert_eq!(copy_rows(&dump, "customers").len(), 3);
    assert!(!dump.contains("@south.example") && !dump.contains("@east.example"));

    // Without --enable-row-security pg_dump sends `SET row_security = off`, which rlsgate lets
    // through: Postgres itself then refuses to read an RLS table.
    let out = blocking(|| run_client(&proxy, "pg_dump", &token("north"), &["--no-blobs"]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("row-level security policy"),
        "{}",
        stderr(&out)
    );
    // Large objects stay refused by default (pg_dump reads pg_largeobject_metadata unless
    // --no-blobs) …
    let out = blocking(|| {
        run_client(
            &proxy,
            "pg_dump",
            &token("north"),
            &["--enable-row-security"],
        )
    });
    assert!(!out.status.success());
    assert!(stderr(&out).contains("large objects"), "{}", stderr(&out));
    proxy.stop().await;
    // … and the dump works with them where the operator allows them.
    let proxy = proxy_for(&db, "[guard]\nallow_large_objects = true\n").await;
    let dump = pg_dump(&proxy, "north", &["--enable-row-security"]);
    assert_eq!(copy_rows(&dump, "customers").len(), 3);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// psql restores of plain dumps
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_dump_restores_through_rlsgate() {
    let db = dump_db();
    let source = proxy_for(&db, "").await;
    let dump = pg_dump(&source, "north", &["--schema-only", "--no-owner"]);
    source.stop().await;
    // SET check_function_bodies/xmloption/client_min_messages/row_security/
    // default_table_access_method and set_config('search_path', '', false) all pass.
    for statement in [
        "SET row_security = off;",
        "SET default_table_access_method = heap;",
        "SELECT pg_catalog.set_config('search_path', '', false);",
    ] {
        assert!(dump.contains(statement), "{statement}");
    }

    let target_db = empty_db(&db, "schema");
    let target = proxy_for(&target_db, "").await;
    let out = psql_restore(&target, "north", &dump);
    assert!(out.status.success(), "restore: {}", stderr(&out));
    target.stop().await;

    let reference = ["--schema-only", "--no-owner", "--no-privileges"];
    assert_eq!(
        comparable(&direct_dump(&target_db, &reference)),
        comparable(&direct_dump(&db, &reference))
    );
    let rls = admin_sql(
        &target_db,
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace \
         AND relkind = 'r' AND relrowsecurity AND relforcerowsecurity",
    );
    assert_eq!(rls, "5");
}

/// A tenant's full dump (schema and its rows), as INSERTs and as COPY, restored into an empty
/// database: the data goes in before the dump enables row-level security, as it does directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_dump_restores_through_rlsgate() {
    let db = dump_db();
    let source = proxy_for(&db, "").await;
    let common = [
        "--enable-row-security",
        "--no-blobs",
        "--no-owner",
        "--no-privileges",
    ];
    for (form, extra) in [("inserts", Some("--inserts")), ("copy", None)] {
        let args: Vec<&str> = common.iter().copied().chain(extra).collect();
        let dump = pg_dump(&source, "north", &args);
        let target_db = empty_db(&db, form);
        let target = proxy_for(&target_db, "").await;
        let out = psql_restore(&target, "north", &dump);
        assert!(out.status.success(), "{form} restore: {}", stderr(&out));

        for table in [
            "stores",
            "customers",
            "products",
            "sales_transactions",
            "sales_items",
        ] {
            let rows = format!("SELECT * FROM {table} ORDER BY 1");
            let north_only = if table == "sales_items" {
                "transaction_id IN (1, 2)"
            } else {
                "store_id = 'north'"
            };
            let north_rows = format!("SELECT * FROM {table} WHERE {north_only} ORDER BY 1");
            assert_eq!(
                admin_sql(&target_db, &rows),
                admin_sql(&db, &north_rows),
                "{form}: {table}"
            );
        }
        // the restored tables enforce the restored policies through rlsgate
        assert_eq!(
            tenant_view(&client(&target, "north").await).await,
            ("north".to_string(), 3),
            "{form}"
        );
        assert_eq!(
            tenant_view(&client(&target, "south").await).await,
            ("south".to_string(), 0),
            "{form}"
        );
        target.stop().await;
    }
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_dump_of_a_table_without_rls_restores_through_rlsgate() {
    let db = dump_db();
    admin_sql(
        &db,
        "CREATE TABLE public.notes (id int PRIMARY KEY, body text); \
         INSERT INTO public.notes VALUES (1, 'plain'), (2, E'tab\\there'), (3, E'line\\nbreak'), \
         (4, E'back\\\\slash'), (5, NULL); \
         GRANT SELECT ON public.notes TO rlsgate_app",
    );
    let source = proxy_for(&db, "").await;
    let dump = pg_dump(
        &source,
        "north",
        &["--table=public.notes", "--no-owner", "--no-privileges"],
    );
    source.stop().await;
    assert_eq!(copy_rows(&dump, "notes").len(), 5);

    let target_db = empty_db(&db, "notes");
    let target = proxy_for(&target_db, "").await;
    let out = psql_restore(&target, "east", &dump);
    assert!(out.status.success(), "restore: {}", stderr(&out));
    target.stop().await;
    let rows = "SELECT id, quote_nullable(body) FROM public.notes ORDER BY id";
    assert_eq!(admin_sql(&target_db, rows), admin_sql(&db, rows));
}
