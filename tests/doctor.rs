//! `rlsgate check`: one deliberately broken copy of `sql/demo.sql` per check, in a real Postgres.
//! Each test asserts the finding's id and severity, applies its fix SQL as the superuser, and
//! asserts the finding is gone. Roles are cluster-wide, so tests that change role attributes or
//! memberships use a role of their own.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use rlsgate::config::Config;
use rlsgate::doctor::{self, Finding, Report, Severity};
use support::*;

fn config_for(db: &str, user: Option<&str>) -> Config {
    let mut text = config_text(db, 2, "");
    if let Some(user) = user {
        text = text.replace("user = \"rlsgate_app\"", &format!("user = \"{user}\""));
    }
    Config::from_toml(&text).expect("valid config")
}

async fn check_as(db: &str, user: Option<&str>) -> Report {
    doctor::run(&config_for(db, user))
        .await
        .expect("checks run")
}

async fn check(db: &str) -> Report {
    check_as(db, None).await
}

/// A login role of this test's own, with the test password.
fn own_role(db: &str, suffix: &str, attributes: &str) -> String {
    let role = format!("{db}_{suffix}");
    admin_sql(
        db,
        &format!("CREATE ROLE {role} LOGIN PASSWORD '{APP_PASSWORD}' {attributes};"),
    );
    role
}

/// The findings of `check`, asserting there is at least one and all have `severity`.
fn expect(report: &Report, check: &str, severity: Severity) -> Vec<Finding> {
    let found: Vec<Finding> = report.by_check(check).into_iter().cloned().collect();
    assert!(
        !found.is_empty(),
        "expected a {check} finding, got:\n{}",
        report.render_text(false)
    );
    for f in &found {
        assert_eq!(f.severity, severity, "{f:?}");
        assert!(!f.fix.trim().is_empty() && !f.why.is_empty(), "{f:?}");
    }
    found
}

/// Apply each finding's fix as the superuser, then assert the check reports nothing more.
async fn fix_and_recheck(db: &str, user: Option<&str>, check: &str, found: &[Finding]) -> Report {
    for f in found {
        admin_sql(db, &f.fix);
    }
    let after = check_as(db, user).await;
    assert!(
        after.by_check(check).is_empty(),
        "{check} still reported after the fix:\n{}",
        after.render_text(false)
    );
    after
}

/// Break the demo database, expect `check` with `severity`, fix, recheck; returns the findings.
async fn broken(sql: &str, id: &str, severity: Severity) -> (String, Vec<Finding>) {
    let db = demo_db();
    admin_sql(&db, sql);
    let report = check(&db).await;
    let found = expect(&report, id, severity);
    // Nothing else is reported, and the fix leaves a clean database.
    assert!(
        ids(&report).iter().all(|i| *i == id),
        "{}",
        report.render_text(false)
    );
    let after = fix_and_recheck(&db, None, id, &found).await;
    assert!(after.findings.is_empty(), "{}", after.render_text(false));
    (db, found)
}

fn ids(report: &Report) -> Vec<&'static str> {
    report.findings.iter().map(|f| f.check).collect()
}

#[tokio::test]
async fn demo_schema_and_examples_have_no_findings() {
    let db = demo_db();
    let report = check(&db).await;
    assert!(report.findings.is_empty(), "{}", report.render_text(false));
    assert_eq!(report.tenant_columns, vec!["store_id".to_string()]);
    assert_eq!(report.exit_code(true), 0);
    admin_sql(&db, include_str!("../sql/examples/owner_and_admin.sql"));
    let report = check(&db).await;
    assert!(report.findings.is_empty(), "{}", report.render_text(false));
}

#[tokio::test]
async fn superuser_role_is_critical() {
    let db = demo_db();
    let role = own_role(&db, "su", "SUPERUSER");
    let report = check_as(&db, Some(&role)).await;
    let found = expect(&report, "role-superuser", Severity::Critical);
    assert_eq!(report.exit_code(false), 2);
    fix_and_recheck(&db, Some(&role), "role-superuser", &found).await;
}

#[tokio::test]
async fn bypassrls_role_is_critical() {
    let db = demo_db();
    let role = own_role(&db, "bypass", "BYPASSRLS");
    admin_sql(&db, &format!("GRANT SELECT ON customers TO {role};"));
    let report = check_as(&db, Some(&role)).await;
    let found = expect(&report, "role-bypassrls", Severity::Critical);
    fix_and_recheck(&db, Some(&role), "role-bypassrls", &found).await;
}

