//! Hardened mode (`[context] mode = "signed"`, sql/hardened.sql): the database itself refuses a
//! tenant setting rlsgate did not make.
//!
//! - With the statement guard switched off (a test-only switch), every escape attempt of
//!   `tests/escapes.rs` and `tests/guard_corpus.rs` is replayed by tenant `north`, followed by
//!   reads and writes of other tenants' rows: in signed mode nothing foreign is read or written
//!   (plain Postgres and `transaction_wrap`); in plain mode the same replay leaks, which shows the
//!   test can fail.
//! - Forgeries straight against PostgreSQL as the application role (what a client that got
//!   past the guard can run): a seal replayed from another backend or on the same one, an expired
//!   one, key rotation, reading the key, redefining the verifier, search_path shadowing, DISCARD.

mod support;

use aws_lc_rs::hmac;
use support::escape_cases::*;
use support::*;
use tokio_postgres::{Client, SimpleQueryMessage};

const KEY: &str = "hardened-test-signing-key-0123456789abcdef";
const KEY2: &str = "hardened-test-rotated-key-0123456789abcdef";
const HARDENED_SQL: &str = include_str!("../sql/hardened.sql");
const HARDENED_DEMO_SQL: &str = include_str!("../sql/examples/hardened_demo.sql");

/// Rows of tables under RLS that are not tenant `north`'s (for the attacker).
const FOREIGN_ROWS: &str = "SELECT ((SELECT count(*) FROM customers WHERE store_id <> 'north') \
     + (SELECT count(*) FROM products WHERE store_id <> 'north') \
     + (SELECT count(*) FROM stores WHERE store_id <> 'north') \
     + (SELECT count(*) FROM sales_transactions WHERE store_id <> 'north') \
     + (SELECT count(*) FROM sales_items i WHERE i.transaction_id NOT IN \
        (SELECT transaction_id FROM sales_transactions WHERE store_id = 'north')))::text";
/// Writes to other tenants' rows (in a block that is rolled back).
const FOREIGN_WRITE: &str = "UPDATE customers SET name = name || '' WHERE store_id <> 'north'";
/// What only other tenants' rows contain (set by `mark_foreign_rows`).
const MARK: &str = "foreign-secret";

/// The demo database, with what the escapes suite grants so that only the guard (or the
/// hardening) stands in the way; `signed`: sql/hardened.sql, its demo policies and KEY.
fn database(signed: bool) -> String {
    let db = escape_db();
    admin_sql(
        &db,
        &format!(
            "UPDATE customers SET email = '{MARK}-' || customer_id WHERE store_id <> 'north';
             UPDATE products SET name = '{MARK}-' || product_id WHERE store_id <> 'north';"
        ),
    );
    if signed {
        pg().psql(&db, HARDENED_SQL).expect("sql/hardened.sql");
        pg().psql(&db, HARDENED_DEMO_SQL)
            .expect("sql/examples/hardened_demo.sql");
        install_key(&db, KEY);
    }
    db
}

fn install_key(db: &str, key: &str) -> String {
    admin_sql(db, &format!("SELECT rlsgate.install_key('{key}')"))
}

/// Everything of other tenants, as the superuser sees it (to show nothing was written).
fn foreign_state(db: &str) -> String {
    admin_sql(
        db,
        "SELECT md5(string_agg(x, ',' ORDER BY x)) FROM (
             SELECT t::text AS x FROM customers t WHERE store_id <> 'north'
             UNION ALL SELECT t::text FROM products t WHERE store_id <> 'north'
             UNION ALL SELECT t::text FROM stores t WHERE store_id <> 'north'
             UNION ALL SELECT t::text FROM sales_transactions t WHERE store_id <> 'north') s",
    )
}

fn proxy_config(db: &str, signed: bool, wrap: bool, pool: usize) -> String {
    // Pipelining off: with the guard off, attacks leave session state behind that the guard
    // refuses (session advisory locks taken through field selection), and a later attack on
    // another connection would wait on such a lock forever. (Signed mode turns pipelining off
    // anyway.)
    let mut text = config_text(db, pool, "")
        .replace(
            "transaction_wrap = false",
            &format!("transaction_wrap = {wrap}"),
        )
        .replace(
            &format!("pipeline_depth = {}", pipeline_depth()),
            "pipeline_depth = 1",
        );
    if signed {
        text.push_str(&format!("mode = \"signed\"\nsigning_key = \"{KEY}\"\n"));
    }
    text
}

