//! The JWKS key source (`rlsgate::auth::jwks`) against a local HTTPS server and files.

#[allow(dead_code)]
mod jwks_server;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rlsgate::auth::jwks::{Jwks, JwksConfig, JwksError, Lookup};
use rlsgate::auth::{AuthError, Validator};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use jwks_server::{JwksServer, es256_jwk, jwks_body};

fn url_config(server: &JwksServer) -> JwksConfig {
    JwksConfig {
        url: Some(server.url.clone()),
        ca_file: Some(server.ca_pem_path.clone()),
        ..JwksConfig::default()
    }
}

fn sign(private_pem: &str, kid: &str) -> String {
    sign_claims(private_pem, kid, json!({"sub": "u1"}))
}

/// An ES256 token with these claims (and `exp` a minute ahead), signed with the key `kid`.
fn sign_claims(private_pem: &str, kid: &str, mut claims: Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_string());
    claims["exp"] = json!(jsonwebtoken::get_current_timestamp() + 60);
    let key = EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// Look the token's key up by its header, as the validator does, and verify it.
fn verify(jwks: &Jwks, token: &str) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    match jwks.lookup(header.kid.as_deref(), header.alg) {
        Lookup::Key(key) => {
            jsonwebtoken::decode::<Value>(token, &key, &Validation::new(header.alg))
                .map(|data| data.claims)
                .map_err(|e| e.to_string())
        }
        other => Err(format!("{other:?}")),
    }
}

fn has_kid(jwks: &Jwks, kid: &str) -> bool {
    matches!(jwks.lookup(Some(kid), Algorithm::ES256), Lookup::Key(_))
}

/// A fresh temporary file path for this test process.
fn temp_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("rlsgate-jwks-{}-{n}.json", std::process::id()))
}

/// A key set loaded from a file holding `keys`.
async fn load_file(keys: &[Value]) -> Jwks {
    let path = temp_path();
    std::fs::write(&path, jwks_body(keys)).unwrap();
    let jwks = Jwks::load(JwksConfig {
        file: Some(path.clone()),
        ..JwksConfig::default()
    })
    .await;
    let _ = std::fs::remove_file(&path);
    jwks.unwrap()
}

fn with(mut jwk: Value, extra: Value) -> Value {
    jwk.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    jwk
}

/// Public JWK (no `alg`, no `use`) and PKCS#8 DER private key for a fresh rcgen key.
fn rcgen_jwk(alg: &'static rcgen::SignatureAlgorithm, kid: &str) -> (Value, Vec<u8>) {
    let pair = rcgen::KeyPair::generate_for(alg).unwrap();
    let public = if alg == &rcgen::PKCS_ED25519 {
        DecodingKey::from_ed_der(pair.public_key_raw())
    } else {
        DecodingKey::from_ec_der(pair.public_key_raw())
    };
    let jwk = serde_json::to_value(Jwk::from_decoding_key(&public, None).unwrap()).unwrap();
    (
        with(jwk, json!({ "kid": kid })),
        pair.serialized_der().to_vec(),
    )
}

/// Shaped like a 2048-bit RSA key; only for lookup rules, never for verifying.
fn rsa_shaped(extra: Value) -> Value {
    let n = format!("{}A", "s".repeat(341)); // 256 bytes, canonical base64url
    with(json!({"kty": "RSA", "e": "AQAB", "n": n}), extra)
}

