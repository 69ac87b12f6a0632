//! Protocol sequences drivers rarely produce, through a raw client.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_is_refused_except_large_objects() {
    let proxy = start_proxy(1).await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    // FunctionCall of set_config (OID 2078) with three text args
    let mut body = 2078i32.to_be_bytes().to_vec();
    body.extend_from_slice(&[0, 0, 0, 3]);
    for arg in ["app.current_store_id", "south", "false"] {
        body.extend_from_slice(&(arg.len() as i32).to_be_bytes());
        body.extend_from_slice(arg.as_bytes());
    }
    body.extend_from_slice(&[0, 0]);
    c.send(b'F', &body).await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "E Z");
    assert_eq!(msgs[0].code(), "0A000");
    c.query("SELECT current_setting('app.current_store_id')")
        .await;
    let msgs = c.until_ready().await;
    let row = msgs.iter().find(|m| m.tag == 'D').expect("a row");
    assert!(String::from_utf8_lossy(&row.body).contains("north"));
    proxy.stop().await;
}

fn lo_import(proxy: &Proxy, file: &std::path::Path) -> std::process::Output {
    run_client(
        proxy,
        "psql",
        &token("north"),
        &[
            "-X",
            "-At",
            "-c",
            &format!("\\lo_import {}", file.display()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_are_refused_by_default_even_through_the_fastpath() {
    let proxy = start_proxy(1).await;
    let file = std::env::temp_dir().join(format!("rlsgate-lo-deny-{}", std::process::id()));
    std::fs::write(&file, b"large object payload").unwrap();
    let out = lo_import(&proxy, &file);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("large objects are not allowed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        admin_sql(&proxy.db, "SELECT count(*) FROM pg_largeobject_metadata"),
        "0"
    );
    let _ = std::fs::remove_file(file);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_work_through_libpq_fastpath_when_allowed() {
    let db = demo_db();
    let proxy = start_proxy_with(
        &db,
        &config_text(&db, 1, "[guard]\nallow_large_objects = true\n"),
    )
    .await;
    let file = std::env::temp_dir().join(format!("rlsgate-lo-{}", std::process::id()));
    std::fs::write(&file, b"large object payload").unwrap();
    let out = lo_import(&proxy, &file);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("lo_import "), "{}", stdout(&out));
    let oid = stdout(&out).trim_start_matches("lo_import ").to_string();
    assert_eq!(
        admin_sql(
            &proxy.db,
            &format!("SELECT convert_from(lo_get({oid}), 'UTF8')")
        ),
        "large object payload"
    );
    let _ = std::fs::remove_file(file);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_queries_and_notices_pass_through() {
    let proxy = start_proxy(1).await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    c.query("").await;
    assert_eq!(tags(&c.until_ready().await), "I Z");
    c.query("DO $$ BEGIN RAISE NOTICE 'hello'; END $$").await;
    // DO is denied by the guard; the error is a proper ErrorResponse and the session continues
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "E Z");
    assert_eq!(msgs[0].code(), "42501");
    c.query("SELECT 1; ").await;
    assert_eq!(tags(&c.until_ready().await), "T D C Z");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_errors_skip_to_sync_like_postgres() {
    let proxy = start_proxy(1).await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    // error in the middle of a pipeline: the rest up to Sync is skipped, the next unit runs
    c.parse("", "SELECT 1/(SELECT 0)").await;
    c.bind("", "").await;
    c.execute("").await;
    c.parse("", "SELECT 42").await;
    c.bind("", "").await;
    c.execute("").await;
    c.sync().await;
    c.parse("", "SELECT count(*) FROM customers").await;
    c.bind("", "").await;
    c.execute("").await;
    c.sync().await;
    let first = c.until_ready().await;
    assert_eq!(tags(&first), "1 2 E Z");
    assert_eq!(first[2].code(), "22012");
    let second = c.until_ready().await;
    assert_eq!(tags(&second), "1 2 D C Z");
    assert!(String::from_utf8_lossy(&second[2].body).ends_with('3'));
    // a denied Parse inside an explicit transaction fails the transaction, as a Postgres error would
    c.query("BEGIN").await;
    c.until_ready().await;
    c.parse("s1", "SET app.current_store_id = 'south'").await;
    c.bind("", "s1").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "E Z");
    assert_eq!(msgs[0].code(), "42501");
    assert_eq!(msgs[1].body, b"E", "transaction must be failed");
    c.query("ROLLBACK").await;
    let msgs = c.until_ready().await;
    assert_eq!(msgs.last().unwrap().body, b"I");
    // the denied statement does not exist
    c.bind("", "s1").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "E Z");
    assert_eq!(msgs[0].code(), "26000");
    proxy.stop().await;
}

/// One message (tag, whole frame) from a socket that has not logged in.
async fn first_messages(addr: std::net::SocketAddr, packet: &[u8], n: usize) -> Vec<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(packet).await.unwrap();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() > len {
                out.push(buf.drain(..=len).collect());
                continue;
            }
        }
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("an answer within 10s")
            .unwrap();
        assert!(read > 0, "closed after {out:?} + {buf:?}");
        buf.extend_from_slice(&chunk[..read]);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiate_protocol_version_is_byte_for_byte_what_postgres_15_sends() {
    let proxy = start_proxy(1).await;
    let server: std::net::SocketAddr = format!("127.0.0.1:{}", pg().port()).parse().unwrap();
    let v = |minor: i32| (3 << 16) | minor;
    type Case<'a> = (&'a str, i32, &'a [(&'a str, &'a str)]);
    let cases: [Case; 6] = [
        ("3.2", v(2), &[]),
        (
            "3.2 + _pq_ options",
            v(2),
            &[("_pq_.foo", "1"), ("_pq_.bar", "x")],
        ),
        ("3.1", v(1), &[]),
        ("3.9999", v(9999), &[]),
        ("3.65535", v(65535), &[("_pq_.a", "")]),
        ("3.0 + _pq_ option", v(0), &[("_pq_.only", "on")]),
    ];
    for (what, version, options) in cases {
        let mut params = vec![("user", "rlsgate_app"), ("database", proxy.db.as_str())];
        params.extend_from_slice(options);
        let packet = startup_packet(version, &params);
        let from_pg = first_messages(server, &packet, 2).await;
        let from_proxy = first_messages(proxy.addr, &packet, 2).await;
        assert_eq!(from_pg[0][0], b'v', "{what}: Postgres 15 negotiates");
        assert_eq!(
            from_proxy[0], from_pg[0],
            "{what}: NegotiateProtocolVersion differs from Postgres 15's"
        );
        // newest supported version: the full version number 3.0
        assert_eq!(&from_proxy[0][5..9], &196_608i32.to_be_bytes(), "{what}");
        // then both ask for a password
        assert_eq!((from_pg[1][0], from_proxy[1][0]), (b'R', b'R'), "{what}");
    }
    // 3.0 without options: no negotiation on either side
    let packet = startup_packet(
        v(0),
        &[("user", "rlsgate_app"), ("database", proxy.db.as_str())],
    );
    assert_eq!(first_messages(server, &packet, 1).await[0][0], b'R');
    assert_eq!(first_messages(proxy.addr, &packet, 1).await[0][0], b'R');
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_18_with_max_protocol_version_3_2_connects_at_3_0() {
    let Some(python) = libpq18_python() else {
        return;
    };
    let proxy = start_proxy(1).await;
    let script = "import sys, psycopg\n\
                  conn = psycopg.connect(sys.argv[1])\n\
                  n = conn.execute('SELECT count(*) FROM customers').fetchone()[0]\n\
                  print(conn.info.pgconn.full_protocol_version, n)\n";
    for max in ["3.2", "latest"] {
        let conninfo = format!(
            "{} max_protocol_version={max}",
            proxy.conn_str(&token("north"))
        );
        let out = std::process::Command::new(&python)
            .args(["-c", script, &conninfo])
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "max_protocol_version={max}: {}",
            stderr(&out)
        );
        // protocol 3.0 (PQfullProtocolVersion = 30000), north's three customers
        assert_eq!(stdout(&out), "30000 3", "max_protocol_version={max}");
    }
    // and min_protocol_version=3.2 is refused by libpq itself, as against Postgres 15
    let conninfo = format!(
        "{} min_protocol_version=3.2",
        proxy.conn_str(&token("north"))
    );
    let out = std::process::Command::new(&python)
        .args(["-c", script, &conninfo])
        .output()
        .expect("run python");
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("3.0"), "{}", stderr(&out));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_after_an_error_read_with_flush_are_skipped_until_sync() {
    let proxy = start_proxy(1).await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    c.parse("", "SELECT 1/(SELECT 0)").await;
    c.bind("", "").await;
    c.execute("").await;
    c.send(b'H', &[]).await; // Flush: the client reads the error before its Sync
    assert_eq!(c.recv().await.tag, '1');
    assert_eq!(c.recv().await.tag, '2');
    let err = c.recv().await;
    assert_eq!((err.tag, err.code()), ('E', "22012".to_string()));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    c.parse("s9", "SELECT 2").await;
    c.bind("", "s9").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "Z", "the server skips everything up to Sync");
    // s9 was never prepared, as in Postgres
    c.bind("", "s9").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(msgs[0].code(), "26000");
    c.query("SELECT count(*) FROM customers").await;
    assert_eq!(tags(&c.until_ready().await), "T D C Z");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_cannot_be_prepared_or_sent_in_the_extended_protocol() {
    let proxy = start_proxy(1).await;
    let south = client(&proxy, "south").await;
    let stmt = south
        .prepare("SELECT count(*) FROM customers")
        .await
        .unwrap();
    let mut north = RawClient::connect(&proxy, &token("north")).await;
    // PQprepare-style (Parse + Sync, no connection held) and a full unit
    for name in ["dall", ""] {
        north.parse(name, "DEALLOCATE ALL").await;
        north.sync().await;
        let msgs = north.until_ready().await;
        assert_eq!(tags(&msgs), "E Z", "{name:?}");
        assert_eq!(msgs[0].code(), "42501");
        north.bind("", name).await;
        north.execute("").await;
        north.sync().await;
        let msgs = north.until_ready().await;
        assert_eq!(msgs[0].tag, 'E', "{name:?}: {}", tags(&msgs));
        assert_ne!(msgs[0].code(), "", "{name:?}");
    }
    // south's statement on the shared connection survived
    let n: i64 = south.query_one(&stmt, &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
    proxy.stop().await;
}

/// Drivers Parse the unnamed statement again for every execution; rlsgate keeps the verdict of
/// the same text and parameter types instead of asking the guard again — but never across a
/// reload that installs another guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_unnamed_parse_gets_the_verdict_of_the_guard_in_force() {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &config_text(&db, 1, "")).await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    let knob = "SET other.knob = 'x'";
    // plain autocommit work (a lane's, when pipelining is on); longer than the new guard reads
    let long = format!("SELECT 1 AS {}", "a".repeat(60));
    // (one write: a whole unit, as drivers send it, which a lane may take)
    async fn run(c: &mut RawClient, sql: &str) -> Vec<Msg> {
        c.start_batch();
        c.parse("", sql).await;
        c.bind("", "").await;
        c.execute("").await;
        c.sync().await;
        c.write_batch().await;
        c.until_ready().await
    }
    for _ in 0..3 {
        assert_eq!(tags(&run(&mut c, knob).await), "1 2 C Z");
    }
    // (another client: one without settings of its own may use a lane)
    let mut plain = RawClient::connect(&proxy, &token("north")).await;
    for _ in 0..3 {
        assert_eq!(tags(&run(&mut plain, &long).await), "1 2 D C Z");
    }
    let guard = "[guard]\nprotected = [\"app.*\", \"other.*\"]\nmax_statement_bytes = 64";
    let text = config_text(&db, 1, guard).replace("127.0.0.1:0", &proxy.addr.to_string());
    let config = rlsgate::config::Config::from_toml(&text).expect("config");
    proxy.shared.reload(config).await.expect("reload");
    for _ in 0..2 {
        let msgs = run(&mut c, knob).await;
        assert_eq!(tags(&msgs), "E Z", "the same text after the reload");
        assert_eq!(msgs[0].code(), "42501");
    }
    let msgs = run(&mut plain, &long).await;
    assert_eq!(tags(&msgs), "E Z", "the same plain text after the reload");
    assert_eq!(msgs[0].code(), "54000");
    // another text, then the first again: the new guard's verdict each time
    assert_eq!(tags(&run(&mut c, "SELECT 1").await), "1 2 D C Z");
    assert_eq!(run(&mut c, knob).await[0].code(), "42501");
    proxy.stop().await;
}

/// Outside a transaction a Close needs no connection (no portals exist then; server statements
/// are rlsgate's): `Close` + `Sync`, what tokio-postgres sends for every statement it drops, is
/// answered by rlsgate even while every pooled connection is busy, and the client's name is
/// gone. Inside a transaction the Close goes to the server as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_outside_a_transaction_takes_no_connection() {
    let proxy = start_proxy(1).await;
    let holder = client(&proxy, "south").await;
    holder.simple_query("BEGIN").await.unwrap();
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    // PQprepare (in one write): deferred, no connection either
    c.start_batch();
    c.parse("s1", "SELECT count(*) FROM customers").await;
    c.sync().await;
    c.write_batch().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "1 Z", "{msgs:?}");
    // the only connection is south's, inside its transaction: a Close + Sync that needed one
    // would wait for checkout_timeout and fail
    let started = std::time::Instant::now();
    c.start_batch();
    c.send(b'C', b"Ss1\0").await;
    c.sync().await;
    c.send(b'C', b"Pnone\0").await;
    c.send(b'C', b"Snever_prepared\0").await;
    c.sync().await;
    c.write_batch().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "3 Z");
    assert_eq!(msgs[1].body, b"I");
    assert_eq!(tags(&c.until_ready().await), "3 3 Z");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    holder.simple_query("COMMIT").await.unwrap();
    // the client's name is gone
    c.bind("", "s1").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "E Z");
    assert_eq!(msgs[0].code(), "26000");
    // inside a transaction: the server answers (a portal of the transaction is closed)
    c.query("BEGIN").await;
    c.until_ready().await;
    c.parse("s2", "SELECT 7").await;
    c.bind("p", "s2").await;
    c.send(b'C', b"Pp\0").await;
    c.send(b'C', b"Ss2\0").await;
    c.execute("p").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "1 2 3 3 E Z", "{msgs:?}");
    assert_eq!(msgs[4].code(), "34000", "the closed portal is gone");
    c.query("ROLLBACK").await;
    assert_eq!(c.until_ready().await.last().unwrap().body, b"I");
    // a driver dropping its statements after each query
    let d = client(&proxy, "north").await;
    for _ in 0..3 {
        assert_eq!(count(&d, "customers").await, 3);
    }
    proxy.stop().await;
}
