//! rlsgate in front of a real Citus cluster (a coordinator and two workers, each a throwaway
//! `initdb` with `shared_preload_libraries = 'citus'`), in wrap mode with `citus_propagate_set =
//! true` and the server's `citus.propagate_set_commands` left at Citus' default (`none`).
//!
//! Citus is not in Debian: the build at `../shared/citus/` (beside the project) is installed
//! when present (`install.sh`, as root, idempotent). Without it the tests say so and pass.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::{TryStreamExt, future};
use rlsgate::config::Config;
use rlsgate::doctor::{self, Report, Severity};
use rlsgate::embedded_pg::{EmbeddedOptions, EmbeddedPg};
use support::*;

const TARBALL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/citus/citus-pg15.tar.gz"
);
const PG_CONFIG: &str = "/usr/lib/postgresql/15/bin/pg_config";

/// The database everything lives in (Citus needs the same name on every node).
const DB: &str = "postgres";

struct Cluster {
    coordinator: EmbeddedPg,
    workers: Vec<EmbeddedPg>,
}

impl Cluster {
    fn sql(&self, sql: &str) -> String {
        self.coordinator
            .psql(DB, sql)
            .unwrap_or_else(|e| panic!("coordinator SQL failed: {e}\n{sql}"))
            .trim()
            .to_string()
    }
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();

/// Install the shared Citus build when needed; `Err(reason)` to skip.
fn install_citus() -> Result<(), String> {
    if !Path::new(TARBALL).exists() {
        return Err(format!("{TARBALL} is absent"));
    }
    let pkglib = Command::new(PG_CONFIG)
        .arg("--pkglibdir")
        .output()
        .map_err(|e| format!("{PG_CONFIG}: {e}"))?;
    let pkglib = PathBuf::from(String::from_utf8_lossy(&pkglib.stdout).trim());
    let installed = pkglib.join("citus.so").exists()
        && Path::new("/usr/share/postgresql/15/extension/citus.control").exists();
    if installed {
        return Ok(());
    }
    // The install writes into the system's PostgreSQL dirs.
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("Citus is not installed and installing it needs root \
                    (bash ../shared/citus/install.sh ../shared/citus/citus-pg15.tar.gz)"
            .into());
    }
    let script = Path::new(TARBALL).with_file_name("install.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(TARBALL)
        .output()
        .map_err(|e| e.to_string())?;
    assert!(
        out.status.success(),
        "installing Citus failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn node(auth: &str) -> EmbeddedPg {
    EmbeddedPg::start(EmbeddedOptions {
        tcp_auth: auth.into(),
        extra_conf: vec![
            "shared_preload_libraries = 'citus'".into(),
            "max_connections = 300".into(),
        ],
        ..EmbeddedOptions::default()
    })
    .expect("start a Citus node (is the PostgreSQL minor at least the one Citus was built for?)")
}

/// The cluster, or `None` (after saying why) when Citus is not available.
fn cluster() -> Option<&'static Cluster> {
    CLUSTER
        .get_or_init(|| {
            if let Err(why) = install_citus() {
                eprintln!("SKIPPED: Citus tests need ../shared/citus: {why}");
                return None;
            }
            // The workers trust loopback (Citus connects to them as the client's role); the
            // coordinator asks rlsgate and the doctor for the password.
            let coordinator = node("scram-sha-256");
            let workers = vec![node("trust"), node("trust")];
            for n in std::iter::once(&coordinator).chain(&workers) {
                n.psql(DB, "CREATE EXTENSION citus")
                    .expect("CREATE EXTENSION citus");
            }
            let mut setup = format!(
                "SELECT citus_set_coordinator_host('127.0.0.1', {});",
                coordinator.port()
            );
            for w in &workers {
                setup.push_str(&format!(
                    "SELECT citus_add_node('127.0.0.1', {});",
                    w.port()
                ));
            }
            coordinator.psql(DB, &setup).expect("add the workers");
            load_schema(&coordinator);
            Some(Cluster {
                coordinator,
                workers,
            })
        })
        .as_ref()
}

/// Tables like `sql/demo.sql`'s, distributed by the tenant column, with policies Citus accepts
/// (no subqueries), and some things wrong on purpose for the doctor: `events` distributed by its
/// id, `notes` without RLS, `orders` with a policy branch that ignores the tenant, `devices`
/// casting the setting without `nullif`, and none of the database hardening `demo.sql` does.
const TABLES: &str = r#"
CREATE TABLE stores (store_id text PRIMARY KEY, name text NOT NULL);
CREATE TABLE customers (
    store_id text NOT NULL, customer_id bigint NOT NULL, name text NOT NULL,
    PRIMARY KEY (store_id, customer_id));
CREATE TABLE orders (
    store_id text NOT NULL, order_id bigint NOT NULL, customer_id bigint NOT NULL,
    total numeric(12,2) NOT NULL,
    PRIMARY KEY (store_id, order_id),
    FOREIGN KEY (store_id, customer_id) REFERENCES customers (store_id, customer_id));
CREATE TABLE events (
    store_id text NOT NULL, event_id bigint NOT NULL, kind text NOT NULL,
    PRIMARY KEY (store_id, event_id));
CREATE TABLE notes (store_id text NOT NULL, note_id bigint NOT NULL, body text,
    PRIMARY KEY (store_id, note_id));
CREATE TABLE devices (store_id uuid NOT NULL, device_id bigint NOT NULL,
    PRIMARY KEY (store_id, device_id));
CREATE INDEX ON events (store_id);
SELECT create_reference_table('stores');
SELECT create_distributed_table('customers', 'store_id');
SELECT create_distributed_table('orders', 'store_id', colocate_with => 'customers');
SELECT create_distributed_table('events', 'event_id');
SELECT create_distributed_table('notes', 'store_id', colocate_with => 'customers');
SELECT create_distributed_table('devices', 'store_id');
ALTER TABLE stores ENABLE ROW LEVEL SECURITY;
ALTER TABLE stores FORCE ROW LEVEL SECURITY;
ALTER TABLE customers ENABLE ROW LEVEL SECURITY;
ALTER TABLE customers FORCE ROW LEVEL SECURITY;
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
ALTER TABLE orders FORCE ROW LEVEL SECURITY;
ALTER TABLE events ENABLE ROW LEVEL SECURITY;
ALTER TABLE events FORCE ROW LEVEL SECURITY;
ALTER TABLE devices ENABLE ROW LEVEL SECURITY;
ALTER TABLE devices FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON stores
    USING (store_id = nullif(current_setting('app.current_store_id', true), ''))
    WITH CHECK (store_id = nullif(current_setting('app.current_store_id', true), ''));
CREATE POLICY tenant_isolation ON customers
    USING (store_id = nullif(current_setting('app.current_store_id', true), ''))
    WITH CHECK (store_id = nullif(current_setting('app.current_store_id', true), ''));
CREATE POLICY tenant_isolation ON orders
    USING (store_id = nullif(current_setting('app.current_store_id', true), '') OR total < 0)
    WITH CHECK (store_id = nullif(current_setting('app.current_store_id', true), ''));
CREATE POLICY tenant_isolation ON events
    USING (store_id = nullif(current_setting('app.current_store_id', true), ''))
    WITH CHECK (store_id = nullif(current_setting('app.current_store_id', true), ''));
CREATE POLICY tenant_isolation ON devices
    USING (store_id = current_setting('app.current_store_id', true)::uuid)
    WITH CHECK (store_id = current_setting('app.current_store_id', true)::uuid);
INSERT INTO stores VALUES ('north', 'North'), ('south', 'South');
INSERT INTO customers VALUES ('north', 1, 'Ada'), ('north', 2, 'Ben'), ('north', 3, 'Cy'),
                             ('south', 4, 'Dot'), ('south', 5, 'Eve');
INSERT INTO orders VALUES ('north', 1, 1, 10), ('north', 2, 2, 20), ('south', 3, 4, 30);
INSERT INTO events SELECT CASE WHEN i % 3 = 0 THEN 'south' ELSE 'north' END, i, 'visit'
                     FROM generate_series(1, 30) i;
GRANT USAGE ON SCHEMA public TO rlsgate_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON stores, customers, orders, events, notes, devices
    TO rlsgate_app;
"#;

/// One test at a time: they share the cluster's rows (and the doctor test applies fixes and
/// changes a database setting for a moment). The proxy tests use only what the fixes leave as
/// it was: stores, customers, orders.
static SCHEMA_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn load_schema(coordinator: &EmbeddedPg) {
    let sql = format!(
        "CREATE ROLE rlsgate_owner NOLOGIN;
         CREATE ROLE rlsgate_app LOGIN PASSWORD '{APP_PASSWORD}';
         {TABLES}
         ALTER TABLE stores OWNER TO rlsgate_owner;
         ALTER TABLE customers OWNER TO rlsgate_owner;
         ALTER TABLE orders OWNER TO rlsgate_owner;
         ALTER TABLE events OWNER TO rlsgate_owner;
         ALTER TABLE notes OWNER TO rlsgate_owner;
         ALTER TABLE devices OWNER TO rlsgate_owner;"
    );
    coordinator.psql(DB, &sql).expect("load the schema");
}

fn config(c: &Cluster, wrap: bool, propagate: bool, pool: usize) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_timeout = "5s"
handshake_timeout = "5s"
[upstream]
host = "127.0.0.1"
port = {port}
database = "{DB}"
user = "rlsgate_app"
password = "{APP_PASSWORD}"
sslmode = "disable"
transaction_wrap = {wrap}
citus_propagate_set = {propagate}
pool_size = {pool}
checkout_timeout = "10s"
[auth]
hs_secret = "{SECRET}"
tenant_claim = "store_id"
[context]
"app.current_store_id" = "store_id"
"#,
        port = c.coordinator.port()
    )
}