fn lookup_name(jwks: &Jwks, kid: Option<&str>, alg: Algorithm) -> String {
    match jwks.lookup(kid, alg) {
        Lookup::Key(_) => "Key".to_string(),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn url_source_verifies_es256_token_by_kid() {
    let (private_a, public_a) = es256_jwk("a");
    let (private_b, _) = es256_jwk("b");
    let server = JwksServer::start(jwks_body(&[public_a])).await;
    let jwks = Jwks::load(url_config(&server)).await.unwrap();
    assert_eq!((jwks.len(), server.hits()), (1, 1));

    let claims = verify(&jwks, &sign(&private_a, "a")).unwrap();
    assert_eq!(claims["sub"], "u1");
    assert_eq!(
        verify(&jwks, &sign(&private_b, "b")).unwrap_err(),
        "UnknownKid"
    );
    // Key b's signature under kid a: right key chosen, signature refused.
    assert!(
        verify(&jwks, &sign(&private_b, "a"))
            .unwrap_err()
            .contains("InvalidSignature")
    );
    assert!(matches!(
        jwks.lookup(Some("a"), Algorithm::RS256),
        Lookup::AlgorithmMismatch
    ));
    assert!(matches!(
        jwks.lookup(None, Algorithm::ES256),
        Lookup::Key(_)
    ));
}

#[tokio::test]
async fn unknown_kid_refetch_installs_rotated_set_at_most_once_per_interval() {
    let (_, public_a) = es256_jwk("a");
    let (private_b, public_b) = es256_jwk("b");
    let (_, public_c) = es256_jwk("c");
    let server = JwksServer::start(jwks_body(&[public_a])).await;
    let cfg = JwksConfig {
        min_refetch_interval: Duration::from_millis(400),
        ..url_config(&server)
    };
    let jwks = Jwks::load(cfg).await.unwrap();
    assert_eq!(server.hits(), 1);

    tokio::time::sleep(Duration::from_millis(450)).await;
    server.set_body(jwks_body(&[public_b]));
    assert!(matches!(
        jwks.lookup(Some("b"), Algorithm::ES256),
        Lookup::UnknownKid
    ));
    assert!(jwks.refetch_for_unknown_kid().await);
    assert_eq!(server.hits(), 2);
    assert!(verify(&jwks, &sign(&private_b, "b")).is_ok());
    assert!(!has_kid(&jwks, "a"), "rotated-out key must be gone");

    // Within the interval: no request, nothing new.
    server.set_body(jwks_body(&[public_c]));
    assert!(!jwks.refetch_for_unknown_kid().await);
    assert_eq!(server.hits(), 2);
    assert!(!has_kid(&jwks, "c"));

    // After it: concurrent callers share a single fetch and all see the new set.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let calls = (0..5).map(|_| {
        let jwks = jwks.clone();
        tokio::spawn(async move { jwks.refetch_for_unknown_kid().await })
    });
    for call in calls.collect::<Vec<_>>() {
        assert!(call.await.unwrap());
    }
    assert_eq!(server.hits(), 3);
    assert!(has_kid(&jwks, "c"));
}

