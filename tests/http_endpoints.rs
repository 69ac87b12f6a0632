//! The HTTP endpoint (`/metrics`, `/healthz`, `/readyz`) over real TCP, with a small hand-written
//! HTTP/1.1 client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rlsgate::http::{self, HttpState, ReadyStatus};
use rlsgate::metrics::{ClientState, LoginFailure, LoginResult, Metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Server {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

async fn start(per_tenant: bool, tenant_cap: usize) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new(per_tenant, tenant_cap));
    let ready = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&ready);
    let state = HttpState::new(Arc::clone(&metrics), move || {
        if flag.load(Ordering::SeqCst) {
            ReadyStatus::ready()
        } else {
            ReadyStatus::not_ready("draining: shutting down")
        }
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(http::serve(listener, state, shutdown.clone()));
    Server {
        addr,
        metrics,
        ready,
        shutdown,
        task,
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn parse_reply(raw: &[u8]) -> Reply {
    let text = String::from_utf8(raw.to_vec()).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("end of headers");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// One request on a fresh connection (`Connection: close`), read to EOF.
async fn request(addr: SocketAddr, method: &str, path: &str, extra_headers: &str) -> Reply {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra_headers}\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .expect("response within 10s")
        .unwrap();
    parse_reply(&raw)
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, "").await
}

/// The value of one exact series (`name{labels}`) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn healthz_is_ok() {
    let s = start(false, 0).await;
    let r = get(s.addr, "/healthz").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "ok\n");
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    // Liveness does not depend on readiness.
    s.ready.store(false, Ordering::SeqCst);
    assert_eq!(get(s.addr, "/healthz").await.status, 200);
}

#[tokio::test]
async fn readyz_follows_the_ready_check() {
    let s = start(false, 0).await;
    let r = get(s.addr, "/readyz").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "ready\n");

    s.ready.store(false, Ordering::SeqCst);
    let r = get(s.addr, "/readyz").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("draining: shutting down"), "{:?}", r.body);

    s.ready.store(true, Ordering::SeqCst);
    assert_eq!(get(s.addr, "/readyz").await.status, 200);
}

