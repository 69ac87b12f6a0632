//! Pipelined extended-protocol units that end a transaction before their Sync (psycopg 3
//! pipeline mode and the like): every statement after the end runs in a new transaction on the
//! server, and it must run with the tenant context again — never with whatever the connection
//! holds. Also the neighbours of that path: statements that cannot run in a transaction block,
//! portals bound in one unit and executed in another, simple Queries inside an open unit, and
//! COMMIT/ROLLBACK AND CHAIN (the chained transaction starts without local settings).

mod support;

use support::*;

/// The tenant the statement runs for, and the rows it can see (north 3, south 2, east 1).
const PROBE: &str = "SELECT current_setting('app.current_store_id', true), count(*) FROM customers";

/// Statements that end the transaction they run in.
const ENDINGS: &[&str] = &[
    "COMMIT",
    "ROLLBACK",
    "END",
    "ABORT",
    "COMMIT AND CHAIN",
    "ROLLBACK AND CHAIN",
];

fn chains(end: &str) -> bool {
    end.ends_with("AND CHAIN")
}

/// Text values of the DataRows in `msgs`.
fn rows(msgs: &[Msg]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter(|m| m.tag == 'D')
        .map(|m| {
            let b = &m.body;
            let n = i16::from_be_bytes([b[0], b[1]]) as usize;
            let mut at = 2;
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let len = i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                at += 4;
                if len < 0 {
                    out.push(None);
                } else {
                    let len = len as usize;
                    out.push(Some(String::from_utf8_lossy(&b[at..at + len]).to_string()));
                    at += len;
                }
            }
            out
        })
        .collect()
}

/// The PROBE rows as (tenant, count) pairs.
fn probes(msgs: &[Msg]) -> Vec<(String, String)> {
    rows(msgs)
        .into_iter()
        .filter(|r| r.len() == 2)
        .map(|r| {
            (
                r[0].clone().unwrap_or_default(),
                r[1].clone().unwrap_or_default(),
            )
        })
        .collect()
}

fn north() -> (String, String) {
    ("north".to_string(), "3".to_string())
}

/// Transaction status of the last ReadyForQuery.
fn status(msgs: &[Msg]) -> char {
    let z = msgs.last().expect("messages");
    assert_eq!(z.tag, 'Z', "{msgs:?}");
    z.body[0] as char
}

/// Tags without notices (COMMIT outside a block warns; that is Postgres' business).
fn tags_no_notice(msgs: &[Msg]) -> String {
    let kept: Vec<Msg> = msgs.iter().filter(|m| m.tag != 'N').cloned().collect();
    tags(&kept)
}

/// Parse/Bind/Execute on the unnamed statement and portal, no Sync.
async fn pbe(c: &mut RawClient, sql: &str) {
    c.parse("", sql).await;
    c.bind("", "").await;
    c.execute("").await;
}

/// Execute with a row limit.
async fn execute_max(c: &mut RawClient, portal: &str, max_rows: i32) {
    c.send(
        b'E',
        &[portal.as_bytes(), b"\0", &max_rows.to_be_bytes()].concat(),
    )
    .await;
}

fn config(db: &str, wrap: bool) -> String {
    let text = config_text(db, 1, "");
    if wrap {
        let text = text.replace("transaction_wrap = false", "transaction_wrap = true");
        assert!(text.contains("transaction_wrap = true"));
        text
    } else {
        text
    }
}

/// A proxy with one pooled connection that another tenant (south) has used first.
async fn proxy_used_by_south(db: &str, wrap: bool) -> Proxy {
    let proxy = start_proxy_with(db, &config(db, wrap)).await;
    {
        let south = client(&proxy, "south").await;
        assert_eq!(count(&south, "customers").await, 2);
    }
    proxy
}

async fn north_client(proxy: &Proxy) -> RawClient {
    RawClient::connect(proxy, &token("north")).await
}

/// One unit of PROBE alone: the session is healthy and idle afterwards.
async fn assert_healthy(c: &mut RawClient, what: &str) {
    pbe(c, PROBE).await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(probes(&msgs), vec![north()], "{what}: {msgs:?}");
    assert_eq!(status(&msgs), 'I', "{what}");
    c.query(PROBE).await;
    let msgs = c.until_ready().await;
    assert_eq!(probes(&msgs), vec![north()], "{what}: {msgs:?}");
    assert_eq!(status(&msgs), 'I', "{what}");
}

// ------------------------------------------------------------------ every ending statement

