//! transaction_wrap must be invisible to clients: the same client scripts against a plain proxy
//! and a wrapping proxy (same database, pool of 1) produce identical message streams; and every
//! statement of a wrapped autocommit unit runs in one transaction with the tenant setting.

mod support;

use support::*;

/// One step of a client script.
#[derive(Clone, Copy)]
enum Step {
    Q(&'static str),
    /// Parse (unnamed or named) + Bind + Execute, no Sync
    Pbe(&'static str, &'static str),
    /// Bind + Execute of a named statement
    Be(&'static str),
    /// Parse + Describe statement, no Sync
    Pd(&'static str, &'static str),
    Flush,
    Sync,
}
use Step::*;

/// Scripts; each ends when as many ReadyForQuery as Q/Sync steps have arrived.
const SCRIPTS: &[&[Step]] = &[
    &[Q("SELECT count(*) FROM customers")],
    &[Q(
        "SELECT store_id, name FROM customers ORDER BY 2; SELECT count(*) FROM products",
    )],
    &[Q("SELECT 1/0")],
    &[Q("SELECT 1; SELECT 1/0; SELECT 2")],
    &[Q("")],
    &[Q("-- only a comment")],
    &[
        Q("BEGIN"),
        Q("SELECT count(*) FROM products"),
        Q("SELECT 1/0"),
        Q("SELECT 1"),
        Q("ROLLBACK"),
    ],
    &[Q(
        "BEGIN; SELECT count(*) FROM customers; COMMIT; SELECT count(*) FROM products",
    )],
    &[Q("SELECT 1; COMMIT; SELECT 2")],
    &[
        Q("START TRANSACTION READ ONLY"),
        Q("SELECT current_setting('app.current_store_id')"),
        Q("COMMIT"),
    ],
    &[Q("BEGIN; SELECT 1/0; COMMIT"), Q("ROLLBACK")],
    &[
        Q("BEGIN"),
        Q("SAVEPOINT s1"),
        Q("SELECT 1/0"),
        Q("ROLLBACK TO SAVEPOINT s1"),
        Q("SELECT 1"),
        Q("COMMIT"),
    ],
    &[Q("COMMIT")],
    &[Q("ROLLBACK")],
    &[Q("SAVEPOINT outside")],
    &[Q("SET LOCAL statement_timeout = 1000")],
    &[Q("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")],
    &[
        Q("SET statement_timeout = '5s'"),
        Q("SHOW statement_timeout"),
        Q("RESET statement_timeout"),
    ],
    &[Q("SET TimeZone = 'Asia/Tokyo'"), Q("RESET TimeZone")],
    &[
        Q("INSERT INTO customers (store_id, name) VALUES ('north', 'x'); SELECT 1/0"),
        Q("SELECT count(*) FROM customers"),
    ],
    &[Q(
        "INSERT INTO customers (store_id, name) VALUES ('south', 'x')",
    )],
    &[Q("SELECT current_setting('app.current_store_id')")],
    &[Q("SET app.current_store_id = 'south'")],
    &[
        Q("BEGIN"),
        Q("SET app.current_store_id = 'south'"),
        Q("SELECT 1"),
        Q("ROLLBACK"),
    ],
    &[Q("VACUUM customers")],
    &[Q(
        "COPY (SELECT store_id FROM customers ORDER BY 1) TO STDOUT",
    )],
    &[Q("DO $$ BEGIN RAISE NOTICE 'x'; END $$")],
    &[Q("SELECT pg_sleep(0)"), Q("SELECT 42")],
    &[Pbe("", "SELECT count(*) FROM customers"), Sync],
    &[
        Pbe("", "SELECT 1/(SELECT 0)"),
        Pbe("", "SELECT 2"),
        Sync,
        Pbe("", "SELECT 3"),
        Sync,
    ],
    &[
        Pbe("", "SELECT 1"),
        Sync,
        Pbe("", "SELECT 2"),
        Sync,
        Pbe("", "SELECT count(*) FROM products"),
        Sync,
    ],
    &[
        Pbe("s1", "SELECT count(*) FROM customers"),
        Sync,
        Be("s1"),
        Sync,
        Be("s1"),
        Sync,
    ],
    &[
        Pbe("", "BEGIN"),
        Pbe("", "SELECT count(*) FROM customers"),
        Sync,
        Q("COMMIT"),
    ],
    &[
        Pbe("", "SELECT 1/(SELECT 0)"),
        Flush,
        Pbe("", "SELECT 2"),
        Sync,
    ],
    &[Pd("s2", "SELECT $1::int + 1"), Sync],
    &[Pbe("", "SAVEPOINT outside"), Sync],
    &[
        Pbe(
            "",
            "INSERT INTO customers (store_id, name) VALUES ('north', 'y')",
        ),
        Pbe("", "SELECT 1/(SELECT 0)"),
        Sync,
        Q("SELECT count(*) FROM customers"),
    ],
    &[
        Q("BEGIN"),
        Pbe("", "SELECT count(*) FROM customers"),
        Sync,
        Q("COMMIT"),
    ],
];

async fn run_script(c: &mut RawClient, script: &[Step]) -> Vec<Msg> {
    let mut readies = 0;
    for step in script {
        match *step {
            Q(sql) => {
                c.query(sql).await;
                readies += 1;
            }
            Pbe(name, sql) => {
                c.parse(name, sql).await;
                c.bind("", name).await;
                c.execute("").await;
            }
            Be(name) => {
                c.bind("", name).await;
                c.execute("").await;
            }
            Pd(name, sql) => {
                c.parse(name, sql).await;
                c.send(b'D', &[b"S", name.as_bytes(), b"\0"].concat()).await;
            }
            Flush => c.send(b'H', &[]).await,
            Sync => {
                c.sync().await;
                readies += 1;
            }
        }
    }
    let mut out = Vec::new();
    for _ in 0..readies {
        out.extend(c.until_ready().await);
    }
    out
}

/// Errors and notices without the server's source location (file, line, routine): the same
/// message can come from another line of xact.c inside and outside an explicit block.
fn normalized(msgs: &[Msg]) -> Vec<Msg> {
    msgs.iter()
        .map(|m| match m.tag {
            'E' | 'N' => {
                let fields: Vec<&[u8]> = m
                    .body
                    .split(|&b| b == 0)
                    .filter(|f| !f.is_empty() && !matches!(f[0], b'F' | b'L' | b'R'))
                    .collect();
                Msg {
                    tag: m.tag,
                    body: fields.join(&0u8),
                }
            }
            _ => m.clone(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapping_is_invisible_to_clients() {
    let db = demo_db();
    let plain = start_proxy_with(&db, &config_text(&db, 1, "")).await;
    let wrap_cfg =
        config_text(&db, 1, "").replace("transaction_wrap = false", "transaction_wrap = true");
    assert!(wrap_cfg.contains("transaction_wrap = true"));
    let wrap = start_proxy_with(&db, &wrap_cfg).await;
    let tok = token("north");
    for (i, script) in SCRIPTS.iter().enumerate() {
        // a fresh session each, so session state of one script cannot influence the next
        let mut a = RawClient::connect(&plain, &tok).await;
        let mut b = RawClient::connect(&wrap, &tok).await;
        let plain_msgs = run_script(&mut a, script).await;
        let wrap_msgs = run_script(&mut b, script).await;
        assert_eq!(
            tags(&plain_msgs),
            tags(&wrap_msgs),
            "script {i}: message kinds differ\nplain: {plain_msgs:?}\nwrap:  {wrap_msgs:?}"
        );
        assert_eq!(
            normalized(&plain_msgs),
            normalized(&wrap_msgs),
            "script {i}: message contents differ"
        );
    }
    plain.stop().await;
    wrap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wrapped_statement_runs_in_one_block_with_the_tenant_setting() {
    let db = demo_db();
    let cfg =
        config_text(&db, 1, "").replace("transaction_wrap = false", "transaction_wrap = true");
    let proxy = start_proxy_with(&db, &cfg).await;
    let c = client(&proxy, "south").await;
    let probe =
        "SELECT current_setting('app.current_store_id') || ' ' || transaction_timestamp()::text";
    // simple protocol: three statements of one autocommit Query
    let msgs = c
        .simple_query(&format!("{probe}; SELECT pg_sleep(0.01); {probe}; {probe}"))
        .await
        .unwrap();
    let rows: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r)
                if r.get(0).is_some_and(|v| v.starts_with("south")) =>
            {
                r.get(0).map(str::to_string)
            }
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        rows.iter().all(|r| *r == rows[0]),
        "one transaction, one timestamp: {rows:?}"
    );
    // extended protocol: several Executes before one Sync form one autocommit unit
    let mut raw = RawClient::connect(&proxy, &token("north")).await;
    raw.parse("", probe).await;
    raw.bind("", "").await;
    raw.execute("").await;
    raw.parse("", "SELECT pg_sleep(0.01)").await;
    raw.bind("", "").await;
    raw.execute("").await;
    raw.parse("", probe).await;
    raw.bind("", "").await;
    raw.execute("").await;
    raw.sync().await;
    let msgs = raw.until_ready().await;
    let values: Vec<String> = msgs
        .iter()
        .filter(|m| m.tag == 'D')
        .map(|m| String::from_utf8_lossy(&m.body[6..]).to_string())
        .filter(|v| v.starts_with("north"))
        .collect();
    assert_eq!(values.len(), 2, "{msgs:?}");
    assert_eq!(values[0], values[1]);
    assert_eq!(
        msgs.last().map(|m| m.body.clone()),
        Some(b"I".to_vec()),
        "the client sees an idle connection"
    );
    // and each autocommit unit is its own transaction
    let a: String = c.query_one(probe, &[]).await.unwrap().get(0);
    let b: String = c.query_one(probe, &[]).await.unwrap().get(0);
    assert_ne!(a, b);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_wrapped_units_each_get_the_context() {
    // The client's Sync arrives after the server has already answered rlsgate's BEGIN: that
    // answer must not make the proxy think the next units are inside a transaction.
    let db = demo_db();
    let cfg =
        config_text(&db, 1, "").replace("transaction_wrap = false", "transaction_wrap = true");
    let proxy = start_proxy_with(&db, &cfg).await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    let probe =
        "SELECT current_setting('app.current_store_id') || (SELECT count(*) FROM products)::text";
    for _ in 0..4 {
        c.parse("", probe).await;
        c.bind("", "").await;
        c.execute("").await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        c.sync().await;
    }
    for unit in 0..4 {
        let msgs = c.until_ready().await;
        let row = msgs.iter().find(|m| m.tag == 'D').expect("a row");
        assert_eq!(
            String::from_utf8_lossy(&row.body[6..]),
            "north4",
            "unit {unit}"
        );
    }
    proxy.stop().await;
}
