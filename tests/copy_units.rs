//! COPY FROM STDIN followed by pipelined work (regressions found by the session fuzz target,
//! fuzz/fuzz_targets/session.rs): nothing of rlsgate's or the client's reaches a server that is
//! reading COPY data; the unit after a COPY runs with the tenant context; a Query with two
//! COPYs behaves as in Postgres. Runs in plain mode here and with `transaction_wrap` in
//! tests/wrap_mode.rs.

mod support;

use support::*;

/// A demo database with a table without RLS that the application role may COPY into.
async fn copy_proxy() -> Proxy {
    let db = demo_db();
    admin_sql(
        &db,
        "CREATE TABLE scratch (x int); GRANT SELECT, INSERT ON scratch TO rlsgate_app",
    );
    start_proxy_with(&db, &config_text(&db, 1, "")).await
}

/// Parse, Bind, Describe (portal), Execute and Sync of `sql`, unnamed.
async fn extended_unit(c: &mut RawClient, sql: &str) {
    c.parse("", sql).await;
    c.bind("", "").await;
    c.send(b'D', b"P\0").await;
    c.execute("").await;
    c.sync().await;
}

async fn copy_data(c: &mut RawClient, data: &str) {
    c.send(b'd', data.as_bytes()).await;
    c.send(b'c', &[]).await;
}

/// The tenant context a Query sees now.
async fn tenant_now(c: &mut RawClient) -> String {
    c.query("SELECT current_setting('app.current_store_id')")
        .await;
    last_value(&c.until_ready().await)
}

/// The tenant the server sees, as the last DataRow's text.
fn last_value(msgs: &[Msg]) -> String {
    let row = msgs.iter().rev().find(|m| m.tag == 'D').expect("a row");
    String::from_utf8_lossy(&row.body[6..]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unit_after_a_copy_runs_with_the_context() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    for _ in 0..3 {
        // everything pipelined: the COPY, its data, and the next Query right behind
        c.query("COPY scratch FROM STDIN").await;
        copy_data(&mut c, "1\n2\n").await;
        c.query("SELECT current_setting('app.current_store_id')")
            .await;
        let copy = c.until_ready().await;
        assert_eq!(tags(&copy), "G C Z", "{copy:?}");
        assert_eq!(copy[2].body, b"I", "{copy:?}");
        let next = c.until_ready().await;
        assert_eq!(tags(&next), "T D C Z", "{next:?}");
        assert_eq!(last_value(&next), "north");
    }
    // and the rows are there, committed
    c.query("SELECT count(*) FROM scratch").await;
    assert_eq!(last_value(&c.until_ready().await), "6");
    proxy.stop().await;
}

/// Two COPYs in one Query and a Query pipelined behind the first CopyDone: as in Postgres, the
/// second COPY starts, the Query interrupts it (an error), and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_behind_the_first_of_two_copies_interrupts_the_second() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    c.query("COPY scratch FROM STDIN; COPY scratch FROM STDIN")
        .await;
    copy_data(&mut c, "1\n").await;
    c.query("SELECT 1").await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "G C G E Z", "{msgs:?}");
    assert_eq!(msgs[3].code(), "57014", "{msgs:?}");
    assert_eq!(msgs[4].body, b"I");
    c.query("SELECT current_setting('app.current_store_id')")
        .await;
    let msgs = c.until_ready().await;
    assert_eq!(last_value(&msgs), "north", "{msgs:?}");
    // The whole Query failed: nothing was copied.
    c.query("SELECT count(*) FROM scratch").await;
    assert_eq!(last_value(&c.until_ready().await), "0");
    proxy.stop().await;
}

