//! No client can wedge a pooled connection: after any sequence of bytes, a Sync (or leaving)
//! gives the connection back. Each case runs on a pool of one, so a wedged session would starve
//! the next client (which must be served within a few seconds).

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Messages until ReadyForQuery, or `None` when none comes within `wait`.
async fn ready_within(c: &mut RawClient, wait: Duration) -> Option<Vec<Msg>> {
    tokio::time::timeout(wait, c.until_ready()).await.ok()
}

/// The pool (of one) serves another client: nothing was left holding the connection.
async fn pool_serves(proxy: &Proxy) {
    let served = tokio::time::timeout(Duration::from_secs(8), async {
        let c = client(proxy, "north").await;
        c.simple_query("SELECT 1").await.map(|_| ())
    })
    .await;
    assert!(
        matches!(served, Ok(Ok(()))),
        "the pool did not serve a normal client: {served:?}"
    );
}

fn errors(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag == 'E')
        .map(|m| format!("{} {}", m.code(), m.field(b'M')))
        .collect()
}

/// `Execute` with nothing bound fails and the server ignores everything up to Sync, including
/// simple Queries: a split multi-statement Query or a Query held behind COMMIT must not wait for
/// replies that never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_after_a_failed_execute_are_skipped_until_sync() {
    let proxy = start_proxy(1).await;
    let cases: &[&[&str]] = &[
        &["BEGIN; SELECT 1; COMMIT; SELECT 2"],
        &["COMMIT", "SELECT 2"],
        &["SELECT 1; SELECT 2"],
        &["PREPARE TRANSACTION 'x'"],
        &["CLOSE c"],
        &["COPY stores FROM STDIN"],
        &["BEGIN", "SELECT 1", "COMMIT; SELECT 3"],
    ];
    for queries in cases {
        let mut c = RawClient::connect(&proxy, &token("north")).await;
        // one write: the proxy sees everything before the server's error comes back
        let mut m = Vec::new();
        push(&mut m, b'E', b"\0\0\0\0\0");
        for q in *queries {
            push(&mut m, b'Q', format!("{q}\0").as_bytes());
        }
        push(&mut m, b'S', b"");
        c.stream.write_all(&m).await.unwrap();
        let msgs = ready_within(&mut c, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{queries:?}: no ReadyForQuery after Sync"));
        // Postgres: one error (the Execute), the Queries ignored, then ReadyForQuery for the Sync.
        assert_eq!(errors(&msgs).len(), 1, "{queries:?}: {msgs:?}");
        assert_eq!(msgs.last().map(|m| m.body.clone()), Some(b"I".to_vec()));
        // and the session goes on normally
        c.query("SELECT 42").await;
        let msgs = ready_within(&mut c, Duration::from_secs(5))
            .await
            .expect("answer");
        assert_eq!(tags(&msgs), "T D C Z", "{queries:?}");
        pool_serves(&proxy).await;

        // The same bytes, then the client leaves without a Sync.
        let mut c = RawClient::connect(&proxy, &token("north")).await;
        let mut m = Vec::new();
        push(&mut m, b'E', b"\0\0\0\0\0");
        for q in *queries {
            push(&mut m, b'Q', format!("{q}\0").as_bytes());
        }
        c.stream.write_all(&m).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(c);
        pool_serves(&proxy).await;
    }
    proxy.stop().await;
}

/// A client that leaves while its Query waits behind in-flight replies (held pending, or the
/// rest of a split Query) is noticed at once: its connection goes back (closed) without waiting
/// for the server to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_its_query_waits_is_noticed() {
    let proxy = start_proxy(1).await;
    for first in [
        "BEGIN; SELECT pg_sleep(30); COMMIT; SELECT 1",
        "COMMIT; SELECT pg_sleep(30)",
    ] {
        let mut c = RawClient::connect(&proxy, &token("north")).await;
        c.query("BEGIN").await;
        c.until_ready().await;
        c.query(first).await;
        c.query("SELECT 2").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(c);
        let started = std::time::Instant::now();
        pool_serves(&proxy).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{first}: took {:?}",
            started.elapsed()
        );
    }
    proxy.stop().await;
}

