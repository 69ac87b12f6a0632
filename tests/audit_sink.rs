//! The audit sink against a real throwaway Postgres: batched inserts with every field, a full
//! queue that drops instead of blocking, reconnection, the writer role's privileges, the log line,
//! and statement fingerprints.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rlsgate::audit::{Audit, AuditEvent, SinkConfig, fingerprint};
use rlsgate::embedded_pg::{EmbeddedOptions, EmbeddedPg};
use tokio_util::sync::CancellationToken;

const AUDIT_SQL: &str = include_str!("../sql/audit.sql");
const WRITER_PASSWORD: &str = "audit-writer-password-for-tests";

static PG: OnceLock<EmbeddedPg> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);
/// `sql/audit.sql` creates a cluster-wide role: one loader at a time.
static LOAD: Mutex<()> = Mutex::new(());

fn pg() -> &'static EmbeddedPg {
    PG.get_or_init(|| EmbeddedPg::start(EmbeddedOptions::default()).expect("start PostgreSQL"))
}

fn new_db_name() -> String {
    let n = NEXT_DB.fetch_add(1, Ordering::Relaxed);
    format!("audit_{}_{n}", std::process::id())
}

/// Runs SQL as the superuser (blocking `psql`, off the runtime's worker threads).
async fn sql(db: &str, text: &str) -> String {
    let (db, text) = (db.to_string(), text.to_string());
    tokio::task::spawn_blocking(move || pg().psql(&db, &text))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("psql failed: {e}"))
}

/// Creates `db`, loads `sql/audit.sql` (twice: it must be idempotent) and sets the writer's password.
async fn load_audit_db(db: &str) {
    let db = db.to_string();
    tokio::task::spawn_blocking(move || {
        let pg = pg();
        pg.create_database(&db).expect("create database");
        let _one_at_a_time = LOAD.lock().unwrap_or_else(|e| e.into_inner());
        pg.psql(&db, AUDIT_SQL).expect("load sql/audit.sql");
        pg.psql(&db, AUDIT_SQL).expect("load sql/audit.sql again");
        let pw = format!("ALTER ROLE rlsgate_audit_writer PASSWORD '{WRITER_PASSWORD}'");
        pg.psql("postgres", &pw).expect("set the writer's password");
    })
    .await
    .unwrap();
}

fn sink_config(db: &str, port: u16) -> SinkConfig {
    SinkConfig {
        connection: format!(
            "host=127.0.0.1 port={port} user=rlsgate_audit_writer password={WRITER_PASSWORD} dbname={db}"
        ),
        flush_interval: Duration::from_millis(200),
        ..SinkConfig::default()
    }
}