#[tokio::test]
async fn owner_connected_config_is_critical_and_fixable() {
    let db = demo_db();
    let role = own_role(&db, "owner", "");
    admin_sql(
        &db,
        &format!(
            "ALTER TABLE stores OWNER TO {role}; ALTER TABLE customers OWNER TO {role};
             ALTER TABLE products OWNER TO {role}; ALTER TABLE sales_transactions OWNER TO {role};
             ALTER TABLE sales_items OWNER TO {role};"
        ),
    );
    let report = check_as(&db, Some(&role)).await;
    let found = expect(&report, "role-owns-table", Severity::Critical);
    assert_eq!(found.len(), 5, "{}", report.render_text(false));
    let after = fix_and_recheck(&db, Some(&role), "role-owns-table", &found).await;
    assert!(after.findings.is_empty(), "{}", after.render_text(false));
}

#[tokio::test]
async fn role_that_can_become_the_owner_and_unforced_rls() {
    let db = demo_db();
    let role = own_role(&db, "member", "");
    admin_sql(
        &db,
        &format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
             GRANT rlsgate_owner TO {role};
             ALTER TABLE customers NO FORCE ROW LEVEL SECURITY;"
        ),
    );
    let report = check_as(&db, Some(&role)).await;
    let not_forced = expect(&report, "rls-not-forced", Severity::Critical);
    assert_eq!(not_forced[0].object, "table public.customers");
    let become_owner = expect(&report, "role-can-become", Severity::Critical);
    fix_and_recheck(&db, Some(&role), "rls-not-forced", &not_forced).await;
    let after = fix_and_recheck(&db, Some(&role), "role-can-become", &become_owner).await;
    assert!(after.findings.is_empty(), "{}", after.render_text(false));
}

#[tokio::test]
async fn rls_disabled_on_a_tenant_table() {
    let (_, found) = broken(
        "ALTER TABLE customers DISABLE ROW LEVEL SECURITY;",
        "rls-disabled",
        Severity::Critical,
    )
    .await;
    assert_eq!(found[0].object, "table public.customers");
}

#[tokio::test]
async fn rls_disabled_on_a_table_reachable_by_foreign_key() {
    // item_notes has no store_id: it belongs to a tenant through sales_items → products or
    // sales_transactions. The fix creates a policy that reaches the tenant column.
    let (db, found) = broken(
        "CREATE TABLE item_notes (
             note_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             item_id bigint NOT NULL REFERENCES sales_items,
             body text NOT NULL);
         INSERT INTO item_notes (item_id, body) SELECT item_id, 'n' FROM sales_items;
         GRANT SELECT, INSERT ON item_notes TO rlsgate_app;",
        "rls-disabled",
        Severity::Critical,
    )
    .await;
    assert!(found[0].fix.contains("CREATE POLICY"), "{}", found[0].fix);
    // The generated policy isolates: north has 3 items, south 2.
    for (store, n) in [("north", "3"), ("south", "2"), ("", "0")] {
        let got = admin_sql(
            &db,
            &format!(
                "BEGIN; SET LOCAL ROLE rlsgate_app; SET LOCAL app.current_store_id = '{store}';
                 SELECT count(*) FROM item_notes; COMMIT;"
            ),
        );
        assert_eq!(got, n, "store {store:?}");
    }
    assert!(check(&db).await.findings.is_empty());
}