/// COPY FROM STDIN with a Bind/Execute/Sync (or a FunctionCall, or a Query) pipelined behind it:
/// Postgres fails the COPY with the unexpected message; the session stays in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_pipelined_behind_copy_from_stdin_keep_the_session_in_step() {
    let proxy = start_proxy(1).await;
    admin_sql(
        &proxy.db,
        &format!("GRANT TEMPORARY ON DATABASE {} TO rlsgate_app", proxy.db),
    );
    type Tail = fn(&mut Vec<u8>);
    let tails: &[(&str, Tail)] = &[
        ("bind", |m| {
            push(m, b'P', b"\0SELECT 1\0\0\0");
            push(m, b'B', b"\0\0\0\0\0\0\0\0");
            push(m, b'E', b"\0\0\0\0\0");
            push(m, b'S', b"");
        }),
        ("bind of a prepared statement", |m| {
            push(m, b'B', b"\0s1\0\0\0\0\0\0\0");
            push(m, b'E', b"\0\0\0\0\0");
            push(m, b'S', b"");
        }),
        ("function call", |m| {
            push(m, b'F', &[0, 0, 3, 0xb8, 0, 0, 0, 0, 0, 0]);
        }),
        ("query", |m| push(m, b'Q', b"SELECT 1\0")),
    ];
    for (what, tail) in tails {
        let mut c = RawClient::connect(&proxy, &token("north")).await;
        c.parse("s1", "SELECT 1").await;
        c.sync().await;
        c.until_ready().await;
        c.query("CREATE TEMP TABLE t (x int)").await;
        assert_eq!(tags(&c.until_ready().await), "C Z");
        let mut m = Vec::new();
        push(&mut m, b'Q', b"COPY t FROM STDIN\0");
        tail(&mut m);
        c.stream.write_all(&m).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // end the COPY if the server still waits for it (ignored otherwise), then a query
        let mut m = Vec::new();
        push(&mut m, b'c', b"");
        push(&mut m, b'S', b"");
        push(&mut m, b'Q', b"SELECT 42\0");
        c.stream.write_all(&m).await.unwrap();
        let (all, answered) = until_answered(&mut c, b"42").await;
        assert!(
            !all.iter().any(|m| m.tag == 'E' && m.field(b'S') == "FATAL"),
            "{what}: the session ended: {all:?}"
        );
        assert!(answered, "{what}: no answer to SELECT 42: {all:?}");
        assert!(
            !all.iter()
                .any(|m| m.tag == 'I' || m.tag == 'C' && m.body.starts_with(b"COPY")),
            "{what}: nothing was copied: {all:?}"
        );
        drop(c);
        pool_serves(&proxy).await;
    }
    proxy.stop().await;
}

/// The extended-protocol COPY (Parse/Bind/Execute/Sync) with another unit pipelined behind it,
/// and a COPY whose data is pipelined right behind it (no wait for CopyInResponse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_copy_with_a_unit_pipelined_behind_it_stays_in_step() {
    let proxy = start_proxy(1).await;
    admin_sql(
        &proxy.db,
        &format!("GRANT TEMPORARY ON DATABASE {} TO rlsgate_app", proxy.db),
    );
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    // (tenant tables refuse COPY FROM under RLS; a temp table pins the connection, fine here)
    c.query("CREATE TEMP TABLE t (x int)").await;
    assert_eq!(tags(&c.until_ready().await), "C Z");
    let mut m = Vec::new();
    push(&mut m, b'P', b"\0COPY t FROM STDIN\0\0\0");
    push(&mut m, b'B', b"\0\0\0\0\0\0\0\0");
    push(&mut m, b'E', b"\0\0\0\0\0");
    push(&mut m, b'S', b"");
    push(&mut m, b'P', b"\0SELECT 7\0\0\0");
    push(&mut m, b'B', b"\0\0\0\0\0\0\0\0");
    push(&mut m, b'E', b"\0\0\0\0\0");
    push(&mut m, b'S', b"");
    c.stream.write_all(&m).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut m = Vec::new();
    push(&mut m, b'S', b"");
    push(&mut m, b'Q', b"SELECT 42\0");
    c.stream.write_all(&m).await.unwrap();
    let (all, answered) = until_answered(&mut c, b"42").await;
    assert!(
        !all.iter().any(|m| m.tag == 'E' && m.field(b'S') == "FATAL"),
        "the session ended: {all:?}"
    );
    assert!(answered, "no answer to SELECT 42: {all:?}");
    assert!(all.iter().any(|m| m.tag == 'G'), "COPY started: {all:?}");

    // COPY with its data and CopyDone in the same write: rows arrive, the session goes on.
    let mut m = Vec::new();
    push(&mut m, b'Q', b"DELETE FROM t\0");
    push(&mut m, b'Q', b"COPY t FROM STDIN\0");
    push(&mut m, b'd', b"1\n2\n");
    push(&mut m, b'c', b"");
    push(&mut m, b'Q', b"SELECT count(*) FROM t\0");
    c.stream.write_all(&m).await.unwrap();
    c.until_ready().await;
    let copied = c.until_ready().await;
    assert!(
        copied
            .iter()
            .any(|m| m.tag == 'C' && m.body.starts_with(b"COPY 2")),
        "{copied:?}"
    );
    let counted = c.until_ready().await;
    assert!(
        counted
            .iter()
            .any(|m| m.tag == 'D' && m.body.ends_with(b"2")),
        "{counted:?}"
    );

    // Bad data: the server ends the COPY with an error; the client's next Query (no CopyDone
    // sent) runs normally, as with Postgres.
    let mut m = Vec::new();
    push(&mut m, b'Q', b"COPY t FROM STDIN\0");
    c.stream.write_all(&m).await.unwrap();
    assert_eq!(c.recv().await.tag, 'G');
    let mut m = Vec::new();
    push(&mut m, b'd', b"not a number\n");
    c.stream.write_all(&m).await.unwrap();
    let failed = c.until_ready().await;
    assert_eq!(tags(&failed), "E Z", "{failed:?}");
    c.query("SELECT 43").await;
    let answered = c.until_ready().await;
    assert!(
        answered
            .iter()
            .any(|m| m.tag == 'D' && m.body.ends_with(b"43")),
        "{answered:?}"
    );
    drop(c);
    pool_serves(&proxy).await;
    proxy.stop().await;
}