/// A split Query (transaction control in the middle) whose last piece is a COPY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_query_ending_in_a_copy_completes() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    c.query("BEGIN; SELECT 1; COMMIT; SELECT 2; COPY scratch FROM STDIN")
        .await;
    let mut msgs = Vec::new();
    loop {
        let m = c.recv().await;
        let copy_in = m.tag == 'G';
        msgs.push(m);
        if copy_in {
            break;
        }
    }
    copy_data(&mut c, "7\n").await;
    msgs.extend(c.until_ready().await);
    assert_eq!(tags(&msgs), "C T D C C T D C G C Z", "{msgs:?}");
    c.query("SELECT count(*) FROM scratch").await;
    assert_eq!(last_value(&c.until_ready().await), "1");
    assert_eq!(tenant_now(&mut c).await, "north");
    proxy.stop().await;
}

/// A refused Query inside an unfinished extended unit (no Sync yet): one error, and the unit
/// and the session go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_query_inside_an_open_extended_unit() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    c.send(b'C', b"Sno_such\0").await; // Close of a statement: opens a unit
    c.query("SELECT set_config('app.current_store_id', 'south', false)")
        .await;
    c.sync().await;
    c.query("SELECT current_setting('app.current_store_id')")
        .await;
    let first = c.until_ready().await;
    assert!(tags(&first).ends_with("E Z"), "{first:?}");
    let err = first.iter().find(|m| m.tag == 'E').unwrap();
    assert_eq!(err.code(), "42501", "{err:?}");
    let sync = c.until_ready().await;
    assert_eq!(tags(&sync), "Z", "{sync:?}");
    let last = c.until_ready().await;
    assert_eq!(last_value(&last), "north", "{last:?}");
    proxy.stop().await;
}

/// Inside a block, a refused statement (aborting the block) with more pipelined behind it,
/// among them a BEGIN that fails in the aborted block: every statement gets Postgres' answer,
/// and after ROLLBACK the session has its context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_pipelined_behind_a_refusal_in_a_block() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    c.query("BEGIN").await;
    c.query("SELECT set_config('app.current_store_id', 'south', false)")
        .await;
    c.query("BEGIN; SELECT 1").await;
    c.query("SELECT 2").await;
    c.query("ROLLBACK").await;
    c.query("SELECT current_setting('app.current_store_id')")
        .await;
    assert_eq!(tags(&c.until_ready().await), "C Z");
    let refused = c.until_ready().await;
    assert_eq!(tags(&refused), "E Z", "{refused:?}");
    assert_eq!(refused[0].code(), "42501");
    let begin = c.until_ready().await;
    assert_eq!(tags(&begin), "E Z", "{begin:?}");
    assert_eq!(begin[0].code(), "25P02");
    let select = c.until_ready().await;
    assert_eq!(tags(&select), "E Z", "{select:?}");
    assert_eq!(select[0].code(), "25P02");
    let rollback = c.until_ready().await;
    assert_eq!(tags(&rollback), "C Z", "{rollback:?}");
    assert_eq!(rollback[1].body, b"I");
    let last = c.until_ready().await;
    assert_eq!(last_value(&last), "north", "{last:?}");
    proxy.stop().await;
}

/// A Query that fails inside an unfinished extended unit (no Sync yet), then another Query:
/// as in Postgres, the failed Query ends the unit's implicit transaction, the next one runs with
/// the context, and the unit's Sync is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_query_inside_an_open_extended_unit() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    c.parse("", "SELECT 1").await;
    c.bind("", "").await;
    c.execute("").await;
    c.query("SELECT 1/0").await;
    c.query("SELECT current_setting('app.current_store_id')")
        .await;
    c.sync().await;
    let first = c.until_ready().await;
    assert_eq!(tags(&first), "1 2 D C E Z", "{first:?}");
    assert_eq!(first[4].code(), "22012");
    assert_eq!(first[5].body, b"I");
    let second = c.until_ready().await;
    assert_eq!(tags(&second), "T D C Z", "{second:?}");
    assert_eq!(last_value(&second), "north");
    let sync = c.until_ready().await;
    assert_eq!(tags(&sync), "Z", "{sync:?}");
    assert_eq!(tenant_now(&mut c).await, "north");
    proxy.stop().await;
}