#[tokio::test]
async fn metrics_show_recorded_values() {
    let s = start(false, 0).await;
    let m = &s.metrics;
    m.login(LoginResult::Ok);
    m.login(LoginResult::Ok);
    m.login(LoginResult::Failed(LoginFailure::Expired));
    m.denial("protected_setting", "north");
    m.denial("something_new", "north");
    m.checkout_wait(Duration::from_millis(3));
    m.transaction_finished("north", Duration::from_millis(20));
    m.query_finished(Duration::from_micros(700));
    m.bytes(100, 2048);
    m.injection();
    m.pin();
    m.cancel();
    m.pool_timeout();
    m.upstream_error(rlsgate::metrics::UpstreamErrorKind::Lost);
    m.set_server_connections(3, 2);
    m.set_pinned(1);
    let mut tracker = m.track_client("north");
    tracker.set_state(ClientState::Waiting);

    let r = get(s.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let t = &r.body;
    for name in [
        "rlsgate_client_connections",
        "rlsgate_server_connections",
        "rlsgate_pinned_clients",
        "rlsgate_checkout_wait_seconds",
        "rlsgate_transaction_duration_seconds",
        "rlsgate_query_duration_seconds",
        "rlsgate_client_bytes_received_total",
        "rlsgate_client_bytes_sent_total",
        "rlsgate_logins_total",
        "rlsgate_guard_denials_total",
        "rlsgate_context_injections_total",
        "rlsgate_pins_total",
        "rlsgate_cancels_total",
        "rlsgate_pool_timeouts_total",
        "rlsgate_upstream_errors_total",
    ] {
        assert!(
            t.contains(&format!("# TYPE {name} ")),
            "{name} missing in\n{t}"
        );
    }
    assert_eq!(
        sample(t, r#"rlsgate_logins_total{result="ok",reason="ok"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(
            t,
            r#"rlsgate_logins_total{result="failed",reason="expired"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            t,
            r#"rlsgate_guard_denials_total{rule="protected_setting"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(t, r#"rlsgate_guard_denials_total{rule="other"}"#),
        Some(1.0)
    );
    assert_eq!(sample(t, "rlsgate_checkout_wait_seconds_count"), Some(1.0));
    assert_eq!(
        sample(t, r#"rlsgate_checkout_wait_seconds_bucket{le="0.0025"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(t, r#"rlsgate_checkout_wait_seconds_bucket{le="0.005"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(t, "rlsgate_client_bytes_received_total"),
        Some(100.0)
    );
    assert_eq!(sample(t, "rlsgate_client_bytes_sent_total"), Some(2048.0));
    assert_eq!(
        sample(t, r#"rlsgate_upstream_errors_total{kind="lost"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(t, r#"rlsgate_server_connections{state="idle"}"#),
        Some(3.0)
    );
    assert_eq!(
        sample(t, r#"rlsgate_client_connections{state="waiting"}"#),
        Some(1.0)
    );
    assert_eq!(sample(t, "rlsgate_pinned_clients"), Some(1.0));
    // Per-tenant series are off here.
    assert!(!t.contains("rlsgate_tenant_"), "{t}");
    assert!(!t.contains("# EOF"));

    drop(tracker);
    let t = get(s.addr, "/metrics").await.body;
    assert_eq!(
        sample(&t, r#"rlsgate_client_connections{state="waiting"}"#),
        Some(0.0)
    );

    // A scraper asking for OpenMetrics gets it.
    let r = request(
        s.addr,
        "GET",
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(r.body.ends_with("# EOF\n"));
    assert!(r.body.contains("# TYPE rlsgate_logins counter\n"));
}

#[tokio::test]
async fn tenant_cap_folds_extra_tenants_into_other() {
    let s = start(true, 2).await;
    let m = &s.metrics;
    for tenant in ["north", "south", "east", "west", "north", "east"] {
        m.transaction_finished(tenant, Duration::from_millis(1));
    }
    m.denial("protected_setting", "north");
    m.denial("protected_setting", "west");
    let _a = m.track_client("south");
    let _b = m.track_client("east");

    let t = get(s.addr, "/metrics").await.body;
    let tx = |tenant: &str| {
        sample(
            &t,
            &format!(r#"rlsgate_tenant_transactions_total{{tenant="{tenant}"}}"#),
        )
    };
    assert_eq!(tx("north"), Some(2.0));
    assert_eq!(tx("south"), Some(1.0));
    assert_eq!(tx("other"), Some(3.0));
    assert_eq!(
        sample(&t, r#"rlsgate_tenant_denials_total{tenant="north"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&t, r#"rlsgate_tenant_denials_total{tenant="other"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&t, r#"rlsgate_tenant_client_connections{tenant="south"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&t, r#"rlsgate_tenant_client_connections{tenant="other"}"#),
        Some(1.0)
    );
    assert!(!t.contains(r#"tenant="east""#), "{t}");
    assert!(!t.contains(r#"tenant="west""#), "{t}");
    // At most cap tenants plus "other" per series.
    let distinct: std::collections::HashSet<&str> = t
        .lines()
        .filter(|l| l.starts_with("rlsgate_tenant_"))
        .filter_map(|l| l.split("tenant=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(distinct.len(), 3, "{distinct:?}");
}

#[tokio::test]
async fn unknown_paths_and_methods() {
    let s = start(false, 0).await;
    let r = get(s.addr, "/").await;
    assert_eq!(r.status, 404);
    assert_eq!(get(s.addr, "/metricsx").await.status, 404);
    assert_eq!(get(s.addr, "/healthz/../metrics").await.status, 404);

    let r = request(s.addr, "POST", "/readyz", "Content-Length: 0\r\n").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));

    // HEAD: the headers of a GET, no body.
    let r = request(s.addr, "HEAD", "/healthz", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "");

    // A query string does not change the route.
    assert_eq!(get(s.addr, "/readyz?verbose=1").await.status, 200);

    // Garbage instead of HTTP does not bring the server down.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"\x16\x03\x01 not http\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw)).await;
    assert_eq!(get(s.addr, "/healthz").await.status, 200);
}

#[tokio::test]
async fn keep_alive_and_graceful_shutdown() {
    let s = start(false, 0).await;
    // Two requests on one kept-alive connection, which then stays open and idle.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let mut raw = Vec::new();
    for _ in 0..2 {
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        raw.clear();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&raw).ends_with("ok\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
                .await
                .expect("response within 10s")
                .unwrap();
            assert!(n > 0, "connection closed early");
            raw.extend_from_slice(&buf[..n]);
        }
        assert_eq!(parse_reply(&raw).status, 200);
    }

    // Shutdown closes the idle connection and returns well before the grace period.
    let started = std::time::Instant::now();
    s.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(4), s.task)
        .await
        .expect("serve returns promptly after shutdown")
        .unwrap();
    assert!(started.elapsed() < http::SHUTDOWN_GRACE);
    raw.clear();
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut raw))
        .await
        .expect("idle connection closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // No longer listening.
    assert!(TcpStream::connect(s.addr).await.is_err());
}

/// The configs under deploy/ load with rlsgate's own parser, and the Kubernetes termination grace
/// period covers the preStop sleep plus the drain.
#[test]
fn deploy_configs_parse() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let with_secrets = |text: &str| {
        text.replace("${RLSGATE_UPSTREAM_PASSWORD}", "pw")
            .replace("${RLSGATE_JWT_SECRET}", "0123456789abcdef0123456789abcdef")
    };

    let compose =
        rlsgate::config::Config::from_toml(&with_secrets(&read("deploy/rlsgate.compose.toml")))
            .expect("deploy/rlsgate.compose.toml");
    assert_eq!(
        compose.server.http_listen,
        Some("0.0.0.0:9930".parse().unwrap())
    );
    assert_eq!(compose.upstream.host, "postgres");

    // The ConfigMap's `rlsgate.toml: |` block, unindented.
    let configmap = read("deploy/kubernetes/configmap.yaml");
    let toml: String = configmap
        .lines()
        .skip_while(|l| l.trim() != "rlsgate.toml: |")
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let sidecar = rlsgate::config::Config::from_toml(&with_secrets(&toml))
        .expect("the rlsgate.toml in deploy/kubernetes/configmap.yaml");
    assert_eq!(sidecar.server.listen, "127.0.0.1:6432".parse().unwrap());
    assert_eq!(
        sidecar.server.http_listen,
        Some("0.0.0.0:9930".parse().unwrap())
    );

    let deployment = read("deploy/kubernetes/sidecar.yaml");
    let number_after = |key: &str| -> u64 {
        let line = deployment
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("{key} in sidecar.yaml"));
        line.trim_start()[key.len()..].trim().parse().unwrap()
    };
    let grace = number_after("terminationGracePeriodSeconds:");
    assert!(deployment.contains(r#"command: ["sleep", "5"]"#));
    assert!(
        grace > 5 + sidecar.server.shutdown_timeout.as_secs(),
        "terminationGracePeriodSeconds {grace} must exceed preStop 5s + shutdown_timeout {:?}",
        sidecar.server.shutdown_timeout
    );
}
