//! Prometheus metrics: one [`Metrics`] per proxy (no global registry), shared as `Arc<Metrics>`.
//!
//! Every recording method is cheap (atomics, plus a short mutex for histograms and the per-tenant
//! lookup) and never fails. Label values are bounded: guard rules, login reasons and upstream
//! error kinds come from fixed lists (anything unknown is counted as `"other"`), and per-tenant
//! series — only when enabled — use at most `tenant_cap` distinct tenants, the rest being counted
//! under `tenant="other"`.
//!
//! [`Metrics::encode`] renders the Prometheus text format (0.0.4);
//! [`Metrics::encode_openmetrics`] the OpenMetrics text format.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Content type of [`Metrics::encode`].
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of [`Metrics::encode_openmetrics`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The label value used for anything outside a bounded set, and for tenants over the cap.
pub const OTHER: &str = "other";

/// Histogram buckets in seconds, from 100 µs to 10 s.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Guard rule names counted under their own label; anything else is `"other"`.
///
/// The classifier's rules, plus the refusals the session and handshake make themselves
/// (`session_state` with `session_state = "deny"`, `function_call`, `startup_setting`).
pub const GUARD_RULES: &[&str] = &[
    "protected_setting",
    "reset_all",
    "set_config",
    "role_change",
    "parser_setting",
    "sql_exec_function",
    "do_block",
    "create_function",
    "load",
    "unparsable",
    "unclassified",
    "session_state",
    "function_call",
    "startup_setting",
];

/// What a client connection is doing, for `rlsgate_client_connections{state}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientState {
    /// Logged in, no transaction open (holds no server connection in transaction mode).
    Idle,
    /// Running a transaction on a server connection.
    Active,
    /// Waiting for a server connection from the pool.
    Waiting,
}

impl ClientState {
    /// Every state, in declaration order (the discriminants index [`Metrics`]' gauges).
    const ALL: [ClientState; 3] = [ClientState::Idle, ClientState::Active, ClientState::Waiting];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Active => "active",
            ClientState::Waiting => "waiting",
        }
    }
}

/// Why a login was refused, for `rlsgate_logins_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoginFailure {
    Expired,
    BadSignature,
    BadAlgorithm,
    UnknownKid,
    MissingClaim,
    BadClaim,
    Malformed,
    Throttled,
    Other,
}

impl LoginFailure {
    pub const ALL: [LoginFailure; 9] = [
        LoginFailure::Expired,
        LoginFailure::BadSignature,
        LoginFailure::BadAlgorithm,
        LoginFailure::UnknownKid,
        LoginFailure::MissingClaim,
        LoginFailure::BadClaim,
        LoginFailure::Malformed,
        LoginFailure::Throttled,
        LoginFailure::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LoginFailure::Expired => "expired",
            LoginFailure::BadSignature => "bad_signature",
            LoginFailure::BadAlgorithm => "bad_algorithm",
            LoginFailure::UnknownKid => "unknown_kid",
            LoginFailure::MissingClaim => "missing_claim",
            LoginFailure::BadClaim => "bad_claim",
            LoginFailure::Malformed => "malformed",
            LoginFailure::Throttled => "throttled",
            LoginFailure::Other => "other",
        }
    }

    /// A reason given as text (e.g. from an audit event); unknown text is [`LoginFailure::Other`].
    pub fn from_reason(reason: &str) -> LoginFailure {
        LoginFailure::ALL
            .into_iter()
            .find(|f| f.as_str() == reason)
            .unwrap_or(LoginFailure::Other)
    }
}

/// The outcome of one login, for [`Metrics::login`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoginResult {
    Ok,
    Failed(LoginFailure),
}