/// An error in an open extended unit, with a Query pipelined behind it before the Sync: as in
/// Postgres, the server skips the Query up to the Sync, whose ReadyForQuery says idle, and the
/// next Query runs with the context. (With transaction_wrap the unit runs in rlsgate's block,
/// and rlsgate's COMMIT before the Query is skipped too: the block must still end, found by the
/// session fuzz target.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_skipped_after_an_error_in_an_open_extended_unit() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    for _ in 0..2 {
        // (fails at Execute: a constant 1/0 would fail at Bind, when it is planned)
        c.parse("", "SELECT 1 / count(*)::int FROM scratch").await;
        c.bind("", "").await;
        c.execute("").await;
        c.query("INSERT INTO scratch VALUES (1)").await;
        c.sync().await;
        c.query("SELECT current_setting('app.current_store_id')")
            .await;
        let unit = c.until_ready().await;
        assert_eq!(tags(&unit), "1 2 E Z", "{unit:?}");
        assert_eq!(unit[2].code(), "22012", "{unit:?}");
        assert_eq!(unit[3].body, b"I", "{unit:?}");
        let next = c.until_ready().await;
        assert_eq!(tags(&next), "T D C Z", "{next:?}");
        assert_eq!(last_value(&next), "north");
        assert_eq!(next[3].body, b"I", "{next:?}");
    }
    // the skipped INSERT did not run
    c.query("SELECT count(*) FROM scratch").await;
    assert_eq!(last_value(&c.until_ready().await), "0");
    proxy.stop().await;
}

/// An extended COPY FROM STDIN interrupted by a Query: the server fails the COPY (the Query
/// consumed) after it has already consumed the unit's Sync, so it skips everything up to the
/// client's next Sync. rlsgate must keep that connection until then (pool of one: found by the
/// session fuzz target, the connection went back to the pool still skipping and the next Query
/// was never answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_copy_interrupted_by_a_query_waits_for_the_next_sync() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    extended_unit(&mut c, "COPY scratch FROM STDIN").await;
    c.query("COMMIT").await;
    let mut seen = Vec::new();
    loop {
        let m = c.recv().await;
        let tag = m.tag;
        seen.push(m);
        if tag == 'E' {
            break;
        }
    }
    assert_eq!(tags(&seen), "1 2 n G E", "{seen:?}");
    assert_eq!(seen[4].code(), "57014", "{seen:?}");
    // skipped by the server up to the Sync, as in Postgres
    c.query("INSERT INTO scratch VALUES (1)").await;
    c.sync().await;
    let sync = c.until_ready().await;
    assert_eq!(tags(&sync), "Z", "{sync:?}");
    assert_eq!(sync[0].body, b"I");
    c.query("SELECT current_setting('app.current_store_id')")
        .await;
    let next = c.until_ready().await;
    assert_eq!(last_value(&next), "north", "{next:?}");
    c.query("SELECT count(*) FROM scratch").await;
    assert_eq!(last_value(&c.until_ready().await), "0");
    proxy.stop().await;
}

/// A Query inside an open extended unit that has run nothing yet (a Close opened it): the
/// Query runs with the context. (With transaction_wrap, rlsgate's block around the unit ends
/// before the Query; an earlier fix made the Query start without the context, found by the
/// session fuzz target.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_right_after_a_close_has_the_context() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("south")).await;
    c.send(b'C', b"Sno_such\0").await;
    c.query("SELECT current_setting('app.current_store_id')")
        .await;
    c.sync().await;
    let first = c.until_ready().await;
    assert_eq!(tags(&first), "3 T D C Z", "{first:?}");
    assert_eq!(last_value(&first), "south");
    let sync = c.until_ready().await;
    assert_eq!(tags(&sync), "Z", "{sync:?}");
    assert_eq!(sync[0].body, b"I");
    proxy.stop().await;
}

