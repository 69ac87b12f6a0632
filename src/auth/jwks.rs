//! JSON Web Key Set (JWKS) key source: verification keys from a local file or an HTTPS URL.
//!
//! Only the configured location is ever read; URLs named inside tokens (`jku`, `x5u`) are never
//! fetched. Keys that cannot serve for signature verification (symmetric `oct` keys, `use: enc`,
//! unknown key types or curves, malformed or undersized material) are skipped one by one; a set
//! with no usable key counts as a failed load and the previous set stays in place.
//!
//! Key types accepted per token algorithm: `RS*`/`PS*` need `kty: RSA` (2048 to 8192 bits),
//! `ES256` needs `kty: EC, crv: P-256`, `ES384` needs `kty: EC, crv: P-384`, `EdDSA` needs
//! `kty: OKP, crv: Ed25519`. `HS*` never matches: shared secrets do not belong in a key set.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Default period of the background refresh.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// Default minimum spacing of refetches triggered by unknown `kid`s.
pub const DEFAULT_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// Default limit for one whole HTTP request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default size cap for a key set document.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;
/// Redirects followed at most (all of them must stay on https).
const MAX_REDIRECTS: usize = 3;

/// Where to read the key set from and how often.
#[derive(Debug, Clone)]
pub struct JwksConfig {
    /// Local JWKS file (exclusive with `url`).
    pub file: Option<PathBuf>,
    /// `https://` URL of the key set (exclusive with `file`).
    pub url: Option<String>,
    /// Extra CA certificates (PEM) trusted for `url`, on top of the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// Period of the background refresh.
    pub refresh_interval: Duration,
    /// Refetches for unknown `kid`s happen at most this often.
    pub min_refetch_interval: Duration,
    /// Limit for one whole HTTP request (connect, headers and body).
    pub timeout: Duration,
    /// Size cap for the response body or file.
    pub max_bytes: usize,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            file: None,
            url: None,
            ca_file: None,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            min_refetch_interval: DEFAULT_MIN_REFETCH_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// Why a key set could not be set up or loaded.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS configuration: {0}")]
    Config(String),
    #[error("cannot read JWKS file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("JWKS fetch failed: {0}")]
    Fetch(String),
    #[error("JWKS server answered HTTP {0}")]
    Status(u16),
    #[error("JWKS document is larger than {0} bytes")]
    TooLarge(usize),
    #[error("JWKS document is not a valid key set: {0}")]
    Parse(String),
    #[error("JWKS document has no usable signature verification key")]
    NoUsableKeys,
}

/// Result of choosing a key for a token header.
#[derive(Debug)]
pub enum Lookup {
    Key(Arc<DecodingKey>),
    /// The token names a `kid` the set does not have.
    UnknownKid,
    /// The token has no `kid` and several keys of the set fit its algorithm.
    KidRequired,
    /// The matching key declares another `alg`, or its type cannot verify this algorithm.
    AlgorithmMismatch,
    /// Nothing is loaded (yet).
    NoKeys,
}

/// The key type (and curve) of a usable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Kind {
    fn verifies(self, alg: Algorithm) -> bool {
        match self {
            Kind::Rsa => alg.family() == AlgorithmFamily::Rsa,
            Kind::P256 => alg == Algorithm::ES256,
            Kind::P384 => alg == Algorithm::ES384,
            Kind::Ed25519 => alg == Algorithm::EdDSA,
        }
    }
}

/// One usable key of the set.
struct Entry {
    kid: Option<String>,
    /// The JWK's `alg`, when it declares one.
    alg: Option<Algorithm>,
    kind: Kind,
    key: Arc<DecodingKey>,
}

