//! Memory comes back when clients leave: thousands of idle clients log in and leave, and the
//! process's resident memory returns most of the way to where it was. (Its own test binary:
//! it measures the whole process.)

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_idle_clients_is_returned_when_they_leave() {
    const CLIENTS: usize = 2000;
    let db = demo_db();
    let proxy = start_proxy_with(
        &db,
        &config_text(&db, 2, "").replace(
            "[server]\n",
            &format!("[server]\nmax_client_conn = {}\n", CLIENTS + 10),
        ),
    )
    .await;
    // warm up (pool, caches, runtime threads)
    for _ in 0..20 {
        let mut c = RawClient::connect(&proxy, &token("north")).await;
        c.query("SELECT 1").await;
        c.until_ready().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kb();
    let mut clients = Vec::with_capacity(CLIENTS);
    let t = token("north");
    for _ in 0..CLIENTS {
        let mut c = RawClient::connect(&proxy, &t).await;
        // a little work, so each session's buffers have been used
        c.query("SELECT 1").await;
        c.until_ready().await;
        clients.push(c);
    }
    let peak = rss_kb();
    let grown = peak.saturating_sub(before);
    // (about 2 MB of it is the proxy's since idle sessions hold no buffers; the rest is the
    // clients' side in this same process)
    assert!(
        grown > 4_000,
        "2000 clients should cost some memory: {before} → {peak} kB"
    );
    drop(clients);
    let mut after = rss_kb();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = rss_kb();
        if after < before + grown / 3 {
            break;
        }
    }
    assert!(
        after < before + grown / 3,
        "memory not returned: before {before} kB, with {CLIENTS} clients {peak} kB, after they left {after} kB"
    );
    // still serving
    let c = client(&proxy, "north").await;
    c.simple_query("SELECT 1").await.expect("served");
    proxy.stop().await;
}