async fn guardless_proxy(db: &str, signed: bool, wrap: bool) -> Proxy {
    let proxy = start_proxy_with(db, &proxy_config(db, signed, wrap, 2)).await;
    proxy.shared.disable_guard_for_tests();
    proxy
}

/// A connection straight to PostgreSQL as the application role (a client past the guard).
async fn direct(db: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=rlsgate_app password={APP_PASSWORD} dbname={db}",
            pg().port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .expect("direct connection as rlsgate_app");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn values(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_string())
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .collect()
}

/// What one attempt got of other tenants' data, in words (empty: nothing).
async fn foreign_access(c: &Client, outputs: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(row) = outputs.iter().find(|v| v.contains(MARK)) {
        found.push(format!("its output shows a foreign row: {row}"));
    }
    if let Ok(msgs) = c.simple_query(FOREIGN_ROWS).await
        && let Some(n) = values(&msgs).first()
        && n != "0"
    {
        found.push(format!("then read {n} foreign rows"));
    }
    if let Ok(msgs) = c.simple_query(FOREIGN_WRITE).await {
        let written = msgs.iter().find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        });
        if let Some(n @ 1..) = written {
            found.push(format!("then updated {n} foreign rows"));
        }
    }
    found
}

/// Run one attack (a sequence of steps) as `north` and look for foreign rows: inside a block
/// (rolled back) and in autocommit. Returns what leaked.
async fn attack(proxy: &Proxy, steps: &[(String, bool)]) -> Vec<String> {
    let mut leaks = Vec::new();
    for in_block in [true, false] {
        let Ok(c) = connect(proxy, &token("north")).await else {
            leaks.push("cannot log in".into());
            continue;
        };
        if in_block {
            let _ = c.simple_query("BEGIN").await;
        }
        let mut outputs = Vec::new();
        for (sql, extended) in steps {
            if *extended {
                if let Ok(rows) = c.query(sql.as_str(), &[]).await {
                    for row in rows {
                        outputs.push(format!("{row:?}"));
                    }
                }
            } else if let Ok(msgs) = c.simple_query(sql).await {
                outputs.extend(values(&msgs));
            }
        }
        for leak in foreign_access(&c, &outputs).await {
            let via = if in_block { "in a block" } else { "autocommit" };
            leaks.push(format!("{via}: {leak}"));
        }
        if in_block {
            let _ = c.simple_query("ROLLBACK").await;
        }
    }
    leaks
}

/// Every escape attempt in tests/ (escapes.rs' cases and effect sequences, the guard corpus),
/// as step sequences.
fn all_attacks(db: &str) -> Vec<Vec<(String, bool)>> {
    let mut cases: Vec<Case> = Vec::new();
    for list in [
        class1_deny(),
        class2_deny(),
        class3_deny(),
        class4_deny(),
        class5_seed_deny(),
        class6_deny(),
        class8_deny(db, 9),
        class9_deny(),
        class10_deny(),
        extra_deny(),
    ] {
        cases.extend(list);
    }
    let mut attacks: Vec<Vec<(String, bool)>> = Vec::new();
    for case in cases {
        if case.simple {
            attacks.push(vec![(case.sql.clone(), false)]);
        }
        if case.extended {
            attacks.push(vec![(case.sql.clone(), true)]);
        }
    }
    for (_, sql) in GUARD_CORPUS_DENY {
        attacks.push(vec![(sql.to_string(), false)]);
    }
    for steps in class5_temp_objects()
        .into_iter()
        .chain(class5_settings())
        .chain(extra_effects())
    {
        attacks.push(steps.into_iter().map(|s| (s.sql, s.extended)).collect());
    }
    attacks
}