async fn each_ending_statement(wrap: bool) {
    let db = demo_db();
    let proxy = proxy_used_by_south(&db, wrap).await;
    let mut c = north_client(&proxy).await;
    for end in ENDINGS {
        // inside an explicit block
        pbe(&mut c, "BEGIN").await;
        pbe(&mut c, end).await;
        pbe(&mut c, PROBE).await;
        c.sync().await;
        let msgs = c.until_ready().await;
        assert_eq!(tags(&msgs), "1 2 C 1 2 C 1 2 D C Z", "{end}: {msgs:?}");
        assert_eq!(
            probes(&msgs),
            vec![north()],
            "{end} (wrap {wrap}): {msgs:?}"
        );
        if chains(end) {
            assert_eq!(status(&msgs), 'T', "{end}: the chained block is open");
            c.query("ROLLBACK").await;
            assert_eq!(status(&c.until_ready().await), 'I');
        } else {
            assert_eq!(status(&msgs), 'I', "{end}");
        }
        // outside any block (the unit's own implicit transaction ends)
        if !chains(end) {
            pbe(&mut c, PROBE).await;
            pbe(&mut c, end).await;
            pbe(&mut c, PROBE).await;
            c.sync().await;
            let msgs = c.until_ready().await;
            assert_eq!(
                tags_no_notice(&msgs),
                "1 2 D C 1 2 C 1 2 D C Z",
                "{end}: {msgs:?}"
            );
            assert_eq!(
                probes(&msgs),
                vec![north(), north()],
                "{end} outside a block (wrap {wrap}): {msgs:?}"
            );
            assert_eq!(status(&msgs), 'I');
        }
        // two ends in a row, and a new block after the end
        pbe(&mut c, "BEGIN").await;
        pbe(&mut c, end).await;
        pbe(&mut c, PROBE).await;
        if chains(end) {
            pbe(&mut c, "COMMIT").await;
        }
        pbe(&mut c, "BEGIN").await;
        pbe(&mut c, PROBE).await;
        pbe(&mut c, end).await;
        pbe(&mut c, PROBE).await;
        c.sync().await;
        let msgs = c.until_ready().await;
        assert_eq!(
            probes(&msgs),
            vec![north(), north(), north()],
            "{end} twice (wrap {wrap}): {msgs:?}"
        );
        if chains(end) {
            assert_eq!(status(&msgs), 'T');
            c.query("COMMIT").await;
            c.until_ready().await;
        } else {
            assert_eq!(status(&msgs), 'I');
        }
        assert_healthy(&mut c, end).await;
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_after_a_pipelined_end_run_with_the_context() {
    each_ending_statement(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_after_a_pipelined_end_run_with_the_context_wrap() {
    each_ending_statement(true).await;
}

/// The connection's session default names another tenant (a misconfigured
/// `ALTER DATABASE … SET`): a statement without rlsgate's context would see that tenant's rows.
async fn session_default_is_never_used(wrap: bool) {
    let db = demo_db();
    admin_sql(
        &db,
        &format!("ALTER DATABASE {db} SET app.current_store_id = 'south'"),
    );
    let proxy = proxy_used_by_south(&db, wrap).await;
    let mut c = north_client(&proxy).await;
    for end in ENDINGS {
        pbe(&mut c, "BEGIN").await;
        pbe(&mut c, end).await;
        pbe(&mut c, PROBE).await;
        c.sync().await;
        let msgs = c.until_ready().await;
        assert_eq!(
            probes(&msgs),
            vec![north()],
            "{end} (wrap {wrap}): {msgs:?}"
        );
        if chains(end) {
            c.query("ROLLBACK").await;
            c.until_ready().await;
        }
    }
    // the same through a simple Query split at the end, and across units after a chain
    for end in ENDINGS {
        c.query(&format!("BEGIN; {end}; {PROBE}")).await;
        let msgs = c.until_ready().await;
        assert_eq!(probes(&msgs), vec![north()], "Query {end}: {msgs:?}");
        if chains(end) {
            assert_eq!(status(&msgs), 'T');
            c.query(PROBE).await;
            let msgs = c.until_ready().await;
            assert_eq!(probes(&msgs), vec![north()], "after {end}: {msgs:?}");
            c.query("ROLLBACK").await;
            c.until_ready().await;
        }
    }
    for end in ["COMMIT AND CHAIN", "ROLLBACK AND CHAIN"] {
        pbe(&mut c, "BEGIN").await;
        pbe(&mut c, end).await;
        c.sync().await;
        assert_eq!(status(&c.until_ready().await), 'T');
        pbe(&mut c, PROBE).await;
        c.sync().await;
        let msgs = c.until_ready().await;
        assert_eq!(probes(&msgs), vec![north()], "unit after {end}: {msgs:?}");
        c.query("ROLLBACK").await;
        c.until_ready().await;
        c.query("BEGIN").await;
        c.until_ready().await;
        c.query(end).await;
        c.until_ready().await;
        c.query(PROBE).await;
        let msgs = c.until_ready().await;
        assert_eq!(probes(&msgs), vec![north()], "Query after {end}: {msgs:?}");
        c.query("ROLLBACK").await;
        c.until_ready().await;
    }
    assert_healthy(&mut c, "session default").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_default_of_another_tenant_is_never_used() {
    session_default_is_never_used(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_default_of_another_tenant_is_never_used_wrap() {
    session_default_is_never_used(true).await;
}

// ------------------------------------------------------------------ PREPARE TRANSACTION

/// PREPARE TRANSACTION needs `max_prepared_transactions > 0`: a cluster of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_after_prepare_transaction_run_with_the_context() {
    use rlsgate::embedded_pg::{EmbeddedOptions, EmbeddedPg};
    let own = EmbeddedPg::start(EmbeddedOptions {
        extra_conf: vec!["max_prepared_transactions = 4".to_string()],
        ..EmbeddedOptions::default()
    })
    .expect("start a PostgreSQL with prepared transactions");
    own.psql(
        "postgres",
        &format!("CREATE ROLE rlsgate_app LOGIN PASSWORD '{APP_PASSWORD}'; CREATE ROLE rlsgate_owner NOLOGIN;"),
    )
    .expect("roles");
    own.create_database("prep").expect("database");
    own.psql("prep", DEMO_SQL).expect("demo.sql");
    own.psql(
        "prep",
        "ALTER DATABASE prep SET app.current_store_id = 'south'",
    )
    .expect("session default");
    for wrap in [false, true] {
        let cfg = config("prep", wrap).replace(
            &format!("port = {}\n", pg().port()),
            &format!("port = {}\n", own.port()),
        );
        assert!(cfg.contains(&format!("port = {}\n", own.port())));
        let proxy = start_proxy_with("prep", &cfg).await;
        {
            let south = client(&proxy, "south").await;
            assert_eq!(count(&south, "customers").await, 2);
        }
        let mut c = north_client(&proxy).await;
        let gid = format!("rlsgate_test_{wrap}");
        pbe(&mut c, "BEGIN").await;
        pbe(
            &mut c,
            "INSERT INTO customers (store_id, name) VALUES ('north', 'prepared')",
        )
        .await;
        pbe(&mut c, &format!("PREPARE TRANSACTION '{gid}'")).await;
        pbe(&mut c, PROBE).await;
        c.sync().await;
        let msgs = c.until_ready().await;
        if let Some(e) = msgs.iter().find(|m| m.tag == 'E') {
            // the guard may refuse two-phase commit altogether: then nothing after it runs
            assert_eq!(e.code(), "42501", "wrap {wrap}: {msgs:?}");
            assert_eq!(tags(&msgs), "1 2 C 1 2 C E Z", "wrap {wrap}: {msgs:?}");
            assert_eq!(status(&msgs), 'E');
            c.query("ROLLBACK").await;
            c.until_ready().await;
        } else {
            assert_eq!(
                tags(&msgs),
                "1 2 C 1 2 C 1 2 C 1 2 D C Z",
                "wrap {wrap}: {msgs:?}"
            );
            assert_eq!(probes(&msgs), vec![north()], "wrap {wrap}: {msgs:?}");
            assert_eq!(status(&msgs), 'I');
            own.psql("prep", &format!("ROLLBACK PREPARED '{gid}'"))
                .expect("rollback prepared");
        }
        assert_healthy(&mut c, "after PREPARE TRANSACTION").await;
        proxy.stop().await;
    }
}

// ------------------------------------------------------------------ no transaction block

async fn no_block_statement_first(wrap: bool) {
    let db = demo_db();
    admin_sql(
        &db,
        &format!("ALTER DATABASE {db} SET app.current_store_id = 'south'"),
    );
    let proxy = proxy_used_by_south(&db, wrap).await;
    let mut c = north_client(&proxy).await;
    // VACUUM of a table rlsgate_app does not own warns and skips it; it runs outside any
    // transaction, so the unit gets no context at its start
    pbe(&mut c, "VACUUM stores").await;
    pbe(&mut c, PROBE).await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(
        tags_no_notice(&msgs),
        "1 2 C 1 2 D C 1 2 D C Z",
        "wrap {wrap}: {msgs:?}"
    );
    assert_eq!(
        probes(&msgs),
        vec![north(), north()],
        "wrap {wrap}: {msgs:?}"
    );
    assert_eq!(status(&msgs), 'I');
    // a unit that opens with a VACUUM Parse but executes something else
    c.parse("probe", PROBE).await;
    c.sync().await;
    c.until_ready().await;
    c.parse("vac", "VACUUM stores").await;
    c.bind("p", "probe").await;
    c.execute("p").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "1 2 D C Z", "wrap {wrap}: {msgs:?}");
    assert_eq!(probes(&msgs), vec![north()], "wrap {wrap}: {msgs:?}");
    // … and one that runs the VACUUM statement after all
    c.bind("", "vac").await;
    c.execute("").await;
    c.bind("", "probe").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(
        tags_no_notice(&msgs),
        "2 C 2 D C Z",
        "wrap {wrap}: {msgs:?}"
    );
    assert_eq!(probes(&msgs), vec![north()], "wrap {wrap}: {msgs:?}");
    assert_healthy(&mut c, "after VACUUM").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_after_a_no_block_statement_run_with_the_context() {
    no_block_statement_first(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_after_a_no_block_statement_run_with_the_context_wrap() {
    no_block_statement_first(true).await;
}

// ------------------------------------------------------------------ portals

async fn portals(wrap: bool) {
    let db = demo_db();
    admin_sql(
        &db,
        &format!("ALTER DATABASE {db} SET app.current_store_id = 'south'"),
    );
    let proxy = proxy_used_by_south(&db, wrap).await;
    let mut c = north_client(&proxy).await;
    c.parse("commit", "COMMIT").await;
    c.parse("probe", PROBE).await;
    c.parse("ids", "SELECT store_id FROM customers ORDER BY customer_id")
        .await;
    c.sync().await;
    assert_eq!(tags(&c.until_ready().await), "1 1 1 Z");

    // named statements and portals after the end
    pbe(&mut c, "BEGIN").await;
    c.bind("pc", "commit").await;
    c.execute("pc").await;
    c.bind("pp", "probe").await;
    c.execute("pp").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "1 2 C 2 C 2 D C Z", "wrap {wrap}: {msgs:?}");
    assert_eq!(probes(&msgs), vec![north()], "wrap {wrap}: {msgs:?}");

    // a row limit after the end: the portal is suspended and resumed in the same transaction
    pbe(&mut c, "BEGIN").await;
    c.bind("", "commit").await;
    c.execute("").await;
    c.bind("ids", "ids").await;
    execute_max(&mut c, "ids", 2).await;
    execute_max(&mut c, "ids", 0).await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(
        tags(&msgs),
        "1 2 C 2 C 2 D D s D C Z",
        "wrap {wrap}: {msgs:?}"
    );
    let stores: Vec<String> = rows(&msgs)
        .into_iter()
        .map(|r| r[0].clone().unwrap_or_default())
        .collect();
    assert_eq!(stores, ["north", "north", "north"], "wrap {wrap}");

    // a COMMIT portal bound inside a block in one unit, executed in the next one
    c.query("BEGIN").await;
    c.until_ready().await;
    c.bind("later", "commit").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "2 Z");
    assert_eq!(status(&msgs), 'T');
    c.execute("later").await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "C 1 2 D C Z", "wrap {wrap}: {msgs:?}");
    assert_eq!(probes(&msgs), vec![north()], "wrap {wrap}: {msgs:?}");
    assert_eq!(status(&msgs), 'I');
    // the unit ended the transaction: the next unit is a new one (with the context)
    c.bind("", "probe").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(probes(&msgs), vec![north()], "wrap {wrap}: {msgs:?}");

    // … and executed in a unit of its own, with the next unit pipelined right behind it
    c.query("BEGIN").await;
    c.until_ready().await;
    c.bind("later", "commit").await;
    c.sync().await;
    assert_eq!(tags(&c.until_ready().await), "2 Z");
    c.execute("later").await;
    c.sync().await;
    c.bind("", "probe").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "C Z", "wrap {wrap}: {msgs:?}");
    assert_eq!(status(&msgs), 'I');
    let msgs = c.until_ready().await;
    assert_eq!(probes(&msgs), vec![north()], "wrap {wrap}: {msgs:?}");

    // in a failed block only COMMIT/ROLLBACK may be bound and run: rebinding the unnamed
    // portal to anything else fails, and the COMMIT portal stays
    c.query("BEGIN").await;
    c.until_ready().await;
    pbe(&mut c, "SELECT 1/(SELECT 0)").await;
    c.sync().await;
    assert_eq!(status(&c.until_ready().await), 'E');
    c.bind("", "commit").await;
    c.sync().await;
    assert_eq!(tags(&c.until_ready().await), "2 Z");
    c.bind("", "probe").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "E Z", "wrap {wrap}: {msgs:?}");
    assert_eq!(msgs[0].code(), "25P02");
    c.execute("").await;
    c.bind("", "probe").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "C 2 D C Z", "wrap {wrap}: {msgs:?}");
    assert_eq!(msgs[0].body, b"ROLLBACK\0");
    assert_eq!(probes(&msgs), vec![north()], "wrap {wrap}: {msgs:?}");
    assert_eq!(status(&msgs), 'I');

    // the same COMMIT portal executed twice: it is gone after the COMMIT
    pbe(&mut c, "BEGIN").await;
    c.bind("twice", "commit").await;
    c.execute("twice").await;
    c.bind("", "probe").await;
    c.execute("").await;
    c.execute("twice").await;
    c.bind("", "probe").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "1 2 C 2 C 2 D C E Z", "wrap {wrap}: {msgs:?}");
    assert_eq!(probes(&msgs), vec![north()], "wrap {wrap}: {msgs:?}");
    assert_eq!(status(&msgs), 'I', "{msgs:?}");
    assert_healthy(&mut c, "portals").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_portals_row_limits_and_portals_executed_later() {
    portals(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_portals_row_limits_and_portals_executed_later_wrap() {
    portals(true).await;
}

// ------------------------------------------------------------------ errors

async fn errors(wrap: bool) {
    let db = demo_db();
    let proxy = proxy_used_by_south(&db, wrap).await;
    let mut c = north_client(&proxy).await;

    // an error before the end: everything up to Sync is skipped, the block is failed
    pbe(&mut c, "BEGIN").await;
    pbe(&mut c, "SELECT 1/(SELECT 0)").await;
    pbe(&mut c, "COMMIT").await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "1 2 C 1 2 E Z", "wrap {wrap}: {msgs:?}");
    assert_eq!(
        msgs.iter().find(|m| m.tag == 'E').map(Msg::code).as_deref(),
        Some("22012")
    );
    assert_eq!(status(&msgs), 'E');
    c.query("ROLLBACK").await;
    assert_eq!(status(&c.until_ready().await), 'I');
    assert_healthy(&mut c, "error before the end").await;

    // an error after the end, before the statement that would get the context again
    pbe(&mut c, "BEGIN").await;
    pbe(&mut c, "COMMIT").await;
    pbe(&mut c, "SELECT 1/(SELECT 0)").await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "1 2 C 1 2 C 1 2 E Z", "wrap {wrap}: {msgs:?}");
    assert_eq!(status(&msgs), 'I');
    assert_healthy(&mut c, "error after the end").await;

    // the ending statement itself fails (no block to chain), after a re-application
    pbe(&mut c, "BEGIN").await;
    pbe(&mut c, "COMMIT").await;
    pbe(&mut c, "COMMIT AND CHAIN").await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "1 2 C 1 2 C 1 2 E Z", "wrap {wrap}: {msgs:?}");
    assert_eq!(status(&msgs), 'I');
    assert_healthy(&mut c, "failed COMMIT AND CHAIN").await;
    if !wrap {
        // (transaction_wrap runs a unit that opens with it inside rlsgate's block)
        pbe(&mut c, "COMMIT AND CHAIN").await;
        pbe(&mut c, PROBE).await;
        c.sync().await;
        let msgs = c.until_ready().await;
        assert_eq!(tags(&msgs), "1 2 E Z", "{msgs:?}");
        assert_eq!(status(&msgs), 'I');
        assert_healthy(&mut c, "failed COMMIT AND CHAIN").await;
    }

    // the client reads the error before it sends its Sync (the proxy drops what comes between)
    pbe(&mut c, "BEGIN").await;
    pbe(&mut c, "COMMIT").await;
    pbe(&mut c, "SELECT 1/(SELECT 0)").await;
    c.send(b'H', &[]).await;
    let mut seen = Vec::new();
    loop {
        let m = c.recv().await;
        let done = m.tag == 'E';
        seen.push(m);
        if done {
            break;
        }
    }
    assert_eq!(tags(&seen), "1 2 C 1 2 C 1 2 E", "wrap {wrap}");
    pbe(&mut c, PROBE).await;
    pbe(&mut c, "COMMIT").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "Z", "wrap {wrap}: {msgs:?}");
    assert_eq!(status(&msgs), 'I');
    // several units in flight, one failing in the middle
    for sql in ["SELECT 1/(SELECT 0)", PROBE] {
        pbe(&mut c, "BEGIN").await;
        pbe(&mut c, "COMMIT").await;
        pbe(&mut c, sql).await;
        pbe(&mut c, PROBE).await;
        c.sync().await;
    }
    let first = c.until_ready().await;
    assert_eq!(
        tags(&first),
        "1 2 C 1 2 C 1 2 E Z",
        "wrap {wrap}: {first:?}"
    );
    let second = c.until_ready().await;
    assert_eq!(
        probes(&second),
        vec![north(), north()],
        "wrap {wrap}: {second:?}"
    );
    assert_healthy(&mut c, "after errors").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_around_the_end_leaves_the_session_usable() {
    errors(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_around_the_end_leaves_the_session_usable_wrap() {
    errors(true).await;
}

// ------------------------------------------------------------------ simple Query in a unit

async fn queries_inside_a_unit(wrap: bool) {
    let db = demo_db();
    admin_sql(
        &db,
        &format!("ALTER DATABASE {db} SET app.current_store_id = 'south'"),
    );
    let proxy = proxy_used_by_south(&db, wrap).await;
    let mut c = north_client(&proxy).await;
    // the Query ends the block; the extended statements after it need the context again
    pbe(&mut c, "BEGIN").await;
    pbe(&mut c, PROBE).await;
    c.query("COMMIT").await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let first = c.until_ready().await;
    let second = c.until_ready().await;
    assert_eq!(tags(&first), "1 2 C 1 2 D C C Z", "wrap {wrap}: {first:?}");
    assert_eq!(probes(&first), vec![north()], "wrap {wrap}: {first:?}");
    assert_eq!(tags(&second), "1 2 D C Z", "wrap {wrap}: {second:?}");
    assert_eq!(probes(&second), vec![north()], "wrap {wrap}: {second:?}");
    assert_eq!(status(&second), 'I');
    // a Query after a pipelined end
    pbe(&mut c, "BEGIN").await;
    pbe(&mut c, "COMMIT").await;
    c.query(PROBE).await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let first = c.until_ready().await;
    let second = c.until_ready().await;
    assert_eq!(probes(&first), vec![north()], "wrap {wrap}: {first:?}");
    assert_eq!(probes(&second), vec![north()], "wrap {wrap}: {second:?}");
    assert_eq!(status(&second), 'I');
    // an autocommit Query in the middle of an autocommit unit
    pbe(&mut c, PROBE).await;
    c.query(PROBE).await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let first = c.until_ready().await;
    let second = c.until_ready().await;
    assert_eq!(
        probes(&first),
        vec![north(), north()],
        "wrap {wrap}: {first:?}"
    );
    assert_eq!(probes(&second), vec![north()], "wrap {wrap}: {second:?}");
    // a split Query in the middle of a unit
    pbe(&mut c, "BEGIN").await;
    c.query(&format!("COMMIT; {PROBE}; COMMIT; {PROBE}")).await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let first = c.until_ready().await;
    let second = c.until_ready().await;
    assert_eq!(
        probes(&first),
        vec![north(), north()],
        "wrap {wrap}: {first:?}"
    );
    assert_eq!(probes(&second), vec![north()], "wrap {wrap}: {second:?}");
    // inside the client's own block: a pipelined COMMIT, then a Query
    c.query("BEGIN").await;
    assert_eq!(status(&c.until_ready().await), 'T');
    pbe(&mut c, PROBE).await;
    pbe(&mut c, "COMMIT").await;
    c.query(PROBE).await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let first = c.until_ready().await;
    let second = c.until_ready().await;
    assert_eq!(
        probes(&first),
        vec![north(), north()],
        "wrap {wrap}: {first:?}"
    );
    assert_eq!(probes(&second), vec![north()], "wrap {wrap}: {second:?}");
    assert_eq!(status(&second), 'I');
    // inside the client's own block without an end: the block goes on
    c.query("BEGIN").await;
    c.until_ready().await;
    pbe(&mut c, PROBE).await;
    c.query(PROBE).await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let first = c.until_ready().await;
    let second = c.until_ready().await;
    assert_eq!(
        probes(&first),
        vec![north(), north()],
        "wrap {wrap}: {first:?}"
    );
    assert_eq!(status(&first), 'T');
    assert_eq!(probes(&second), vec![north()], "wrap {wrap}: {second:?}");
    assert_eq!(status(&second), 'T');
    c.query("COMMIT").await;
    assert_eq!(status(&c.until_ready().await), 'I');
    // a Query that fails the client's block, then ROLLBACK AND CHAIN in the same unit
    c.query("BEGIN").await;
    c.until_ready().await;
    pbe(&mut c, PROBE).await;
    c.query("SELECT 1/(SELECT 0)").await;
    pbe(&mut c, "ROLLBACK AND CHAIN").await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let first = c.until_ready().await;
    let second = c.until_ready().await;
    assert_eq!(tags(&first), "1 2 D C T E Z", "wrap {wrap}: {first:?}");
    assert_eq!(status(&first), 'E');
    assert_eq!(tags(&second), "1 2 C 1 2 D C Z", "wrap {wrap}: {second:?}");
    assert_eq!(probes(&second), vec![north()], "wrap {wrap}: {second:?}");
    assert_eq!(status(&second), 'T');
    c.query("ROLLBACK").await;
    c.until_ready().await;
    assert_healthy(&mut c, "queries inside a unit").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_inside_an_open_unit_cannot_skip_the_context() {
    queries_inside_a_unit(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_inside_an_open_unit_cannot_skip_the_context_wrap() {
    queries_inside_a_unit(true).await;
}

// ------------------------------------------------------------------ unchanged behaviour

fn injections(proxy: &Proxy) -> f64 {
    let text = proxy.shared.metrics.encode();
    text.lines()
        .find(|l| l.starts_with("rlsgate_context_injections_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("injection counter")
}

/// Units without a transaction end: same replies as before, one injection per transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_without_an_end_are_unchanged() {
    let db = demo_db();
    let proxy = proxy_used_by_south(&db, false).await;
    let mut c = north_client(&proxy).await;
    let before = injections(&proxy);
    pbe(&mut c, PROBE).await;
    pbe(&mut c, "SELECT 1").await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "1 2 D C 1 2 D C 1 2 D C Z", "{msgs:?}");
    assert_eq!(probes(&msgs)[0], north());
    assert_eq!(injections(&proxy) - before, 1.0);
    // an explicit block over several units: one injection (at its start)
    let before = injections(&proxy);
    pbe(&mut c, "BEGIN").await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    pbe(&mut c, PROBE).await;
    c.sync().await;
    pbe(&mut c, "COMMIT").await;
    c.sync().await;
    for _ in 0..3 {
        let msgs = c.until_ready().await;
        assert!(!msgs.iter().any(|m| m.tag == 'E'), "{msgs:?}");
    }
    assert_eq!(
        injections(&proxy) - before,
        1.0,
        "a COMMIT that ends its unit costs nothing extra"
    );
    // describe-only and prepare-only units
    c.parse("d", "SELECT $1::int").await;
    c.send(b'D', b"Sd\0").await;
    c.sync().await;
    assert_eq!(tags(&c.until_ready().await), "1 t T Z");
    assert_healthy(&mut c, "unchanged").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrap_unit_opening_with_a_block_sensitive_statement_gets_the_context() {
    let db = demo_db();
    admin_sql(
        &db,
        &format!("ALTER DATABASE {db} SET app.current_store_id = 'south'"),
    );
    for wrap in [false, true] {
        let proxy = proxy_used_by_south(&db, wrap).await;
        let mut c = north_client(&proxy).await;
        pbe(&mut c, "SET LOCAL work_mem = '1MB'").await;
        pbe(&mut c, PROBE).await;
        pbe(&mut c, "SHOW work_mem").await;
        c.sync().await;
        let msgs = c.until_ready().await;
        assert_eq!(
            tags_no_notice(&msgs),
            "1 2 C 1 2 D C 1 2 D C Z",
            "wrap {wrap}: {msgs:?}"
        );
        let r = rows(&msgs);
        assert_eq!(
            r[0],
            [Some("north".into()), Some("3".into())],
            "wrap {wrap}"
        );
        assert_eq!(
            r[1],
            [Some("1MB".into())],
            "wrap {wrap}: SET LOCAL lasts the unit"
        );
        assert_eq!(status(&msgs), 'I');
        assert_healthy(&mut c, "block-sensitive first").await;
        proxy.stop().await;
    }
}

// ------------------------------------------------------------------ the end of a wrapped unit

/// transaction_wrap closes its block with a COMMIT ahead of the client's Sync (one
/// ReadyForQuery per unit). An error in the unit makes the server skip that COMMIT: the block is
/// closed after the Sync, before anything else runs, whether the client waits for the reply or
/// pipelines its next unit right behind (before or after the proxy has handled the Sync). A
/// COMMIT that fails itself (a deferred constraint) is the client's error. Plain mode gives the
/// same answers.
async fn block_ends(wrap: bool) {
    let db = demo_db();
    admin_sql(
        &db,
        "CREATE TABLE deferred_ref (id int PRIMARY KEY, \
           parent int REFERENCES deferred_ref (id) DEFERRABLE INITIALLY DEFERRED); \
         GRANT SELECT, INSERT ON deferred_ref TO rlsgate_app",
    );
    let proxy = proxy_used_by_south(&db, wrap).await;
    let mut c = north_client(&proxy).await;
    for round in 0..3 {
        let what = format!("wrap {wrap}, round {round}");
        // an error, the reply read before the next unit
        pbe(&mut c, "SELECT 1/(SELECT 0)").await;
        c.sync().await;
        let msgs = c.until_ready().await;
        assert_eq!(tags(&msgs), "1 2 E Z", "{what}: {msgs:?}");
        assert_eq!(status(&msgs), 'I', "{what}");
        assert_healthy(&mut c, &what).await;

        // an error, the next unit sent a moment later, before the error comes
        // (each unit in one write: the proxy has handled the first one's Sync, and sent it
        // on, when the second comes)
        c.start_batch();
        pbe(&mut c, "SELECT 1/(SELECT 0 FROM pg_sleep(0.2))").await;
        c.sync().await;
        c.write_batch().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        c.start_batch();
        pbe(&mut c, PROBE).await;
        c.sync().await;
        c.write_batch().await;
        let first = c.until_ready().await;
        assert_eq!(tags(&first), "1 2 E Z", "{what}: {first:?}");
        assert_eq!(status(&first), 'I', "{what}");
        let second = c.until_ready().await;
        assert_eq!(probes(&second), vec![north()], "{what}: {second:?}");
        assert_eq!(status(&second), 'I', "{what}");

        // the same, both units in one write
        c.start_batch();
        pbe(&mut c, "SELECT 1/(SELECT 0)").await;
        c.sync().await;
        pbe(&mut c, PROBE).await;
        c.sync().await;
        c.write_batch().await;
        let first = c.until_ready().await;
        assert_eq!(tags(&first), "1 2 E Z", "{what}: {first:?}");
        let second = c.until_ready().await;
        assert_eq!(probes(&second), vec![north()], "{what}: {second:?}");
        assert_eq!(status(&second), 'I', "{what}");

        // a COMMIT that fails: the insert is gone, the error is the client's; in a Query of two
        // statements the first one's completion comes first, as in Postgres
        let id = 10 + round;
        pbe(
            &mut c,
            &format!("INSERT INTO deferred_ref VALUES ({id}, 999)"),
        )
        .await;
        c.sync().await;
        let msgs = c.until_ready().await;
        assert_eq!(tags(&msgs), "1 2 C E Z", "{what}: {msgs:?}");
        assert_eq!(msgs[3].code(), "23503", "{what}: {msgs:?}");
        assert_eq!(status(&msgs), 'I', "{what}");
        // (Postgres commits before it completes the Query's last statement: no C)
        // (the last: Postgres' own notice about the COMMIT is not the point here)
        let failing = [
            (
                format!("INSERT INTO deferred_ref VALUES ({id}, 999)"),
                "E Z",
                false,
            ),
            (
                format!("SELECT 1; INSERT INTO deferred_ref VALUES ({id}, 999)"),
                "T D C E Z",
                false,
            ),
            // the client's own COMMIT fails: the INSERT before it completed
            (
                format!("INSERT INTO deferred_ref VALUES ({id}, 999); COMMIT; SELECT 1"),
                "C E Z",
                true,
            ),
        ];
        for (sql, want, notices) in failing {
            c.query(&sql).await;
            let msgs = c.until_ready().await;
            let got = if notices {
                tags_no_notice(&msgs)
            } else {
                tags(&msgs)
            };
            assert_eq!(got, want, "{what}: {sql}: {msgs:?}");
            let error = msgs.iter().find(|m| m.tag == 'E').map(Msg::code);
            assert_eq!(error.as_deref(), Some("23503"), "{what}: {sql}");
            assert_eq!(status(&msgs), 'I', "{what}: {sql}");
        }
        assert_healthy(&mut c, &what).await;

        // a unit that commits: its row is there for the next one
        pbe(
            &mut c,
            &format!("INSERT INTO deferred_ref VALUES ({id}, {id})"),
        )
        .await;
        c.sync().await;
        pbe(
            &mut c,
            &format!("SELECT count(*) FROM deferred_ref WHERE id = {id}"),
        )
        .await;
        c.sync().await;
        let msgs = c.until_ready().await;
        assert_eq!(tags(&msgs), "1 2 C Z", "{what}: {msgs:?}");
        let msgs = c.until_ready().await;
        assert_eq!(rows(&msgs), vec![vec![Some("1".to_string())]], "{what}");
        assert_eq!(status(&msgs), 'I', "{what}");
    }
    // nothing was left open on the server: the next client of the connection starts clean
    drop(c);
    let south = client(&proxy, "south").await;
    assert_eq!(count(&south, "customers").await, 2);
    let open = admin_sql(
        &db,
        "SELECT count(*) FROM pg_stat_activity \
          WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    );
    assert_eq!(open, "0");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_unit_closes_the_block_before_the_next_one() {
    block_ends(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_unit_closes_the_block_before_the_next_one_wrap() {
    block_ends(true).await;
}
