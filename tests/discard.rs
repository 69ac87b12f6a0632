//! DISCARD ALL: outside a transaction it drops the client's prepared statements (and rlsgate
//! forgets them); inside a block Postgres refuses it (25001) and nothing is forgotten.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_in_a_block_keeps_the_clients_statements() {
    let proxy = start_proxy(2).await;
    let mut c = RawClient::connect(&proxy, &token("north")).await;
    c.parse("s1", "SELECT count(*) FROM customers").await;
    c.sync().await;
    assert_eq!(tags(&c.until_ready().await), "1 Z");

    c.query("BEGIN").await;
    c.until_ready().await;
    c.query("DISCARD ALL").await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "E Z", "{msgs:?}");
    assert_eq!(msgs[0].code(), "25001");
    c.query("ROLLBACK").await;
    c.until_ready().await;
    // s1 still exists, as it does in Postgres.
    c.bind("", "s1").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "2 D C Z", "{msgs:?}");

    // Outside a block DISCARD ALL drops it.
    c.query("DISCARD ALL").await;
    assert_eq!(tags(&c.until_ready().await), "C Z");
    c.bind("", "s1").await;
    c.execute("").await;
    c.sync().await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "E Z", "{msgs:?}");
    assert_eq!(msgs[0].code(), "26000");
    proxy.stop().await;
}
