//! The operator's HTTP endpoint (`server.http_listen`): `/metrics`, `/healthz`, `/readyz`.
//!
//! - `GET /metrics`: Prometheus text format 0.0.4 (`text/plain; version=0.0.4`), or OpenMetrics
//!   when the scraper's `Accept` asks for `application/openmetrics-text`;
//! - `GET /healthz`: `200 ok` while the process serves HTTP at all (liveness);
//! - `GET /readyz`: `200 ready`, or `503` with the reason from [`HttpState::ready`] (readiness);
//! - any other path `404`; other methods than GET/HEAD on a known path `405`.
//!
//! HTTP/1.1 only, at most [`MAX_CONNECTIONS`] connections at once, request headers must arrive
//! within [`HEADER_READ_TIMEOUT`], hyper's default buffer limits; request bodies are ignored.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};

/// Most HTTP connections served at once; further ones are closed right after accept.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// After `shutdown` fires, how long open HTTP connections may take to finish their response.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The answer of the readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyStatus {
    pub ready: bool,
    /// Why not ready (sent in the 503 body); ignored when ready.
    pub reason: String,
}

impl ReadyStatus {
    pub fn ready() -> ReadyStatus {
        ReadyStatus {
            ready: true,
            reason: String::new(),
        }
    }

    pub fn not_ready(reason: impl Into<String>) -> ReadyStatus {
        ReadyStatus {
            ready: false,
            reason: reason.into(),
        }
    }
}

/// What the endpoints read.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    /// Called on every `/readyz` request; should be cheap and must not block for long.
    pub ready: Arc<dyn Fn() -> ReadyStatus + Send + Sync>,
}

impl HttpState {
    pub fn new(
        metrics: Arc<Metrics>,
        ready: impl Fn() -> ReadyStatus + Send + Sync + 'static,
    ) -> HttpState {
        HttpState {
            metrics,
            ready: Arc::new(ready),
        }
    }
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

/// Serve the endpoints on `listener` until `shutdown` fires; then stop accepting, let open
/// connections finish their current response (at most [`SHUTDOWN_GRACE`]) and return.
///
/// To keep `/readyz` answering `503` and `/healthz` `200` while the proxy drains, fire
/// `shutdown` only after the proxy's drain is over.
pub async fn serve(listener: TcpListener, state: HttpState, shutdown: CancellationToken) {
    let state = Arc::new(state);
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tracing::info!(listen = ?listener.local_addr().ok(), "HTTP endpoint (/metrics, /healthz, /readyz) is listening");
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "too many HTTP connections; closing one");
            drop(tcp);
            continue;
        };
        let state = Arc::clone(&state);
        let stop = shutdown.clone();
        tracker.spawn(async move {
            let _slot = slot;
            serve_connection(tcp, state, stop).await;
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::debug!(
            connections = tracker.len(),
            "HTTP connections still open at shutdown"
        );
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    state: Arc<HttpState>,
    shutdown: CancellationToken,
) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let response = respond(&state, &req);
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// The response to one request (never panics: a panicking readiness check is a 503).
fn respond<B>(state: &HttpState, req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let status = std::panic::catch_unwind(AssertUnwindSafe(|| (state.ready)()))
                .unwrap_or_else(|_| ReadyStatus::not_ready("readiness check failed"));
            if status.ready {
                text(StatusCode::OK, "ready\n")
            } else {
                let reason = status.reason.trim();
                let reason = if reason.is_empty() {
                    "not ready"
                } else {
                    reason
                };
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                )
            }
        }
        _ => {
            let openmetrics = wants_openmetrics(req.headers().get(header::ACCEPT));
            let (body, content_type) = if openmetrics {
                (state.metrics.encode_openmetrics(), OPENMETRICS_CONTENT_TYPE)
            } else {
                (state.metrics.encode(), PROMETHEUS_CONTENT_TYPE)
            };
            with_type(StatusCode::OK, body, content_type)
        }
    }
}

/// Whether `Accept` lists `application/openmetrics-text` with a non-zero quality.
fn wants_openmetrics(accept: Option<&HeaderValue>) -> bool {
    let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        if !media.eq_ignore_ascii_case("application/openmetrics-text") {
            return false;
        }
        !parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        })
    })
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    with_type(status, body.into(), "text/plain; charset=utf-8")
}

fn with_type(
    status: StatusCode,
    body: String,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, method: Method) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
    }

    #[test]
    fn routes_and_methods() {
        let state = HttpState::new(Arc::new(Metrics::default()), ReadyStatus::ready);
        assert_eq!(respond(&state, &get("/healthz", Method::GET)).status(), 200);
        assert_eq!(
            respond(&state, &get("/readyz?x=1", Method::HEAD)).status(),
            200
        );
        assert_eq!(respond(&state, &get("/nope", Method::GET)).status(), 404);
        let post = respond(&state, &get("/metrics", Method::POST));
        assert_eq!(post.status(), 405);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
    }

    #[test]
    fn a_panicking_readiness_check_is_not_ready() {
        let state = HttpState::new(Arc::new(Metrics::default()), || -> ReadyStatus {
            panic!("boom")
        });
        assert_eq!(respond(&state, &get("/readyz", Method::GET)).status(), 503);
    }

    #[test]
    fn accept_negotiation() {
        let h = |s: &'static str| Some(HeaderValue::from_static(s));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(h("text/plain;version=0.0.4").as_ref()));
        assert!(wants_openmetrics(h(
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.1"
        ).as_ref()));
        assert!(!wants_openmetrics(
            h("application/openmetrics-text; q=0, text/plain").as_ref()
        ));
    }
}
