//! Direct TLS (libpq 17+ `sslnegotiation=direct`): the client starts the TLS handshake at once,
//! without an SSLRequest. rlsgate behaves as PostgreSQL 17: it answers with TLS, advertises ALPN
//! `postgresql`, refuses a direct-TLS client that did not negotiate it, and closes (never hangs)
//! when TLS is not configured.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

struct Certs {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn certs(name: &str) -> Certs {
    let dir = std::env::temp_dir().join(format!("rlsgate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    Certs {
        dir,
        cert: cert_path,
        key: key_path,
        der: cert.cert.der().clone(),
    }
}

/// A proxy with `[tls]` (plaintext tokens refused, so every login below really went over TLS).
async fn tls_proxy(certs: &Certs) -> Proxy {
    let db = demo_db();
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nplaintext_password = \"never\"\n",
        certs.cert.display(),
        certs.key.display()
    );
    let cfg = config_text(&db, 1, "").replace("[upstream]", &format!("{tls}[upstream]"));
    start_proxy_with(&db, &cfg).await
}

fn connector(certs: &Certs, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// TLS handshake as the very first bytes on the connection (no SSLRequest).
async fn direct(
    proxy: &Proxy,
    connector: &tokio_rustls::TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(proxy.addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("TLS handshake answered within 10s")
}

/// Everything the server sends until it closes (or 10 s pass, which fails the test).
async fn read_to_close(s: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "rlsgate must close the connection, not hang");
    buf
}

async fn recv(s: &mut (impl AsyncRead + Unpin)) -> Msg {
    let mut head = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .expect("answer within 10s")
        .expect("read a message header");
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut body).await.expect("read a message body");
    Msg {
        tag: head[0] as char,
        body,
    }
}

async fn send(s: &mut (impl AsyncWrite + Unpin), tag: u8, body: &[u8]) {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    s.write_all(&m).await.unwrap();
}

/// Log in with `store`'s token over `s` and count the customers it sees.
async fn login_and_count(
    s: &mut (impl AsyncRead + AsyncWrite + Unpin),
    db: &str,
    store: &str,
) -> String {
    s.write_all(&startup_packet(
        196_608,
        &[("user", "app"), ("database", db)],
    ))
    .await
    .unwrap();
    let auth = recv(s).await;
    assert_eq!(
        (auth.tag, &auth.body[..]),
        ('R', &[0, 0, 0, 3][..]),
        "{auth:?}"
    );
    send(s, b'p', &[token(store).as_bytes(), b"\0"].concat()).await;
    loop {
        let m = recv(s).await;
        assert_ne!(m.tag, 'E', "login failed: {}", m.field(b'M'));
        if m.tag == 'Z' {
            break;
        }
    }
    send(s, b'Q', b"SELECT count(*) FROM customers\0").await;
    let mut rows = Vec::new();
    loop {
        let m = recv(s).await;
        match m.tag {
            'D' => rows.push(String::from_utf8_lossy(&m.body[6..]).to_string()),
            'E' => panic!("query failed: {}", m.field(b'M')),
            'Z' => return rows.join(","),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_postgresql_logs_in() {
    let certs = certs("direct-alpn");
    let proxy = tls_proxy(&certs).await;
    let mut s = direct(&proxy, &connector(&certs, &[b"postgresql"]))
        .await
        .expect("direct TLS handshake");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    assert_eq!(login_and_count(&mut s, &proxy.db, "north").await, "3");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_without_alpn_is_refused() {
    let certs = certs("direct-noalpn");
    let proxy = tls_proxy(&certs).await;
    // No ALPN at all: the handshake itself may complete (as with Postgres 17), but nothing a
    // Postgres client needs follows; the server closes.
    if let Ok(mut s) = direct(&proxy, &connector(&certs, &[])).await {
        assert_eq!(s.get_ref().1.alpn_protocol(), None);
        let _ = s
            .write_all(&startup_packet(
                196_608,
                &[("user", "app"), ("database", &proxy.db)],
            ))
            .await;
        let got = read_to_close(&mut s).await;
        assert!(got.is_empty(), "no answer expected, got {got:?}");
    }
    // ALPN offered, but not postgresql: the handshake fails (no_application_protocol)
    let err = direct(&proxy, &connector(&certs, &[b"http/1.1"]))
        .await
        .expect_err("ALPN http/1.1 must be refused");
    assert!(
        err.to_string().to_lowercase().contains("application"),
        "{err}"
    );
    // and the same proxy still serves a proper direct-TLS client
    let mut s = direct(&proxy, &connector(&certs, &[b"postgresql"]))
        .await
        .unwrap();
    assert_eq!(login_and_count(&mut s, &proxy.db, "south").await, "2");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_request_with_alpn_postgresql_still_works() {
    let certs = certs("sslrequest-alpn");
    let proxy = tls_proxy(&certs).await;
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'S');
    let name = ServerName::try_from("localhost").unwrap();
    let mut s = connector(&certs, &[b"postgresql"])
        .connect(name, tcp)
        .await
        .expect("TLS after SSLRequest");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    assert_eq!(login_and_count(&mut s, &proxy.db, "north").await, "3");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_without_tls_configured_is_closed_at_once() {
    let certs = certs("direct-notls");
    // handshake_timeout is 5s in the test config: closing well before it proves no hang
    let proxy = start_proxy(1).await;
    let started = Instant::now();
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(4),
        connector(&certs, &[b"postgresql"]).connect(name, tcp),
    )
    .await
    .expect("refused before the handshake timeout");
    assert!(result.is_err(), "no TLS without [tls]");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // nothing in plaintext either: the raw bytes after a ClientHello-like first byte
    let mut raw = TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(&[0x16, 3, 1, 0, 4, 1, 0, 0, 0])
        .await
        .unwrap();
    let got = read_to_close(&mut raw).await;
    assert!(got.is_empty(), "expected a silent close, got {got:?}");
    // plain clients are unaffected
    let c = client(&proxy, "north").await;
    assert_eq!(count(&c, "customers").await, 3);
    proxy.stop().await;
}

/// psycopg (libpq 18): prints `<ssl_in_use> <customers>` or fails.
fn psycopg(python: &Path, conninfo: &str) -> std::process::Output {
    let script = "import sys, psycopg\n\
                  conn = psycopg.connect(sys.argv[1], connect_timeout=10)\n\
                  n = conn.execute('SELECT count(*) FROM customers').fetchone()[0]\n\
                  print(conn.info.pgconn.ssl_in_use, n)\n";
    std::process::Command::new(python)
        .args(["-c", script, conninfo])
        .output()
        .expect("run python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_18_connects_with_sslnegotiation_direct() {
    let Some(python) = libpq18_python() else {
        return;
    };
    let certs = certs("direct-libpq");
    let proxy = tls_proxy(&certs).await;
    let base = format!(
        "host=127.0.0.1 port={} dbname={} user=app password={}",
        proxy.addr.port(),
        proxy.db,
        token("north")
    );
    for negotiation in ["direct", "postgres"] {
        let out = psycopg(
            &python,
            &format!("{base} sslmode=require sslnegotiation={negotiation}"),
        );
        assert!(out.status.success(), "{negotiation}: {}", stderr(&out));
        assert_eq!(stdout(&out), "True 3", "{negotiation}");
    }
    let root = certs.dir.join("root.crt");
    std::fs::copy(&certs.cert, &root).unwrap();
    let out = psycopg(
        &python,
        &format!(
            "{base} host=localhost sslmode=verify-full sslrootcert={} sslnegotiation=direct",
            root.display()
        ),
    );
    assert!(out.status.success(), "verify-full: {}", stderr(&out));
    assert_eq!(stdout(&out), "True 3");
    proxy.stop().await;

    // without [tls]: a clean refusal, quickly
    let proxy = start_proxy(1).await;
    let started = Instant::now();
    let out = psycopg(
        &python,
        &format!(
            "host=127.0.0.1 port={} dbname={} user=app password={} sslmode=require sslnegotiation=direct",
            proxy.addr.port(),
            proxy.db,
            token("north")
        ),
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(!stderr(&out).contains("timeout"), "{}", stderr(&out));
    proxy.stop().await;
}

/// The end of a TLS connection rlsgate closes: Ok(0) after close_notify, or the error rustls
/// reports for a connection that just ended (which libpq 18 takes for a failure).
async fn clean_end(s: &mut (impl AsyncRead + Unpin)) -> Result<(), String> {
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Err(_) => return Err("no end within 10 s".into()),
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return Err(format!("{:?}: {e}", e.kind())),
        }
    }
}

/// A CancelRequest over TLS (libpq 18's `PQcancelBlocking` / psycopg `cancel_safe()`), and a
/// refused TLS login: rlsgate ends both with close_notify, as Postgres does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_rlsgate_closes_end_with_close_notify() {
    let certs = certs("close-notify");
    let proxy = tls_proxy(&certs).await;
    let connector = connector(&certs, &[b"postgresql"]);

    let mut cancel = direct(&proxy, &connector).await.expect("TLS handshake");
    let mut packet = Vec::new();
    packet.extend_from_slice(&16i32.to_be_bytes());
    packet.extend_from_slice(&80877102i32.to_be_bytes());
    packet.extend_from_slice(&12345i32.to_be_bytes());
    packet.extend_from_slice(&67890i32.to_be_bytes());
    cancel.write_all(&packet).await.unwrap();
    cancel.flush().await.unwrap();
    assert_eq!(clean_end(&mut cancel).await, Ok(()), "cancel connection");

    let mut refused = direct(&proxy, &connector).await.expect("TLS handshake");
    let startup = startup_packet(196_608, &[("user", "app"), ("database", "no_such_db")]);
    refused.write_all(&startup).await.unwrap();
    refused.flush().await.unwrap();
    let fatal = recv(&mut refused).await;
    assert_eq!(fatal.tag, 'E', "{fatal:?}");
    assert_eq!(clean_end(&mut refused).await, Ok(()), "refused login");
    proxy.stop().await;
}