#[tokio::test]
async fn server_error_keeps_last_good_set() {
    let (private_a, public_a) = es256_jwk("a");
    let server = JwksServer::start(jwks_body(&[public_a])).await;
    let cfg = JwksConfig {
        min_refetch_interval: Duration::ZERO,
        ..url_config(&server)
    };
    let jwks = Jwks::load(cfg).await.unwrap();
    server.set_status(500);
    assert!(matches!(
        jwks.refresh_now().await,
        Err(JwksError::Status(500))
    ));
    assert!(!jwks.refetch_for_unknown_kid().await);
    server.set_status(200);
    server.set_body(r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#.to_string());
    assert!(matches!(
        jwks.refresh_now().await,
        Err(JwksError::NoUsableKeys)
    ));
    server.set_body("<html>".to_string());
    assert!(matches!(jwks.refresh_now().await, Err(JwksError::Parse(_))));
    assert_eq!(server.hits(), 5);
    assert_eq!(jwks.len(), 1);
    assert!(verify(&jwks, &sign(&private_a, "a")).is_ok());
}

#[tokio::test]
async fn oversize_body_is_refused_with_or_without_content_length() {
    let (_, public_a) = es256_jwk("a");
    let (_, public_b) = es256_jwk("b");
    let server = JwksServer::start(jwks_body(&[public_a])).await;
    let cfg = JwksConfig {
        max_bytes: 4096,
        ..url_config(&server)
    };
    let jwks = Jwks::load(cfg).await.unwrap();
    // Still valid JSON, only too long.
    server.set_body(jwks_body(&[public_b]) + &" ".repeat(8192));
    assert!(matches!(
        jwks.refresh_now().await,
        Err(JwksError::TooLarge(4096))
    ));
    server.set_send_length(false);
    assert!(matches!(
        jwks.refresh_now().await,
        Err(JwksError::TooLarge(4096))
    ));
    assert!(has_kid(&jwks, "a") && !has_kid(&jwks, "b"));
    // A close-delimited body within the limit is fine.
    server.set_body(jwks_body(&[es256_jwk("c").1]));
    assert_eq!(jwks.refresh_now().await.unwrap(), 1);
    assert!(has_kid(&jwks, "c"));
}

#[tokio::test]
async fn redirects_must_stay_https_and_are_limited() {
    let (_, public_a) = es256_jwk("a");
    let server = JwksServer::start(jwks_body(&[public_a])).await;
    let jwks = Jwks::load(url_config(&server)).await.unwrap();
    let hits = server.hits();

    let plain = format!(
        "http://127.0.0.1:{}/.well-known/jwks.json",
        server.addr.port()
    );
    server.set_redirect(Some(plain));
    match jwks.refresh_now().await {
        Err(JwksError::Fetch(m)) => assert!(m.contains("non-https"), "{m}"),
        other => panic!("expected a fetch error, got {other:?}"),
    }
    assert_eq!(
        server.hits(),
        hits + 1,
        "the http:// location must not be requested"
    );

    // Redirecting to itself forever: the first request plus 3 followed redirects.
    server.set_redirect(Some(server.url.clone()));
    match jwks.refresh_now().await {
        Err(JwksError::Fetch(m)) => assert!(m.contains("redirects"), "{m}"),
        other => panic!("expected a fetch error, got {other:?}"),
    }
    assert_eq!(server.hits(), hits + 1 + 4);
    assert!(has_kid(&jwks, "a"));
}

#[tokio::test]
async fn unavailable_url_starts_empty_and_recovers() {
    let (private_a, public_a) = es256_jwk("a");
    let server = JwksServer::start(jwks_body(&[public_a])).await;
    server.set_status(503);
    let cfg = JwksConfig {
        min_refetch_interval: Duration::ZERO,
        ..url_config(&server)
    };
    let jwks = Jwks::load(cfg).await.unwrap();
    assert!(jwks.is_empty());
    assert!(matches!(
        jwks.lookup(Some("a"), Algorithm::ES256),
        Lookup::NoKeys
    ));
    server.set_status(200);
    assert!(jwks.refetch_for_unknown_kid().await);
    assert!(verify(&jwks, &sign(&private_a, "a")).is_ok());
}

#[tokio::test]
async fn self_signed_server_is_untrusted_without_ca_file() {
    let (_, public_a) = es256_jwk("a");
    let server = JwksServer::start(jwks_body(&[public_a])).await;
    let cfg = JwksConfig {
        ca_file: None,
        ..url_config(&server)
    };
    let jwks = Jwks::load(cfg).await.unwrap();
    assert!(jwks.is_empty());
    match jwks.refresh_now().await {
        Err(JwksError::Fetch(m)) => assert!(m.to_lowercase().contains("certificate"), "{m}"),
        other => panic!("expected a fetch error, got {other:?}"),
    }
    assert_eq!(server.hits(), 0);
}

#[tokio::test]
async fn background_refresh_picks_up_rotation_and_stops() {
    let (_, public_a) = es256_jwk("a");
    let (_, public_b) = es256_jwk("b");
    let server = JwksServer::start(jwks_body(&[public_a])).await;
    let cfg = JwksConfig {
        refresh_interval: Duration::from_millis(100),
        ..url_config(&server)
    };
    let jwks = Jwks::load(cfg).await.unwrap();
    let stop = CancellationToken::new();
    let task = jwks.spawn_refresh(stop.clone());
    server.set_body(jwks_body(&[public_b]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !has_kid(&jwks, "b") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotation not picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!has_kid(&jwks, "a"));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap();
    let hits = server.hits();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.hits(), hits, "no fetches after stop");
}

#[tokio::test]
async fn file_source_loads_and_rereads_on_unknown_kid() {
    let (private_a, public_a) = es256_jwk("a");
    let (private_b, public_b) = es256_jwk("b");
    let path = temp_path();
    std::fs::write(&path, jwks_body(&[public_a])).unwrap();
    let cfg = JwksConfig {
        file: Some(path.clone()),
        min_refetch_interval: Duration::ZERO,
        ..JwksConfig::default()
    };
    let jwks = Jwks::load(cfg.clone()).await.unwrap();
    assert!(verify(&jwks, &sign(&private_a, "a")).is_ok());

    std::fs::write(&path, jwks_body(&[public_b])).unwrap();
    assert_eq!(
        verify(&jwks, &sign(&private_b, "b")).unwrap_err(),
        "UnknownKid"
    );
    assert!(jwks.refetch_for_unknown_kid().await);
    assert!(verify(&jwks, &sign(&private_b, "b")).is_ok());

    // A broken file keeps the last good set, and is an error at start-up.
    std::fs::write(&path, "{").unwrap();
    assert!(!jwks.refetch_for_unknown_kid().await);
    assert!(has_kid(&jwks, "b"));
    assert!(matches!(Jwks::load(cfg).await, Err(JwksError::Parse(_))));
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn unusable_keys_are_skipped_not_fatal() {
    let p256 = |extra: Value| with(es256_jwk("x").1, extra);
    let jwks = load_file(&[
        p256(json!({"kid": "good", "key_ops": ["verify"]})),
        p256(json!({"kid": "enc", "use": "enc"})),
        p256(json!({"kid": "ops", "key_ops": ["encrypt"]})),
        json!({"kid": "hmac", "kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}),
        json!({"kid": "weird", "kty": "XYZ"}),
        json!({"kid": "short", "kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}),
        json!({"kid": "p521", "kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}),
        json!({"kid": "badb64", "kty": "OKP", "crv": "Ed25519", "x": "!".repeat(43)}),
        json!({"kid": "small", "kty": "RSA", "e": "AQAB", "n": "s".repeat(171)}),
        rsa_shaped(json!({"kid": "oaep", "alg": "RSA-OAEP"})),
        rsa_shaped(json!({"kid": "rsa-as-ec", "alg": "ES256"})),
        rsa_shaped(json!({"kid": "rsa-ok", "alg": "PS384"})),
        json!("not an object"),
    ])
    .await;
    assert_eq!(jwks.len(), 2);
    assert!(has_kid(&jwks, "good"));
    assert_eq!(lookup_name(&jwks, Some("rsa-ok"), Algorithm::PS384), "Key");
    for kid in [
        "enc", "ops", "hmac", "weird", "short", "p521", "badb64", "small", "oaep",
    ] {
        assert_eq!(
            lookup_name(&jwks, Some(kid), Algorithm::ES256),
            "UnknownKid",
            "{kid}"
        );
    }
    assert_eq!(
        lookup_name(&jwks, Some("hmac"), Algorithm::HS256),
        "UnknownKid"
    );
}

#[tokio::test]
async fn key_sets_without_usable_keys_are_refused() {
    for (body, expect_parse) in [
        (
            jwks_body(&[with(es256_jwk("a").1, json!({"use": "enc"}))]),
            false,
        ),
        (r#"{"keys": 3}"#.to_string(), true),
        ("<html>".to_string(), true),
    ] {
        let path = temp_path();
        std::fs::write(&path, body).unwrap();
        let cfg = JwksConfig {
            file: Some(path.clone()),
            ..JwksConfig::default()
        };
        match Jwks::load(cfg).await {
            Err(JwksError::Parse(_)) => assert!(expect_parse),
            Err(JwksError::NoUsableKeys) => assert!(!expect_parse),
            other => panic!("expected an error, got {other:?}"),
        }
        let _ = std::fs::remove_file(&path);
    }
}

#[tokio::test]
async fn lookup_honours_kid_declared_alg_and_key_type() {
    let jwks = load_file(&[
        with(es256_jwk("ec").1, json!({"use": "sig"})),
        rsa_shaped(json!({"kid": "rsa", "alg": "RS256"})),
        rsa_shaped(json!({"kid": "rsa-any"})),
        rcgen_jwk(&rcgen::PKCS_ECDSA_P384_SHA384, "p384").0,
        rcgen_jwk(&rcgen::PKCS_ED25519, "ed").0,
    ])
    .await;
    assert_eq!(jwks.len(), 5);
    let cases = [
        ("ec", Algorithm::ES256, "Key"),
        ("rsa", Algorithm::RS256, "Key"),
        ("rsa-any", Algorithm::PS512, "Key"),
        ("p384", Algorithm::ES384, "Key"),
        ("ed", Algorithm::EdDSA, "Key"),
        ("ec", Algorithm::ES384, "AlgorithmMismatch"), // the JWK declares ES256
        ("rsa", Algorithm::RS384, "AlgorithmMismatch"), // the JWK declares RS256
        ("ec", Algorithm::RS256, "AlgorithmMismatch"), // EC key, RSA algorithm
        ("p384", Algorithm::ES256, "AlgorithmMismatch"), // the curve must match
        ("rsa-any", Algorithm::HS256, "AlgorithmMismatch"), // never HMAC
        ("nope", Algorithm::ES256, "UnknownKid"),
    ];
    for (kid, alg, expected) in cases {
        assert_eq!(
            lookup_name(&jwks, Some(kid), alg),
            expected,
            "{kid} {alg:?}"
        );
    }
}

#[tokio::test]
async fn missing_kid_needs_a_single_fitting_key() {
    let jwks = load_file(&[
        es256_jwk("a").1,
        with(es256_jwk("b").1, json!({"kid": null})),
        rsa_shaped(json!({"kid": "r"})),
    ])
    .await;
    assert_eq!(lookup_name(&jwks, None, Algorithm::ES256), "KidRequired");
    assert_eq!(lookup_name(&jwks, None, Algorithm::RS256), "Key");
    assert_eq!(
        lookup_name(&jwks, None, Algorithm::EdDSA),
        "AlgorithmMismatch"
    );
}

#[tokio::test]
async fn p384_and_ed25519_keys_verify_signatures() {
    for (alg, jwt_alg) in [
        (&rcgen::PKCS_ECDSA_P384_SHA384, Algorithm::ES384),
        (&rcgen::PKCS_ED25519, Algorithm::EdDSA),
    ] {
        let (public, private_der) = rcgen_jwk(alg, "k");
        let jwks = load_file(&[public]).await;
        let signing = if jwt_alg == Algorithm::EdDSA {
            EncodingKey::from_ed_der(&private_der)
        } else {
            EncodingKey::from_ec_der(&private_der)
        };
        let mut header = Header::new(jwt_alg);
        header.kid = Some("k".into());
        let claims = json!({"sub": "u1", "exp": jsonwebtoken::get_current_timestamp() + 60});
        let token = jsonwebtoken::encode(&header, &claims, &signing).unwrap();
        assert_eq!(verify(&jwks, &token).unwrap()["sub"], "u1", "{jwt_alg:?}");
    }
}

#[tokio::test]
async fn config_mistakes_are_refused() {
    let cfg = |file: Option<&str>, url: Option<&str>| JwksConfig {
        file: file.map(PathBuf::from),
        url: url.map(String::from),
        ..JwksConfig::default()
    };
    for bad in [
        cfg(None, Some("http://idp.example/jwks.json")),
        cfg(None, Some("file:///etc/jwks.json")),
        cfg(None, Some("not a url")),
        cfg(Some("/x"), Some("https://idp.example/jwks.json")),
        cfg(None, None),
        JwksConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..cfg(None, Some("https://idp.example/jwks.json"))
        },
        JwksConfig {
            refresh_interval: Duration::ZERO,
            ..cfg(Some("/x"), None)
        },
    ] {
        let described = format!("{bad:?}");
        match Jwks::load(bad).await {
            Err(JwksError::Config(_)) => {}
            other => panic!("{described}: expected a config error, got {other:?}"),
        }
    }
    let missing = cfg(Some("/nonexistent/rlsgate-jwks.json"), None);
    assert!(matches!(
        Jwks::load(missing).await,
        Err(JwksError::Read { .. })
    ));
}

/// An ES256 token for `tenant`, signed with the key named `kid`.
fn sign_for(private_pem: &str, kid: &str, tenant: &str) -> String {
    sign_claims(private_pem, kid, json!({ "store_id": tenant }))
}

/// The validator keeps tokens that verified (a second login with the same text skips the
/// signature check) only while the key set still holds the key that verified them: once the
/// key rotates out, the same token text is refused.
#[tokio::test]
async fn a_kept_token_is_refused_once_its_key_rotates_out() {
    let (private_a, public_a) = es256_jwk("a");
    let (private_b, public_b) = es256_jwk("b");
    let path = temp_path();
    std::fs::write(&path, jwks_body(&[public_a])).unwrap();
    let text = format!(
        "[upstream]\ndatabase = \"app\"\nuser = \"u\"\n[auth]\nalgorithms = [\"ES256\"]\njwks_file = \"{}\"\njwks_min_refetch = \"0s\"\ntenant_claim = \"store_id\"\n[context]\n\"app.current_store_id\" = \"store_id\"\n",
        path.display()
    );
    let config = rlsgate::config::Config::from_toml(&text).unwrap();
    let validator = Validator::new(&config.auth, &config.context.settings)
        .await
        .unwrap();
    let token_a = sign_for(&private_a, "a", "north");
    for _ in 0..3 {
        assert_eq!(
            &*validator.validate(&token_a, "u").await.unwrap().tenant,
            "north"
        );
    }
    // "b" is unknown: the validator rereads the file, which now holds only "b"
    std::fs::write(&path, jwks_body(&[public_b])).unwrap();
    let token_b = sign_for(&private_b, "b", "south");
    assert_eq!(
        &*validator.validate(&token_b, "u").await.unwrap().tenant,
        "south"
    );
    for _ in 0..2 {
        assert_eq!(
            validator.validate(&token_a, "u").await.unwrap_err(),
            AuthError::UnknownKid
        );
    }
    assert_eq!(
        &*validator.validate(&token_b, "u").await.unwrap().tenant,
        "south"
    );
    let _ = std::fs::remove_file(&path);
}
