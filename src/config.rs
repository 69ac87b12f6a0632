//! Configuration: TOML → serde types (unknown keys rejected) → [`Config::validate`].
//!
//! `${VAR}` inside any string value is replaced by the environment variable `VAR` before parsing,
//! so secrets can live in the environment (Kubernetes Secrets, systemd credentials).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("environment variable {0} referenced in the config is not set")]
    MissingEnv(String),
    #[error("config is not valid TOML or has unknown keys: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid config value for {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub tls: Option<TlsConfig>,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub context: ContextConfig,
    #[serde(default)]
    pub guard: GuardConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[context]`: the settings applied to every transaction (`"<setting>" = "<claim path>"`),
/// and how the database can tell that rlsgate set them.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ContextConfig {
    /// `"plain"` (default): the settings alone. `"signed"`: rlsgate also seals each server
    /// connection for its tenant with `rlsgate.enter` (sql/hardened.sql), so that policies
    /// written with `rlsgate.tenant()` refuse a tenant setting rlsgate did not make.
    #[serde(default)]
    pub mode: ContextMode,
    /// Signed mode: the HMAC key shared with the database (at least 32 bytes; use `${VAR}`).
    pub signing_key: Option<String>,
    /// Signed mode, during a key rotation: the key used while the database does not know
    /// `signing_key` yet.
    pub previous_signing_key: Option<String>,
    /// `"<setting name>" = "<claim path>"`.
    #[serde(flatten)]
    pub settings: BTreeMap<String, String>,
}

/// The signing keys never show in logs or debug output.
impl std::fmt::Debug for ContextConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |k: &Option<String>| k.as_ref().map(|_| "<redacted>");
        f.debug_struct("ContextConfig")
            .field("mode", &self.mode)
            .field("signing_key", &redacted(&self.signing_key))
            .field(
                "previous_signing_key",
                &redacted(&self.previous_signing_key),
            )
            .field("settings", &self.settings)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContextMode {
    #[default]
    Plain,
    Signed,
}

/// Shortest signing key accepted (bytes), as sql/hardened.sql's `install_key` requires.
pub const MIN_SIGNING_KEY_BYTES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Transaction,
    Session,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Reserved for the metrics/health endpoint.
    pub http_listen: Option<SocketAddr>,
    #[serde(default = "default_pool_mode")]
    pub pool_mode: PoolMode,
    #[serde(default = "default_handshake_timeout", with = "humantime_serde_compat")]
    pub handshake_timeout: Duration,
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde_compat")]
    pub shutdown_timeout: Duration,
    #[serde(default = "default_max_message_size", deserialize_with = "de_bytes")]
    pub max_message_size: usize,
    /// Session state that outlives a transaction (temp tables, LISTEN, WITH HOLD cursors,
    /// SQL PREPARE, session advisory locks) in transaction mode: pin the connection or refuse.
    #[serde(default)]
    pub session_state: SessionStatePolicy,
    /// Most client connections at once; more get FATAL 53300.
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: usize,
    /// A client idle inside a transaction longer than this is disconnected (0 = never). On by
    /// default: a client that sits in `BEGIN` would otherwise hold a pool slot (and its locks)
    /// for as long as it likes.
    #[serde(
        default = "default_idle_in_transaction_timeout",
        with = "humantime_serde_compat"
    )]
    pub idle_in_transaction_timeout: Duration,
    /// After PgBouncer's `query_timeout`: a request that has waited this long with nothing from
    /// the upstream (since it was sent, or since the last bytes of its answer) ends the session
    /// and closes its upstream connection (0 = never). Meant for network faults and hung
    /// servers: set it a little above the server's `statement_timeout`.
    #[serde(default, with = "humantime_serde_compat")]
    pub query_timeout: Duration,
    /// SO_KEEPALIVE on client and upstream sockets (PgBouncer's `tcp_keepalive`).
    #[serde(default = "default_true")]
    pub tcp_keepalive: bool,
    /// Idle time before the first keepalive probe (TCP_KEEPIDLE); whole seconds, "0s" = the
    /// OS default (7200 s on Linux).
    #[serde(default = "default_tcp_keepidle", with = "humantime_serde_compat")]
    pub tcp_keepidle: Duration,
    /// Time between unanswered probes (TCP_KEEPINTVL); whole seconds, "0s" = the OS default.
    #[serde(default = "default_tcp_keepintvl", with = "humantime_serde_compat")]
    pub tcp_keepintvl: Duration,
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT); 0 = the OS default.
    #[serde(default = "default_tcp_keepcnt")]
    pub tcp_keepcnt: u32,
    /// Linux TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the
    /// connection is dropped; "0s" = off (the OS default).
    #[serde(default, with = "humantime_serde_compat")]
    pub tcp_user_timeout: Duration,
    /// Transaction mode: how many autocommit units of different clients one server connection
    /// runs pipelined (written behind each other without waiting for replies). 1 = each
    /// transaction has a connection to itself. Read at start.
    #[serde(default = "default_pipeline_depth")]
    pub pipeline_depth: usize,
}

/// The TCP keepalive settings of `[server]`, applied to every client and upstream socket
/// ([`crate::stream::apply_keepalive`]). A zero duration or count leaves the OS default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveConfig {
    pub enabled: bool,
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
    pub user_timeout: Duration,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        ServerConfig::default().keepalive()
    }
}

impl ServerConfig {
    pub fn keepalive(&self) -> KeepaliveConfig {
        KeepaliveConfig {
            enabled: self.tcp_keepalive,
            idle: self.tcp_keepidle,
            interval: self.tcp_keepintvl,
            count: self.tcp_keepcnt,
            user_timeout: self.tcp_user_timeout,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatePolicy {
    #[default]
    Pin,
    Deny,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            http_listen: None,
            pool_mode: default_pool_mode(),
            handshake_timeout: default_handshake_timeout(),
            shutdown_timeout: default_shutdown_timeout(),
            max_message_size: default_max_message_size(),
            session_state: SessionStatePolicy::default(),
            max_client_conn: default_max_client_conn(),
            idle_in_transaction_timeout: default_idle_in_transaction_timeout(),
            query_timeout: Duration::ZERO,
            tcp_keepalive: true,
            tcp_keepidle: default_tcp_keepidle(),
            tcp_keepintvl: default_tcp_keepintvl(),
            tcp_keepcnt: default_tcp_keepcnt(),
            tcp_user_timeout: Duration::ZERO,
            pipeline_depth: default_pipeline_depth(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PlaintextPassword {
    Never,
    #[default]
    Loopback,
    Always,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub plaintext_password: PlaintextPassword,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyFull,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub database: String,
    pub user: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub sslmode: SslMode,
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    #[serde(default = "default_checkout_timeout", with = "humantime_serde_compat")]
    pub checkout_timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    #[serde(
        default = "default_health_check_after",
        with = "humantime_serde_compat"
    )]
    pub health_check_after: Duration,
    /// Close connections idle in the pool longer than this (0 = never).
    #[serde(default = "default_idle_timeout", with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Close connections older than this when they come back to the pool (0 = never).
    #[serde(default = "default_max_lifetime", with = "humantime_serde_compat")]
    pub max_lifetime: Duration,
    /// Keep at least this many connections open and idle (opened in the background).
    #[serde(default)]
    pub min_idle: usize,
    /// Run every autocommit unit inside rlsgate's own `BEGIN … COMMIT` with the context applied
    /// inside the block (Citus propagates `SET LOCAL` to workers only in explicit blocks).
    #[serde(default)]
    pub transaction_wrap: bool,
    /// Citus: start the injected context with `SET LOCAL citus.propagate_set_commands = 'local'`
    /// (before the `SET LOCAL app.…`, which Citus then forwards to the workers of the
    /// transaction), so the upstream needs no server setting. Only effective together with
    /// `transaction_wrap` (Citus propagates SET LOCAL inside explicit blocks only); `rlsgate
    /// check` probes a worker to confirm the tenant reaches it.
    #[serde(default)]
    pub citus_propagate_set: bool,
    /// Let a server connection keep a client's tenant context at session level between its
    /// transactions (a hidden `set_config(…, false)`), so that they need none of their own while
    /// the same context comes back to it; a connection is cleaned (`RESET ALL`) before a client
    /// with another context gets it. Not with `transaction_wrap`, the signed context or a role
    /// claim (the context is sent every transaction there).
    #[serde(default = "default_true")]
    pub keep_context: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    pub hs_secret: Option<String>,
    pub public_key_pem: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    #[serde(default = "default_leeway", with = "humantime_serde_compat")]
    pub leeway: Duration,
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// JSON Web Key Set from a file and/or an HTTPS URL (keys chosen by `kid`).
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    /// Extra CA certificates (PEM) trusted for `jwks_url`.
    pub jwks_ca_file: Option<PathBuf>,
    #[serde(default = "default_jwks_refresh", with = "humantime_serde_compat")]
    pub jwks_refresh: Duration,
    /// An unknown `kid` triggers a refetch at most this often.
    #[serde(default = "default_jwks_min_refetch", with = "humantime_serde_compat")]
    pub jwks_min_refetch: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde_compat")]
    pub jwks_timeout: Duration,
    #[serde(default = "default_jwks_max_bytes", deserialize_with = "de_bytes")]
    pub jwks_max_bytes: usize,
    /// When set, the login user name must equal this claim.
    pub user_claim: Option<String>,
    /// Role mode: `SET LOCAL ROLE` to the role named by this claim (must be in `role_allow`)…
    pub role_claim: Option<String>,
    /// …or to `role_template` with `{claim.path}` placeholders filled from the token.
    pub role_template: Option<String>,
    #[serde(default)]
    pub role_allow: Vec<String>,
    /// Failed logins tolerated per (client address, token subject) within
    /// `failed_login_window`; after that, further such failures are refused with FATAL 53300.
    /// Only what an attacker controls counts: malformed or oversized tokens, bad signatures,
    /// unknown key ids, disallowed algorithms. A token whose signature verifies is never
    /// throttled; an expired or not-yet-valid one gets its own 28000 and is not counted. The
    /// subject is the unverified `sub`; unreadable tokens share one bucket per address (refused
    /// unchecked once it is locked). 0 = no throttling.
    #[serde(default = "default_failed_login_burst")]
    pub failed_login_burst: u32,
    /// The window of `failed_login_burst`, counted from a key's first failure.
    #[serde(
        default = "default_failed_login_window",
        with = "humantime_serde_compat"
    )]
    pub failed_login_window: Duration,
    /// A token whose claim at this path is `true` may log in to the admin console (database
    /// `rlsgate`). Absent = no admin console.
    pub admin_claim: Option<String>,
}