/// An error at the very start of a fresh connection's first unit makes the server skip the
/// context statement's Parse; a second unit pipelined behind it (all in one write) must not
/// count on that statement (found by the session fuzz target: its Bind failed with 26000 and
/// rlsgate ended the session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_pipelined_behind_a_skipped_context_parse() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    c.start_batch();
    c.send(b'D', b"Pno_such_portal\0").await;
    c.parse("", "SELECT 1").await;
    c.bind("", "").await;
    c.execute("").await;
    c.sync().await;
    c.parse("", "SELECT current_setting('app.current_store_id')")
        .await;
    c.bind("", "").await;
    c.execute("").await;
    c.sync().await;
    c.write_batch().await;
    let first = c.until_ready().await;
    assert_eq!(tags(&first), "E Z", "{first:?}");
    assert_eq!(first[0].code(), "34000", "{first:?}");
    let second = c.until_ready().await;
    assert_eq!(tags(&second), "1 2 D C Z", "{second:?}");
    assert_eq!(last_value(&second), "north");
    proxy.stop().await;
}

/// DISCARD ALL in an extended unit that an earlier error makes the server skip: rlsgate's
/// statements are still there, and the next units run with the context (found by the session
/// fuzz target: rlsgate took them for gone, its Parse then failed with 42P05).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_discard_all_leaves_the_context_working() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("south")).await;
    // a first unit: the connection now has the context statement
    c.query("SELECT 1").await;
    c.until_ready().await;
    c.start_batch();
    c.send(b'D', b"Pno_such_portal\0").await;
    c.parse("", "DISCARD ALL").await;
    c.bind("", "").await;
    c.execute("").await;
    c.sync().await;
    c.write_batch().await;
    let skipped = c.until_ready().await;
    assert_eq!(tags(&skipped), "E Z", "{skipped:?}");
    for _ in 0..2 {
        c.query("SELECT current_setting('app.current_store_id')")
            .await;
        let next = c.until_ready().await;
        assert_eq!(last_value(&next), "south", "{next:?}");
    }
    // and one that runs: the context is prepared again afterwards
    c.query("DISCARD ALL").await;
    assert_eq!(tags(&c.until_ready().await), "C Z");
    assert_eq!(tenant_now(&mut c).await, "south");
    proxy.stop().await;
}

/// DEALLOCATE ALL on a pinned connection reaches the server and drops rlsgate's statements too,
/// also the context statement rlsgate queued ahead of it (after COMMIT AND CHAIN): the next
/// units prepare it again (found by the session fuzz target).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_on_a_pinned_connection_after_and_chain() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    for sql in [
        "BEGIN",
        "PREPARE pin_me AS SELECT 1",
        "COMMIT AND CHAIN",
        "DEALLOCATE ALL",
    ] {
        c.query(sql).await;
        let msgs = c.until_ready().await;
        assert_eq!(tags(&msgs), "C Z", "{sql}: {msgs:?}");
    }
    c.query("COMMIT; SELECT current_setting('app.current_store_id')")
        .await;
    let msgs = c.until_ready().await;
    assert_eq!(last_value(&msgs), "north", "{msgs:?}");
    assert_eq!(tenant_now(&mut c).await, "north");
    proxy.stop().await;
}

