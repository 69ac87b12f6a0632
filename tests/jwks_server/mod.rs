//! A tiny HTTPS server that serves a JWKS document, for integration tests.
//!
//! Hand-rolled HTTP/1.1 over tokio-rustls: every connection gets one answer and is closed.
//! The certificate is self-signed (rcgen) for `localhost` and `127.0.0.1`; its PEM is written to
//! a temporary file so clients can trust it via `ca_file`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// What the server answers; changed by the test while it runs.
struct State {
    body: Mutex<String>,
    status: AtomicU16,
    redirect: Mutex<Option<String>>,
    send_length: AtomicBool,
    hits: AtomicUsize,
}

/// A running JWKS server; stops (and removes its CA file) when dropped.
pub struct JwksServer {
    /// `https://127.0.0.1:<port>/.well-known/jwks.json`
    pub url: String,
    /// PEM of the self-signed server certificate, to use as `ca_file`.
    pub ca_pem_path: PathBuf,
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    /// Bind 127.0.0.1:0 and serve `initial_body` with status 200 to any request.
    pub async fn start(initial_body: String) -> JwksServer {
        let certified = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .expect("self-signed certificate");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("server certificate");
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let ca_pem_path = std::env::temp_dir().join(format!(
            "rlsgate-jwks-ca-{}-{}.pem",
            std::process::id(),
            addr.port()
        ));
        std::fs::write(&ca_pem_path, certified.cert.pem()).expect("write CA file");

        let state = Arc::new(State {
            body: Mutex::new(initial_body),
            status: AtomicU16::new(200),
            redirect: Mutex::new(None),
            send_length: AtomicBool::new(true),
            hits: AtomicUsize::new(0),
        });
        let served = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let state = Arc::clone(&served);
                tokio::spawn(async move { serve(acceptor, tcp, &state).await });
            }
        });
        JwksServer {
            url: format!("https://127.0.0.1:{}/.well-known/jwks.json", addr.port()),
            ca_pem_path,
            addr,
            state,
            task,
        }
    }

    /// Serve `body` from now on (key rotation).
    pub fn set_body(&self, body: String) {
        *self.state.body.lock().unwrap() = body;
    }

    /// Answer with this status code (200 serves the body; anything else a short error text).
    pub fn set_status(&self, code: u16) {
        self.state.status.store(code, Ordering::SeqCst);
    }

    /// Answer 302 with this `Location` (takes precedence over status), or stop redirecting.
    pub fn set_redirect(&self, location: Option<String>) {
        *self.state.redirect.lock().unwrap() = location;
    }

    /// Whether 200 answers carry `Content-Length` (otherwise the body ends at close).
    pub fn set_send_length(&self, send: bool) {
        self.state.send_length.store(send, Ordering::SeqCst);
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.ca_pem_path);
    }
}

async fn serve(acceptor: TlsAcceptor, tcp: TcpStream, state: &State) {
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        return; // e.g. the client did not trust the certificate
    };
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    state.hits.fetch_add(1, Ordering::SeqCst);
    let redirect = state.redirect.lock().unwrap().clone();
    let status = state.status.load(Ordering::SeqCst);
    let response = if let Some(location) = redirect {
        format!(
            "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    } else if status != 200 {
        let text = "key set unavailable\n";
        format!(
            "HTTP/1.1 {status} Error\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        )
    } else {
        let body = state.body.lock().unwrap().clone();
        let length = if state.send_length.load(Ordering::SeqCst) {
            format!("Content-Length: {}\r\n", body.len())
        } else {
            String::new()
        };
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{length}Connection: close\r\n\r\n{body}"
        )
    };
    let _ = tls.write_all(response.as_bytes()).await;
    let _ = tls.shutdown().await;
}

/// A fresh P-256 key: (private key PEM for signing, public JWK with `kid`, `alg: ES256`,
/// `use: sig`).
pub fn es256_jwk(kid: &str) -> (String, serde_json::Value) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let point = key.public_key_raw();
    assert!(
        point.len() == 65 && point[0] == 0x04,
        "uncompressed P-256 point"
    );
    let jwk = serde_json::json!({
        "kty": "EC",
        "crv": "P-256",
        "kid": kid,
        "alg": "ES256",
        "use": "sig",
        "x": base64url(&point[1..33]),
        "y": base64url(&point[33..65]),
    });
    (key.serialize_pem(), jwk)
}

/// `{"keys": [...]}` for these JWKs.
pub fn jwks_body(keys: &[serde_json::Value]) -> String {
    serde_json::json!({ "keys": keys }).to_string()
}

/// Base64url without padding (RFC 4648 section 5).
pub fn base64url(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let bytes = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let group = (u32::from(bytes[0]) << 16) | (u32::from(bytes[1]) << 8) | u32::from(bytes[2]);
        // 1 input byte -> 2 characters, 2 -> 3, 3 -> 4.
        for i in 0..=chunk.len() {
            out.push(char::from(
                ALPHABET[((group >> (18 - 6 * i)) & 63) as usize],
            ));
        }
    }
    out
}
