//! Login: tokens, database name, startup parameters, TLS.

mod support;

use serde_json::json;
use support::*;

async fn login_error(proxy: &Proxy, token: &str) -> (String, String) {
    match connect(proxy, token).await {
        Ok(_) => panic!("login with a bad token must fail"),
        Err(e) => (code(&e), message(&e)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_28000_and_a_reason() {
    let proxy = start_proxy(1).await;
    let expired = token_with(json!({"store_id": "north", "exp": now() - 120}));
    let (c, m) = login_error(&proxy, &expired).await;
    assert_eq!((c.as_str(), m.contains("expired")), ("28000", true), "{m}");

    let wrong_key = rlsgate::auth::mint_hs256(
        b"some-other-secret-some-other-secret",
        &json!({"store_id": "north", "exp": now() + 60}),
    )
    .unwrap();
    let (c, m) = login_error(&proxy, &wrong_key).await;
    assert_eq!(
        (c.as_str(), m.contains("signature")),
        ("28000", true),
        "{m}"
    );

    let no_tenant = token_with(json!({"sub": "x", "exp": now() + 60}));
    let (c, m) = login_error(&proxy, &no_tenant).await;
    assert_eq!((c.as_str(), m.contains("store_id")), ("28000", true), "{m}");

    let bad_tenant = token_with(json!({"store_id": "north' OR '1'='1", "exp": now() + 60}));
    let (c, _) = login_error(&proxy, &bad_tenant).await;
    assert_eq!(c, "28000");

    let no_exp = token_with(json!({"store_id": "north"}));
    let (c, m) = login_error(&proxy, &no_exp).await;
    assert_eq!((c.as_str(), m.contains("exp")), ("28000", true), "{m}");

    let not_yet =
        token_with(json!({"store_id": "north", "exp": now() + 7200, "nbf": now() + 3600}));
    let (c, _) = login_error(&proxy, &not_yet).await;
    assert_eq!(c, "28000");

    let (c, _) = login_error(&proxy, "not-a-token").await;
    assert_eq!(c, "28000");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_audience_are_checked_when_configured() {
    let db = demo_db();
    let cfg = config_text(
        &db,
        1,
        "issuer = \"https://id.example\"\naudience = \"rlsgate\"",
    );
    let proxy = start_proxy_with(&db, &cfg).await;
    let good = token_with(
        json!({"store_id": "north", "exp": now() + 60, "iss": "https://id.example", "aud": "rlsgate"}),
    );
    let c = connect(&proxy, &good).await.unwrap();
    assert_eq!(count(&c, "customers").await, 3);
    let wrong_aud = token_with(
        json!({"store_id": "north", "exp": now() + 60, "iss": "https://id.example", "aud": "other"}),
    );
    assert_eq!(login_error(&proxy, &wrong_aud).await.0, "28000");
    let wrong_iss = token_with(
        json!({"store_id": "north", "exp": now() + 60, "iss": "https://evil.example", "aud": "rlsgate"}),
    );
    assert_eq!(login_error(&proxy, &wrong_iss).await.0, "28000");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_database_is_refused_with_3d000() {
    let proxy = start_proxy(1).await;
    let conn = format!(
        "host=127.0.0.1 port={} dbname=postgres user=app password={}",
        proxy.addr.port(),
        token("north")
    );
    let err = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .err()
        .expect("must fail");
    assert_eq!(code(&err), "3D000", "{err}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_settings_in_the_startup_packet_are_refused() {
    let proxy = start_proxy(1).await;
    for options in [
        "-c app.current_store_id=south",
        "--app.current_store_id=south",
        "-c role=postgres",
    ] {
        let conn = format!("{} options='{options}'", proxy.conn_str(&token("north")));
        let err = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .err()
            .expect("must fail");
        assert_eq!(code(&err), "42501", "{options}: {err}");
    }
    // harmless options still work
    let conn = format!(
        "{} options='-c statement_timeout=5000'",
        proxy.conn_str(&token("north"))
    );
    let (c, conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(count(&c, "customers").await, 3);
    proxy.stop().await;
}

fn write_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_login_works_and_plaintext_tokens_can_be_refused() {
    let dir = std::env::temp_dir().join(format!("rlsgate-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = write_cert(&dir);
    let db = demo_db();
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nplaintext_password = \"never\"\n",
        cert.display(),
        key.display()
    );
    let cfg = config_text(&db, 1, "").replace("[upstream]", &format!("{tls}[upstream]"));
    let proxy = start_proxy_with(&db, &cfg).await;
    let tok = token("north");

    let out = run_client(
        &proxy,
        "psql",
        &tok,
        &[
            "-X",
            "-At",
            "-c",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            "-c",
            "SELECT count(*) FROM customers",
        ],
    );
    // PGSSLMODE=disable in run_client: refused because the token would travel in clear text
    assert!(!out.status.success());
    assert!(stderr(&out).contains("without TLS"), "{}", stderr(&out));
    // psql came from loopback: the message must name the rule that refused it, not the address
    assert!(!stderr(&out).contains("non-loopback"), "{}", stderr(&out));
    assert!(stderr(&out).contains("never"), "{}", stderr(&out));

    let mut cmd = std::process::Command::new(pg().bin("psql"));
    cmd.env_clear().env("PGPASSWORD", &tok).args([
        "-X",
        "-At",
        &format!(
            "host=127.0.0.1 port={} dbname={db} user=app sslmode=require",
            proxy.addr.port()
        ),
        "-c",
        "SELECT count(*) FROM customers",
    ]);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "3");
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_first_packets_get_an_error_not_a_hang() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = start_proxy(1).await;
    for garbage in [
        &b"\x00\x00\x00\x04"[..],
        b"\x00\x00\xff\xff\x00\x03\x00\x00",
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let mut buf = Vec::new();
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "proxy must close the connection");
        assert_eq!(
            buf.first(),
            Some(&b'E'),
            "expected an ErrorResponse for {garbage:?}, got {buf:?}"
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_public_key_tokens_work_and_algorithm_confusion_is_refused() {
    let dir = std::env::temp_dir().join(format!("rlsgate-es256-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let public_pem = key.public_key_pem();
    let pub_path = dir.join("jwt-public.pem");
    std::fs::write(&pub_path, &public_pem).unwrap();
    let db = demo_db();
    let cfg = config_text(&db, 1, "")
        .replace("hs_secret = ", "# hs_secret = ")
        .replace(
            "tenant_claim = \"store_id\"",
            &format!(
                "tenant_claim = \"store_id\"\nalgorithms = [\"ES256\"]\npublic_key_pem = \"{}\"",
                pub_path.display()
            ),
        );
    let proxy = start_proxy_with(&db, &cfg).await;

    let claims = json!({"store_id": "south", "exp": now() + 60});
    let signing = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let good = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &signing,
    )
    .unwrap();
    let c = connect(&proxy, &good).await.unwrap();
    assert_eq!(count(&c, "customers").await, 2);

    // HS256 signed with the public key as the secret: the algorithm comes from the config
    let confused = rlsgate::auth::mint_hs256(public_pem.as_bytes(), &claims).unwrap();
    assert_eq!(login_error(&proxy, &confused).await.0, "28000");
    // alg "none"
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let body = base64url(claims.to_string().as_bytes());
    assert_eq!(
        login_error(&proxy, &format!("{header}.{body}.")).await.0,
        "28000"
    );
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_use_tls_per_sslmode() {
    let dir = std::env::temp_dir().join(format!("rlsgate-uptls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = write_cert(&dir);
    let opts = rlsgate::embedded_pg::EmbeddedOptions {
        ssl: Some((cert.clone(), key)),
        ..Default::default()
    };
    let tls_pg = tokio::task::spawn_blocking(move || rlsgate::embedded_pg::EmbeddedPg::start(opts))
        .await
        .unwrap()
        .unwrap();
    tls_pg
        .psql(
            "postgres",
            &format!("CREATE ROLE rlsgate_app LOGIN PASSWORD '{APP_PASSWORD}'"),
        )
        .unwrap();
    let base = config_text("postgres", 1, "").replace(
        &format!("port = {}", pg().port()),
        &format!("port = {}", tls_pg.port()),
    );
    let ssl_query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    for (mode, extra, want) in [
        ("require", String::new(), "t"),
        (
            "verify-full",
            format!("ca_file = \"{}\"\n", cert.display()),
            "t",
        ),
        ("disable", String::new(), "f"),
    ] {
        let cfg = base.replace(
            "sslmode = \"disable\"",
            &format!("sslmode = \"{mode}\"\n{extra}"),
        );
        let proxy = start_proxy_with("postgres", &cfg).await;
        let c = client(&proxy, "north").await;
        let row = c.simple_query(ssl_query).await.unwrap();
        let got = row
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap();
        assert_eq!(got, want, "sslmode {mode}");
        proxy.stop().await;
    }
    drop(tls_pg);
    let _ = std::fs::remove_dir_all(dir);
}

/// rlsgate on a dual-stack `[::]:0` listener, where IPv4 clients show as `::ffff:a.b.c.d`.
async fn dual_stack_proxy(db: &str, config: &str) -> Option<Proxy> {
    let listener = match tokio::net::TcpListener::bind("[::]:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED: no IPv6 listener here: {e}");
            return None;
        }
    };
    let port = listener.local_addr().unwrap().port();
    let config = rlsgate::config::Config::from_toml(config).unwrap();
    let shared = rlsgate::app::Shared::new(config).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(rlsgate::app::run(
        listener,
        std::sync::Arc::clone(&shared),
        shutdown.clone(),
    ));
    Some(Proxy {
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        db: db.to_string(),
        shared,
        shutdown,
        task,
    })
}

/// This host's address on its default route, when it has one that is not loopback.
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect("192.0.2.1:9").ok()?; // no packet is sent
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_clients_of_a_dual_stack_listener_are_loopback() {
    let db = demo_db();
    let Some(proxy) = dual_stack_proxy(&db, &config_text(&db, 1, "")).await else {
        return;
    };
    // 127.0.0.1 arrives as ::ffff:127.0.0.1: still loopback, so a plaintext token is accepted
    let c = connect(&proxy, &token("north"))
        .await
        .expect("IPv4 loopback client through a dual-stack listener");
    assert_eq!(count(&c, "customers").await, 3);
    match non_loopback_ip() {
        Some(ip) => {
            let conn = format!(
                "host={ip} port={} dbname={db} user=app password={} sslmode=disable",
                proxy.addr.port(),
                token("north")
            );
            let err = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                .await
                .err()
                .expect("a plaintext token from a non-loopback address is refused");
            assert_eq!(code(&err), "08004", "{err}");
            assert!(message(&err).contains("non-loopback"), "{err}");
        }
        None => eprintln!("SKIPPED (part): this host has no non-loopback address"),
    }
    proxy.stop().await;
}