/// What went wrong with the upstream, for `rlsgate_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamErrorKind {
    /// Could not open a connection (refused, timed out, DNS, the server said no).
    Connect,
    /// TLS to the upstream failed.
    Tls,
    /// The upstream refused rlsgate's credentials.
    Auth,
    /// The upstream sent something rlsgate did not expect.
    Protocol,
    /// An established connection broke (read/write error, EOF, health check failed).
    Lost,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 5] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Tls,
        UpstreamErrorKind::Auth,
        UpstreamErrorKind::Protocol,
        UpstreamErrorKind::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Tls => "tls",
            UpstreamErrorKind::Auth => "auth",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::Lost => "lost",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LoginLabels {
    result: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RuleLabel {
    rule: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

/// The series of one tenant label value (handles share their values with the families).
#[derive(Clone)]
struct TenantHandles {
    transactions: Counter,
    denials: Counter,
    connections: Gauge,
}

struct TenantSeries {
    cap: usize,
    transactions: Family<TenantLabel, Counter>,
    denials: Family<TenantLabel, Counter>,
    connections: Family<TenantLabel, Gauge>,
    /// At most `cap` entries; never shrinks, so a tenant's label never changes.
    /// (foldhash: tenant names come from verified tokens)
    known: Mutex<HashMap<String, TenantHandles, foldhash::fast::RandomState>>,
    other: TenantHandles,
}

impl TenantSeries {
    fn new(cap: usize) -> TenantSeries {
        let transactions = Family::<TenantLabel, Counter>::default();
        let denials = Family::<TenantLabel, Counter>::default();
        let connections = Family::<TenantLabel, Gauge>::default();
        let other = Self::handles(&transactions, &denials, &connections, OTHER);
        TenantSeries {
            cap,
            transactions,
            denials,
            connections,
            known: Mutex::new(HashMap::default()),
            other,
        }
    }

    fn handles(
        transactions: &Family<TenantLabel, Counter>,
        denials: &Family<TenantLabel, Counter>,
        connections: &Family<TenantLabel, Gauge>,
        tenant: &str,
    ) -> TenantHandles {
        let label = TenantLabel {
            tenant: tenant.to_string(),
        };
        TenantHandles {
            transactions: transactions.get_or_create_owned(&label),
            denials: denials.get_or_create_owned(&label),
            connections: connections.get_or_create_owned(&label),
        }
    }

    /// The series for `tenant`: its own while fewer than `cap` tenants have been seen, else
    /// `"other"`. The literal tenant name `"other"` shares the overflow series.
    fn resolve(&self, tenant: &str) -> TenantHandles {
        if tenant == OTHER {
            return self.other.clone();
        }
        let Ok(mut known) = self.known.lock() else {
            return self.other.clone();
        };
        if let Some(h) = known.get(tenant) {
            return h.clone();
        }
        if known.len() >= self.cap {
            return self.other.clone();
        }
        let h = Self::handles(&self.transactions, &self.denials, &self.connections, tenant);
        known.insert(tenant.to_string(), h.clone());
        h
    }
}

/// All of rlsgate's metrics, with their own registry.
pub struct Metrics {
    registry: Registry,
    /// `rlsgate_client_connections{state}`, one gauge per [`ClientState`] (in its order),
    /// resolved once: a client changes state twice per transaction.
    client_states: [Gauge; 3],
    server_connections: Family<StateLabel, Gauge>,
    pinned_clients: Gauge,
    resting_clients: Gauge,
    checkout_wait: Histogram,
    transaction_duration: Histogram,
    query_duration: Histogram,
    bytes_received: Counter,
    bytes_sent: Counter,
    logins: Family<LoginLabels, Counter>,
    guard_denials: Family<RuleLabel, Counter>,
    injections: Counter,
    pins: Counter,
    cancels: Counter,
    pool_timeouts: Counter,
    upstream_errors: Family<KindLabel, Counter>,
    tenants: Option<TenantSeries>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("per_tenant", &self.tenants.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    /// No per-tenant series.
    fn default() -> Self {
        Metrics::new(false, 0)
    }
}

impl Metrics {
    /// `per_tenant`: also keep `rlsgate_tenant_*` series, for at most `tenant_cap` distinct
    /// tenants (further tenants are counted under `tenant="other"`).
    pub fn new(per_tenant: bool, tenant_cap: usize) -> Metrics {
        let mut registry = Registry::default();
        let histogram = || Histogram::new(DURATION_BUCKETS);

        let client_connections = Family::<StateLabel, Gauge>::default();
        let client_states = ClientState::ALL
            .map(|s| client_connections.get_or_create_owned(&StateLabel { state: s.as_str() }));
        registry.register(
            "rlsgate_client_connections",
            "Client connections that are logged in, by state: idle (no transaction), active (in a transaction on a server connection), waiting (for a server connection)",
            client_connections.clone(),
        );

        let server_connections = Family::<StateLabel, Gauge>::default();
        for state in ["idle", "active"] {
            let _ = server_connections.get_or_create(&StateLabel { state });
        }
        registry.register(
            "rlsgate_server_connections",
            "Upstream connections, by state: idle (in the pool) and active (checked out)",
            server_connections.clone(),
        );

        let pinned_clients = Gauge::default();
        registry.register(
            "rlsgate_pinned_clients",
            "Clients whose server connection is pinned to them because of session state",
            pinned_clients.clone(),
        );

        let resting_clients = Gauge::default();
        registry.register(
            "rlsgate_resting_clients",
            "Idle clients resting as compact records (quiet for a second or more: their session holds only what it needs between transactions)",
            resting_clients.clone(),
        );

        let checkout_wait = histogram();
        registry.register(
            "rlsgate_checkout_wait_seconds",
            "Time a transaction waited for a server connection from the pool",
            checkout_wait.clone(),
        );
        let transaction_duration = histogram();
        registry.register(
            "rlsgate_transaction_duration_seconds",
            "Time from checkout to check-in of a server connection (one transaction in transaction mode)",
            transaction_duration.clone(),
        );
        let query_duration = histogram();
        registry.register(
            "rlsgate_query_duration_seconds",
            "Time from a client's query to the server's ReadyForQuery",
            query_duration.clone(),
        );

        // prometheus-client appends `_total` to counter names.
        let bytes_received = Counter::default();
        registry.register(
            "rlsgate_client_bytes_received",
            "Bytes received from clients",
            bytes_received.clone(),
        );
        let bytes_sent = Counter::default();
        registry.register(
            "rlsgate_client_bytes_sent",
            "Bytes sent to clients",
            bytes_sent.clone(),
        );

        let logins = Family::<LoginLabels, Counter>::default();
        let _ = logins.get_or_create(&LoginLabels {
            result: "ok",
            reason: "ok",
        });
        for f in LoginFailure::ALL {
            let _ = logins.get_or_create(&LoginLabels {
                result: "failed",
                reason: f.as_str(),
            });
        }
        registry.register(
            "rlsgate_logins",
            "Client logins by result and (bounded) reason",
            logins.clone(),
        );

        let guard_denials = Family::<RuleLabel, Counter>::default();
        for rule in GUARD_RULES.iter().copied().chain([OTHER]) {
            let _ = guard_denials.get_or_create(&RuleLabel { rule });
        }
        registry.register(
            "rlsgate_guard_denials",
            "Statements refused by the guard, by rule",
            guard_denials.clone(),
        );

        let injections = Counter::default();
        registry.register(
            "rlsgate_context_injections",
            "Tenant contexts (SET LOCAL) sent ahead of a transaction",
            injections.clone(),
        );
        let pins = Counter::default();
        registry.register(
            "rlsgate_pins",
            "Server connections pinned to a client because of session state",
            pins.clone(),
        );
        let cancels = Counter::default();
        registry.register(
            "rlsgate_cancels",
            "Cancel requests received from clients",
            cancels.clone(),
        );
        let pool_timeouts = Counter::default();
        registry.register(
            "rlsgate_pool_timeouts",
            "Transactions refused because no server connection became free within checkout_timeout",
            pool_timeouts.clone(),
        );

        let upstream_errors = Family::<KindLabel, Counter>::default();
        for k in UpstreamErrorKind::ALL {
            let _ = upstream_errors.get_or_create(&KindLabel { kind: k.as_str() });
        }
        registry.register(
            "rlsgate_upstream_errors",
            "Upstream failures by kind: connect, tls, auth, protocol, lost",
            upstream_errors.clone(),
        );

        let tenants = per_tenant.then(|| {
            let t = TenantSeries::new(tenant_cap);
            registry.register(
                "rlsgate_tenant_transactions",
                "Transactions per tenant (tenants over the cap are counted as \"other\")",
                t.transactions.clone(),
            );
            registry.register(
                "rlsgate_tenant_denials",
                "Guard denials per tenant (tenants over the cap are counted as \"other\")",
                t.denials.clone(),
            );
            registry.register(
                "rlsgate_tenant_client_connections",
                "Logged-in client connections per tenant (tenants over the cap are counted as \"other\")",
                t.connections.clone(),
            );
            t
        });

        Metrics {
            registry,
            client_states,
            server_connections,
            pinned_clients,
            resting_clients,
            checkout_wait,
            transaction_duration,
            query_duration,
            bytes_received,
            bytes_sent,
            logins,
            guard_denials,
            injections,
            pins,
            cancels,
            pool_timeouts,
            upstream_errors,
            tenants,
        }
    }

    /// Whether per-tenant series are kept.
    pub fn per_tenant(&self) -> bool {
        self.tenants.is_some()
    }

    // --- client connections -------------------------------------------------------------------

    fn state_gauge(&self, state: ClientState) -> &Gauge {
        &self.client_states[state as usize]
    }

    /// A client logged in (it starts [`ClientState::Idle`]). Pair with
    /// [`Metrics::client_disconnected`], or use [`Metrics::track_client`], which does both.
    pub fn client_connected(&self, tenant: &str) {
        self.state_gauge(ClientState::Idle).inc();
        if let Some(t) = &self.tenants {
            t.resolve(tenant).connections.inc();
        }
    }

    /// A logged-in client left while in `state`.
    pub fn client_disconnected(&self, tenant: &str, state: ClientState) {
        self.state_gauge(state).dec();
        if let Some(t) = &self.tenants {
            t.resolve(tenant).connections.dec();
        }
    }

    /// A logged-in client moved from `old` to `new`.
    pub fn client_state_change(&self, old: ClientState, new: ClientState) {
        if old != new {
            self.state_gauge(old).dec();
            self.state_gauge(new).inc();
        }
    }

    /// Counts a logged-in client until the returned guard is dropped; move it between states with
    /// [`ClientTracker::set_state`]. Keeps the gauges right on every exit path.
    pub fn track_client(self: &Arc<Self>, tenant: &str) -> ClientTracker {
        let state = ClientState::Idle;
        self.state_gauge(state).inc();
        let handles = self.tenants.as_ref().map(|t| t.resolve(tenant));
        if let Some(h) = &handles {
            h.connections.inc();
        }
        let (tenant_gauge, tenant_transactions) = match handles {
            Some(h) => (Some(h.connections), Some(h.transactions)),
            None => (None, None),
        };
        ClientTracker {
            metrics: Arc::clone(self),
            state,
            tenant_gauge,
            tenant_transactions,
        }
    }

    // --- durations ----------------------------------------------------------------------------

    /// How long a transaction waited for a server connection (also when it then timed out).
    pub fn checkout_wait(&self, waited: Duration) {
        self.checkout_wait.observe(waited.as_secs_f64());
    }

    /// A transaction ended (its server connection went back to the pool).
    pub fn transaction_finished(&self, tenant: &str, took: Duration) {
        self.transaction_duration.observe(took.as_secs_f64());
        if let Some(t) = &self.tenants {
            t.resolve(tenant).transactions.inc();
        }
    }

    /// A query (or extended-protocol unit up to Sync) was answered with ReadyForQuery.
    pub fn query_finished(&self, took: Duration) {
        self.query_duration.observe(took.as_secs_f64());
    }

    // --- counters -----------------------------------------------------------------------------

    /// Bytes relayed from (`received`) and to (`sent`) clients.
    pub fn bytes(&self, received: u64, sent: u64) {
        if received > 0 {
            self.bytes_received.inc_by(received);
        }
        if sent > 0 {
            self.bytes_sent.inc_by(sent);
        }
    }

    pub fn login(&self, result: LoginResult) {
        let labels = match result {
            LoginResult::Ok => LoginLabels {
                result: "ok",
                reason: "ok",
            },
            LoginResult::Failed(f) => LoginLabels {
                result: "failed",
                reason: f.as_str(),
            },
        };
        self.logins.get_or_create(&labels).inc();
    }

    /// A statement (or startup setting, FunctionCall, session state) was refused. `rule` outside
    /// [`GUARD_RULES`] is counted as `"other"`.
    pub fn denial(&self, rule: &str, tenant: &str) {
        let rule = bounded_rule(rule);
        self.guard_denials.get_or_create(&RuleLabel { rule }).inc();
        if let Some(t) = &self.tenants {
            t.resolve(tenant).denials.inc();
        }
    }

    /// A tenant context was sent ahead of a transaction.
    pub fn injection(&self) {
        self.injections.inc();
    }

    /// A server connection was pinned to a client.
    pub fn pin(&self) {
        self.pins.inc();
    }

    /// A cancel request was dealt with (delivered to the server, or found nothing to cancel).
    pub fn cancel(&self) {
        self.cancels.inc();
    }

    /// A quiet client's session was parked (`true`) or resumed (`false`).
    pub fn resting(&self, parked: bool) {
        if parked {
            self.resting_clients.inc();
        } else {
            self.resting_clients.dec();
        }
    }

    /// Clients resting now.
    pub fn resting_clients(&self) -> i64 {
        self.resting_clients.get()
    }

    /// Cancel requests dealt with so far.
    pub fn cancels(&self) -> u64 {
        self.cancels.get()
    }

    /// A checkout gave up after `checkout_timeout`.
    pub fn pool_timeout(&self) {
        self.pool_timeouts.inc();
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    // --- gauges set from a snapshot -------------------------------------------------------------

    pub fn set_server_connections(&self, idle: usize, active: usize) {
        for (state, n) in [("idle", idle), ("active", active)] {
            self.server_connections
                .get_or_create(&StateLabel { state })
                .set(clamp_i64(n));
        }
    }

    pub fn set_pinned(&self, n: usize) {
        self.pinned_clients.set(clamp_i64(n));
    }

    // --- exposition ---------------------------------------------------------------------------

    /// The Prometheus text format (0.0.4, [`PROMETHEUS_CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        openmetrics_to_prometheus(&self.encode_openmetrics())
    }

    /// The OpenMetrics text format ([`OPENMETRICS_CONTENT_TYPE`]), ending with `# EOF`.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A logged-in client, counted in `rlsgate_client_connections{state}` (and the tenant's series)
/// until dropped. See [`Metrics::track_client`].
pub struct ClientTracker {
    metrics: Arc<Metrics>,
    state: ClientState,
    tenant_gauge: Option<Gauge>,
    /// The tenant's transaction counter, looked up once per client instead of per transaction.
    tenant_transactions: Option<Counter>,
}

impl std::fmt::Debug for ClientTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTracker")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl ClientTracker {
    pub fn set_state(&mut self, new: ClientState) {
        self.metrics.client_state_change(self.state, new);
        self.state = new;
    }

    pub fn state(&self) -> ClientState {
        self.state
    }

    /// As [`Metrics::transaction_finished`], for this client's tenant.
    pub fn transaction_finished(&self, took: Duration) {
        self.metrics
            .transaction_duration
            .observe(took.as_secs_f64());
        if let Some(c) = &self.tenant_transactions {
            c.inc();
        }
    }
}

impl Drop for ClientTracker {
    fn drop(&mut self) {
        self.metrics.state_gauge(self.state).dec();
        if let Some(g) = &self.tenant_gauge {
            g.dec();
        }
    }
}

fn bounded_rule(rule: &str) -> &'static str {
    GUARD_RULES
        .iter()
        .copied()
        .find(|r| *r == rule)
        .unwrap_or(OTHER)
}

fn clamp_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// OpenMetrics text → Prometheus text 0.0.4: counter families are named with their `_total`
/// suffix in `# HELP`/`# TYPE` (as their samples are), and `# EOF`/`# UNIT` lines are dropped.
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len() + counters.len() * 12);
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn tenants_over_the_cap_fold_into_other() {
        let m = Metrics::new(true, 2);
        for tenant in ["north", "south", "east", "west", "north"] {
            m.transaction_finished(tenant, Duration::from_millis(3));
        }
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                r#"rlsgate_tenant_transactions_total{tenant="north"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"rlsgate_tenant_transactions_total{tenant="south"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"rlsgate_tenant_transactions_total{tenant="other"}"#
            ),
            Some(2.0)
        );
        assert!(!text.contains(r#"tenant="east""#));
        assert!(!text.contains(r#"tenant="west""#));
    }

    #[test]
    fn no_tenant_series_unless_enabled() {
        let m = Metrics::new(false, 100);
        m.transaction_finished("north", Duration::from_millis(1));
        m.denial("protected_setting", "north");
        assert!(!m.encode().contains("rlsgate_tenant_"));
        assert!(!m.per_tenant());
    }

    #[test]
    fn rule_and_reason_labels_are_bounded() {
        let m = Metrics::new(false, 0);
        m.denial("protected_setting", "t");
        m.denial("made_up_rule\"}\n", "t");
        m.login(LoginResult::Failed(LoginFailure::from_reason(
            "no_such_reason",
        )));
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                r#"rlsgate_guard_denials_total{rule="protected_setting"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"rlsgate_guard_denials_total{rule="other"}"#),
            Some(1.0)
        );
        assert!(!text.contains("made_up_rule"));
        assert_eq!(
            sample(
                &text,
                r#"rlsgate_logins_total{result="failed",reason="other"}"#
            ),
            Some(1.0)
        );
        assert_eq!(LoginFailure::from_reason("expired"), LoginFailure::Expired);
        assert_eq!(
            crate::auth::AuthError::KidRequired.login_failure(),
            LoginFailure::UnknownKid
        );
        assert_eq!(
            crate::client::HandshakeError::Throttled.login_failure(),
            Some(LoginFailure::Throttled)
        );
        assert_eq!(crate::client::HandshakeError::Gone.login_failure(), None);
    }

    #[test]
    fn client_tracker_keeps_gauges_balanced() {
        let m = Arc::new(Metrics::new(true, 10));
        let mut a = m.track_client("north");
        let b = m.track_client("north");
        a.set_state(ClientState::Waiting);
        a.set_state(ClientState::Active);
        let text = m.encode();
        assert_eq!(
            sample(&text, r#"rlsgate_client_connections{state="active"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"rlsgate_client_connections{state="idle"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"rlsgate_tenant_client_connections{tenant="north"}"#
            ),
            Some(2.0)
        );
        drop(a);
        drop(b);
        let text = m.encode();
        for state in ["idle", "active", "waiting"] {
            let series = format!(r#"rlsgate_client_connections{{state="{state}"}}"#);
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
        assert_eq!(
            sample(
                &text,
                r#"rlsgate_tenant_client_connections{tenant="north"}"#
            ),
            Some(0.0)
        );
    }

    #[test]
    fn prometheus_text_names_counters_with_total() {
        let m = Metrics::new(false, 0);
        m.injection();
        m.checkout_wait(Duration::from_micros(150));
        crate::pool::PoolError::Timeout(Duration::from_secs(1)).count(&m);
        crate::pool::PoolError::Tls("x".into()).count(&m);
        let text = m.encode();
        assert!(text.contains("# TYPE rlsgate_context_injections_total counter\n"));
        assert!(text.contains("# HELP rlsgate_context_injections_total "));
        assert_eq!(sample(&text, "rlsgate_context_injections_total"), Some(1.0));
        assert_eq!(sample(&text, "rlsgate_pool_timeouts_total"), Some(1.0));
        assert_eq!(
            sample(&text, r#"rlsgate_upstream_errors_total{kind="tls"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"rlsgate_checkout_wait_seconds_bucket{le="0.00025"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"rlsgate_checkout_wait_seconds_bucket{le="0.0001"}"#
            ),
            Some(0.0)
        );
        assert!(text.contains("# TYPE rlsgate_checkout_wait_seconds histogram\n"));
        assert!(!text.contains("# EOF"));
        assert!(m.encode_openmetrics().ends_with("# EOF\n"));
    }
}
