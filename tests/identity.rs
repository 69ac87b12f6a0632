//! Identity from tokens: refused headers, expiry for the life of a connection, re-auth, claims
//! mapped into several settings, role mode, audit events, failed-login throttling.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

async fn login_code(proxy: &Proxy, token: &str) -> String {
    match connect(proxy, token).await {
        Ok(_) => panic!("login must fail"),
        Err(e) => code(&e),
    }
}

fn with_header(header: serde_json::Value, claims: serde_json::Value) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    if let Some(jku) = header.get("jku").and_then(|v| v.as_str()) {
        h.jku = Some(jku.to_string());
    }
    if let Some(x5u) = header.get("x5u").and_then(|v| v.as_str()) {
        h.x5u = Some(x5u.to_string());
    }
    if let Some(kid) = header.get("kid").and_then(|v| v.as_str()) {
        h.kid = Some(kid.to_string());
    }
    jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_are_refused_with_28000() {
    let proxy = start_proxy(1).await;
    let claims = json!({"store_id": "north", "exp": now() + 60});
    let none = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(claims.to_string().as_bytes())
    );
    assert_eq!(login_code(&proxy, &none).await, "28000");
    let jku = with_header(
        json!({"jku": "https://evil.example/jwks.json"}),
        claims.clone(),
    );
    assert_eq!(login_code(&proxy, &jku).await, "28000");
    let x5u = with_header(
        json!({"x5u": "https://evil.example/cert.pem"}),
        claims.clone(),
    );
    assert_eq!(login_code(&proxy, &x5u).await, "28000");
    // RS256 header but HS256 is the only configured algorithm
    let rs = format!(
        "{}.{}.{}",
        base64url(br#"{"alg":"RS256","typ":"JWT"}"#),
        base64url(claims.to_string().as_bytes()),
        base64url(b"sig")
    );
    assert_eq!(login_code(&proxy, &rs).await, "28000");
    let huge =
        token_with(json!({"store_id": "north", "exp": now() + 60, "pad": "x".repeat(20_000)}));
    assert_eq!(login_code(&proxy, &huge).await, "28000");
    proxy.stop().await;
}

async fn expiring_client(proxy: &Proxy, secs: u64) -> tokio_postgres::Client {
    let t = token_with(json!({"store_id": "north", "sub": "alice", "exp": now() + secs}));
    connect(proxy, &t).await.expect("login")
}

fn no_leeway(db: &str, extra_server: &str) -> String {
    config_text(db, 2, "leeway = \"0s\"")
        .replace("[upstream]", &format!("{extra_server}[upstream]"))
}