/// Replays every attack with the guard off; returns the attacks that reached foreign rows.
async fn replay(signed: bool, wrap: bool) -> (usize, Vec<String>) {
    let db = database(signed);
    let before = foreign_state(&db);
    let proxy = guardless_proxy(&db, signed, wrap).await;
    let attacks = all_attacks(&db);
    let mut leaked = Vec::new();
    for steps in &attacks {
        let leaks = attack(&proxy, steps).await;
        if !leaks.is_empty() {
            let sql: Vec<&str> = steps.iter().map(|(s, _)| s.as_str()).collect();
            let mut text = sql.join(" ⏎ ");
            text.truncate(160);
            leaked.push(format!("{text}: {}", leaks.join("; ")));
        }
    }
    // the proxy still serves the attacker's own rows (so "no foreign row" is not "no row")
    let c = client(&proxy, "north").await;
    assert_eq!(
        count_customers(&c)
            .await
            .expect("own rows after the replay"),
        3
    );
    let msgs = c.simple_query(FOREIGN_ROWS).await.expect("the probe runs");
    assert_eq!(values(&msgs), ["0"]);
    proxy.stop().await;
    if foreign_state(&db) != before {
        leaked.push("other tenants' rows changed".into());
    }
    // what the ALTER ROLE attempts left behind (cluster-wide for the role)
    admin_sql(
        &db,
        &format!(
            "ALTER ROLE rlsgate_app RESET ALL; ALTER ROLE rlsgate_app IN DATABASE \"{db}\" RESET ALL;
             ALTER ROLE ALL RESET ALL; ALTER DATABASE \"{db}\" RESET ALL;
             ALTER ROLE rlsgate_app SET log_min_messages = 'error'"
        ),
    );
    (attacks.len(), leaked)
}