/// DEALLOCATE ALL in autocommit on a connection pinned by SQL PREPARE: with transaction_wrap the
/// context goes inside rlsgate's block, queued after rlsgate decided what the statement drops;
/// that context statement is dropped too and must be prepared again (found by the session fuzz
/// target: the next unit bound the dropped statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_twice_on_a_connection_pinned_by_prepare() {
    let proxy = copy_proxy().await;
    let mut c = RawClient::connect(&proxy, &token("south")).await;
    for sql in ["PREPARE q AS SELECT 1", "DEALLOCATE ALL", "DEALLOCATE ALL"] {
        c.query(sql).await;
        let msgs = c.until_ready().await;
        assert_eq!(tags(&msgs), "C Z", "{sql}: {msgs:?}");
    }
    for _ in 0..2 {
        c.query("SELECT current_setting('app.current_store_id')")
            .await;
        let msgs = c.until_ready().await;
        assert_eq!(last_value(&msgs), "south", "{msgs:?}");
    }
    // in a Query with other statements it is refused (and the session goes on with its context)
    for (i, sql) in [
        "DEALLOCATE ALL; SELECT 1; COMMIT; SELECT 2",
        "SELECT 1; COMMIT; DEALLOCATE ALL; SELECT 2",
        "SELECT 1; DEALLOCATE ALL; SELECT 2",
    ]
    .into_iter()
    .enumerate()
    {
        c.query(&format!("PREPARE q{i} AS SELECT 1")).await;
        assert_eq!(tags(&c.until_ready().await), "C Z");
        c.query(sql).await;
        let msgs = c.until_ready().await;
        assert_eq!(tags(&msgs), "E Z", "{sql}: {msgs:?}");
        assert_eq!(msgs[0].code(), "42501", "{sql}: {msgs:?}");
        for _ in 0..2 {
            assert_eq!(tenant_now(&mut c).await, "south", "after {sql}");
        }
    }
    proxy.stop().await;
}

/// A Query that starts with BEGIN, pipelined inside an open block behind a COPY FROM STDIN that
/// the client's next message interrupts: the COPY fails the block, so the BEGIN fails as well
/// and the rest of its Query is skipped, as in Postgres, and the client goes on. With
/// transaction_wrap rlsgate puts the context after a leading BEGIN only outside an aborted
/// block, so it must know first whether the pipelined COPY failed the block: set in the aborted
/// block, the context failed and ended the session with XX000 (a session fuzz finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_pipelined_behind_a_failing_copy_in_a_block() {
    let proxy = copy_proxy().await;
    for round in 0..5 {
        let mut c = RawClient::connect(&proxy, &token("north")).await;
        c.start_batch();
        c.query("SELECT 1").await;
        c.query("SELECT 1").await;
        // (with transaction_wrap rlsgate runs the two as pieces, so the isolation level is
        // accepted; in one implicit transaction Postgres refuses it after the SELECT)
        let start = if WRAP {
            "SELECT 1; START TRANSACTION ISOLATION LEVEL SERIALIZABLE"
        } else {
            "SELECT 1; START TRANSACTION"
        };
        c.query(start).await;
        c.parse("q", "COMMIT").await;
        c.query("SELECT 1; COPY scratch FROM STDIN; SELECT 2").await;
        // not COPY data: the server fails the COPY, and the block with it
        extended_unit(&mut c, "SELECT 1").await;
        c.query("BEGIN; SET search_path = public").await;
        c.query("SELECT 1").await;
        c.query("SELECT 1; SELECT 1").await;
        c.write_batch().await;
        let mut replies = Vec::new();
        for _ in 0..8 {
            replies.push(c.until_ready().await);
        }
        let replies = replies.split_off(2);
        let fatal = replies
            .iter()
            .flatten()
            .any(|m| m.tag == 'E' && String::from_utf8_lossy(&m.body).contains("FATAL"));
        assert!(!fatal, "round {round}: {replies:?}");
        for reply in &replies[3..] {
            assert_eq!(tags(reply), "E Z", "round {round}: {replies:?}");
            assert!(
                String::from_utf8_lossy(&reply[0].body).contains("C25P02"),
                "round {round}: {reply:?}"
            );
            assert_eq!(reply[1].body, b"E", "round {round}: {replies:?}");
        }
        c.query("ROLLBACK").await;
        assert_eq!(tags(&c.until_ready().await), "C Z");
        assert_eq!(tenant_now(&mut c).await, "north");
    }
    proxy.stop().await;
}
