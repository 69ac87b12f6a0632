//! Compatibility suite: real clients through rlsgate in transaction mode with a pool of 2 and
//! 10 concurrent clients each — psql, pgbench, pg_dump, tokio-postgres, psycopg 3, asyncpg,
//! node-postgres, pgJDBC, ActiveRecord, SQLAlchemy (psycopg and asyncpg), Django and libpq 18's
//! protocol 3.2 and direct TLS (installed from Debian, PyPI and npm by tests/compat/install.sh).
//! Each reports per feature; the README's compatibility table is generated from these results
//! and checked here.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use support::*;

const CLIENTS: usize = 10;
const FEATURES: &[&str] = &[
    "isolation",
    "prepared",
    "session_settings",
    "cancel",
    "temp_table",
    "error_in_transaction",
    "pipeline",
    "server_cursor",
    "dump_restore",
];
const EXTERNAL: &[&str] = &[
    "psycopg3",
    "asyncpg",
    "node-postgres",
    "jdbc",
    "activerecord",
    "sqlalchemy-psycopg",
    "sqlalchemy-asyncpg",
    "django",
    "libpq18-protocol-3.2",
    "libpq18-direct-tls",
];

type Results = BTreeMap<String, BTreeMap<String, (bool, String)>>;

fn record(results: &mut Results, driver: &str, feature: &str, ok: bool, detail: impl Into<String>) {
    results
        .entry(driver.to_string())
        .or_default()
        .insert(feature.to_string(), (ok, detail.into()));
}

fn tls_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("rlsgate-compat-tls-{}", std::process::id()))
}

/// A throwaway self-signed certificate for `[tls]` (as tests/login.rs makes them).
fn write_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::create_dir_all(dir).expect("cert dir");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