async fn check(c: &Cluster, wrap: bool, propagate: bool) -> Report {
    let config = Config::from_toml(&config(c, wrap, propagate, 2)).expect("config");
    doctor::run(&config).await.expect("rlsgate check runs")
}

fn ids(r: &Report, severity: Severity) -> Vec<&'static str> {
    r.findings
        .iter()
        .filter(|f| f.severity == severity)
        .map(|f| f.check)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_fails_broken_setups_and_its_fixes_are_accepted_by_citus() {
    let Some(c) = cluster() else { return };
    let _one_at_a_time = SCHEMA_LOCK.write().await;

    // Wrap off: the context never reaches a worker, whatever else is set.
    let report = check(c, false, true).await;
    assert!(
        ids(&report, Severity::Critical).contains(&"citus-without-wrap"),
        "{}",
        report.render_text(false)
    );
    assert!(report.by_check("citus-propagate-set").is_empty());

    // Wrap on, rlsgate not sending the propagate statement, server at Citus' default: the probe
    // reads the setting back on a worker and finds nothing there.
    assert_eq!(c.sql("SHOW citus.propagate_set_commands"), "none");
    let report = check(c, true, false).await;
    let text = report.render_text(false);
    let propagate = report.by_check("citus-propagate-set");
    assert_eq!(propagate.len(), 1, "{text}");
    assert_eq!(propagate[0].severity, Severity::Critical);
    // Said by the probe that ran on a worker, not guessed from the settings.
    assert!(
        propagate[0].why.contains("routed to worker 127.0.0.1:"),
        "{text}"
    );
    assert!(report.by_check("citus-without-wrap").is_empty(), "{text}");
    // The server-side fix works too (then back to the default for the other tests).
    c.sql(&propagate[0].fix);
    assert!(
        check(c, true, false)
            .await
            .by_check("citus-propagate-set")
            .is_empty()
    );
    c.sql("ALTER DATABASE postgres RESET citus.propagate_set_commands");

    // The working setup, with the broken schema: every printed fix is applied (as an
    // administrator, in report order) and accepted by Citus.
    let report = check(c, true, true).await;
    let text = report.render_text(false);
    eprintln!("{text}");
    assert!(report.by_check("citus-propagate-set").is_empty(), "{text}");
    for (id, severity) in [
        ("rls-disabled", Severity::Critical),
        ("policy-ignores-tenant", Severity::Critical),
        ("cast-of-empty-setting", Severity::Warning),
        ("citus-distribution-column", Severity::Warning),
    ] {
        let found = report.by_check(id);
        assert!(!found.is_empty(), "expected {id}:\n{text}");
        assert!(found.iter().all(|f| f.severity == severity), "{text}");
    }
    // Fixes that Citus would refuse are not printed.
    assert!(
        report.by_check("per-row-current-setting").is_empty(),
        "{text}"
    );
    let events = &report.by_check("citus-distribution-column")[0];
    assert!(events.object.contains("event_id"), "{text}");
    assert!(events.fix.contains("'store_id'"), "{text}");
    for f in report
        .findings
        .iter()
        .filter(|f| f.severity != Severity::Note)
    {
        if f.check == "citus-without-wrap" {
            continue;
        }
        assert!(
            !f.fix.contains("(SELECT nullif") || !f.fix.contains("POLICY"),
            "a subquery in a policy fix: {f:?}"
        );
        let out = c.coordinator.psql(DB, &f.fix);
        assert!(
            out.is_ok(),
            "Citus refused the fix for {}: {out:?}\n{}",
            f.check,
            f.fix
        );
    }
    let after = check(c, true, true).await;
    assert_eq!(
        after.criticals() + after.warnings(),
        0,
        "{}",
        after.render_text(false)
    );
    let copy = after.by_check("citus-copy-to");
    assert_eq!(copy.len(), 1, "{}", after.render_text(false));
    assert!(
        copy[0]
            .fix
            .contains("COPY (SELECT * FROM public.customers) TO STDOUT;")
    );
    c.sql(&copy[0].fix);
    assert_eq!(
        c.sql(
            "SELECT column_to_column_name(logicalrelid, partkey) FROM pg_dist_partition \
               WHERE logicalrelid = 'events'::regclass"
        ),
        "store_id"
    );
}