impl Entry {
    fn fits(&self, alg: Algorithm) -> bool {
        self.kind.verifies(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// An immutable, installed key set.
#[derive(Default)]
struct KeySet {
    entries: Vec<Entry>,
    /// Bumped on every install, so concurrent refetchers can tell a new set arrived.
    generation: u64,
}

enum Source {
    File(PathBuf),
    Url {
        url: reqwest::Url,
        client: reqwest::Client,
    },
}

struct Inner {
    cfg: JwksConfig,
    /// The source for logs: the file path, or the URL without query or credentials.
    name: String,
    source: Source,
    current: RwLock<Arc<KeySet>>,
    /// Serialises loads (async mutex, meant to be held across the fetch) and remembers when the
    /// last one started.
    gate: tokio::sync::Mutex<Option<Instant>>,
}

/// A shared, refreshable key set. Cloning is cheap.
#[derive(Clone)]
pub struct Jwks {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("source", &self.name())
            .field("keys", &self.len())
            .finish()
    }
}

impl Jwks {
    /// Initial load. A file is read now and must hold at least one usable key. A URL is fetched
    /// now; if that fails a warning is logged and the set starts empty (tokens are refused with
    /// [`Lookup::NoKeys`] until a fetch succeeds), so a briefly unavailable identity provider
    /// does not stop the proxy from starting. Configuration mistakes are always errors.
    pub async fn load(cfg: JwksConfig) -> Result<Jwks, JwksError> {
        let (source, name) = match (&cfg.file, &cfg.url) {
            (Some(path), None) => (Source::File(path.clone()), path.display().to_string()),
            (None, Some(url)) => {
                let url = parse_https_url(url)?;
                let mut shown = url.clone();
                shown.set_query(None);
                let _ = shown.set_username("");
                let _ = shown.set_password(None);
                let client = http_client(&cfg)?;
                (Source::Url { url, client }, shown.to_string())
            }
            (Some(_), Some(_)) => return Err(config("set a JWKS file or a URL, not both")),
            (None, None) => return Err(config("no JWKS file or URL given")),
        };
        if cfg.refresh_interval.is_zero() || cfg.timeout.is_zero() || cfg.max_bytes == 0 {
            return Err(config(
                "refresh interval, timeout and size limit must be positive",
            ));
        }
        let jwks = Jwks {
            inner: Arc::new(Inner {
                cfg,
                name,
                source,
                current: RwLock::new(Arc::new(KeySet::default())),
                gate: tokio::sync::Mutex::new(None),
            }),
        };
        match jwks.refresh_now().await {
            Ok(_) => {}
            Err(e) if matches!(jwks.inner.source, Source::Url { .. }) => tracing::warn!(
                source = %jwks.name(),
                error = %e,
                "initial JWKS fetch failed; tokens are refused until a fetch succeeds"
            ),
            Err(e) => return Err(e),
        }
        Ok(jwks)
    }

    /// Select the key for a token header's `kid` and `alg`.
    ///
    /// With a `kid`, only keys carrying that `kid` are considered. Without one, the single key
    /// that fits `alg` is used, or [`Lookup::KidRequired`] when several do. A key fits when its
    /// type can verify `alg`, its `alg` (if declared) equals `alg`, and its `use` is absent or
    /// `sig`. The caller must still restrict `alg` to the configured algorithm list.
    pub fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Lookup {
        let set = self.current();
        if set.entries.is_empty() {
            return Lookup::NoKeys;
        }
        let found = match kid {
            Some(kid) => {
                let mut named = set
                    .entries
                    .iter()
                    .filter(|e| e.kid.as_deref() == Some(kid))
                    .peekable();
                if named.peek().is_none() {
                    return Lookup::UnknownKid;
                }
                named.find(|e| e.fits(alg))
            }
            None => {
                let mut fitting = set.entries.iter().filter(|e| e.fits(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(_), Some(_)) => return Lookup::KidRequired,
                    (one, _) => one,
                }
            }
        };
        match found {
            Some(entry) => Lookup::Key(Arc::clone(&entry.key)),
            None => Lookup::AlgorithmMismatch,
        }
    }

    /// Reload after [`Lookup::UnknownKid`] (or [`Lookup::NoKeys`]): URL sources are fetched again,
    /// files re-read, unless a load started within `min_refetch_interval`. Concurrent callers
    /// share one load. Returns true if a new set was installed since the call began (look the
    /// key up again), false otherwise.
    pub async fn refetch_for_unknown_kid(&self) -> bool {
        let seen = self.current().generation;
        let mut last = self.inner.gate.lock().await;
        if self.current().generation != seen {
            return true;
        }
        if last.is_some_and(|t| t.elapsed() < self.inner.cfg.min_refetch_interval) {
            tracing::debug!("JWKS refetch for an unknown kid skipped: last load was too recent");
            return false;
        }
        *last = Some(Instant::now());
        match self.load_and_install().await {
            Ok(n) => {
                tracing::info!(source = %self.name(), keys = n, "JWKS reloaded for an unknown kid");
                true
            }
            Err(e) => {
                self.warn_kept(&e);
                false
            }
        }
    }

    /// Load and install a new set now, ignoring `min_refetch_interval`. Returns the number of
    /// usable keys; on error the previous set stays installed.
    pub async fn refresh_now(&self) -> Result<usize, JwksError> {
        let mut last = self.inner.gate.lock().await;
        *last = Some(Instant::now());
        self.load_and_install().await
    }

    /// Refresh every `refresh_interval` (every `min_refetch_interval`, at least one second,
    /// while the set is empty) until `stop` fires. Failures keep the last good set and are
    /// logged as warnings.
    pub fn spawn_refresh(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let cfg = &this.inner.cfg;
                let wait = if this.is_empty() {
                    cfg.min_refetch_interval
                        .max(Duration::from_secs(1))
                        .min(cfg.refresh_interval)
                } else {
                    cfg.refresh_interval
                };
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
                let result = tokio::select! {
                    () = stop.cancelled() => break,
                    r = this.refresh_now() => r,
                };
                match result {
                    Ok(n) => tracing::debug!(source = %this.name(), keys = n, "JWKS refreshed"),
                    Err(e) => this.warn_kept(&e),
                }
            }
        })
    }

    /// Number of usable keys in the installed set.
    pub fn len(&self) -> usize {
        self.current().entries.len()
    }

    /// True while no key is installed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn current(&self) -> Arc<KeySet> {
        match self.inner.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Callers hold the gate, so installs never race each other.
    async fn load_and_install(&self) -> Result<usize, JwksError> {
        let bytes = match &self.inner.source {
            Source::File(path) => read_file(path, self.inner.cfg.max_bytes).await?,
            Source::Url { url, client } => fetch(client, url, self.inner.cfg.max_bytes).await?,
        };
        let entries = parse_key_set(&bytes)?;
        let count = entries.len();
        let mut slot = match self.inner.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let generation = slot.generation + 1;
        *slot = Arc::new(KeySet {
            entries,
            generation,
        });
        Ok(count)
    }

    fn name(&self) -> &str {
        &self.inner.name
    }

    /// Log a failed load (the error only, never key material); the last good set stays.
    fn warn_kept(&self, e: &JwksError) {
        tracing::warn!(source = %self.name(), error = %e, "JWKS load failed; keeping the last good set");
    }
}