async fn compat_proxy() -> Proxy {
    let db = demo_db();
    admin_sql(&db, &format!("GRANT TEMP ON DATABASE {db} TO rlsgate_app"));
    // The drivers are measured, not the per-tenant shares: with a pool of 2 the default share is
    // one connection per tenant, which the temp-table client's pinned connection would keep from
    // the tenant's other clients (tests/dos_limits.rs covers the limits).
    let limits = "\n[limits]\nmax_transactions_per_tenant = 0\nmax_pinned_per_tenant = 0\n";
    // TLS for the libpq18-direct-tls row; the other drivers connect with sslmode=disable.
    let (cert, key) = write_cert(&tls_dir());
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let cfg = config_text(&db, 2, "").replace("[upstream]", &format!("{tls}[upstream]"));
    start_proxy_with(&db, &format!("{cfg}{limits}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_work_through_a_small_pool() {
    let install = Command::new("bash")
        .arg("tests/compat/install.sh")
        .output()
        .expect("run install.sh");
    assert!(
        install.status.success(),
        "tests/compat/install.sh failed:\n{}",
        String::from_utf8_lossy(&install.stderr)
    );

    let proxy = compat_proxy().await;
    let mut results = Results::new();
    tokio_postgres_checks(&proxy, &mut results).await;
    psql_checks(&proxy, &mut results);
    pgbench_checks(&proxy, &mut results);
    for driver in EXTERNAL {
        external_checks(&proxy, driver, &mut results).await;
    }
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(tls_dir());
    pg_dump_checks(&mut results).await;

    let table = render(&results);
    std::fs::create_dir_all("target").ok();
    std::fs::write("target/compat-table.md", &table).expect("write table");
    let failures: Vec<String> = results
        .iter()
        .flat_map(|(d, fs)| {
            fs.iter()
                .filter(|(_, (ok, _))| !ok)
                .map(move |(f, (_, why))| format!("{d}/{f}: {why}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "compatibility failures:\n{}\n\n{table}",
        failures.join("\n")
    );
    let readme = std::fs::read_to_string("README.md").expect("README");
    assert!(
        readme.contains(&table),
        "README's compatibility table is out of date; replace it with target/compat-table.md:\n{table}"
    );
}

/// The README table: one row per client, one column per feature.
fn render(results: &Results) -> String {
    let order = [
        "psql",
        "pgbench",
        "pg_dump",
        "tokio-postgres",
        "psycopg3",
        "asyncpg",
        "node-postgres",
        "jdbc",
        "activerecord",
        "sqlalchemy-psycopg",
        "sqlalchemy-asyncpg",
        "django",
        "libpq18-protocol-3.2",
        "libpq18-direct-tls",
    ];
    let mut out = String::from("<!-- compat-table: generated by tests/compat.rs -->\n| client |");
    for f in FEATURES {
        out.push_str(&format!(" {f} |"));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(FEATURES.len()));
    out.push('\n');
    for driver in order {
        let Some(fs) = results.get(driver) else {
            continue;
        };
        out.push_str(&format!("| {driver} |"));
        for f in FEATURES {
            let cell = match fs.get(*f) {
                Some((true, _)) => "✓",
                Some((false, _)) => "✗",
                None => "–",
            };
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out.push_str(LEGEND);
    out
}

/// Part of the generated block: what the rows and columns added with the ORMs mean.
const LEGEND: &str = "
`server_cursor`: rows fetched one by one through a server-side cursor inside a transaction
(SQLAlchemy `stream_results`/`yield_per`, Django `iterator()`; Django's client-side `iterator()`
with `DISABLE_SERVER_SIDE_CURSORS` too). `dump_restore`: a `pg_dump --schema-only` restored with
`psql -v ON_ERROR_STOP=1` through rlsgate into a fresh database, then a tenant's
`--enable-row-security --inserts` data. `activerecord` runs with `prepared_statements` on and off;
`django` with `CONN_MAX_AGE`; `libpq18-*` is psycopg on libpq 18 with `max_protocol_version=3.2`
or `sslnegotiation=direct`. Details: `tests/compat/README.md`.
";

async fn external_checks(proxy: &Proxy, driver: &str, results: &mut Results) {
    let scratch =
        std::env::temp_dir().join(format!("rlsgate-compat-{}-{driver}", std::process::id()));
    std::fs::create_dir_all(&scratch).ok();
    let mut cmd = tokio::process::Command::new("bash");
    cmd.args(["tests/compat/run.sh", driver])
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", proxy.addr.port().to_string())
        .env("PGDATABASE", &proxy.db)
        .env("PGUSER", "app")
        .env("PGSSLMODE", "disable")
        .env("TOKEN_NORTH", token("north"))
        .env("TOKEN_SOUTH", token("south"))
        .env("COMPAT_CLIENTS", CLIENTS.to_string())
        .env("COMPAT_DIR", &scratch)
        .kill_on_drop(true);
    let out = match tokio::time::timeout(Duration::from_secs(120), cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            return record(
                results,
                driver,
                "isolation",
                false,
                format!("could not run: {e}"),
            );
        }
        Err(_) => return record(results, driver, "isolation", false, "timed out after 120 s"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut any = false;
    for line in stdout.lines().filter(|l| l.trim_start().starts_with('{')) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(feature), Some(ok)) = (v["feature"].as_str(), v["ok"].as_bool()) else {
            continue;
        };
        any = true;
        record(
            results,
            driver,
            feature,
            ok,
            v["detail"].as_str().unwrap_or(""),
        );
    }
    if !any || !out.status.success() {
        record(
            results,
            driver,
            "isolation",
            false,
            format!(
                "exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ),
        );
    }
    let _ = std::fs::remove_dir_all(scratch);
}

async fn tokio_postgres_checks(proxy: &Proxy, results: &mut Results) {
    use futures_util::future::join_all;
    let d = "tokio-postgres";
    let tenants: Vec<(&str, i64)> = (0..CLIENTS)
        .map(|i| {
            if i % 2 == 0 {
                ("north", 3)
            } else {
                ("south", 2)
            }
        })
        .collect();
    let clients = join_all(tenants.iter().map(|(t, _)| client(proxy, t))).await;

    // isolation + prepared: every client prepares and runs a statement 20 times, concurrently
    let runs = join_all(
        clients
            .iter()
            .zip(&tenants)
            .map(|(c, (_, want))| async move {
                let stmt = c
                    .prepare("SELECT count(*) FROM customers WHERE $1::int = $1::int")
                    .await
                    .map_err(|e| e.to_string())?;
                for i in 0..20 {
                    let n: i64 = c
                        .query_one(&stmt, &[&i])
                        .await
                        .map_err(|e| e.to_string())?
                        .get(0);
                    if n != *want {
                        return Err(format!("saw {n} rows, expected {want}"));
                    }
                }
                Ok(())
            }),
    )
    .await;
    let bad: Vec<_> = runs.into_iter().filter_map(Result::err).collect();
    record(results, d, "isolation", bad.is_empty(), bad.join("; "));
    record(results, d, "prepared", bad.is_empty(), bad.join("; "));

    // session settings, later transactions
    let c = &clients[0];
    let r = async {
        c.batch_execute("SET statement_timeout = '4321ms'; SET TimeZone = 'Asia/Tokyo'")
            .await?;
        let mut ok = true;
        for other in &clients[1..] {
            other.simple_query("SELECT 1").await?;
            let v: String = c.query_one("SHOW statement_timeout", &[]).await?.get(0);
            let tz: String = c.query_one("SHOW TimeZone", &[]).await?.get(0);
            ok &= v == "4321ms" && tz == "Asia/Tokyo";
        }
        Ok::<_, tokio_postgres::Error>(ok)
    }
    .await;
    record(
        results,
        d,
        "session_settings",
        matches!(r, Ok(true)),
        format!("{r:?}"),
    );

    // cancel
    let token = clients[1].cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let r = clients[1].simple_query("SELECT pg_sleep(10)").await;
    let cancelled = matches!(&r, Err(e) if code(e) == "57014");
    let _ = canceller.await;
    let usable = clients[1].simple_query("SELECT 1").await.is_ok();
    record(
        results,
        d,
        "cancel",
        cancelled && usable,
        format!("{:?}", r.err()),
    );

    // temp table across transactions (pins the connection)
    let c = &clients[2];
    let r = async {
        c.batch_execute("CREATE TEMP TABLE scratch_tp (x int); INSERT INTO scratch_tp VALUES (1)")
            .await?;
        clients[3].simple_query("SELECT 1").await?;
        c.query_one("SELECT count(*) FROM scratch_tp", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    }
    .await;
    record(
        results,
        d,
        "temp_table",
        matches!(r, Ok(1)),
        format!("{r:?}"),
    );

    // error inside a transaction
    let c = &clients[4];
    let r = async {
        c.batch_execute("BEGIN").await?;
        let e1 = c.simple_query("SELECT 1/0").await.err().map(|e| code(&e));
        let e2 = c.simple_query("SELECT 1").await.err().map(|e| code(&e));
        c.batch_execute("ROLLBACK").await?;
        let n: i64 = c
            .query_one("SELECT count(*) FROM customers", &[])
            .await?
            .get(0);
        Ok::<_, tokio_postgres::Error>((e1, e2, n))
    }
    .await;
    let ok = matches!(&r, Ok((Some(a), Some(b), 3)) if a == "22012" && b == "25P02");
    record(results, d, "error_in_transaction", ok, format!("{r:?}"));

    // pipelining: concurrent requests on one connection
    let c = &clients[5];
    let rs = join_all((0..20).map(|_| c.query_one("SELECT count(*) FROM customers", &[]))).await;
    let ok = rs
        .iter()
        .all(|r| matches!(r, Ok(row) if row.get::<_, i64>(0) == 2));
    record(results, d, "pipeline", ok, "");
}

fn psql_checks(proxy: &Proxy, results: &mut Results) {
    let d = "psql";
    let run = |tok: &str, cmds: &[&str]| {
        let mut args = vec!["-X", "-At"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        run_client(proxy, "psql", tok, &args)
    };
    // CLIENTS psql processes at once, tenants alternating
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (tenant, want) = if i % 2 == 0 {
                ("north", "3")
            } else {
                ("south", "2")
            };
            let tok = token(tenant);
            let port = proxy.addr.port().to_string();
            let db = proxy.db.clone();
            let bin = pg().bin("psql");
            std::thread::spawn(move || {
                let out = Command::new(bin)
                    .env_clear()
                    .env("PGHOST", "127.0.0.1")
                    .env("PGPORT", port)
                    .env("PGUSER", "app")
                    .env("PGDATABASE", db)
                    .env("PGPASSWORD", tok)
                    .env("PGSSLMODE", "disable")
                    .args([
                        "-X",
                        "-At",
                        "-c",
                        "SELECT count(*) FROM customers",
                        "-c",
                        "SELECT pg_sleep(0.2)",
                        "-c",
                        "SELECT count(*) FROM customers",
                    ])
                    .output()
                    .expect("psql");
                let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                (text == format!("{want}\n\n{want}"), text)
            })
        })
        .collect();
    let outcomes: Vec<(bool, String)> = handles
        .into_iter()
        .map(|h| h.join().expect("psql thread"))
        .collect();
    let bad: Vec<&String> = outcomes
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, t)| t)
        .collect();
    record(results, d, "isolation", bad.is_empty(), format!("{bad:?}"));
    let out = run(
        &token("north"),
        &[
            "PREPARE q AS SELECT count(*) FROM customers",
            "EXECUTE q",
            "EXECUTE q",
        ],
    );
    record(
        results,
        d,
        "prepared",
        stdout(&out) == "PREPARE\n3\n3",
        format!("{} {}", stdout(&out), stderr(&out)),
    );
    let out = run(
        &token("north"),
        &[
            "SET statement_timeout = '4321ms'",
            "SELECT 1",
            "SHOW statement_timeout",
        ],
    );
    record(
        results,
        d,
        "session_settings",
        stdout(&out).ends_with("4321ms"),
        stderr(&out),
    );
    let out = run(
        &token("north"),
        &[
            "CREATE TEMP TABLE t (x int)",
            "INSERT INTO t VALUES (1)",
            "SELECT count(*) FROM t",
        ],
    );
    record(
        results,
        d,
        "temp_table",
        stdout(&out).ends_with('1'),
        stderr(&out),
    );
    let out = run(
        &token("north"),
        &[
            "BEGIN",
            "SELECT 1/0",
            "SELECT 1",
            "ROLLBACK",
            "SELECT count(*) FROM customers",
        ],
    );
    let err = stderr(&out);
    record(
        results,
        d,
        "error_in_transaction",
        err.contains("division by zero")
            && err.contains("current transaction is aborted")
            && stdout(&out).ends_with('3'),
        err,
    );
    // Ctrl-C in psql sends a CancelRequest
    let child = Command::new(pg().bin("psql"))
        .env_clear()
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", proxy.addr.port().to_string())
        .env("PGUSER", "app")
        .env("PGDATABASE", &proxy.db)
        .env("PGPASSWORD", token("north"))
        .env("PGSSLMODE", "disable")
        .args(["-X", "-At", "-c", "SELECT pg_sleep(10)"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    std::thread::sleep(Duration::from_millis(800));
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().expect("psql");
    record(
        results,
        d,
        "cancel",
        stderr(&out).contains("canceling statement due to user request"),
        stderr(&out),
    );
}

fn pgbench_checks(proxy: &Proxy, results: &mut Results) {
    let d = "pgbench";
    let script = std::env::temp_dir().join(format!("rlsgate-compat-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "SELECT count(*) FROM customers;\nBEGIN;\nSELECT count(*) FROM products;\nEND;\n",
    )
    .unwrap();
    let mut all_ok = true;
    let mut detail = String::new();
    for mode in ["simple", "extended", "prepared"] {
        let out = run_client(
            proxy,
            "pgbench",
            &token("north"),
            &[
                "-n",
                "-c",
                &CLIENTS.to_string(),
                "-j",
                "2",
                "-t",
                "30",
                "-M",
                mode,
                "-f",
                script.to_str().unwrap(),
            ],
        );
        let text = stdout(&out);
        let ok = out.status.success()
            && text.contains("number of transactions actually processed: 300/300");
        if !ok {
            detail.push_str(&format!("-M {mode}: {text} {}", stderr(&out)));
        }
        all_ok &= ok;
        if mode == "prepared" {
            record(results, d, "prepared", ok, detail.clone());
        }
    }
    record(results, d, "isolation", all_ok, detail);
    let _ = std::fs::remove_file(script);
}

/// pg_dump 15 through rlsgate, on a database of its own: pg_dump calls
/// `set_config('search_path', '', false)` at connect, so EXECUTE on set_config is granted back
/// to PUBLIC there (the demo schema revokes it; the guard still refuses set_config on
/// `app.current_store_id`).
/// - `isolation`: each tenant's `--data-only --inserts --enable-row-security --no-blobs` dump
///   holds exactly its own rows (large objects are refused by default, see README).
/// - `dump_restore`: a `--schema-only` dump (tables, forced RLS, policies), restored with
///   `psql -v ON_ERROR_STOP=1` through rlsgate into a fresh database (a second proxy), then
///   north's data dump restored into it the same way: north sees its rows there, south none,
///   and nothing else arrived.
async fn pg_dump_checks(results: &mut Results) {
    let d = "pg_dump";
    let db = demo_db();
    admin_sql(
        &db,
        "GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO PUBLIC",
    );
    let proxy = start_proxy_with(&db, &config_text(&db, 2, "")).await;
    let scratch =
        std::env::temp_dir().join(format!("rlsgate-compat-{}-pg_dump", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let dump = |tenant: &str, args: &[&str]| {
        tokio::task::block_in_place(|| run_client(&proxy, "pg_dump", &token(tenant), args))
    };

    // isolation: tenant data dumps with row security on
    let all_emails = [
        ("north", "alice@north.example"),
        ("north", "bob@north.example"),
        ("north", "carol@north.example"),
        ("south", "dave@south.example"),
        ("south", "erin@south.example"),
        ("east", "frank@east.example"),
    ];
    // --no-blobs: the guard refuses pg_largeobject_metadata unless [guard] allow_large_objects.
    let data_args = [
        "--data-only",
        "--inserts",
        "--enable-row-security",
        "--no-blobs",
    ];
    let mut problems = Vec::new();
    let mut north_data = None;
    for (tenant, want_customers, want_items) in [("north", 3, 3), ("south", 2, 2)] {
        let out = dump(tenant, &data_args);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            problems.push(format!("{tenant}: pg_dump failed: {}", stderr(&out)));
            continue;
        }
        let wrong: Vec<&str> = all_emails
            .iter()
            .filter(|(t, email)| text.contains(email) != (*t == tenant))
            .map(|(_, e)| *e)
            .collect();
        let customers = text.matches("INSERT INTO public.customers ").count();
        let sold = text.matches("INSERT INTO public.sales_items ").count();
        if !wrong.is_empty() || customers != want_customers || sold != want_items {
            problems.push(format!(
                "{tenant}: dump has {customers} customers and {sold} sales items; wrong presence of {wrong:?}"
            ));
        }
        if tenant == "north" {
            north_data = Some(text);
        }
    }
    record(
        results,
        d,
        "isolation",
        problems.is_empty(),
        if problems.is_empty() {
            "--enable-row-security data dumps: north's holds its 3 customers, south's its 2, nothing else".to_string()
        } else {
            problems.join("; ")
        },
    );

    // dump_restore: schema-only dump, restored through rlsgate into a fresh database with psql
    let r = async {
        let out = dump("north", &["--schema-only", "--no-owner", "--no-privileges"]);
        if !out.status.success() {
            return Err(format!("pg_dump --schema-only failed: {}", stderr(&out)));
        }
        let schema = String::from_utf8_lossy(&out.stdout).to_string();
        for needle in [
            "CREATE TABLE public.customers",
            "ALTER TABLE ONLY public.customers FORCE ROW LEVEL SECURITY",
            "CREATE POLICY tenant_isolation ON public.sales_items",
        ] {
            if !schema.contains(needle) {
                return Err(format!("schema dump lacks `{needle}`"));
            }
        }
        let north_data = north_data.ok_or_else(|| "no data dump of north to restore".to_string())?;
        let target = format!("{db}_restore");
        pg().create_database(&target).expect("create restore database");
        admin_sql(&target, "GRANT CREATE ON SCHEMA public TO rlsgate_app");
        let restore = start_proxy_with(&target, &config_text(&target, 2, "")).await;
        let psql_file = |tenant: &str, name: &str, sql: &str| {
            let file = scratch.join(name);
            std::fs::write(&file, sql).expect("write dump");
            let file = file.to_string_lossy().to_string();
            tokio::task::block_in_place(|| {
                run_client(
                    &restore,
                    "psql",
                    &token(tenant),
                    &["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", &file],
                )
            })
        };
        let result = async {
            let out = psql_file("north", "schema.sql", &schema);
            if !out.status.success() {
                return Err(format!("restoring the schema dump: {}", stderr(&out)));
            }
            let out = psql_file("north", "north.sql", &north_data);
            if !out.status.success() {
                return Err(format!("restoring north's data dump: {}", stderr(&out)));
            }
            let count = "SELECT (SELECT count(*) FROM customers) || '/' || (SELECT count(*) FROM sales_items)";
            let north = stdout(&tokio::task::block_in_place(|| psql(&restore, &token("north"), count)));
            let south = stdout(&tokio::task::block_in_place(|| psql(&restore, &token("south"), count)));
            let total = admin_sql(&target, count);
            let policies = admin_sql(
                &target,
                "SELECT count(*) FROM pg_class WHERE relrowsecurity AND relforcerowsecurity",
            );
            if (north.as_str(), south.as_str(), total.as_str(), policies.as_str())
                != ("3/3", "0/0", "3/3", "5")
            {
                return Err(format!(
                    "after the restore north sees {north}, south {south} (customers/items), {total} in all, {policies} tables with forced RLS"
                ));
            }
            Ok(())
        }
        .await;
        restore.stop().await;
        result
    }
    .await;
    record(
        results,
        d,
        "dump_restore",
        r.is_ok(),
        match r {
            Ok(()) => "--schema-only dump restored with psql -v ON_ERROR_STOP=1 through rlsgate into a fresh database, then north's --inserts data: RLS forced, north sees 3 customers, south none".to_string(),
            Err(e) => e,
        },
    );
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(scratch);
}