/// Per-tenant limits (0 = unlimited).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default)]
    pub max_clients_per_tenant: usize,
    /// Concurrent transactions (server connections) per tenant: a fair share of the pool.
    /// Unset = [`LimitsConfig::transactions_cap`]'s default share; `0` = unlimited.
    #[serde(default)]
    pub max_transactions_per_tenant: Option<usize>,
    /// Server connections pinned to a tenant's clients by session state (transaction mode).
    /// Unset = [`LimitsConfig::pinned_cap`]'s default share; `0` = unlimited.
    #[serde(default)]
    pub max_pinned_per_tenant: Option<usize>,
    /// Transactions per second per tenant.
    #[serde(default)]
    pub transaction_rate_per_tenant: u32,
    #[serde(default)]
    pub on_limit: OnLimit,
}

impl LimitsConfig {
    /// Concurrent transactions one tenant may run (0 = unlimited). Unset: three quarters of the
    /// pool (at least 1), so that with two or more connections one tenant never holds them all.
    pub fn transactions_cap(&self, pool_size: usize) -> usize {
        self.max_transactions_per_tenant
            .unwrap_or_else(|| (pool_size * 3 / 4).max(1))
    }

    /// Server connections one tenant's clients may keep pinned (0 = unlimited). Unset: a
    /// quarter of the pool (at least 1).
    pub fn pinned_cap(&self, pool_size: usize) -> usize {
        self.max_pinned_per_tenant
            .unwrap_or_else(|| (pool_size / 4).max(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    /// Wait up to `checkout_timeout`, then fail with 53400.
    #[default]
    Wait,
    /// Fail with 53400 at once.
    Error,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Tenant-labelled series (`rlsgate_tenant_*`), at most `tenant_cap` distinct tenants.
    #[serde(default)]
    pub per_tenant: bool,
    #[serde(default = "default_tenant_cap")]
    pub tenant_cap: usize,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// tokio-postgres connection string of a database holding `sql/audit.sql`'s table; absent =
    /// audit events go to the log only.
    pub sink: Option<String>,
    #[serde(default = "default_audit_table")]
    pub table: String,
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    #[serde(default = "default_protected")]
    pub protected: Vec<String>,
    #[serde(default)]
    pub allow_do_blocks: bool,
    #[serde(default)]
    pub allow_create_function: bool,
    #[serde(default = "default_cache_size")]
    pub verdict_cache_size: usize,
    /// Byte budget of the verdict cache, statement shapes included (texts over 64 KiB are never
    /// cached). `verdict_cache_size` bounds the entries of both the same way.
    #[serde(default = "default_cache_bytes", deserialize_with = "de_bytes")]
    pub verdict_cache_bytes: usize,
    /// Longest statement text the guard classifies; longer ones are refused (54000) unread.
    /// Classifying costs several hundred bytes of memory per byte of text.
    #[serde(default = "default_max_statement_bytes", deserialize_with = "de_bytes")]
    pub max_statement_bytes: usize,
    /// Allow the large-object functions, pg_largeobject and the large-object fastpath calls.
    /// Large objects belong to the upstream role, not to a tenant: RLS cannot protect them.
    #[serde(default)]
    pub allow_large_objects: bool,
    /// Allow `LISTEN`, `NOTIFY` and `pg_notify()`. Notification channels belong to the
    /// database, not to a tenant: a listener hears every tenant's notifications.
    #[serde(default)]
    pub allow_notifications: bool,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            protected: default_protected(),
            allow_do_blocks: false,
            allow_create_function: false,
            verdict_cache_size: default_cache_size(),
            verdict_cache_bytes: default_cache_bytes(),
            max_statement_bytes: default_max_statement_bytes(),
            allow_large_objects: false,
            allow_notifications: false,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6432))
}
fn default_pool_mode() -> PoolMode {
    PoolMode::Transaction
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_message_size() -> usize {
    64 * 1024 * 1024
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    5432
}
fn default_pipeline_depth() -> usize {
    1
}

fn default_pool_size() -> usize {
    20
}
fn default_checkout_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_health_check_after() -> Duration {
    Duration::from_secs(30)
}
fn default_max_client_conn() -> usize {
    1000
}
fn default_idle_in_transaction_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_statement_bytes() -> usize {
    1 << 20
}
fn default_true() -> bool {
    true
}
/// With the defaults a dead peer is noticed after 60 s idle + 6 × 10 s of probes = 2 minutes
/// (Linux's own defaults take over 2 hours).
fn default_tcp_keepidle() -> Duration {
    Duration::from_secs(60)
}
fn default_tcp_keepintvl() -> Duration {
    Duration::from_secs(10)
}
fn default_tcp_keepcnt() -> u32 {
    6
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_max_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}
fn default_jwks_min_refetch() -> Duration {
    Duration::from_secs(30)
}
fn default_jwks_max_bytes() -> usize {
    1024 * 1024
}
fn default_failed_login_burst() -> u32 {
    20
}
fn default_failed_login_window() -> Duration {
    Duration::from_secs(60)
}
fn default_tenant_cap() -> usize {
    100
}
fn default_audit_table() -> String {
    "rlsgate_audit.events".into()
}
fn default_audit_queue() -> usize {
    10_000
}
fn default_algorithms() -> Vec<String> {
    vec!["HS256".into()]
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_tenant_claim() -> String {
    "store_id".into()
}
fn default_protected() -> Vec<String> {
    vec!["app.*".into()]
}
fn default_cache_bytes() -> usize {
    32 << 20
}
fn default_cache_size() -> usize {
    10_000
}

/// Durations written as `"10s"`, `"500ms"`, `"1h"`.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

/// Sizes written as `"64MB"`, `"512kB"`, `"1GB"` or a plain number of bytes.
fn de_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    let n = match Raw::deserialize(d)? {
        Raw::N(n) => n,
        Raw::S(s) => {
            parse_size(&s).ok_or_else(|| serde::de::Error::custom(format!("invalid size {s:?}")))?
        }
    };
    usize::try_from(n).map_err(|_| serde::de::Error::custom("size too large"))
}

pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1024,
        "mb" | "m" => 1024 * 1024,
        "gb" | "g" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Replace `${VAR}` with the value of the environment variable `VAR`.
pub fn expand_env(text: &str) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        let value = std::env::var(name).map_err(|_| ConfigError::MissingEnv(name.to_string()))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        // Expand only outside comments so that documented examples do not need the variables.
        let expanded = text
            .lines()
            .map(|line| {
                if line.trim_start().starts_with('#') {
                    Ok(line.to_string())
                } else {
                    expand_env(line)
                }
            })
            .collect::<Result<Vec<_>, _>>()?
            .join("\n");
        let config: Config = toml::from_str(&expanded)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.server.pipeline_depth) {
            return Err(invalid("server.pipeline_depth", "must be between 1 and 64"));
        }
        if self.upstream.pool_size == 0 {
            return Err(invalid("upstream.pool_size", "must be at least 1"));
        }
        if self.upstream.min_idle > self.upstream.pool_size {
            return Err(invalid("upstream.min_idle", "must not exceed pool_size"));
        }
        if self.server.max_client_conn == 0 {
            return Err(invalid("server.max_client_conn", "must be at least 1"));
        }
        if self.upstream.database.is_empty() {
            return Err(invalid("upstream.database", "must not be empty"));
        }
        // Linux's limits (MAX_TCP_KEEPIDLE/KEEPINTVL/KEEPCNT): larger values fail setsockopt.
        for (key, d) in [
            ("server.tcp_keepidle", self.server.tcp_keepidle),
            ("server.tcp_keepintvl", self.server.tcp_keepintvl),
        ] {
            if d.subsec_nanos() != 0 {
                return Err(invalid(key, "must be a whole number of seconds"));
            }
            if d.as_secs() > 32_767 {
                return Err(invalid(key, "must be at most 32767s"));
            }
        }
        if self.server.tcp_keepcnt > 127 {
            return Err(invalid("server.tcp_keepcnt", "must be at most 127"));
        }
        if self.server.tcp_user_timeout.as_millis() > i32::MAX as u128 {
            return Err(invalid("server.tcp_user_timeout", "too large"));
        }
        if !self.server.tcp_user_timeout.is_zero() && self.server.tcp_user_timeout.as_millis() == 0
        {
            return Err(invalid(
                "server.tcp_user_timeout",
                "must be at least 1ms (or \"0s\" = off)",
            ));
        }
        if !cfg!(target_os = "linux") && !self.server.tcp_user_timeout.is_zero() {
            return Err(invalid(
                "server.tcp_user_timeout",
                "is supported on Linux only",
            ));
        }
        if self.server.max_message_size < 1024 {
            return Err(invalid("server.max_message_size", "must be at least 1kB"));
        }
        if let Some(tls) = &self.tls
            && tls.cert.is_none() != tls.key.is_none()
        {
            return Err(invalid("tls", "cert and key must be given together"));
        }
        if self.auth.algorithms.is_empty() {
            return Err(invalid(
                "auth.algorithms",
                "must list at least one algorithm",
            ));
        }
        if let Some(url) = &self.auth.jwks_url
            && !url.starts_with("https://")
        {
            return Err(invalid("auth.jwks_url", "must be an https:// URL"));
        }
        if self.auth.role_claim.is_some() && self.auth.role_allow.is_empty() {
            return Err(invalid(
                "auth.role_allow",
                "role_claim needs an allow-list of roles",
            ));
        }
        if self.auth.tenant_claim.is_empty() {
            return Err(invalid("auth.tenant_claim", "must not be empty"));
        }
        match self.context.mode {
            ContextMode::Plain => {
                if self.context.signing_key.is_some() || self.context.previous_signing_key.is_some()
                {
                    return Err(invalid(
                        "context.signing_key",
                        "is only used with context.mode = \"signed\"",
                    ));
                }
            }
            ContextMode::Signed => {
                let Some(key) = &self.context.signing_key else {
                    return Err(invalid(
                        "context.signing_key",
                        "is required with context.mode = \"signed\"",
                    ));
                };
                for (name, key) in [
                    ("context.signing_key", Some(key)),
                    (
                        "context.previous_signing_key",
                        self.context.previous_signing_key.as_ref(),
                    ),
                ] {
                    if key.is_some_and(|k| k.len() < MIN_SIGNING_KEY_BYTES) {
                        return Err(invalid(
                            name,
                            format!("must be at least {MIN_SIGNING_KEY_BYTES} bytes long"),
                        ));
                    }
                }
                if self.context.previous_signing_key.as_ref() == Some(key) {
                    return Err(invalid(
                        "context.previous_signing_key",
                        "must differ from signing_key",
                    ));
                }
            }
        }
        if !self
            .context
            .settings
            .values()
            .any(|claim| claim == &self.auth.tenant_claim)
        {
            return Err(invalid(
                "context",
                format!(
                    "must map a protected setting to the tenant claim {:?}",
                    self.auth.tenant_claim
                ),
            ));
        }
        for guc in self.context.settings.keys() {
            if !is_valid_guc_name(guc) {
                return Err(invalid(
                    "context",
                    format!("{guc:?} is not a valid custom setting name (prefix.name)"),
                ));
            }
            if !crate::guard::protected::ProtectedSet::new(&self.guard.protected).is_protected(guc)
            {
                return Err(invalid(
                    "context",
                    format!(
                        "{guc:?} is not covered by guard.protected, so clients could overwrite it"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// TLS is offered to clients.
    pub fn client_tls_enabled(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.cert.is_some())
    }

    pub fn plaintext_password(&self) -> PlaintextPassword {
        self.tls
            .as_ref()
            .map(|t| t.plaintext_password)
            .unwrap_or_default()
    }
}

/// `prefix.name` with identifier characters only: what can be written unquoted in `SET LOCAL`.
pub fn is_valid_guc_name(name: &str) -> bool {
    let mut parts = name.split('.');
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) => ok_part(a) && ok_part(b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[upstream]
database = "app"
user = "rlsgate_app"
[auth]
hs_secret = "s"
[context]
"app.current_store_id" = "store_id"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(c.server.pool_mode, PoolMode::Transaction);
        assert_eq!(c.upstream.pool_size, 20);
        assert_eq!(c.plaintext_password(), PlaintextPassword::Loopback);
        assert_eq!(c.server.max_message_size, 64 * 1024 * 1024);
    }

    #[test]
    fn the_example_config_parses() {
        // SAFETY: test-only variables no other test reads.
        unsafe {
            std::env::set_var("RLSGATE_UPSTREAM_PASSWORD", "pw");
            std::env::set_var("RLSGATE_JWT_SECRET", "0123456789abcdef0123456789abcdef");
        }
        let text = include_str!("../config/rlsgate.example.toml");
        let c = Config::from_toml(text).expect("example config is valid");
        assert_eq!(c.server.session_state, SessionStatePolicy::Pin);
        assert_eq!(c.upstream.idle_timeout, Duration::from_secs(600));
        assert!(c.client_tls_enabled());
        // the documented defaults, not an explicit "unlimited"
        assert_eq!(
            c.server.idle_in_transaction_timeout,
            Duration::from_secs(60)
        );
        assert_eq!(c.limits.transactions_cap(c.upstream.pool_size), 15);
        assert_eq!(c.limits.pinned_cap(c.upstream.pool_size), 5);
    }

    #[test]
    fn dos_defaults_are_on() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(
            c.server.idle_in_transaction_timeout,
            Duration::from_secs(60)
        );
        // unset: a fair share of the default pool of 20
        assert_eq!(c.limits.max_transactions_per_tenant, None);
        assert_eq!(c.limits.max_pinned_per_tenant, None);
        assert_eq!(c.limits.transactions_cap(c.upstream.pool_size), 15);
        assert_eq!(c.limits.pinned_cap(c.upstream.pool_size), 5);
        let text = format!("{MINIMAL}\n[server]\nidle_in_transaction_timeout = \"0s\"\n");
        let c = Config::from_toml(&text).expect("valid");
        assert_eq!(c.server.idle_in_transaction_timeout, Duration::ZERO);
    }

    #[test]
    fn tenant_caps_unset_differ_from_explicit_zero() {
        let unset = LimitsConfig::default();
        for (pool, tx, pins) in [(1, 1, 1), (2, 1, 1), (3, 2, 1), (4, 3, 1), (8, 6, 2)] {
            assert_eq!(unset.transactions_cap(pool), tx, "pool {pool}");
            assert_eq!(unset.pinned_cap(pool), pins, "pool {pool}");
            assert!(unset.transactions_cap(pool) < pool || pool == 1);
        }
        let text = format!(
            "{MINIMAL}\n[limits]\nmax_transactions_per_tenant = 0\nmax_pinned_per_tenant = 0\n"
        );
        let zero = Config::from_toml(&text).expect("valid").limits;
        assert_eq!(zero.max_transactions_per_tenant, Some(0));
        assert_eq!(zero.max_pinned_per_tenant, Some(0));
        assert_eq!(zero.transactions_cap(20), 0, "0 = unlimited");
        assert_eq!(zero.pinned_cap(20), 0, "0 = unlimited");
        let text = format!(
            "{MINIMAL}\n[limits]\nmax_transactions_per_tenant = 7\nmax_pinned_per_tenant = 2\n"
        );
        let set = Config::from_toml(&text).expect("valid").limits;
        assert_eq!(set.transactions_cap(20), 7);
        assert_eq!(set.pinned_cap(20), 2);
    }

    #[test]
    fn keepalive_keys_defaults_and_limits() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(
            c.server.keepalive(),
            KeepaliveConfig {
                enabled: true,
                idle: Duration::from_secs(60),
                interval: Duration::from_secs(10),
                count: 6,
                user_timeout: Duration::ZERO,
            }
        );
        assert_eq!(KeepaliveConfig::default(), c.server.keepalive());
        let set = "tcp_keepalive = false\ntcp_keepidle = \"2m\"\ntcp_keepintvl = \"0s\"\ntcp_keepcnt = 0\ntcp_user_timeout = \"1500ms\"";
        let c = Config::from_toml(&format!("[server]\n{set}\n{MINIMAL}")).expect("valid");
        assert_eq!(
            c.server.keepalive(),
            KeepaliveConfig {
                enabled: false,
                idle: Duration::from_secs(120),
                interval: Duration::ZERO,
                count: 0,
                user_timeout: Duration::from_millis(1500),
            }
        );
        for bad in [
            "tcp_keepidle = \"1500ms\"",
            "tcp_keepintvl = \"40000s\"",
            "tcp_keepcnt = 128",
            "tcp_user_timeout = \"100us\"",
            "tcp_keepidle = \"soon\"",
        ] {
            assert!(
                Config::from_toml(&format!("[server]\n{bad}\n{MINIMAL}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = format!("{MINIMAL}\n[guard]\nprotectd = []\n");
        assert!(matches!(
            Config::from_toml(&text),
            Err(ConfigError::Parse(_))
        ));
    }

    #[test]
    fn context_must_cover_tenant_claim_and_be_protected() {
        let text = MINIMAL.replace(
            "\"app.current_store_id\" = \"store_id\"",
            "\"app.x\" = \"sub\"",
        );
        assert!(Config::from_toml(&text).is_err());
        let text = MINIMAL.replace("app.current_store_id", "other.current_store_id");
        assert!(Config::from_toml(&text).is_err());
    }

    #[test]
    fn signed_context_keys() {
        const KEY: &str = "0123456789abcdef0123456789abcdef";
        let plain = Config::from_toml(MINIMAL).expect("plain");
        assert_eq!(plain.context.mode, ContextMode::Plain);
        let signed = format!("{MINIMAL}mode = \"signed\"\nsigning_key = \"{KEY}\"\n");
        let c = Config::from_toml(&signed).expect("signed");
        assert_eq!(c.context.mode, ContextMode::Signed);
        assert_eq!(c.context.signing_key.as_deref(), Some(KEY));
        // the settings beside the keys are still the settings
        assert_eq!(
            c.context.settings.keys().collect::<Vec<_>>(),
            ["app.current_store_id"]
        );
        // never in debug output
        assert!(!format!("{c:?}").contains(KEY));
        for bad in [
            format!("{MINIMAL}mode = \"signed\"\n"),
            format!("{MINIMAL}mode = \"signed\"\nsigning_key = \"short\"\n"),
            format!("{MINIMAL}signing_key = \"{KEY}\"\n"),
            format!(
                "{MINIMAL}mode = \"signed\"\nsigning_key = \"{KEY}\"\nprevious_signing_key = \"{KEY}\"\n"
            ),
            format!("{MINIMAL}mode = \"sealed\"\n"),
        ] {
            assert!(Config::from_toml(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_expansion_and_sizes() {
        // SAFETY: test-only, single-threaded use of a variable no other test reads.
        unsafe { std::env::set_var("RLSGATE_TEST_EXPAND", "xyz") };
        assert_eq!(expand_env("a${RLSGATE_TEST_EXPAND}b").unwrap(), "axyzb");
        assert!(matches!(
            expand_env("${RLSGATE_TEST_MISSING_VAR}"),
            Err(ConfigError::MissingEnv(_))
        ));
        assert_eq!(parse_size("64MB"), Some(64 << 20));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("3 parsecs"), None);
    }

    #[test]
    fn guc_names() {
        assert!(is_valid_guc_name("app.current_store_id"));
        assert!(!is_valid_guc_name("app"));
        assert!(!is_valid_guc_name("app.x'; drop"));
        assert!(!is_valid_guc_name("App.x"));
    }
}