/// rlsgate in wrap mode with `citus_propagate_set`, in front of the coordinator.
async fn proxy(c: &Cluster, pool: usize) -> Proxy {
    start_proxy_with(DB, &config(c, true, true, pool)).await
}

async fn counts(client: &tokio_postgres::Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM orders)",
            &[],
        )
        .await
        .expect("counts");
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrap_mode_isolates_tenants_on_the_workers() {
    let Some(c) = cluster() else { return };
    let _one_at_a_time = SCHEMA_LOCK.write().await;
    assert_eq!(c.sql("SHOW citus.propagate_set_commands"), "none");
    let p = proxy(c, 2).await;
    let north = client(&p, "north").await;
    let south = client(&p, "south").await;

    // Multi-shard reads (both tenants live on different shards) and a router read.
    assert_eq!(counts(&north).await, (3, 2));
    assert_eq!(counts(&south).await, (2, 1));
    let names: Vec<String> = north
        .query(
            "SELECT name FROM customers WHERE store_id = 'north' ORDER BY customer_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["Ada", "Ben", "Cy"]);
    let foreign = south
        .query("SELECT name FROM customers WHERE store_id = 'north'", &[])
        .await
        .unwrap();
    assert!(foreign.is_empty(), "south read north's rows");

    // Writes: own insert, foreign insert refused by RLS on the worker, UPDATE/DELETE.
    north
        .execute("INSERT INTO customers VALUES ('north', 100, 'New')", &[])
        .await
        .expect("own insert");
    let err = north
        .execute("INSERT INTO customers VALUES ('south', 101, 'Sneaky')", &[])
        .await
        .expect_err("foreign insert");
    assert_eq!(code(&err), "42501", "{err}");
    let updated = north
        .execute("UPDATE customers SET name = name || '!'", &[])
        .await
        .unwrap();
    assert_eq!(updated, 4, "north updates its own 4 rows only");
    assert_eq!(
        c.sql("SELECT string_agg(name, ',' ORDER BY customer_id) FROM customers WHERE store_id = 'south'"),
        "Dot,Eve",
        "south's rows untouched"
    );
    assert_eq!(
        south
            .execute("DELETE FROM customers WHERE customer_id = 100", &[])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        north
            .execute("DELETE FROM customers WHERE customer_id = 100", &[])
            .await
            .unwrap(),
        1
    );
    north
        .execute("UPDATE customers SET name = rtrim(name, '!')", &[])
        .await
        .unwrap();

    // A join with the reference table (read locally on the coordinator's replica).
    let rows = south
        .query(
            "SELECT s.name, count(*) FROM customers c JOIN stores s USING (store_id) GROUP BY 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "South");
    assert_eq!(rows[0].get::<_, i64>(1), 2);

    // A multi-statement simple Query.
    let msgs = north
        .simple_query("SELECT count(*) FROM customers; SELECT count(*) FROM orders")
        .await
        .unwrap();
    let values: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["3", "2"]);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explicit_blocks_prepared_statements_and_pipelines_reach_the_workers() {
    let Some(c) = cluster() else { return };
    let _one_at_a_time = SCHEMA_LOCK.write().await;
    let p = proxy(c, 2).await;
    let mut north = client(&p, "north").await;
    let south = client(&p, "south").await;

    // The client's own block: SET LOCAL is injected right after its BEGIN.
    let tx = north.transaction().await.unwrap();
    tx.execute("INSERT INTO orders VALUES ('north', 200, 3, 5)", &[])
        .await
        .unwrap();
    let n: i64 = tx
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    tx.rollback().await.unwrap();
    assert_eq!(counts(&north).await, (3, 2));

    // Extended protocol with parameters, and a prepared statement run for both tenants.
    let stmt = north
        .prepare("SELECT count(*) FROM customers WHERE store_id = $1")
        .await
        .unwrap();
    for (store, expected) in [("north", 3i64), ("south", 0)] {
        let n: i64 = north.query_one(&stmt, &[&store]).await.unwrap().get(0);
        assert_eq!(n, expected, "north counting {store}");
    }
    let stmt = south
        .prepare("SELECT total FROM orders WHERE store_id = $1 AND order_id = $2")
        .await
        .unwrap();
    assert_eq!(
        south.query(&stmt, &[&"south", &3i64]).await.unwrap().len(),
        1
    );
    assert!(
        south
            .query(&stmt, &[&"north", &1i64])
            .await
            .unwrap()
            .is_empty()
    );

    // A pipeline: several extended-protocol queries in flight on one connection.
    let sqls: Vec<&str> = (0..8)
        .map(|i| {
            if i % 2 == 0 {
                "SELECT count(*) FROM customers"
            } else {
                "SELECT count(*) FROM orders"
            }
        })
        .collect();
    let queries: Vec<_> = sqls.iter().map(|sql| north.query_one(*sql, &[])).collect();
    let results = future::join_all(queries).await;
    for (i, r) in results.into_iter().enumerate() {
        let n: i64 = r.unwrap().get(0);
        assert_eq!(n, if i % 2 == 0 { 3 } else { 2 }, "pipelined query {i}");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_select_to_works_and_copy_table_to_fails_closed() {
    let Some(c) = cluster() else { return };
    let _one_at_a_time = SCHEMA_LOCK.write().await;
    let p = proxy(c, 2).await;
    let north = client(&p, "north").await;
    let copy = |sql: &'static str| {
        let north = &north;
        async move {
            let stream = north.copy_out(sql).await.expect("COPY TO");
            let chunks: Vec<bytes::Bytes> = stream.try_collect().await.expect("COPY data");
            String::from_utf8(chunks.concat()).unwrap()
        }
    };
    let out =
        copy("COPY (SELECT store_id, name FROM customers ORDER BY customer_id) TO STDOUT").await;
    assert_eq!(out, "north\tAda\nnorth\tBen\nnorth\tCy\n");
    // What the README and `rlsgate check` warn about: Citus copies the shards outside the
    // transaction, where no tenant is set: nothing (and nobody else's rows) comes back.
    assert_eq!(copy("COPY customers TO STDOUT").await, "");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_stops_a_query_running_on_a_worker() {
    let Some(c) = cluster() else { return };
    let _one_at_a_time = SCHEMA_LOCK.write().await;
    let p = proxy(c, 2).await;
    let north = client(&p, "north").await;
    let token = north.cancel_token();
    let started = Instant::now();
    let (slow, _) = tokio::join!(
        north.query(
            "SELECT pg_sleep(30) FROM customers WHERE store_id = 'north' AND customer_id = 1",
            &[]
        ),
        async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            token
                .cancel_query(tokio_postgres::NoTls)
                .await
                .expect("cancel request");
        }
    );
    let err = slow.expect_err("cancelled");
    assert_eq!(code(&err), "57014", "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(counts(&north).await, (3, 2), "the connection still works");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_tenants_interleaved_on_a_small_pool_never_see_each_other() {
    let Some(c) = cluster() else { return };
    let _one_at_a_time = SCHEMA_LOCK.write().await;
    let p = proxy(c, 2).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let store = if i % 2 == 0 { "north" } else { "south" };
        let client = client(&p, store).await;
        tasks.push(tokio::spawn(async move {
            let expected: (i64, i64) = if store == "north" { (3, 2) } else { (2, 1) };
            for j in 0..40 {
                match j % 3 {
                    0 => {
                        // Other clients of the same tenant may have a tmp row in flight.
                        let row = client
                            .query_one(
                                "SELECT (SELECT count(*) FROM customers WHERE name NOT LIKE 'tmp%'), \
                                        (SELECT count(*) FROM orders)",
                                &[],
                            )
                            .await
                            .unwrap();
                        assert_eq!((row.get(0), row.get(1)), expected, "{store}");
                    }
                    1 => {
                        let rows = client
                            .query("SELECT DISTINCT store_id FROM customers", &[])
                            .await
                            .unwrap();
                        let seen: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                        assert_eq!(seen, [store]);
                    }
                    _ => {
                        let id = 1000 + i * 100 + j;
                        client
                            .execute(
                                "INSERT INTO customers VALUES ($1, $2, $3)",
                                &[&store, &(id as i64), &format!("tmp{id}")],
                            )
                            .await
                            .unwrap();
                        let n = client
                            .execute(
                                "DELETE FROM customers WHERE name = $1",
                                &[&format!("tmp{id}")],
                            )
                            .await
                            .unwrap();
                        assert_eq!(n, 1, "{store} deleted only its own row");
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(c.sql("SELECT count(*) FROM customers"), "5");
    // The tenants' rows live on the workers (both of them), not on the coordinator.
    let ports = c.sql(
        "SELECT string_agg(DISTINCT nodeport::text, ',' ORDER BY nodeport::text) \
           FROM citus_shards WHERE table_name = 'customers'::regclass",
    );
    let mut workers: Vec<String> = c.workers.iter().map(|w| w.port().to_string()).collect();
    workers.sort();
    assert_eq!(ports, workers.join(","));
    p.stop().await;
}

/// Signed mode cannot seal the workers' connections: `rlsgate check` says so instead of letting
/// every query on a distributed table fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_refuses_signed_mode_on_citus() {
    let Some(c) = cluster() else { return };
    let text = config(c, true, true, 2)
        + "mode = \"signed\"\nsigning_key = \"citus-test-signing-key-0123456789abcdef\"\n";
    let config = Config::from_toml(&text).expect("config");
    let report = doctor::run(&config).await.expect("rlsgate check runs");
    assert!(
        ids(&report, Severity::Critical).contains(&"signed-citus"),
        "{}",
        report.render_text(false)
    );
}