/// The whole replay, plain then signed (one test: the ALTER ROLE attempts are cluster-wide).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_with_the_guard_off_reach_no_foreign_row_in_signed_mode() {
    let (n, plain) = replay(false, false).await;
    eprintln!(
        "plain mode, guard off: {} of {n} attacks reached foreign rows, e.g.:\n  {}",
        plain.len(),
        plain
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert!(
        plain.len() >= 10,
        "the replay must show leaks without the hardening (else it proves nothing): {plain:#?}"
    );
    for wrap in [false, true] {
        let (n, signed) = replay(true, wrap).await;
        eprintln!(
            "signed mode (transaction_wrap = {wrap}), guard off: {} of {n} attacks reached foreign rows",
            signed.len()
        );
        assert!(signed.is_empty(), "leaks in signed mode: {signed:#?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Through the proxy
// ---------------------------------------------------------------------------------------------

async fn count_customers(c: &Client) -> Result<i64, tokio_postgres::Error> {
    Ok(c.query_one("SELECT count(*) FROM customers", &[])
        .await?
        .get(0))
}

/// The highest nonce the database accepted from any backend (moves only when rlsgate seals).
fn nonces(db: &str) -> String {
    admin_sql(
        db,
        "SELECT coalesce(sum(nonce), 0)::text FROM rlsgate.backend_nonce",
    )
}

async fn serves_each_tenant(wrap: bool) {
    let db = database(true);
    // one server connection: every other transaction switches tenant
    let proxy = start_proxy_with(&db, &proxy_config(&db, true, wrap, 1)).await;
    for _ in 0..3 {
        for (tenant, want) in [("north", 3), ("south", 2)] {
            let c = client(&proxy, tenant).await;
            assert_eq!(count_customers(&c).await.expect("read"), want, "{tenant}");
            let msgs = c
                .simple_query("SELECT count(*) FROM customers")
                .await
                .expect("simple read");
            assert_eq!(values(&msgs), [want.to_string()], "{tenant}");
        }
    }
    // a tenant that stays: no seal per transaction
    let c = client(&proxy, "north").await;
    count_customers(&c).await.expect("read");
    let sealed = nonces(&db);
    for _ in 0..20 {
        count_customers(&c).await.expect("read");
    }
    c.simple_query("BEGIN; SELECT count(*) FROM customers; COMMIT")
        .await
        .expect("a block");
    assert_eq!(nonces(&db), sealed, "sealed again without a tenant switch");
    // writes: own rows yes, foreign rows no
    c.execute(
        "INSERT INTO customers (store_id, name, email) VALUES ('north', 'n', 'n@x')",
        &[],
    )
    .await
    .expect("own insert");
    let e = c
        .execute(
            "INSERT INTO customers (store_id, name, email) VALUES ('south', 's', 's@x')",
            &[],
        )
        .await
        .expect_err("foreign insert");
    assert_eq!(code(&e), "42501", "{e}");
    // a stray rlsgate.enter breaks the seal: the next statement is refused (never served
    // unsealed), and rlsgate seals the connection again for the one after it
    let e = c
        .simple_query("SELECT rlsgate.enter('north', 0, 0, 'k', '\\x00')")
        .await
        .expect_err("an expired seal");
    assert_eq!(code(&e), "42501", "{e}");
    let e = count_customers(&c).await.expect_err("unsealed");
    assert!(message(&e).contains("not sealed"), "{e}");
    assert_eq!(count_customers(&c).await.expect("sealed again"), 4);
    // DISCARD clears the seal; rlsgate seals again before the next transaction
    for discard in ["DISCARD SEQUENCES", "DISCARD ALL"] {
        c.simple_query(discard).await.expect(discard);
        assert_eq!(count_customers(&c).await.expect(discard), 4, "{discard}");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_mode_serves_each_tenant_its_rows() {
    serves_each_tenant(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_mode_serves_each_tenant_its_rows_with_transaction_wrap() {
    serves_each_tenant(true).await;
}

/// The guard off, a client forges the tenant setting in every way a setting can be set: signed
/// mode refuses each (42501 from rlsgate.tenant()); plain mode leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_tenant_setting_is_refused_by_the_database() {
    let forgeries = [
        "SET app.current_store_id = 'south'",
        "SET LOCAL app.current_store_id = 'south'",
        "SELECT set_config('app.current_store_id', 'south', false)",
        "SELECT set_config('app.current_store_id', 'south', true)",
        "UPDATE pg_settings SET setting = 'south' WHERE name = 'app.current_store_id'",
        "RESET app.current_store_id",
        "SET app.current_store_id = ''",
    ];
    for signed in [false, true] {
        let db = database(signed);
        let proxy = guardless_proxy(&db, signed, false).await;
        let mut leaks = 0;
        for forgery in forgeries {
            let c = client(&proxy, "north").await;
            c.simple_query("BEGIN").await.expect("begin");
            c.simple_query(forgery).await.expect(forgery);
            match c.simple_query(FOREIGN_ROWS).await {
                Ok(msgs) if values(&msgs) != ["0"] => leaks += 1,
                Ok(_) => {}
                Err(e) => {
                    assert!(signed, "{forgery}: {e}");
                    assert_eq!(code(&e), "42501", "{forgery}: {e}");
                    assert!(message(&e).contains("not sealed"), "{forgery}: {e}");
                }
            }
        }
        proxy.stop().await;
        if signed {
            assert_eq!(leaks, 0, "signed mode leaked");
        } else {
            assert!(leaks >= 4, "plain mode should leak: {leaks}");
        }
    }
}

/// A key the database does not know: the client gets a clear error, never unsealed data; the
/// previous key carries a rotation until the new one is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_through_the_proxy() {
    let db = database(true);
    let rotated = format!("{}previous_signing_key = \"{KEY}\"\n", {
        proxy_config(&db, true, false, 1).replace(KEY, KEY2)
    });
    // KEY2 is not installed yet: rlsgate seals with the previous key
    let proxy = start_proxy_with(&db, &rotated).await;
    let c = client(&proxy, "north").await;
    assert_eq!(count_customers(&c).await.expect("previous key"), 3);
    proxy.stop().await;
    // KEY2 installed, KEY removed: the new key alone
    install_key(&db, KEY2);
    admin_sql(
        &db,
        &format!(
            "SELECT rlsgate.remove_key('{}')",
            rlsgate::seal::key_id(KEY)
        ),
    );
    let proxy = start_proxy_with(&db, &rotated).await;
    let c = client(&proxy, "north").await;
    assert_eq!(count_customers(&c).await.expect("new key"), 3);
    proxy.stop().await;
    // a proxy that knows only the removed key: refused with what to run
    let proxy = start_proxy_with(&db, &proxy_config(&db, true, false, 1)).await;
    let detail = refusal(&proxy).await;
    assert!(
        detail.contains("install_key") && detail.contains(&rlsgate::seal::key_id(KEY)),
        "{detail}"
    );
    proxy.stop().await;
}

/// The error a client of `north` gets (at login, which asks the pool for the server's
/// parameters, or at its first query).
async fn refusal(proxy: &Proxy) -> String {
    let e = match connect(proxy, &token("north")).await {
        Ok(c) => count_customers(&c).await.expect_err("refused"),
        Err(e) => e,
    };
    assert_eq!(code(&e), "08006", "{e:?}");
    format!("{e:?}")
}

/// sql/hardened.sql is missing: a clear error, never a query without the seal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_mode_without_the_database_side_refuses_clearly() {
    let db = database(false);
    let proxy = start_proxy_with(&db, &proxy_config(&db, true, false, 1)).await;
    let detail = refusal(&proxy).await;
    assert!(detail.contains("hardened.sql"), "{detail}");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Forgeries straight against PostgreSQL
// ---------------------------------------------------------------------------------------------

fn mac(key: &str, tenant: &str, pid: i32, expires: i64, nonce: i64) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes());
    let msg = format!("rlsgate-seal-v1:{tenant}:{pid}:{expires}:{nonce}");
    hmac::sign(&key, msg.as_bytes()).as_ref().to_vec()
}

async fn pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

fn in_a_minute() -> i64 {
    i64::try_from(now()).expect("time") + 60
}

/// `rlsgate.enter` with these values, then the tenant setting: the customers the backend sees.
async fn enter(
    c: &Client,
    key: &str,
    tenant: &str,
    mac_pid: i32,
    expires: i64,
    nonce: i64,
) -> Result<(), tokio_postgres::Error> {
    let id = rlsgate::seal::key_id(key);
    let mac = mac(key, tenant, mac_pid, expires, nonce);
    c.execute(
        "SELECT rlsgate.enter($1, $2, $3, $4, $5)",
        &[&tenant, &expires, &nonce, &id, &mac],
    )
    .await
    .map(|_| ())
}

async fn customers_as(c: &Client, tenant: &str) -> Result<i64, tokio_postgres::Error> {
    c.execute(
        "SELECT set_config('app.current_store_id', $1, false)",
        &[&tenant],
    )
    .await?;
    count_customers(c).await
}

fn assert_refused(r: Result<impl std::fmt::Debug, tokio_postgres::Error>, what: &str) {
    match r {
        Ok(v) => panic!("{what}: allowed ({v:?})"),
        Err(e) => assert_eq!(code(&e), "42501", "{what}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_seals_fail_closed() {
    let db = database(true);
    let a = direct(&db).await;
    let b = direct(&db).await;
    let (pa, pb) = (pid(&a).await, pid(&b).await);
    let exp = in_a_minute();

    // unsealed: nothing
    assert!(customers_as(&a, "north").await.is_err(), "never sealed");
    // the real thing works (so the refusals below can fail)
    enter(&a, KEY, "north", pa, exp, 10)
        .await
        .expect("a valid seal");
    assert_eq!(customers_as(&a, "north").await.expect("sealed"), 3);
    // forging the setting after a valid seal
    assert_refused(customers_as(&a, "south").await, "forged setting");
    assert_eq!(customers_as(&a, "north").await.expect("own again"), 3);

    // another backend's seal (lifted from logs): bound to the pid
    assert_refused(
        enter(&b, KEY, "south", pa, exp, 11).await,
        "a seal made for another backend",
    );
    assert_refused(customers_as(&b, "south").await, "after a foreign seal");
    // the same seal twice on its own backend: the nonce
    enter(&b, KEY, "south", pb, exp, 20)
        .await
        .expect("b's seal");
    assert_eq!(customers_as(&b, "south").await.expect("b sealed"), 2);
    assert_refused(enter(&b, KEY, "south", pb, exp, 20).await, "replay");
    assert_refused(
        customers_as(&b, "south").await,
        "a refused seal leaves none",
    );
    assert_refused(enter(&b, KEY, "south", pb, exp, 19).await, "an older nonce");
    // expired, or too far ahead
    assert_refused(
        enter(&a, KEY, "south", pa, exp - 120, 30).await,
        "an expired seal",
    );
    assert_refused(
        enter(&a, KEY, "south", pa, exp + 3600, 31).await,
        "a seal valid for an hour",
    );
    // a key the database does not have, a wrong MAC
    assert_refused(
        enter(&a, KEY2, "south", pa, exp, 32).await,
        "an unknown key",
    );
    let id = rlsgate::seal::key_id(KEY);
    assert_refused(
        a.execute(
            "SELECT rlsgate.enter('south', $1, 33, $2, '\\x00'::bytea)",
            &[&exp, &id],
        )
        .await,
        "a made-up MAC",
    );
    // the seal itself
    assert_refused(
        a.simple_query("SELECT setval('rlsgate.seal', 1)").await,
        "setval",
    );
    assert_refused(
        a.simple_query("SELECT nextval('rlsgate.seal')").await,
        "nextval",
    );
    assert_refused(
        a.simple_query("ALTER SEQUENCE rlsgate.seal RESTART").await,
        "ALTER SEQUENCE",
    );
    // a rolled-back seal still counts as refused (setval is not transactional)
    enter(&a, KEY, "north", pa, exp, 40).await.expect("reseal");
    a.simple_query("BEGIN").await.expect("begin");
    assert_refused(
        enter(&a, KEY, "south", pb, exp, 41).await,
        "a bad seal in a block",
    );
    a.simple_query("ROLLBACK").await.expect("rollback");
    assert_refused(
        customers_as(&a, "north").await,
        "the bad seal invalidated it",
    );
    // DISCARD clears it
    enter(&a, KEY, "north", pa, exp, 50).await.expect("reseal");
    a.simple_query("DISCARD SEQUENCES").await.expect("discard");
    assert!(customers_as(&a, "north").await.is_err(), "after DISCARD");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_verifier_are_out_of_reach() {
    let db = database(true);
    let a = direct(&db).await;
    for sql in [
        "SELECT * FROM rlsgate.keys",
        "SELECT * FROM rlsgate.backend_nonce",
        "DELETE FROM rlsgate.backend_nonce",
        "SELECT rlsgate.install_key('attacker-chosen-key-0123456789abcdef')",
        "SELECT rlsgate.remove_key('k0000000000000000')",
        "INSERT INTO rlsgate.keys VALUES ('kx', '\\x00', '\\x00')",
        "CREATE OR REPLACE FUNCTION rlsgate.tenant() RETURNS text LANGUAGE sql AS $$ SELECT 'south' $$",
        "ALTER FUNCTION rlsgate.tenant() RENAME TO old_tenant",
        "ALTER FUNCTION rlsgate.enter(text, bigint, bigint, text, bytea) SECURITY INVOKER",
        "DROP FUNCTION rlsgate.tenant()",
        "CREATE FUNCTION rlsgate.other() RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$",
        "ALTER POLICY tenant_isolation ON customers USING (true)",
        "ALTER TABLE customers DISABLE ROW LEVEL SECURITY",
        "SET ROLE rlsgate_owner",
        "SET SESSION AUTHORIZATION rlsgate_owner",
        "GRANT rlsgate_owner TO rlsgate_app",
    ] {
        let e = a.simple_query(sql).await.expect_err(sql);
        assert!(
            ["42501", "42P01"].contains(&code(&e).as_str()),
            "{sql}: {e}"
        );
    }
    // the function sources (readable by anyone) hold no key
    let sources: String = a
        .query_one(
            "SELECT string_agg(prosrc, ' ') FROM pg_proc WHERE pronamespace = 'rlsgate'::regnamespace",
            &[],
        )
        .await
        .expect("sources")
        .get(0);
    assert!(!sources.contains(KEY) && sources.contains("rlsgate-seal-v1"));
    // row_security off cannot skip the policies: an error instead of rows
    a.simple_query("SET row_security = off").await.expect("set");
    assert!(count_customers(&a).await.is_err());
}

/// The verifier is compiled with the search_path of the session's first call (no SET clause:
/// that would cost every call), so every name in it is schema-qualified. Shadows of each name
/// and operator it uses, ahead of pg_catalog and made before its first call, change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_shadowing_changes_nothing() {
    let db = database(true);
    admin_sql(
        &db,
        "CREATE SCHEMA shadow AUTHORIZATION rlsgate_app; GRANT CREATE ON SCHEMA public TO rlsgate_app",
    );
    let a = direct(&db).await;
    let pa = pid(&a).await;
    enter(&a, KEY, "north", pa, in_a_minute(), 1)
        .await
        .expect("seal");
    for sql in [
        "CREATE FUNCTION shadow.current_setting(text, boolean) RETURNS text LANGUAGE sql AS $$ SELECT 'north' $$",
        "CREATE FUNCTION shadow.current_setting(text) RETURNS text LANGUAGE sql AS $$ SELECT 'north' $$",
        "CREATE FUNCTION shadow.sha256(bytea) RETURNS bytea LANGUAGE sql AS $$ SELECT pg_catalog.sha256('north'::bytea) $$",
        "CREATE FUNCTION shadow.currval(regclass) RETURNS bigint LANGUAGE sql AS $$ SELECT 0::bigint $$",
        "CREATE FUNCTION shadow.int8send(bigint) RETURNS bytea LANGUAGE sql AS $$ SELECT '\\x00'::bytea $$",
        "CREATE FUNCTION shadow.convert_to(text, name) RETURNS bytea LANGUAGE sql AS $$ SELECT 'north'::bytea $$",
        "CREATE FUNCTION shadow.substr(bytea, int, int) RETURNS bytea LANGUAGE sql AS $$ SELECT $1 $$",
        "CREATE FUNCTION shadow.yes(bytea, bytea) RETURNS boolean LANGUAGE sql AS $$ SELECT true $$",
        "CREATE OPERATOR shadow.= (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = shadow.yes)",
        "CREATE OPERATOR public.= (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = shadow.yes)",
        "CREATE FUNCTION shadow.cat(bytea, bytea) RETURNS bytea LANGUAGE sql AS $$ SELECT $2 $$",
        "CREATE OPERATOR shadow.|| (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = shadow.cat)",
        "CREATE TEMP TABLE seal (last_value bigint)",
        "CREATE FUNCTION pg_temp.current_setting(text, boolean) RETURNS text LANGUAGE sql AS $$ SELECT 'north' $$",
    ] {
        a.simple_query(sql).await.expect(sql);
    }
    for path in [
        "shadow, public, pg_catalog",
        "pg_temp, shadow, pg_catalog, public",
        "public, shadow",
    ] {
        a.simple_query(&format!("SET search_path = {path}"))
            .await
            .expect("search_path");
        assert_refused(
            customers_as(&a, "south").await,
            &format!("forged under search_path {path}"),
        );
        let own: i64 = a
            .query_one(
                "SELECT pg_catalog.set_config('app.current_store_id', 'north', false), (SELECT pg_catalog.count(*) FROM public.customers)",
                &[],
            )
            .await
            .expect("own rows")
            .get(1);
        assert_eq!(own, 3, "own tenant under search_path {path}");
    }
}

// ---------------------------------------------------------------------------------------------
// rlsgate check
// ---------------------------------------------------------------------------------------------

async fn signed_check(db: &str) -> rlsgate::doctor::Report {
    let config =
        rlsgate::config::Config::from_toml(&proxy_config(db, true, false, 1)).expect("config");
    rlsgate::doctor::run(&config).await.expect("checks run")
}

fn signed_findings(report: &rlsgate::doctor::Report) -> Vec<String> {
    report
        .findings
        .iter()
        .filter(|f| f.check.starts_with("signed-"))
        .map(|f| format!("{} {}", f.check, f.object))
        .collect()
}

/// `rlsgate check` accepts sql/hardened.sql as installed, names each thing that breaks it, and
/// says what to run when it is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_verifies_the_hardened_setup() {
    let db = database(true);
    let report = signed_check(&db).await;
    assert!(
        signed_findings(&report).is_empty() && report.criticals() == 0,
        "{}",
        report.render_text(false)
    );

    // the database side missing altogether
    let plain = database(false);
    let report = signed_check(&plain).await;
    let missing = report.by_check("signed-setup-missing");
    assert!(
        !missing.is_empty() && missing[0].fix.contains("hardened.sql"),
        "{}",
        report.render_text(false)
    );

    // each way of breaking it
    admin_sql(
        &db,
        "ALTER FUNCTION rlsgate.enter(text, bigint, bigint, text, bytea) SECURITY INVOKER;
         GRANT SELECT ON rlsgate.keys TO rlsgate_app;
         GRANT UPDATE ON SEQUENCE rlsgate.seal TO rlsgate_app;
         GRANT EXECUTE ON FUNCTION rlsgate.install_key(text) TO rlsgate_app;
         ALTER POLICY tenant_isolation ON customers
             USING (store_id = current_setting('app.current_store_id', true));
         CREATE OR REPLACE FUNCTION rlsgate.tenant() RETURNS text LANGUAGE sql STABLE
             AS $$ SELECT current_setting('app.current_store_id', true) $$;
         SELECT rlsgate.remove_key(rlsgate.key_id('hardened-test-signing-key-0123456789abcdef'));",
    );
    let report = signed_check(&db).await;
    let found = signed_findings(&report);
    for want in [
        "signed-verifier-unsafe function rlsgate.enter",
        "signed-key-reachable rlsgate.keys",
        "signed-key-reachable rlsgate.seal",
        "signed-key-reachable function rlsgate.install_key",
        "signed-policy-unverified policy tenant_isolation on public.customers",
        "signed-tenant-function function rlsgate.tenant",
        "signed-key-missing signing keys",
    ] {
        assert!(
            found.iter().any(|f| f.starts_with(want)),
            "{want} not in {found:#?}"
        );
    }
    // the owner within reach of the application role
    admin_sql(&db, "GRANT rlsgate_owner TO rlsgate_app");
    let report = signed_check(&db).await;
    admin_sql(&db, "REVOKE rlsgate_owner FROM rlsgate_app");
    assert!(
        !report.by_check("signed-owner-reachable").is_empty(),
        "{}",
        report.render_text(false)
    );
}

/// Signed mode: a client gets an idle connection already sealed for its tenant when there is
/// one, rather than the most recently used one (which would have to be sealed again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_sealed_for_the_tenant_are_preferred() {
    let db = database(true);
    let proxy = start_proxy_with(&db, &proxy_config(&db, true, false, 2)).await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    // south's connection goes back first, north's last (the top of the idle stack)
    north.simple_query("BEGIN").await.expect("begin");
    assert_eq!(count_customers(&north).await.expect("north"), 3);
    assert_eq!(count_customers(&south).await.expect("south"), 2);
    north.simple_query("COMMIT").await.expect("commit");
    let sealed = nonces(&db);
    for _ in 0..5 {
        assert_eq!(count_customers(&south).await.expect("south"), 2);
        assert_eq!(count_customers(&north).await.expect("north"), 3);
    }
    assert_eq!(nonces(&db), sealed, "a connection was sealed again");
    proxy.stop().await;
}

/// A seal the database refuses (here: its key removed after the connection was opened) ends the
/// session with the reason, and the connection is closed rather than handed to anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_seal_ends_the_session_and_closes_the_connection() {
    let db = database(true);
    let proxy = start_proxy_with(&db, &proxy_config(&db, true, false, 1)).await;
    let north = client(&proxy, "north").await;
    assert_eq!(count_customers(&north).await.expect("north"), 3);
    drop(north);
    let id = rlsgate::seal::key_id(KEY);
    admin_sql(&db, &format!("SELECT rlsgate.remove_key('{id}')"));
    // south needs a seal of its own: refused by the database
    let e = match connect(&proxy, &token("south")).await {
        Ok(c) => count_customers(&c).await.expect_err("refused seal"),
        Err(e) => e,
    };
    assert_eq!(code(&e), "XX000", "{e:?}");
    let detail = format!("{e:?}");
    assert!(detail.contains("is not installed"), "{detail}");
    // the key back: the next client gets a working connection (a new one: the refused one was
    // closed, its block never committed)
    install_key(&db, KEY);
    let south = client(&proxy, "south").await;
    assert_eq!(count_customers(&south).await.expect("south"), 2);
    let backends = admin_sql(
        &db,
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'rlsgate_app' AND state = 'idle in transaction (aborted)'",
    );
    assert_eq!(backends, "0");
    proxy.stop().await;
}