/// Messages until the ReadyForQuery after a DataRow ending in `value` (or 5 s); whether it came.
async fn until_answered(c: &mut RawClient, value: &[u8]) -> (Vec<Msg>, bool) {
    let mut all = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut answered = false;
    while let Ok(msg) = tokio::time::timeout_at(deadline, c.recv()).await {
        if msg.tag == 'D' && msg.body.ends_with(value) {
            answered = true;
        }
        let done = answered && msg.tag == 'Z';
        all.push(msg);
        if done {
            break;
        }
    }
    (all, answered)
}

fn push(m: &mut Vec<u8>, tag: u8, body: &[u8]) {
    m.push(tag);
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
}

/// An 8 MB result pipelined before an 8 MB client message: reads and writes on both sides go on
/// independently (the proxy must not finish writing the client's message to the server while
/// the server is blocked writing its result to the proxy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_result_and_large_message_pipelined_do_not_deadlock() {
    let proxy = start_proxy(1).await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    let mut m = Vec::new();
    push(&mut m, b'Q', b"SELECT repeat('x', 8 * 1024 * 1024)\0");
    // an 8 MB Bind parameter (an 8 MB SQL text would be over guard.max_statement_bytes)
    push(&mut m, b'P', b"\0SELECT length($1::text)\0\0\0");
    let mut bind = b"\0\0\0\0\0\x01".to_vec();
    bind.extend_from_slice(&(8 * 1024 * 1024i32).to_be_bytes());
    bind.extend_from_slice(&vec![b'y'; 8 * 1024 * 1024]);
    bind.extend_from_slice(b"\0\0");
    push(&mut m, b'B', &bind);
    push(&mut m, b'E', b"\0\0\0\0\0");
    push(&mut m, b'S', b"");
    let (mut rd, mut wr) = c.stream.split();
    let write = async {
        wr.write_all(&m).await.unwrap();
    };
    // The client writes everything before reading anything (what a blocking client does with a
    // socket buffer that cannot hold it all is its own affair; here the proxy must not block).
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        let mut readies = 0;
        while readies < 2 {
            let n = rd.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed");
            buf.extend_from_slice(&chunk[..n]);
            readies = count_ready(&buf);
        }
        buf
    };
    let (_, buf) =
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
            .await
            .expect("no deadlock within 30s");
    assert!(
        buf.windows(7).any(|w| w == b"8388608"),
        "the second query's result is there"
    );
    drop(c);
    pool_serves(&proxy).await;
    proxy.stop().await;
}

/// Count ReadyForQuery messages in a byte stream of whole and partial messages.
fn count_ready(buf: &[u8]) -> usize {
    let mut at = 0;
    let mut n = 0;
    while at + 5 <= buf.len() {
        let len = i32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
        if at + 1 + len > buf.len() {
            break;
        }
        if buf[at] == b'Z' {
            n += 1;
        }
        at += 1 + len;
    }
    n
}
