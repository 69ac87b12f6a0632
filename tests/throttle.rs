//! The failed-login throttle counts only what an attacker controls (bad signatures, malformed
//! tokens, unknown keys, wrong algorithms), per client address and claimed subject; a token whose
//! signature verifies is never throttled. All clients here come from 127.0.0.1, like the clients
//! of a sidecar.

mod support;

use std::time::Duration;

use rlsgate::auth::Validator;
use rlsgate::auth::throttle::LoginThrottle;
use serde_json::json;
use support::*;

const OTHER_KEY: &[u8] = b"some-other-secret-some-other-secret";

async fn throttled_proxy(burst: u32, window: &str) -> Proxy {
    let db = demo_db();
    let extra = format!("failed_login_burst = {burst}\nfailed_login_window = \"{window}\"\n");
    start_proxy_with(&db, &config_text(&db, 2, &extra)).await
}

/// `Ok` or the (SQLSTATE, message) of a refused login.
async fn login(conn_str: String) -> Result<(), (String, String)> {
    match tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            let task = tokio::spawn(conn);
            let one: i32 = client
                .query_one("SELECT 1", &[])
                .await
                .map_err(|e| (code(&e), message(&e)))?
                .get(0);
            assert_eq!(one, 1);
            drop(client);
            let _ = task.await;
            Ok(())
        }
        Err(e) => Err((code(&e), message(&e))),
    }
}

fn forged(sub: &str, n: usize) -> String {
    rlsgate::auth::mint_hs256(
        OTHER_KEY,
        &json!({"store_id": "north", "sub": sub, "jti": format!("f{n}"), "exp": now() + 600}),
    )
    .unwrap()
}

fn expired(sub: &str) -> String {
    token_with(json!({"store_id": "north", "sub": sub, "exp": now() - 600}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_neighbour_does_not_lock_out_a_sidecar() {
    let proxy = throttled_proxy(3, "60s").await;
    let conn = |tok: &str| proxy.conn_str(tok);

    // one client retries its expired (but genuinely signed) token over and over
    let stale: Vec<String> = (0..15).map(|_| conn(&expired("user-stale"))).collect();
    let stale = tokio::spawn(async move {
        let mut out = Vec::new();
        for c in stale {
            out.push(login(c).await);
        }
        out
    });
    // another hammers forged tokens under one subject
    let forgeries: Vec<String> = (0..15).map(|n| conn(&forged("user-mallory", n))).collect();
    let mallory = tokio::spawn(async move {
        let mut out = Vec::new();
        for c in forgeries {
            out.push(login(c).await);
        }
        out
    });
    // meanwhile every other client of the pod keeps logging in
    let mut good = Vec::new();
    for store in ["north", "south", "north"] {
        let conns: Vec<String> = (0..10).map(|_| conn(&token(store))).collect();
        good.push(tokio::spawn(async move {
            let mut refusals = Vec::new();
            for c in conns {
                if let Err(e) = login(c).await {
                    refusals.push(e);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            refusals
        }));
    }
    for g in good {
        let refusals = g.await.unwrap();
        assert!(refusals.is_empty(), "valid tokens refused: {refusals:?}");
    }

    for r in stale.await.unwrap() {
        let (code, msg) = r.expect_err("an expired token never logs in");
        assert_eq!(
            code, "28000",
            "expired tokens are refused as such, never throttled: {msg}"
        );
        assert!(msg.contains("expired"), "{msg}");
    }
    let mallory = mallory.await.unwrap();
    let codes: Vec<&str> = mallory
        .iter()
        .map(|r| r.as_ref().err().map_or("ok", |(c, _)| c.as_str()))
        .collect();
    assert_eq!(&codes[..3], ["28000"; 3], "{mallory:?}");
    assert!(codes[3..].iter().all(|c| *c == "53300"), "{mallory:?}");

    // the attacker's subject is locked, yet a genuine token of that subject still gets in
    let genuine =
        token_with(json!({"store_id": "south", "sub": "user-mallory", "exp": now() + 600}));
    assert_eq!(login(conn(&genuine)).await, Ok(()));
    let (code, _) = login(conn(&forged("user-mallory", 99))).await.unwrap_err();
    assert_eq!(code, "53300", "still locked for forgeries");
    // only mallory's key was ever counted: the expired retries left nothing behind
    assert_eq!(proxy.shared.throttle.len(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signature_spraying_is_throttled_until_the_window_passes() {
    let proxy = throttled_proxy(3, "2s").await;
    let mut codes = Vec::new();
    for n in 0..6 {
        let (code, msg) = login(proxy.conn_str(&forged("user-north", n)))
            .await
            .unwrap_err();
        if code == "28000" {
            assert!(msg.contains("signature"), "{msg}");
        }
        codes.push(code);
    }
    assert_eq!(
        codes,
        ["28000", "28000", "28000", "53300", "53300", "53300"]
    );
    // garbage that is not even a JWT shares one bucket per address, refused unchecked once locked
    let mut codes = Vec::new();
    for junk in ["not-a-token", "x.y.z", "also.not", "nope", "still-not"] {
        codes.push(login(proxy.conn_str(junk)).await.unwrap_err().0);
    }
    assert_eq!(codes, ["28000", "28000", "28000", "53300", "53300"]);
    // wrong algorithm and unknown material count too (a readable payload without sub)
    let hs384 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384),
        &json!({"store_id": "north", "exp": now() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(login(proxy.conn_str(&hs384)).await.unwrap_err().0);
    }
    assert_eq!(codes, ["28000", "28000", "28000", "53300"]);
    let refused = proxy
        .shared
        .metrics
        .encode()
        .lines()
        .find(|l| l.contains("rlsgate_logins_total") && l.contains("reason=\"throttled\""))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        refused.ends_with(" 6"),
        "throttled logins counted: {refused:?}"
    );
    // the window passes: the subject may try again (and is refused for what the token is)
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, _) = login(proxy.conn_str(&forged("user-north", 7)))
        .await
        .unwrap_err();
    assert_eq!(code, "28000");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_memory_is_bounded() {
    // through the proxy: every sprayed subject is one key, nothing else is kept
    let proxy = throttled_proxy(2, "60s").await;
    for n in 0..40 {
        let _ = login(proxy.conn_str(&forged(&format!("spray-{n}"), n))).await;
        let _ = login(proxy.conn_str(&expired(&format!("stale-{n}")))).await;
    }
    assert_eq!(proxy.shared.throttle.len(), 40);
    proxy.stop().await;
    // the same keys in a small throttle: never more than its capacity, and the subject that
    // keeps failing stays locked while a spray of fresh subjects churns through
    let throttle = LoginThrottle::with_capacity(2, Duration::from_secs(60), 64);
    let ip = "127.0.0.1".parse().unwrap();
    let hot = throttle.key(ip, &Validator::meta(&forged("user-hot", 0)).claimed);
    for n in 0..5_000 {
        let meta = Validator::meta(&forged(&format!("spray-{n}"), n));
        throttle.failed(throttle.key(ip, &meta.claimed));
        if n % 8 == 0 {
            throttle.failed(hot);
        }
        assert!(throttle.len() <= 64, "{} keys", throttle.len());
    }
    assert!(throttle.locked(&hot));
}