/// A demo database and a proxy in `pool_mode` `mode` without token leeway.
async fn no_leeway_proxy(mode: &str) -> (String, Proxy) {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &no_leeway(&db, &format!("pool_mode = \"{mode}\"\n"))).await;
    (db, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_ends_when_its_token_expires() {
    for mode in ["transaction", "session"] {
        let (_, proxy) = no_leeway_proxy(mode).await;
        let c = expiring_client(&proxy, 2).await;
        assert_eq!(count(&c, "customers").await, 3);
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let err = c.simple_query("SELECT 1").await.unwrap_err();
        assert!(err.is_closed() || code(&err) == "28000", "{mode}: {err}");
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_in_flight_at_expiry_may_finish_but_no_new_one_starts() {
    for mode in ["transaction", "session"] {
        let (db, proxy) = no_leeway_proxy(mode).await;
        let c = expiring_client(&proxy, 2).await;
        c.batch_execute("BEGIN").await.unwrap();
        c.execute(
            "INSERT INTO customers (store_id, name) VALUES ('north', 'Before expiry')",
            &[],
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(3200)).await;
        c.batch_execute("COMMIT").await.unwrap();
        let err = c.simple_query("SELECT 1").await.unwrap_err();
        assert!(err.is_closed() || code(&err) == "28000", "{mode}: {err}");
        assert_eq!(
            admin_sql(
                &db,
                "SELECT count(*) FROM customers WHERE name = 'Before expiry'"
            ),
            "1"
        );
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_extends_a_connection_for_the_same_tenant_only() {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &no_leeway(&db, "")).await;
    let c = expiring_client(&proxy, 3).await;
    let other = token_with(json!({"store_id": "south", "exp": now() + 600}));
    let err = c
        .simple_query(&format!("SELECT rlsgate.reauth('{other}')"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), "28000", "{err}");
    let fresh = token_with(json!({"store_id": "north", "sub": "alice", "exp": now() + 600}));
    let rows = c
        .simple_query(&format!("SELECT rlsgate.reauth('{fresh}')"))
        .await
        .unwrap();
    assert!(rows.iter().any(
        |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("ok"))
    ));
    tokio::time::sleep(Duration::from_millis(4000)).await;
    assert_eq!(
        count(&c, "customers").await,
        3,
        "connection outlives the first token"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_claims_map_to_settings_used_by_policies() {
    let db = demo_db();
    admin_sql(&db, include_str!("../sql/examples/owner_and_admin.sql"));
    let cfg = config_text(&db, 1, "").replace(
        "\"app.current_store_id\" = \"store_id\"",
        "\"app.current_store_id\" = \"store_id\"\n\"app.user_id\" = \"sub\"\n\"app.user_role\" = \"role\"\n\"app.groups\" = \"groups\"",
    );
    let proxy = start_proxy_with(&db, &cfg).await;
    let alice = connect(&proxy, &token_with(json!({"store_id": "north", "sub": "alice", "role": "member", "groups": ["a", "b"], "exp": now() + 60})))
        .await
        .unwrap();
    let admin = connect(&proxy, &token_with(json!({"store_id": "north", "sub": "dora", "role": "admin", "groups": [], "exp": now() + 60})))
        .await
        .unwrap();
    let carol = connect(&proxy, &token_with(json!({"store_id": "south", "sub": "carol", "role": "admin", "groups": [], "exp": now() + 60})))
        .await
        .unwrap();
    assert_eq!(count(&alice, "notes").await, 2);
    assert_eq!(count(&admin, "notes").await, 3);
    assert_eq!(count(&carol, "notes").await, 1);
    let groups: String = alice
        .query_one("SELECT current_setting('app.groups')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(groups, r#"["a","b"]"#);
    let err = alice
        .execute(
            "INSERT INTO notes (store_id, owner, body) VALUES ('north', 'bob', 'forged')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42501");
    // a token without a mapped claim is refused
    assert_eq!(
        login_code(
            &proxy,
            &token_with(json!({"store_id": "north", "sub": "x", "exp": now() + 60}))
        )
        .await,
        "28000"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_claim_must_match_the_login_user() {
    let db = demo_db();
    let proxy = start_proxy_with(&db, &config_text(&db, 1, "user_claim = \"sub\"")).await;
    let t = token_with(json!({"store_id": "north", "sub": "app", "exp": now() + 60}));
    assert!(
        connect(&proxy, &t).await.is_ok(),
        "login user 'app' equals sub"
    );
    let t = token_with(json!({"store_id": "north", "sub": "mallory", "exp": now() + 60}));
    assert_eq!(login_code(&proxy, &t).await, "28000");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_mode_runs_transactions_as_the_derived_role() {
    let db = demo_db();
    admin_sql(
        &db,
        "DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tenant_north') THEN CREATE ROLE tenant_north NOLOGIN; END IF;
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_reader') THEN CREATE ROLE app_reader NOLOGIN; END IF;
         END $$;
         GRANT tenant_north, app_reader TO rlsgate_app;
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO tenant_north, app_reader;",
    );
    let cfg = config_text(&db, 1, "role_template = \"tenant_{store_id}\"");
    let proxy = start_proxy_with(&db, &cfg).await;
    let c = client(&proxy, "north").await;
    let who: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "tenant_north");
    assert_eq!(count(&c, "customers").await, 3);
    let err = c.simple_query("SET ROLE rlsgate_app").await.unwrap_err();
    assert_eq!(code(&err), "42501");
    proxy.stop().await;

    let cfg = config_text(
        &db,
        1,
        "role_claim = \"db_role\"\nrole_allow = [\"app_reader\"]",
    );
    let proxy = start_proxy_with(&db, &cfg).await;
    let ok = token_with(json!({"store_id": "north", "db_role": "app_reader", "exp": now() + 60}));
    let c = connect(&proxy, &ok).await.unwrap();
    let who: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "app_reader");
    let bad = token_with(json!({"store_id": "north", "db_role": "postgres", "exp": now() + 60}));
    assert_eq!(login_code(&proxy, &bad).await, "28000");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_logins_is_throttled_cheaply() {
    let db = demo_db();
    let proxy = start_proxy_with(
        &db,
        &config_text(
            &db,
            1,
            "failed_login_burst = 5\nfailed_login_window = \"2s\"",
        ),
    )
    .await;
    let bad = rlsgate::auth::mint_hs256(
        b"wrong-secret-wrong-secret-wrong-secret",
        &json!({"store_id": "north", "exp": now() + 60}),
    )
    .unwrap();
    let started = Instant::now();
    let mut throttled = 0;
    for _ in 0..200 {
        match login_code(&proxy, &bad).await.as_str() {
            "53300" => throttled += 1,
            "28000" => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        throttled, 195,
        "after 5 failures the rest of this (address, subject) are refused as throttled"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "flood took {:?}",
        started.elapsed()
    );
    // a good token from the same address is never throttled (tests/throttle.rs has the rest)
    let c = client(&proxy, "north").await;
    assert_eq!(count(&c, "customers").await, 3);
    assert_eq!(login_code(&proxy, &bad).await, "53300");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(login_code(&proxy, &bad).await, "28000");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_reach_the_sink_table() {
    let db = demo_db();
    let audit_db = format!("{db}_audit");
    pg().create_database(&audit_db).unwrap();
    admin_sql(&audit_db, include_str!("../sql/audit.sql"));
    admin_sql(
        &audit_db,
        "ALTER ROLE rlsgate_audit_writer PASSWORD 'audit-pw'",
    );
    let sink = format!(
        "[audit]\nsink = \"host=127.0.0.1 port={} dbname={audit_db} user=rlsgate_audit_writer password=audit-pw\"\n",
        pg().port()
    );
    let cfg = no_leeway(&db, "").replace("[context]", &format!("{sink}[context]"));
    let proxy = start_proxy_with(&db, &cfg).await;
    let c = client(&proxy, "north").await;
    let err = c
        .simple_query("SET app.current_store_id = 'south'")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42501");
    assert_eq!(login_code(&proxy, "not-a-token").await, "28000");
    let fresh = token_with(
        json!({"store_id": "north", "sub": "user-north", "exp": now() + 600, "jti": "j-2"}),
    );
    c.simple_query(&format!("SELECT rlsgate.reauth('{fresh}')"))
        .await
        .unwrap();
    let short = connect(
        &proxy,
        &token_with(json!({"store_id": "south", "exp": now() + 1, "jti": "j-1"})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(short.simple_query("SELECT 1").await.is_err());
    proxy.stop().await;
    let events = admin_sql(
        &audit_db,
        "SELECT string_agg(DISTINCT event, ',' ORDER BY event) FROM rlsgate_audit.events",
    );
    assert_eq!(
        events,
        "login_failed,login_ok,reauth,statement_denied,token_expired"
    );
    let denied = admin_sql(
        &audit_db,
        "SELECT tenant || ' ' || (detail->>'rule') || ' ' || length(detail->>'fingerprint') FROM rlsgate_audit.events WHERE event = 'statement_denied'",
    );
    assert_eq!(denied, "north protected_setting 16");
    let text = admin_sql(
        &audit_db,
        "SELECT count(*) FROM rlsgate_audit.events WHERE detail::text LIKE '%south''%' OR detail::text LIKE '%SET app%'",
    );
    assert_eq!(text, "0", "statement text must not be in the audit trail");
    let expired = admin_sql(
        &audit_db,
        "SELECT tenant || ' ' || (detail->>'jti') FROM rlsgate_audit.events WHERE event = 'token_expired'",
    );
    assert_eq!(expired, "south j-1");
}

#[allow(dead_code)]
mod jwks_server;

fn es256_token(private_pem: &str, kid: &str, claims: serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_string());
    let key = jsonwebtoken::EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_rotate_while_clients_stay_connected() {
    use jwks_server::{JwksServer, es256_jwk, jwks_body};
    let (old_private, old_jwk) = es256_jwk("key-old");
    let server = JwksServer::start(jwks_body(std::slice::from_ref(&old_jwk))).await;
    let db = demo_db();
    let auth = format!(
        "algorithms = [\"ES256\", \"HS256\"]\njwks_url = \"{}\"\njwks_ca_file = \"{}\"\njwks_min_refetch = \"1s\"",
        server.url,
        server.ca_pem_path.display()
    );
    let proxy = start_proxy_with(&db, &config_text(&db, 2, &auth)).await;
    let claims = |store: &str| json!({"store_id": store, "exp": now() + 600});

    let kept = connect(
        &proxy,
        &es256_token(&old_private, "key-old", claims("north")),
    )
    .await
    .expect("old key works");
    assert_eq!(count(&kept, "customers").await, 3);
    // HS256 still works alongside (several key sources)
    assert!(connect(&proxy, &token("south")).await.is_ok());

    // rotation: the new key appears and the old one is removed
    let (new_private, new_jwk) = es256_jwk("key-new");
    server.set_body(jwks_body(&[new_jwk]));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = connect(
        &proxy,
        &es256_token(&new_private, "key-new", claims("south")),
    )
    .await
    .expect("unknown kid triggers a refetch");
    assert_eq!(count(&fresh, "customers").await, 2);
    // the connected client keeps working; new logins with the removed key are refused
    assert_eq!(count(&kept, "customers").await, 3);
    assert_eq!(
        login_code(
            &proxy,
            &es256_token(&old_private, "key-old", claims("north"))
        )
        .await,
        "28000"
    );
    // a kid that points nowhere, and no hammering of the provider for it
    let hits = server.hits();
    for _ in 0..5 {
        assert_eq!(
            login_code(
                &proxy,
                &es256_token(&new_private, "nowhere", claims("north"))
            )
            .await,
            "28000"
        );
    }
    assert!(
        server.hits() <= hits + 1,
        "refetches are rate-limited: {} → {}",
        hits,
        server.hits()
    );
    // the provider fails: the last good set stays in force
    server.set_status(500);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        login_code(&proxy, &es256_token(&new_private, "other", claims("north"))).await,
        "28000"
    );
    assert!(
        connect(
            &proxy,
            &es256_token(&new_private, "key-new", claims("north"))
        )
        .await
        .is_ok()
    );
    proxy.stop().await;
}

/// The session ends at expiry by itself: the idle client sends nothing and still gets the FATAL
/// (the check at the next statement is not what ends it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_is_told_its_token_expired_without_sending_anything() {
    for mode in ["transaction", "session"] {
        let (_, proxy) = no_leeway_proxy(mode).await;
        let t = token_with(json!({"store_id": "north", "exp": now() + 2}));
        let mut c = RawClient::connect(&proxy, &t).await;
        c.query("SELECT count(*) FROM customers").await;
        let msgs = c.until_ready().await;
        assert_eq!(tags(&msgs), "T D C Z", "{mode}");
        // (recv waits up to 15 s; the expiry is 2 s away)
        let m = c.recv().await;
        assert_eq!((m.tag, m.code().as_str()), ('E', "28000"), "{mode}: {m:?}");
        assert_eq!(m.field(b'S'), "FATAL", "{mode}");
        proxy.stop().await;
    }
}