fn config(message: impl Into<String>) -> JwksError {
    JwksError::Config(message.into())
}

fn parse_https_url(raw: &str) -> Result<reqwest::Url, JwksError> {
    let url = reqwest::Url::parse(raw).map_err(|e| config(format!("bad JWKS URL: {e}")))?;
    if url.scheme() != "https" || url.host().is_none() {
        return Err(config("JWKS URL must be an https:// URL with a host"));
    }
    Ok(url)
}

/// The HTTP client: aws-lc-rs rustls with webpki roots plus `ca_file`, no environment proxy,
/// https-only redirects (at most [`MAX_REDIRECTS`]), whole-request timeout.
fn http_client(cfg: &JwksConfig) -> Result<reqwest::Client, JwksError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &cfg.ca_file {
        let bad = |why: String| config(format!("JWKS CA file {}: {why}", path.display()));
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no certificates found".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let redirects = reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
        } else if attempt.url().scheme() != "https" {
            attempt.error("redirect to a non-https URL refused")
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .https_only(true)
        .no_proxy()
        .timeout(cfg.timeout)
        .redirect(redirects)
        .build()
        .map_err(|e| config(format!("HTTP client: {}", error_chain(&e))))
}

/// GET the key set, refusing non-2xx answers and bodies over `max_bytes`.
async fn fetch(
    client: &reqwest::Client,
    url: &reqwest::Url,
    max_bytes: usize,
) -> Result<Vec<u8>, JwksError> {
    let failed = |e: reqwest::Error| JwksError::Fetch(error_chain(&e.without_url()));
    let mut resp = client
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(failed)?;
    if !resp.status().is_success() {
        return Err(JwksError::Status(resp.status().as_u16()));
    }
    let announced = resp.content_length().unwrap_or(0);
    if announced > max_bytes as u64 {
        return Err(JwksError::TooLarge(max_bytes));
    }
    // `announced <= max_bytes` here, so the cast cannot truncate.
    let mut body = Vec::with_capacity(announced as usize);
    while let Some(chunk) = resp.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > max_bytes {
            return Err(JwksError::TooLarge(max_bytes));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn read_file(path: &Path, max_bytes: usize) -> Result<Vec<u8>, JwksError> {
    let err = |source| JwksError::Read {
        path: path.display().to_string(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(err)?;
    let mut body = Vec::new();
    file.take(max_bytes as u64 + 1)
        .read_to_end(&mut body)
        .await
        .map_err(err)?;
    if body.len() > max_bytes {
        return Err(JwksError::TooLarge(max_bytes));
    }
    Ok(body)
}

/// Parse a JWKS document into its usable keys; each key is checked on its own.
fn parse_key_set(bytes: &[u8]) -> Result<Vec<Entry>, JwksError> {
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| JwksError::Parse(e.to_string()))?;
    let Some(keys) = doc.get("keys").and_then(serde_json::Value::as_array) else {
        return Err(JwksError::Parse("missing \"keys\" array".into()));
    };
    let mut entries = Vec::with_capacity(keys.len());
    for (index, raw) in keys.iter().enumerate() {
        let kid = raw.get("kid").and_then(serde_json::Value::as_str);
        match serde_json::from_value::<Jwk>(raw.clone())
            .map_err(|e| format!("not a JWK: {e}"))
            .and_then(|jwk| usable_key(&jwk))
        {
            Ok(entry) => entries.push(entry),
            Err(reason) => {
                tracing::debug!(index, kid = ?kid, reason = %reason, "skipping JWKS key")
            }
        }
    }
    if entries.is_empty() {
        return Err(JwksError::NoUsableKeys);
    }
    Ok(entries)
}

/// Check one JWK and turn it into a verification key, or say why it cannot be used.
fn usable_key(jwk: &Jwk) -> Result<Entry, String> {
    let common = &jwk.common;
    match &common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(other) => return Err(format!("use {other:?} is not signature")),
    }
    if let Some(ops) = &common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err("key_ops does not include verify".into());
    }
    let alg = match common.key_algorithm {
        None => None,
        Some(declared) => Some(
            Algorithm::from_str(&declared.to_string())
                .map_err(|_| format!("alg {declared} is not a supported signature algorithm"))?,
        ),
    };
    // (kind, base64url component, its allowed decoded length range)
    let (kind, component, sizes) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => (Kind::Rsa, &p.n, 256..=1024),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 if p.x.len() == p.y.len() => (Kind::P256, &p.x, 32..=32),
            EllipticCurve::P384 if p.x.len() == p.y.len() => (Kind::P384, &p.x, 48..=48),
            _ => return Err(format!("unsupported EC curve {:?} or bad point", p.curve)),
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            (Kind::Ed25519, &p.x, 32..=32)
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (oct) keys are not accepted from a key set".into());
        }
        _ => return Err("unsupported key type or curve".into()),
    };
    // Unpadded base64url: 4 characters carry 3 bytes.
    if !sizes.contains(&(component.len() * 3 / 4)) {
        return Err(format!("{kind:?} key material has the wrong size"));
    }
    if let Some(alg) = alg
        && !kind.verifies(alg)
    {
        return Err(format!("alg {alg:?} does not fit key type {kind:?}"));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key material: {e}"))?;
    Ok(Entry {
        kid: common.key_id.clone(),
        alg,
        kind,
        key: Arc::new(key),
    })
}

/// An error and its sources on one line (reqwest hides the cause in `source()`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}