/// Polls `cond` every 20 ms until it holds, panicking after `secs` seconds.
async fn wait_until(secs: u64, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn denied(jti: &str) -> AuditEvent {
    AuditEvent::StatementDenied {
        peer: "127.0.0.1:5555".into(),
        user: "alice".into(),
        tenant: "north".into(),
        rule: "protected_setting".into(),
        fingerprint: jti.into(),
    }
}

fn one_of_each() -> Vec<AuditEvent> {
    let s = |v: &str| v.to_string();
    vec![
        AuditEvent::LoginOk {
            peer: s("10.0.0.1:40000"),
            user: s("alice"),
            tenant: s("north"),
            kid: Some(s("key-1")),
            jti: Some(s("jti-1")),
            subject: Some(s("alice@example.com")),
        },
        AuditEvent::LoginFailed {
            peer: s("10.0.0.2:40001"),
            user: None,
            reason: s("token expired"),
            kid: None,
            jti: Some(s("jti-2")),
        },
        AuditEvent::LoginThrottled {
            peer: s("10.0.0.3:40002"),
        },
        AuditEvent::StatementDenied {
            peer: s("10.0.0.1:40000"),
            user: s("alice"),
            tenant: s("north"),
            rule: s("protected_setting"),
            fingerprint: fingerprint("SET app.current_store_id = 'south'"),
        },
        AuditEvent::TokenExpired {
            peer: s("10.0.0.1:40000"),
            user: s("alice"),
            tenant: s("north"),
            jti: Some(s("jti-1")),
        },
        AuditEvent::Reauth {
            peer: s("10.0.0.1:40000"),
            user: s("alice"),
            tenant: s("north"),
            ok: true,
            reason: None,
        },
        AuditEvent::Reauth {
            peer: s("10.0.0.1:40000"),
            user: s("alice"),
            tenant: s("north"),
            ok: false,
            reason: Some(s("tenant changed")),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_written_in_batches_and_every_field_lands_in_the_table() {
    let db = new_db_name();
    load_audit_db(&db).await;
    let stop = CancellationToken::new();
    let cfg = SinkConfig {
        batch: 3,
        ..sink_config(&db, pg().port())
    };
    let (audit, task) = Audit::with_sink(cfg, stop.clone());
    for event in one_of_each() {
        audit.record(event);
    }
    wait_until(10, "7 events are written", || audit.written() == 7).await;
    assert_eq!(audit.dropped(), 0);

    let rows = sql(
        &db,
        "SELECT event, coalesce(peer, '-'), coalesce(username, '-'), coalesce(tenant, '-'), detail::text,
                at > now() - interval '1 minute' AND at <= now()
         FROM rlsgate_audit.events ORDER BY id",
    )
    .await;
    let fp = fingerprint("SET app.current_store_id = 'south'");
    let expected = [
        r#"login_ok|10.0.0.1:40000|alice|north|{"jti": "jti-1", "kid": "key-1", "subject": "alice@example.com"}|t"#.to_string(),
        r#"login_failed|10.0.0.2:40001|-|-|{"jti": "jti-2", "kid": null, "reason": "token expired"}|t"#.to_string(),
        r#"login_throttled|10.0.0.3:40002|-|-|{}|t"#.to_string(),
        format!(r#"statement_denied|10.0.0.1:40000|alice|north|{{"rule": "protected_setting", "fingerprint": "{fp}"}}|t"#),
        r#"token_expired|10.0.0.1:40000|alice|north|{"jti": "jti-1"}|t"#.to_string(),
        r#"reauth|10.0.0.1:40000|alice|north|{"ok": true, "reason": null}|t"#.to_string(),
        r#"reauth|10.0.0.1:40000|alice|north|{"ok": false, "reason": "tenant changed"}|t"#.to_string(),
    ];
    assert_eq!(rows.lines().collect::<Vec<_>>(), expected);

    // Rows inserted by one INSERT share a transaction id: 7 events in batches of 3 are 3 INSERTs.
    let batches = sql(
        &db,
        "SELECT string_agg(n::text, ',' ORDER BY first) FROM
           (SELECT min(id) AS first, count(*) AS n FROM rlsgate_audit.events GROUP BY xmin::text) b",
    )
    .await;
    assert_eq!(batches.trim(), "3,3,1");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("writer stops")
        .unwrap();
    audit.record(denied("after-stop"));
    assert_eq!(
        (audit.written(), audit.dropped()),
        (7, 1),
        "recorded after stop: dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_and_counts_instead_of_blocking() {
    // A port nobody listens on: every connection attempt fails at once.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stop = CancellationToken::new();
    let cfg = SinkConfig {
        queue: 4,
        batch: 2,
        ..sink_config("nowhere", closed_port)
    };
    let (audit, task) = Audit::with_sink(cfg, stop.clone());
    let started = Instant::now();
    for i in 0..10_000 {
        audit.record(denied(&format!("e{i}")));
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "record must not wait: 10 000 events took {took:?}"
    );
    assert!(
        audit.dropped() >= 10_000 - 4 - 2 * 2,
        "dropped only {}",
        audit.dropped()
    );
    assert_eq!(audit.written(), 0);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("writer stops within ~2 s")
        .unwrap();
    assert_eq!(
        audit.dropped(),
        10_000,
        "every event is accounted for once the writer has stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_reconnects_after_its_backend_is_terminated() {
    let db = new_db_name();
    load_audit_db(&db).await;
    let stop = CancellationToken::new();
    let (audit, task) = Audit::with_sink(sink_config(&db, pg().port()), stop.clone());
    audit.record(denied("before"));
    wait_until(10, "the first event is written", || audit.written() == 1).await;

    let pid_sql = format!(
        "SELECT pid FROM pg_stat_activity WHERE usename = 'rlsgate_audit_writer' AND datname = '{db}'"
    );
    let first_pid = sql("postgres", &pid_sql).await;
    assert_eq!(
        first_pid.lines().count(),
        1,
        "one writer connection: {first_pid:?}"
    );
    let killed = sql(
        "postgres",
        &format!("SELECT pg_terminate_backend({})", first_pid.trim()),
    )
    .await;
    assert_eq!(killed.trim(), "t");

    // The next batch may be lost (counted) if the writer has not noticed yet; later ones arrive.
    audit.record(denied("during"));
    wait_until(10, "the second event is settled", || {
        audit.written() + audit.dropped() == 2
    })
    .await;
    audit.record(denied("after"));
    wait_until(10, "the third event is settled", || {
        audit.written() + audit.dropped() == 3
    })
    .await;
    let after = sql(
        &db,
        "SELECT count(*) FROM rlsgate_audit.events WHERE detail->>'fingerprint' = 'after'",
    )
    .await;
    assert_eq!(
        after.trim(),
        "1",
        "written {}, dropped {}",
        audit.written(),
        audit.dropped()
    );
    let second_pid = sql("postgres", &pid_sql).await;
    assert_ne!(second_pid, first_pid, "a new connection");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("writer stops")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_keeps_retrying_until_the_database_exists() {
    let db = new_db_name();
    let stop = CancellationToken::new();
    let (audit, task) = Audit::with_sink(sink_config(&db, pg().port()), stop.clone());
    let audit = Arc::new(audit);
    let producer = {
        let audit = Arc::clone(&audit);
        tokio::spawn(async move {
            for i in 0.. {
                audit.record(denied(&format!("e{i}")));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    wait_until(10, "the missing database causes drops", || {
        audit.dropped() > 0
    })
    .await;
    assert_eq!(audit.written(), 0);
    load_audit_db(&db).await;
    wait_until(20, "events are written once the database exists", || {
        audit.written() > 0
    })
    .await;
    producer.abort();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("writer stops")
        .unwrap();
    let count = sql(&db, "SELECT count(*) FROM rlsgate_audit.events").await;
    assert_eq!(count.trim().parse::<u64>().unwrap(), audit.written());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_role_can_insert_but_not_read_change_or_delete() {
    let db = new_db_name();
    load_audit_db(&db).await;
    let as_writer = |stmt: &str| format!("SET ROLE rlsgate_audit_writer; {stmt}");
    let ok = sql(
        &db,
        &as_writer("INSERT INTO rlsgate_audit.events (at, event) VALUES (now(), 'x') RETURNING 1"),
    )
    .await;
    assert_eq!(ok.trim(), "1");
    for stmt in [
        "SELECT count(*) FROM rlsgate_audit.events",
        "UPDATE rlsgate_audit.events SET event = 'y'",
        "DELETE FROM rlsgate_audit.events",
        "TRUNCATE rlsgate_audit.events",
    ] {
        let (db, text) = (db.clone(), as_writer(stmt));
        let res = tokio::task::spawn_blocking(move || pg().psql(&db, &text))
            .await
            .unwrap();
        let err = res.expect_err(stmt).to_string();
        assert!(err.contains("permission denied"), "{stmt}: {err}");
    }
    // Any other role (like the proxy's tenant role) cannot even reach the schema.
    sql(&db, "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'audit_test_tenant') THEN CREATE ROLE audit_test_tenant; END IF; END $$").await;
    let (db2, text) = (
        db.clone(),
        "SET ROLE audit_test_tenant; SELECT 1 FROM rlsgate_audit.events".to_string(),
    );
    let res = tokio::task::spawn_blocking(move || pg().psql(&db2, &text))
        .await
        .unwrap();
    let err = res.expect_err("tenant role reads audit").to_string();
    assert!(
        err.contains("permission denied for schema rlsgate_audit"),
        "{err}"
    );
}

#[test]
fn the_sink_table_name_is_validated() {
    let with = |table: &str| SinkConfig {
        table: table.into(),
        ..SinkConfig::new("host=127.0.0.1")
    };
    assert!(with("rlsgate_audit.events").validate().is_ok());
    assert!(with("events_2").validate().is_ok());
    for bad in [
        "",
        "a.b.c",
        "Events",
        "x; drop table t",
        "1abc",
        "a.",
        "\"a\".b",
        "a".repeat(64).as_str(),
    ] {
        assert!(with(bad).validate().is_err(), "{bad:?} accepted");
    }
    assert!(
        SinkConfig::new("host=127.0.0.1 bogus_option=1")
            .validate()
            .is_err()
    );
    assert!(SinkConfig::default().validate().is_err(), "no host");
}

/// Collects what a `tracing_subscriber` writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn every_event_is_one_log_line_with_structured_fields_and_json() {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .finish();
    let audit = Audit::log_only();
    tracing::subscriber::with_default(subscriber, || {
        for event in one_of_each() {
            audit.record(event);
        }
    });
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7, "{text}");
    assert!(
        lines
            .iter()
            .all(|l| l["target"] == "rlsgate::audit" && l["level"] == "INFO")
    );
    let login = &lines[0]["fields"];
    assert_eq!(login["event"], "login_ok");
    assert_eq!(login["tenant"], "north");
    assert_eq!(login["kid"], "key-1");
    let json: serde_json::Value = serde_json::from_str(login["audit"].as_str().unwrap()).unwrap();
    assert_eq!(json["event"], "login_ok");
    assert_eq!(json["subject"], "alice@example.com");
    assert_eq!(lines[6]["fields"]["ok"], false);
    assert!(
        lines[1]["fields"].get("user").is_none(),
        "absent fields are not logged"
    );
    assert_eq!((audit.written(), audit.dropped()), (0, 0));
}

#[test]
fn fingerprint_is_stable_across_literals_and_never_contains_them() {
    let is_short_hex = |f: &str| f.len() == 16 && f.bytes().all(|b| b.is_ascii_hexdigit());
    let same = |a: &str, b: &str| {
        let (fa, fb) = (fingerprint(a), fingerprint(b));
        assert!(is_short_hex(&fa), "{a:?} → {fa:?}");
        assert_eq!(fa, fb, "{a:?} vs {b:?}");
        assert_eq!(fa, fingerprint(a), "deterministic");
        fa
    };
    // Statements that parse: libpg_query's fingerprint.
    let select = same(
        "SELECT * FROM customers WHERE email = 'alice@example.com' AND id = 42",
        "select *  from customers where email = 'bob.smith@example.org' and id = 7",
    );
    same(
        "SET app.current_store_id = 'north'",
        "SET app.current_store_id TO 'south'",
    );
    same(
        "SELECT set_config('app.current_store_id', 'north', false)",
        "SELECT set_config('app.current_store_id', 'zzz', true)",
    );
    assert_ne!(
        select,
        fingerprint("SELECT * FROM products WHERE email = 'x' AND id = 1")
    );

    // Text that does not parse: a hash of the tokens with constants and comments removed.
    let broken = same(
        "SELEC * FROM customers WHERE ssn = 'Zanzibar-123' /* ticket 99 */ LIMIT 10",
        "selec * from customers where ssn = E'Quixotic\\'s' -- note\n LIMIT 5",
    );
    assert_ne!(broken, select);
    assert_ne!(
        broken,
        fingerprint("SELEC * FROM products WHERE ssn = 'x' LIMIT 1")
    );
    same("SELEC $tag$ Kryptonite $tag$", "SELEC $$ Whatever $$");
    // Text that does not even lex (unterminated quote): the words before the quote.
    same(
        "SELECT * FROM t WHERE name = 'Unterminated secret",
        "SELECT * FROM t WHERE name = 'other",
    );
    same("SELEC 1 \0 nul", "SELEC 2 \0 nul");
}