#[tokio::test]
async fn missing_policy_for_granted_commands() {
    let (_, found) = broken(
        "DROP POLICY tenant_isolation ON products;
         CREATE POLICY products_read ON products FOR SELECT
             USING (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')));",
        "missing-policy",
        Severity::Critical,
    )
    .await;
    let objects: Vec<&str> = found.iter().map(|f| f.object.as_str()).collect();
    assert_eq!(
        objects,
        [
            "table public.products: DELETE",
            "table public.products: INSERT",
            "table public.products: UPDATE"
        ]
    );
}

#[tokio::test]
async fn permissive_true_policy_ignores_the_tenant() {
    broken(
        "CREATE POLICY open_read ON customers FOR SELECT USING (true);",
        "policy-ignores-tenant",
        Severity::Critical,
    )
    .await;
}

#[tokio::test]
async fn or_branch_without_a_protected_setting_ignores_the_tenant() {
    let (db, _) = broken(
        "DROP POLICY tenant_isolation ON customers;
         CREATE POLICY tenant_isolation ON customers
             USING (store_id = (SELECT nullif(current_setting('app.current_store_id', true), ''))
                    OR email LIKE '%@example.com')
             WITH CHECK (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')));",
        "policy-ignores-tenant",
        Severity::Critical,
    )
    .await;
    // Not findings: an OR branch gated by a protected setting, and a permissive `true` under a
    // restrictive tenant policy.
    admin_sql(
        &db,
        "CREATE POLICY store_admin ON products FOR SELECT
             USING (store_id = (SELECT nullif(current_setting('app.current_store_id', true), ''))
                    OR (SELECT current_setting('app.user_role', true)) = 'superadmin');
         CREATE POLICY everything ON stores USING (true) WITH CHECK (true);
         CREATE POLICY only_tenant ON stores AS RESTRICTIVE
             USING (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')));",
    );
    let report = check(&db).await;
    assert!(report.findings.is_empty(), "{}", report.render_text(false));
}

#[tokio::test]
async fn seed_style_set_store_context_helper() {
    let (_, found) = broken(
        "CREATE FUNCTION set_store_context(p_store text) RETURNS void
             LANGUAGE plpgsql SECURITY DEFINER AS $$
         BEGIN
             PERFORM set_config('app.current_store_id', p_store, false);
         END $$;
         GRANT EXECUTE ON FUNCTION set_store_context(text) TO rlsgate_app;",
        "function-sets-protected",
        Severity::Critical,
    )
    .await;
    assert_eq!(found[0].object, "function public.set_store_context(text)");
    assert!(found[0].why.contains("SECURITY DEFINER"));
}

#[tokio::test]
async fn functions_with_set_local_or_a_set_clause() {
    let (_, found) = broken(
        "CREATE FUNCTION become(text) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             EXECUTE format('SET LOCAL app.current_store_id = %L', $1);
         END $$;
         CREATE FUNCTION north_customers() RETURNS bigint LANGUAGE sql SECURITY DEFINER
             SET app.current_store_id = 'north' AS 'SELECT count(*) FROM public.customers';",
        "function-sets-protected",
        Severity::Critical,
    )
    .await;
    assert_eq!(found.len(), 2, "{found:?}");
}

#[tokio::test]
async fn view_owned_by_a_superuser_bypasses_rls() {
    let (db, _) = broken(
        "CREATE VIEW all_customers AS SELECT * FROM customers;
         GRANT SELECT ON all_customers TO rlsgate_app;",
        "view-bypasses-rls",
        Severity::Critical,
    )
    .await;
    // With security_invoker the view applies the caller's policies.
    let got = admin_sql(
        &db,
        "BEGIN; SET LOCAL ROLE rlsgate_app; SET LOCAL app.current_store_id = 'south';
         SELECT count(*) FROM all_customers; COMMIT;",
    );
    assert_eq!(got, "2");
}

#[tokio::test]
async fn materialized_view_of_a_tenant_table() {
    broken(
        "CREATE MATERIALIZED VIEW customer_emails AS SELECT store_id, email FROM customers;
         GRANT SELECT ON customer_emails TO rlsgate_app;",
        "view-bypasses-rls",
        Severity::Critical,
    )
    .await;
}

#[tokio::test]
async fn protected_setting_defaults() {
    let db = demo_db();
    admin_sql(
        &db,
        &format!(
            "ALTER DATABASE {db} SET app.current_store_id = 'north';
             ALTER ROLE rlsgate_app IN DATABASE {db} SET app.current_store_id = 'south';"
        ),
    );
    let report = check(&db).await;
    let found = expect(&report, "protected-default", Severity::Critical);
    assert_eq!(found.len(), 2, "{}", report.render_text(false));
    fix_and_recheck(&db, None, "protected-default", &found).await;
}

#[tokio::test]
async fn create_on_the_database() {
    let (_, found) = broken(
        "DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO PUBLIC', current_database()); END $$;",
        "database-create",
        Severity::Critical,
    )
    .await;
    assert!(
        found[0].fix.contains("REVOKE CREATE ON DATABASE"),
        "{found:?}"
    );
}

/// The role owns the database: it may create schemas (and, as `pg_database_owner`, owns
/// `public`). The fixes hand both to another role; the role keeps its data access.
#[tokio::test]
async fn a_role_that_owns_the_database() {
    let db = demo_db();
    admin_sql(&db, &format!("ALTER DATABASE {db} OWNER TO rlsgate_app;"));
    let report = check(&db).await;
    let found = expect(&report, "database-create", Severity::Critical);
    assert!(
        found[0]
            .fix
            .contains(&format!("ALTER DATABASE {db} OWNER TO")),
        "{found:?}"
    );
    let schema = expect(&report, "schema-create", Severity::Warning);
    fix_and_recheck(&db, None, "database-create", &found).await;
    let after = fix_and_recheck(&db, None, "schema-create", &schema).await;
    assert!(after.findings.is_empty(), "{}", after.render_text(false));
    // the proxy's role still reads its tenant's rows
    let proxy = start_proxy_with(&db, &config_text(&db, 1, "")).await;
    let north = client(&proxy, "north").await;
    assert_eq!(count(&north, "customers").await, 3);
    proxy.stop().await;
}

#[tokio::test]
async fn hardening_warnings() {
    let db = demo_db();
    admin_sql(
        &db,
        &format!(
            "GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO PUBLIC;
             GRANT TEMPORARY ON DATABASE {db} TO PUBLIC;
             GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) TO rlsgate_app;
             GRANT CREATE ON SCHEMA public TO PUBLIC;"
        ),
    );
    let report = check(&db).await;
    assert_eq!(report.criticals(), 0, "{}", report.render_text(false));
    assert_eq!(report.exit_code(false), 0);
    assert_eq!(report.exit_code(true), 1);
    for id in [
        "set-config-public",
        "temp-public",
        "activity-visible",
        "schema-create",
    ] {
        let found = expect(&report, id, Severity::Warning);
        fix_and_recheck(&db, None, id, &found).await;
    }
    assert!(check(&db).await.findings.is_empty());
}

#[tokio::test]
async fn unique_index_and_constraint_without_the_tenant_column() {
    let (_, found) = broken(
        "CREATE UNIQUE INDEX customers_email_idx ON customers (email);
         ALTER TABLE products ADD CONSTRAINT products_name_key UNIQUE (name);",
        "unique-without-tenant",
        Severity::Warning,
    )
    .await;
    assert_eq!(found.len(), 2, "{found:?}");
}

#[tokio::test]
async fn foreign_key_across_tenant_tables_without_the_tenant_column() {
    // What remains is the plain customer_id key.
    let (_, found) = broken(
        "ALTER TABLE sales_transactions DROP CONSTRAINT sales_transactions_store_customer_fkey;",
        "fk-without-tenant",
        Severity::Warning,
    )
    .await;
    assert!(
        found[0]
            .object
            .contains("sales_transactions_customer_id_fkey")
    );
}

#[tokio::test]
async fn foreign_key_fix_adds_the_parent_key_when_missing() {
    let (db, found) = broken(
        "CREATE TABLE loyalty (
             loyalty_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             store_id text NOT NULL REFERENCES stores,
             product_id bigint REFERENCES products ON DELETE SET NULL);
         CREATE INDEX ON loyalty (store_id);
         ALTER TABLE loyalty ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
         CREATE POLICY tenant_isolation ON loyalty
             USING (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')));
         GRANT SELECT ON loyalty TO rlsgate_app;",
        "fk-without-tenant",
        Severity::Warning,
    )
    .await;
    assert!(
        found[0].fix.contains("ADD UNIQUE (store_id, product_id)"),
        "{}",
        found[0].fix
    );
    assert!(
        found[0].fix.contains("ON DELETE SET NULL (product_id)"),
        "{}",
        found[0].fix
    );
    // SET NULL spares the tenant column.
    let got = admin_sql(
        &db,
        "WITH p AS (INSERT INTO products (store_id, name, price) VALUES ('north', 'tmp', 1)
                    RETURNING store_id, product_id)
         INSERT INTO loyalty (store_id, product_id) SELECT store_id, product_id FROM p;
         DELETE FROM products WHERE name = 'tmp';
         SELECT store_id || ':' || coalesce(product_id::text, 'null') FROM loyalty;",
    );
    assert_eq!(got, "north:null");
}

#[tokio::test]
async fn tenant_table_without_a_tenant_index() {
    broken(
        "CREATE TABLE shelves (store_id text NOT NULL REFERENCES stores, label text NOT NULL);
         ALTER TABLE shelves ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
         CREATE POLICY tenant_isolation ON shelves
             USING (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')));
         GRANT SELECT ON shelves TO rlsgate_app;",
        "no-tenant-index",
        Severity::Warning,
    )
    .await;
}

#[tokio::test]
async fn current_setting_per_row() {
    broken(
        "ALTER POLICY tenant_isolation ON customers
             USING (store_id = nullif(current_setting('app.current_store_id', true), ''));",
        "per-row-current-setting",
        Severity::Warning,
    )
    .await;
}

#[tokio::test]
async fn cast_of_a_setting_that_can_be_empty() {
    let (db, _) = broken(
        "CREATE TABLE gift_cards (
             card_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             store_id uuid NOT NULL);
         CREATE INDEX ON gift_cards (store_id);
         ALTER TABLE gift_cards ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
         CREATE POLICY tenant_isolation ON gift_cards
             USING (store_id = (SELECT current_setting('app.current_store_id', true)::uuid));
         GRANT SELECT ON gift_cards TO rlsgate_app;",
        "cast-of-empty-setting",
        Severity::Warning,
    )
    .await;
    // After the fix an empty setting matches no rows instead of failing.
    let got = admin_sql(
        &db,
        "BEGIN; SET LOCAL ROLE rlsgate_app; SET LOCAL app.current_store_id = '';
         SELECT count(*) FROM gift_cards; COMMIT;",
    );
    assert_eq!(got, "0");
}

#[test]
fn exit_codes() {
    let finding = |severity| Finding {
        severity,
        check: "x",
        object: "o".into(),
        why: "w".into(),
        fix: "f".into(),
    };
    let report = |findings| Report {
        database: "d".into(),
        role: "r".into(),
        tenant_setting: "app.current_store_id".into(),
        tenant_columns: vec![],
        findings,
    };
    assert_eq!(report(vec![]).exit_code(false), 0);
    assert_eq!(report(vec![]).exit_code(true), 0);
    let warn = report(vec![finding(Severity::Warning)]);
    assert_eq!((warn.exit_code(false), warn.exit_code(true)), (0, 1));
    let crit = report(vec![
        finding(Severity::Warning),
        finding(Severity::Critical),
    ]);
    assert_eq!((crit.exit_code(false), crit.exit_code(true)), (2, 2));
    let json: serde_json::Value = serde_json::from_str(&crit.to_json()).unwrap();
    assert_eq!(json["findings"][1]["severity"], "critical");
}

fn write_config(db: &str, name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("rlsgate-doctor-{db}-{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

fn rlsgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rlsgate"))
        .args(args)
        .env_remove("RLSGATE_CONFIG")
        .output()
        .expect("run rlsgate")
}

#[tokio::test]
async fn cli_check_prints_json_and_exit_codes() {
    let db = demo_db();
    let path = write_config(&db, "check", &config_text(&db, 2, ""));
    let p = path.to_str().unwrap();
    let out = rlsgate(&["check", "--config", p, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(json["findings"].as_array().map(Vec::len), Some(0));

    admin_sql(&db, &format!("GRANT TEMPORARY ON DATABASE {db} TO PUBLIC;"));
    assert_eq!(rlsgate(&["check", "--config", p]).status.code(), Some(0));
    assert_eq!(
        rlsgate(&["check", "--config", p, "--strict"]).status.code(),
        Some(1)
    );

    admin_sql(&db, "ALTER TABLE customers DISABLE ROW LEVEL SECURITY;");
    let out = rlsgate(&["check", "--config", p, "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert!(json["criticals"].as_u64() >= Some(1), "{json}");
    let findings = json["findings"].as_array().unwrap();
    assert!(findings.iter().any(|f| f["check"] == "rls-disabled"
        && f["severity"] == "critical"
        && f["object"] == "table public.customers"));
    let text = rlsgate(&["check", "--config", p]);
    let report = String::from_utf8_lossy(&text.stdout);
    assert!(
        report.contains("CRITICAL") && report.contains("[rls-disabled]"),
        "{report}"
    );
    assert!(
        !report.contains('\x1b'),
        "no colours when stdout is not a terminal"
    );
    std::fs::remove_file(&path).ok();
}

/// Runs `rlsgate serve`; returns its exit status if it exits within `wait`, else kills it.
fn serve_for(args: &[&str], wait: Duration) -> (Option<std::process::ExitStatus>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlsgate"))
        .arg("serve")
        .args(args)
        .env_remove("RLSGATE_CONFIG")
        .env("RLSGATE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn rlsgate serve");
    let deadline = Instant::now() + wait;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if Instant::now() >= deadline {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        use std::io::Read;
        s.read_to_string(&mut err).ok();
    }
    (status, err)
}

#[tokio::test]
async fn serve_refuses_a_critical_database_unless_allowed() {
    let db = demo_db();
    admin_sql(&db, "ALTER TABLE products DISABLE ROW LEVEL SECURITY;");
    let path = write_config(&db, "serve", &config_text(&db, 2, ""));
    let p = path.to_str().unwrap();
    let (status, err) = serve_for(&["--config", p], Duration::from_secs(20));
    let (status2, _) = serve_for(&["--config", p, "--allow-unsafe"], Duration::from_secs(3));
    let status = status.expect("serve exits on a critical finding");
    assert!(!status.success());
    assert!(
        err.contains("rls-disabled") && err.contains("refusing to start"),
        "{err}"
    );
    assert!(status2.is_none(), "serve --allow-unsafe keeps running");

    // An unreachable database: start anyway.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = config_text(&db, 2, "").replace(
        &format!("port = {}", pg().port()),
        &format!("port = {closed}"),
    );
    let path2 = write_config(&db, "serve-down", &text);
    let (status3, err3) = serve_for(
        &["--config", path2.to_str().unwrap()],
        Duration::from_secs(3),
    );
    assert!(
        status3.is_none(),
        "serve starts without the database: {err3}"
    );
    std::fs::remove_file(&path).ok();
    std::fs::remove_file(&path2).ok();
}

/// The doctor connects over TLS as `upstream.sslmode` says, verifying with `verify-full`.
#[tokio::test]
async fn tls_connection_per_sslmode() {
    use rlsgate::embedded_pg::{EmbeddedOptions, EmbeddedPg};
    let dir = std::env::temp_dir().join(format!("rlsgate-doctor-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, sans: Vec<String>| {
        let c = rcgen::generate_simple_self_signed(sans).unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key)
    };
    let (cert, key) = write("server", vec!["localhost".into(), "127.0.0.1".into()]);
    let (other_ca, _) = write("other", vec!["localhost".into()]);
    let pg = tokio::task::spawn_blocking(move || {
        let pg = EmbeddedPg::start(EmbeddedOptions {
            ssl: Some((cert, key)),
            ..EmbeddedOptions::default()
        })
        .expect("start a TLS cluster");
        pg.psql(
            "postgres",
            &format!("CREATE ROLE rlsgate_app LOGIN PASSWORD '{APP_PASSWORD}';"),
        )
        .unwrap();
        pg.create_database("app").unwrap();
        pg.psql("app", DEMO_SQL).unwrap();
        pg
    })
    .await
    .unwrap();
    let config = |mode: &str, ca: &std::path::Path| {
        let text = config_text("app", 2, "")
            .replace(
                &format!("port = {}", support::pg().port()),
                &format!("port = {}", pg.port()),
            )
            .replace(
                "sslmode = \"disable\"",
                &format!("sslmode = \"{mode}\"\nca_file = \"{}\"", ca.display()),
            );
        Config::from_toml(&text).unwrap()
    };
    let server_ca = dir.join("server.pem");
    for mode in ["require", "verify-full", "prefer"] {
        let report = doctor::run(&config(mode, &server_ca)).await.expect(mode);
        assert!(
            report.findings.is_empty(),
            "{mode}: {}",
            report.render_text(false)
        );
    }
    let err = doctor::run(&config("verify-full", &other_ca))
        .await
        .expect_err("a certificate from another CA is refused");
    assert!(matches!(err, doctor::DoctorError::Connect { .. }), "{err}");
    drop(pg);
    std::fs::remove_dir_all(&dir).ok();
}
