//! The JWKS key source (`rlsgate::auth::jwks`) against a local HTTPS server and files.

#[allow(dead_code)]
mod jwks_server;

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};
use rlsgate::auth::jwks::{Jwks, JwksConfig, JwksError, Lookup};
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
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_string());
    let exp = jsonwebtoken::get_current_timestamp() + 60;
    let key = EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &json!({"sub": "u1", "exp": exp}), &key).unwrap()
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
    let path = std::env::temp_dir().join(format!("rlsgate-jwks-{}.json", std::process::id()));
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
