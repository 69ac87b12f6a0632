//! Adversarial escape suite: the classes of an outside security review (issue 11, classes 1–10),
//! each in several spellings, through the real proxy with a pool of 1 and a pool of 4.
//!
//! The test database grants what the guard must stand alone against: `set_config` and the
//! `pg_stat_get_*activity` functions to PUBLIC, and TEMP on the database (so temporary objects
//! can be created). Every case runs on a fresh proxy (fresh pool, fresh server connections) in
//! front of the test's database, with one attacker (tenant A, `north`) and three victims
//! (tenant B, `south`). After every attempt both tenants are checked: A still sees only its own
//! rows; every B connection (first one after another — the pool is a stack, so B lands on the
//! server connection A used last — then all at once) sees its own tenant, its own rows, the real
//! `customers` table, no temporary objects and the server's own setting values.
//!
//! Failures are collected per test and reported together (grouped by protocol path), so one run
//! shows every spelling that got through; findings that prove a cross-tenant effect are marked
//! `ESCAPE`. Each test prints how often the first victim ran on the attacker's server connection.
//!
//! Class 11 (DoS) is out of scope here. The `extra_*` tests cover spellings the review did not
//! list (`SET seed`, `SET SESSION CHARACTERISTICS`).

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Attacker.
const A: &str = "north";
/// Victim.
const B: &str = "south";

const DENIED: &[&str] = &["42501"];
const UNPARSABLE: &[&str] = &["42601"];
/// Text a newer grammar or a deeper stack might parse after all: then the guard must see what it
/// hides (42501); if it cannot parse it, it must refuse it (42601). Never allowed.
const UNPARSABLE_OR_DENIED: &[&str] = &["42601", "42501"];

fn rows_of(tenant: &str) -> i64 {
    match tenant {
        "north" => 3,
        "south" => 2,
        _ => 1,
    }
}

// ---------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------

struct Report {
    name: String,
    pool: usize,
    fails: Vec<String>,
    /// victim probes right after an attacker probe, and how many ran on the attacker's backend
    probes: usize,
    landed: usize,
    /// false where pinning the attacker's connection is the right outcome
    landing_rule: bool,
    started: std::time::Instant,
}

impl Report {
    fn new(name: &str, pool: usize) -> Report {
        Report {
            name: format!("{name} (pool {pool})"),
            pool,
            fails: Vec::new(),
            probes: 0,
            landed: 0,
            landing_rule: true,
            started: std::time::Instant::now(),
        }
    }

    fn no_landing_rule(mut self) -> Report {
        self.landing_rule = false;
        self
    }

    fn fail(&mut self, case: &str, what: impl Into<String>) {
        self.fails
            .push(format!("[{}] {}", short(case, 110), what.into()));
    }

    fn finish(mut self) {
        eprintln!(
            "{}: {:.1}s; the first victim ran on the attacker's server connection in {} of {} checks",
            self.name,
            self.started.elapsed().as_secs_f64(),
            self.landed,
            self.probes
        );
        if self.landing_rule && self.pool > 1 && self.probes >= 5 && self.landed == 0 {
            let name = self.name.clone();
            self.fail(
                &name,
                "no victim ever ran on the attacker's server connection: the checks prove nothing",
            );
        }
        if !self.fails.is_empty() {
            panic!(
                "{}: {} failure(s):\n  - {}",
                self.name,
                self.fails.len(),
                self.fails.join("\n  - ")
            );
        }
    }
}

fn short(s: &str, max: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let head: String = one_line.chars().take(max).collect();
        format!("{head}… ({} bytes)", s.len())
    }
}

fn err_text(e: &tokio_postgres::Error) -> String {
    let c = code(e);
    let m = short(&message(e), 160);
    if c.is_empty() { m } else { format!("{c} {m}") }
}

fn simple_values(msgs: &[SimpleQueryMessage]) -> Vec<Vec<String>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn row_values(rows: &[tokio_postgres::Row]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| {
            (0..r.len())
                .map(|i| match r.try_get::<_, Option<String>>(i) {
                    Ok(Some(v)) => v,
                    Ok(None) => "NULL".to_string(),
                    Err(_) => "?".to_string(),
                })
                .collect()
        })
        .collect()
}

fn summary(rows: &[Vec<String>]) -> String {
    let shown: Vec<String> = rows
        .iter()
        .take(3)
        .map(|r| r.iter().map(|v| short(v, 40)).collect::<Vec<_>>().join("|"))
        .collect();
    format!("{} row(s) [{}]", rows.len(), shown.join("; "))
}

// ---------------------------------------------------------------------------------------------
// Database, proxy, clients
// ---------------------------------------------------------------------------------------------

/// A fresh demo database where only the guard stands in the way.
fn escape_db() -> String {
    let db = demo_db();
    admin_sql(
        &db,
        &format!(
            "GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO PUBLIC;
             GRANT TEMP ON DATABASE \"{db}\" TO PUBLIC;
             GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) TO PUBLIC;
             GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_get_backend_activity(integer) TO PUBLIC;"
        ),
    );
    db
}

fn proxy_config(db: &str, pool: usize) -> String {
    // A victim waiting for a connection pinned to the attacker gives up after 1 s.
    config_text(db, pool, "").replace("checkout_timeout = \"5s\"", "checkout_timeout = \"1s\"")
}

/// Settings B must keep whatever A does.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    statement_timeout: String,
    default_read_only: String,
    default_isolation: String,
    search_path: String,
    tx_read_only: String,
}

/// What one tenant connection sees.
#[derive(Debug, Clone)]
struct Probe {
    tenant: String,
    own: String,
    foreign: String,
    resolves: String,
    types_ok: String,
    temp_objects: String,
    settings: Settings,
    pid: String,
}

fn probe_sql(tenant: &str) -> String {
    // Every column is cast to pg_catalog.text by its qualified name: a temporary type called
    // `text` must not change what the probe reads.
    format!(
        "SELECT current_setting('app.current_store_id', true), \
         (SELECT count(*) FROM public.customers)::pg_catalog.text, \
         (SELECT count(*) FROM public.customers WHERE store_id <> '{tenant}')::pg_catalog.text, \
         coalesce(to_regclass('customers')::oid = 'public.customers'::regclass::oid, false)::pg_catalog.text, \
         coalesce(to_regtype('text')::oid = 'pg_catalog.text'::regtype::oid \
                  AND to_regtype('int4')::oid = 'pg_catalog.int4'::regtype::oid, false)::pg_catalog.text, \
         ((SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_my_temp_schema()) \
          + (SELECT count(*) FROM pg_catalog.pg_type WHERE typnamespace = pg_my_temp_schema()) \
          + (SELECT count(*) FROM pg_catalog.pg_proc WHERE pronamespace = pg_my_temp_schema()) \
          + (SELECT count(*) FROM pg_catalog.pg_ts_config WHERE cfgnamespace = pg_my_temp_schema()) \
          + (SELECT count(*) FROM pg_catalog.pg_collation WHERE collnamespace = pg_my_temp_schema()))::pg_catalog.text, \
         current_setting('statement_timeout'), current_setting('default_transaction_read_only'), \
         current_setting('default_transaction_isolation'), current_setting('search_path'), \
         current_setting('transaction_read_only'), pg_backend_pid()::pg_catalog.text"
    )
}

async fn probe(c: &Client, tenant: &str, extended: bool) -> Result<Probe, String> {
    let sql = probe_sql(tenant);
    let rows = if extended {
        c.query(sql.as_str(), &[])
            .await
            .map(|r| row_values(&r))
            .map_err(|e| err_text(&e))?
    } else {
        c.simple_query(&sql)
            .await
            .map(|m| simple_values(&m))
            .map_err(|e| err_text(&e))?
    };
    let v = rows
        .into_iter()
        .next()
        .ok_or_else(|| "probe returned no row".to_string())?;
    if v.len() != 12 {
        return Err(format!("probe returned {} columns", v.len()));
    }
    Ok(Probe {
        tenant: v[0].clone(),
        own: v[1].clone(),
        foreign: v[2].clone(),
        resolves: v[3].clone(),
        types_ok: v[4].clone(),
        temp_objects: v[5].clone(),
        settings: Settings {
            statement_timeout: v[6].clone(),
            default_read_only: v[7].clone(),
            default_isolation: v[8].clone(),
            search_path: v[9].clone(),
            tx_read_only: v[10].clone(),
        },
        pid: v[11].clone(),
    })
}

/// Problems in what a tenant sees; settings and session objects only for victims.
fn problems(p: &Probe, tenant: &str, base: Option<&Settings>) -> Vec<String> {
    let mut out = Vec::new();
    if p.tenant != tenant {
        out.push(format!("tenant setting is {:?}, not {tenant:?}", p.tenant));
    }
    if p.own != rows_of(tenant).to_string() {
        out.push(format!(
            "sees {} customers, not its own {}",
            p.own,
            rows_of(tenant)
        ));
    }
    if p.foreign != "0" {
        out.push(format!("sees {} rows of other tenants", p.foreign));
    }
    if let Some(base) = base {
        if p.resolves != "true" {
            out.push("unqualified `customers` no longer resolves to public.customers".into());
        }
        if p.types_ok != "true" {
            out.push("unqualified `text`/`int4` no longer resolve to pg_catalog types".into());
        }
        if p.temp_objects != "0" {
            out.push(format!(
                "{} temporary objects of someone else on its server connection",
                p.temp_objects
            ));
        }
        if &p.settings != base {
            out.push(format!(
                "settings changed: {:?} (server defaults {:?})",
                p.settings, base
            ));
        }
    }
    out
}

/// One proxy in front of the test database, one attacker and three victims.
struct Sess {
    proxy: Proxy,
    a: Option<Client>,
    bs: Vec<Client>,
}

impl Sess {
    async fn start(db: &str, pool: usize) -> Sess {
        let proxy = start_proxy_with(db, &proxy_config(db, pool)).await;
        let a = client(&proxy, A).await;
        let mut bs = Vec::new();
        for _ in 0..3 {
            bs.push(client(&proxy, B).await);
        }
        let s = Sess {
            proxy,
            a: Some(a),
            bs,
        };
        // Everyone at once, so a pool of 4 opens several server connections.
        if pool > 1 {
            let mut all: Vec<&Client> = s.bs.iter().collect();
            all.push(s.a());
            let _ = join_all(
                all.into_iter()
                    .map(|c| c.simple_query("SELECT pg_sleep(0.005)")),
            )
            .await;
        }
        s
    }

    fn a(&self) -> &Client {
        self.a.as_ref().expect("attacker connected")
    }

    async fn drop_a(&mut self) {
        self.a = None;
        // let the proxy see the disconnect and clean the connection
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    async fn stop(self) {
        let Sess { proxy, a, bs } = self;
        drop(a);
        drop(bs);
        proxy.stop().await;
    }
}

struct Env {
    db: String,
    pool: usize,
    base: Settings,
}

impl Env {
    async fn new(pool: usize) -> Env {
        let db = escape_db();
        let s = Sess::start(&db, pool).await;
        let p = probe(&s.bs[0], B, false)
            .await
            .expect("baseline probe of tenant B");
        assert!(
            problems(&p, B, None).is_empty(),
            "baseline: {:?}",
            problems(&p, B, None)
        );
        s.stop().await;
        Env {
            db,
            pool,
            base: p.settings,
        }
    }

    async fn sess(&self) -> Sess {
        Sess::start(&self.db, self.pool).await
    }

    async fn check_a(&self, s: &Sess, r: &mut Report, case: &str, after: &str) {
        let Some(a) = s.a.as_ref() else { return };
        match probe(a, A, false).await {
            Ok(p) => {
                for pr in problems(&p, A, None) {
                    r.fail(case, format!("attacker after {after}: {pr}"));
                }
            }
            Err(e) => r.fail(case, format!("attacker unusable after {after}: {e}")),
        }
    }

    /// Every victim, one after the other (each lands on the connection used last), then all at
    /// once (several server connections).
    async fn check_b(&self, s: &Sess, r: &mut Report, case: &str, when: &str) {
        // The attacker's probe puts its connection on top of the pool's stack: the first victim
        // below should be served by it (unless it is pinned to the attacker).
        let attacker_pid = match s.a.as_ref() {
            Some(a) => probe(a, A, false).await.ok().map(|p| p.pid),
            None => None,
        };
        let mut out = Outcomes::default();
        let mut results = Vec::new();
        for (i, b) in s.bs.iter().enumerate() {
            let p = probe(b, B, i % 2 == 1).await;
            if let (0, Ok(p), Some(apid)) = (i, &p, &attacker_pid) {
                r.probes += 1;
                if &p.pid == apid {
                    r.landed += 1;
                }
            }
            let timed_out = matches!(&p, Err(e) if e.starts_with("57014"));
            results.push((format!("victim {i}"), p));
            if timed_out {
                // no connection for the victims (pinned to the attacker): the rest would only
                // wait for the same timeout
                break;
            }
        }
        if !results.iter().any(|(_, p)| p.is_err()) {
            let all = join_all(
                s.bs.iter()
                    .enumerate()
                    .map(|(i, b)| probe(b, B, i % 2 == 0)),
            )
            .await;
            for (i, p) in all.into_iter().enumerate() {
                results.push((format!("victim {i} (concurrent)"), p));
            }
        }
        for (who, p) in results {
            match p {
                Ok(p) => {
                    for pr in problems(&p, B, Some(&self.base)) {
                        out.add(format!("{when}: {pr}"), String::new(), who.clone());
                    }
                }
                Err(e) => out.add(format!("{when}: probe failed: {e}"), String::new(), who),
            }
        }
        out.report(r, case);
    }

    /// B's unqualified INSERT lands in the real table.
    async fn check_b_insert(&self, s: &Sess, r: &mut Report, case: &str, tag: usize) {
        let name = format!("probe-{}-{tag}", self.pool);
        let b = &s.bs[0];
        if let Err(e) = b
            .simple_query(&format!(
                "INSERT INTO customers (store_id, name) VALUES ('south', '{name}')"
            ))
            .await
        {
            r.fail(
                case,
                format!("victim's INSERT INTO customers failed: {}", err_text(&e)),
            );
        }
        let landed = admin_sql(
            &self.db,
            &format!("SELECT count(*) FROM public.customers WHERE name = '{name}'"),
        );
        if landed != "1" {
            r.fail(
                case,
                format!("victim's row is not in public.customers ({landed} rows)"),
            );
        }
        admin_sql(
            &self.db,
            "DELETE FROM public.customers WHERE name LIKE 'probe-%'",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Case {
    sql: String,
    want: &'static [&'static str],
    /// simple Query (simple_query and batch_execute)
    simple: bool,
    /// extended protocol (prepare + query, and query_typed with the unnamed statement)
    extended: bool,
    /// also inside BEGIN … ROLLBACK: the denial must abort the block (25P02)
    tx: bool,
}

impl Case {
    fn deny(sql: impl Into<String>) -> Case {
        let sql = sql.into();
        let multi = sql.contains(';');
        Case {
            sql,
            want: DENIED,
            simple: true,
            extended: !multi,
            tx: true,
        }
    }

    fn want(mut self, want: &'static [&'static str]) -> Case {
        self.want = want;
        self
    }

    /// One statement whose body contains `;`.
    fn single(mut self) -> Case {
        self.extended = true;
        self
    }

    /// Contains transaction control itself.
    fn no_tx(mut self) -> Case {
        self.tx = false;
        self
    }

    fn extended_only(mut self) -> Case {
        self.simple = false;
        self.extended = true;
        self
    }
}

/// What went wrong with one denial case, grouped by problem across protocol paths.
#[derive(Default)]
struct Outcomes {
    /// (problem, detail, paths)
    problems: Vec<(String, String, Vec<String>)>,
}

impl Outcomes {
    fn add(&mut self, problem: String, detail: String, via: impl Into<String>) {
        match self.problems.iter_mut().find(|p| p.0 == problem) {
            Some(p) => {
                p.2.push(via.into());
                if p.1.is_empty() {
                    p.1 = detail;
                }
            }
            None => self.problems.push((problem, detail, vec![via.into()])),
        }
    }

    fn report(self, r: &mut Report, case: &str) {
        for (problem, detail, vias) in self.problems {
            let detail = if detail.is_empty() {
                String::new()
            } else {
                format!(" ({detail})")
            };
            r.fail(case, format!("{problem} via {}{detail}", vias.join(", ")));
        }
    }
}

/// Records what is wrong with `res` for a case that must be denied; true when it was refused.
fn check_denied(
    out: &mut Outcomes,
    case: &Case,
    via: &'static str,
    res: Result<Vec<Vec<String>>, tokio_postgres::Error>,
) -> bool {
    match res {
        Ok(rows) => {
            let detail = if rows.is_empty() {
                String::new()
            } else {
                format!("returned {}", summary(&rows))
            };
            out.add("ALLOWED".into(), detail, via);
            false
        }
        Err(e) => {
            let c = code(&e);
            if !case.want.contains(&c.as_str()) {
                out.add(
                    format!("got {}, want {:?}", err_text(&e), case.want),
                    String::new(),
                    via,
                );
            } else if !message(&e).starts_with("rlsgate:") {
                out.add(
                    format!("refused by Postgres, not by rlsgate: {}", err_text(&e)),
                    String::new(),
                    via,
                );
            }
            true
        }
    }
}

async fn extended(c: &Client, sql: &str) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    let st = c.prepare(sql).await?;
    c.query(&st, &[]).await.map(|r| row_values(&r))
}

async fn extended_unnamed(
    c: &Client,
    sql: &str,
) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    c.query_typed(sql, &[]).await.map(|r| row_values(&r))
}

async fn usable(r: &mut Report, c: &Client, case: &str, via: &str) {
    match c.simple_query("SELECT 1").await {
        Ok(_) => {}
        Err(e) => r.fail(
            case,
            format!("connection not usable after {via}: {}", err_text(&e)),
        ),
    }
}

/// After a denial inside BEGIN: the block is aborted (25P02) and ROLLBACK ends it.
async fn aborted_block(r: &mut Report, c: &Client, case: &str, via: &str, denied: bool) {
    match c.simple_query("SELECT 1").await {
        Err(e) if code(&e) == "25P02" => {}
        Err(e) if denied => r.fail(
            case,
            format!("{via}: after the denial, want 25P02, got {}", err_text(&e)),
        ),
        Ok(_) if denied => r.fail(
            case,
            format!("{via}: the denial did not abort the transaction block"),
        ),
        _ => {}
    }
    if let Err(e) = c.batch_execute("ROLLBACK").await {
        r.fail(case, format!("{via}: ROLLBACK failed: {}", err_text(&e)));
    }
}

/// A statement the guard must refuse, in every protocol path, leaving both tenants intact.
async fn run_deny(env: &Env, case: &Case, r: &mut Report) {
    let s = env.sess().await;
    let a = s.a();
    let sql = case.sql.as_str();
    let mut out = Outcomes::default();
    if case.simple {
        let res = a.simple_query(sql).await.map(|m| simple_values(&m));
        check_denied(&mut out, case, "simple", res);
        usable(r, a, sql, "simple").await;
        env.check_a(&s, r, sql, "simple").await;
        let res = a.batch_execute(sql).await.map(|_| Vec::new());
        check_denied(&mut out, case, "batch_execute", res);
        usable(r, a, sql, "batch_execute").await;
    }
    if case.extended {
        let res = extended(a, sql).await;
        check_denied(&mut out, case, "extended", res);
        usable(r, a, sql, "extended").await;
        env.check_a(&s, r, sql, "extended").await;
        let res = extended_unnamed(a, sql).await;
        check_denied(&mut out, case, "extended unnamed", res);
        usable(r, a, sql, "extended unnamed").await;
    }
    if case.tx {
        if case.simple {
            a.batch_execute("BEGIN").await.expect("BEGIN");
            let res = a.simple_query(sql).await.map(|m| simple_values(&m));
            let denied = check_denied(&mut out, case, "simple in BEGIN", res);
            aborted_block(r, a, sql, "simple in BEGIN block", denied).await;
        }
        if case.extended {
            a.batch_execute("BEGIN").await.expect("BEGIN");
            let res = extended(a, sql).await;
            let denied = check_denied(&mut out, case, "extended in BEGIN", res);
            aborted_block(r, a, sql, "extended in BEGIN block", denied).await;
        }
        env.check_a(&s, r, sql, "transaction block").await;
    }
    out.report(r, sql);
    env.check_b(&s, r, sql, "after the attempt").await;
    s.stop().await;
}

/// Ordinary SQL that must be allowed and return `want` (first row), simple and extended.
async fn run_allow(env: &Env, sql: &str, want: Option<&[&str]>, r: &mut Report) {
    let s = env.sess().await;
    let a = s.a();
    let mut results = vec![(
        "simple",
        a.simple_query(sql).await.map(|m| simple_values(&m)),
    )];
    if !sql.contains(';') {
        results.push(("extended", extended(a, sql).await));
    }
    for (via, res) in results {
        match res {
            Err(e) => r.fail(sql, format!("{via}: must be allowed, got {}", err_text(&e))),
            Ok(rows) => {
                if let Some(want) = want {
                    let got = rows.first().cloned().unwrap_or_default();
                    if got != want {
                        r.fail(
                            sql,
                            format!("{via}: returned {}, want {want:?}", summary(&rows)),
                        );
                    }
                }
            }
        }
    }
    env.check_a(&s, r, sql, "allowed statement").await;
    env.check_b(&s, r, sql, "after an allowed statement").await;
    s.stop().await;
}

/// Text the guard may either refuse as unparsable (42601, by rlsgate) or run correctly.
async fn run_unparsable_or_correct(env: &Env, sql: &str, want: &[&str], r: &mut Report) {
    let s = env.sess().await;
    let a = s.a();
    let mut results = vec![(
        "simple",
        a.simple_query(sql).await.map(|m| simple_values(&m)),
    )];
    if !sql.contains(';') {
        results.push(("extended", extended(a, sql).await));
    }
    for (via, res) in results {
        match res {
            Err(e) if code(&e) == "42601" && message(&e).starts_with("rlsgate:") => {}
            Err(e) => r.fail(
                sql,
                format!(
                    "{via}: want rlsgate's 42601 or the right result, got {}",
                    err_text(&e)
                ),
            ),
            Ok(rows) => {
                let got = rows.first().cloned().unwrap_or_default();
                if got != want {
                    r.fail(
                        sql,
                        format!("{via}: returned {}, want {want:?}", summary(&rows)),
                    );
                }
            }
        }
        usable(r, a, sql, via).await;
    }
    env.check_a(&s, r, sql, "unparsable text").await;
    env.check_b(&s, r, sql, "after unparsable text").await;
    s.stop().await;
}

/// One step of an attacker's sequence: allowed or denied, it must not reach the victims.
struct Step {
    sql: String,
    extended: bool,
}

fn simple(sql: impl Into<String>) -> Step {
    Step {
        sql: sql.into(),
        extended: false,
    }
}

fn ext(sql: impl Into<String>) -> Step {
    Step {
        sql: sql.into(),
        extended: true,
    }
}

/// Run A's steps (outcome free), then check the victims while A is still connected (pool > 1:
/// a pinned connection is not theirs) and after A left (its connection cleaned or closed).
async fn run_effect(env: &Env, steps: &[Step], r: &mut Report, tag: usize) {
    let case = steps
        .iter()
        .map(|s| s.sql.as_str())
        .collect::<Vec<_>>()
        .join(" ⏎ ");
    let before = r.fails.len();
    let mut s = env.sess().await;
    let mut outcomes = Vec::new();
    {
        for st in steps {
            if let Some(options) = st.sql.strip_prefix("\\options ") {
                // the attacker logs in (again) with these startup options
                let conn = format!("{} options='{options}'", s.proxy.conn_str(&token(A)));
                match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
                    Ok((c, connection)) => {
                        tokio::spawn(connection);
                        s.a = Some(c);
                        outcomes.push("login accepted".into());
                    }
                    Err(e) => {
                        outcomes.push(format!("login refused: {}", err_text(&e)));
                        break;
                    }
                }
                continue;
            }
            let a = s.a();
            let sql = if st.sql.contains("{TEMP_SCHEMA}") {
                let n = a
                    .simple_query(
                        "SELECT coalesce(nullif(pg_my_temp_schema()::regnamespace::text, '-'), 'pg_temp_3')",
                    )
                    .await
                    .map(|m| simple_values(&m))
                    .ok()
                    .and_then(|v| v.first().and_then(|r| r.first().cloned()))
                    .unwrap_or_else(|| "pg_temp_3".into());
                st.sql.replace("{TEMP_SCHEMA}", &n)
            } else {
                st.sql.clone()
            };
            let res = if st.extended {
                extended(a, &sql).await
            } else {
                a.simple_query(&sql).await.map(|m| simple_values(&m))
            };
            outcomes.push(match res {
                Ok(rows) => format!("allowed: {}", summary(&rows)),
                Err(e) => format!("refused: {}", err_text(&e)),
            });
        }
        usable(r, s.a(), &case, "the attacker's steps").await;
    }
    if env.pool > 1 {
        env.check_b(&s, r, &case, "while the attacker is connected")
            .await;
    }
    s.drop_a().await;
    env.check_b(&s, r, &case, "after the attacker left").await;
    env.check_b_insert(&s, r, &case, tag).await;
    s.stop().await;
    if r.fails.len() > before {
        r.fail(
            &case,
            format!("(the attacker's steps: {})", outcomes.join("; ")),
        );
    }
}

macro_rules! at_pools {
    ($class:ident: $p1:ident, $p4:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $p1() {
            $class(1).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $p4() {
            $class(4).await
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Class 1: text the guard cannot parse fails closed
// ---------------------------------------------------------------------------------------------

fn chain(n: usize) -> String {
    vec!["1"; n].join("+")
}

fn nested_abs(depth: usize) -> String {
    format!("{}1{}", "abs(".repeat(depth), ")".repeat(depth))
}

/// `set_config('app.current_store_id', …)` with no protected word and no `set_config` in the text.
const HIDDEN_SET_CONFIG: &str =
    r#"U&"set\005fconfig"(U&'\0061pp.current_store_id', 'south', true)"#;
const HIDDEN_SETTING: &str = r#"U&'\0061pp.current_store_id'"#;

fn class1_deny() -> Vec<Case> {
    vec![
        // `system_user` is a reserved keyword from PostgreSQL 16 on (the guard's grammar is
        // newer than the server's), a plain alias in PostgreSQL 15.
        Case::deny("SELECT count(*) FROM customers system_user").want(UNPARSABLE),
        Case::deny("select 1 as one from stores AS SYSTEM_USER").want(UNPARSABLE),
        Case::deny(format!(
            r#"SET U&"\0061pp".current_store_id = 'south'; SELECT current_setting({HIDDEN_SETTING}), count(*) FROM customers system_user"#
        ))
        .want(UNPARSABLE),
        Case::deny(format!(
            "SELECT {HIDDEN_SET_CONFIG}, count(*) FROM customers AS system_user"
        ))
        .want(UNPARSABLE),
        Case::deny(
            r#"/* c */ set u&"!0061pp" UESCAPE '!'."current_store_id" TO 'south'; select 1 from stores "system_user", stores system_user"#,
        )
        .want(UNPARSABLE),
        Case::deny(
            r#"SELECT 1 FROM stores system_user; SET SESSION U&"\0041PP".current_store_id = 'south'"#,
        )
        .want(UNPARSABLE),
        Case::deny(format!(
            "WITH x AS (SELECT {HIDDEN_SET_CONFIG} AS t) SELECT t FROM x, customers system_user"
        ))
        .want(UNPARSABLE),
        Case::deny(format!(
            "UPDATE pg_settings AS system_user SET setting = 'south' WHERE name = {HIDDEN_SETTING}"
        ))
        .want(UNPARSABLE),
        Case::deny(format!(
            "SELECT (SELECT {HIDDEN_SET_CONFIG} FROM stores system_user LIMIT 1), count(*) FROM customers"
        ))
        .want(UNPARSABLE),
        // deep trees (a long operator chain, nested calls): PostgreSQL 15 runs them
        Case::deny(format!(
            r#"SET U&"\0061pp".current_store_id = 'south'; SELECT count(*) FROM customers WHERE {} > 0"#,
            chain(60)
        ))
        .want(UNPARSABLE_OR_DENIED),
        Case::deny(format!(
            "SELECT {HIDDEN_SET_CONFIG} WHERE {} = 1",
            nested_abs(200)
        ))
        .want(UNPARSABLE_OR_DENIED),
        Case::deny(format!(
            "SELECT ({HIDDEN_SET_CONFIG}), (((({})))) FROM customers",
            chain(100)
        ))
        .want(UNPARSABLE_OR_DENIED),
        Case::deny(format!(
            "UPDATE pg_settings SET setting = 'south' WHERE name = {HIDDEN_SETTING} AND {} > 0",
            chain(300)
        ))
        .want(UNPARSABLE_OR_DENIED),
        Case::deny(format!(
            "SELECT 1; SELECT {HIDDEN_SET_CONFIG}, {}; SELECT count(*) FROM customers",
            chain(80)
        ))
        .want(UNPARSABLE_OR_DENIED),
        Case::deny(format!(
            "SELECT pg_terminate_backend(2147483647) WHERE {} > 0",
            chain(300)
        ))
        .want(UNPARSABLE_OR_DENIED),
        // ~5000 terms: too deep for PostgreSQL 15 as well, refused by the guard first
        Case::deny(format!("SELECT {HIDDEN_SET_CONFIG}, {}", chain(5000)))
            .want(UNPARSABLE_OR_DENIED),
        Case::deny(format!(
            "UPDATE pg_settings SET setting = 'south' WHERE name = {HIDDEN_SETTING} AND {} > 0",
            chain(5000)
        ))
        .want(UNPARSABLE_OR_DENIED),
    ]
}

async fn class1(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new("class 1: unparsable text fails closed", pool);
    for case in class1_deny() {
        run_deny(&env, &case, &mut r).await;
    }
    // harmless but deep: refused as unparsable, or (if the guard can read it) the right value
    run_unparsable_or_correct(
        &env,
        &format!("SELECT ({})::text", chain(5000)),
        &["5000"],
        &mut r,
    )
    .await;
    run_unparsable_or_correct(
        &env,
        &format!("SELECT {}1{}::text", "(".repeat(5000), ")".repeat(5000)),
        &["1"],
        &mut r,
    )
    .await;
    run_unparsable_or_correct(
        &env,
        &format!("SELECT ({})::text", nested_abs(300)),
        &["1"],
        &mut r,
    )
    .await;
    // Legitimate expressions with "approved"/"reset" (and so "app") in literals: a word in a
    // literal never gets parsable text denied. A deep one may be refused as too deep to check
    // (42601), never as "mentions a protected setting" (42501).
    run_allow(
        &env,
        &format!(
            "SELECT 'approved'::text AS status, 'reset'::text AS action, ({})::text AS n",
            chain(30)
        ),
        Some(&["approved", "reset", "30"]),
        &mut r,
    )
    .await;
    run_unparsable_or_correct(
        &env,
        &format!(
            "SELECT 'approved'::text AS status, 'reset'::text AS action, ({})::text AS n",
            chain(80)
        ),
        &["approved", "reset", "80"],
        &mut r,
    )
    .await;
    let names: Vec<String> = (0..2000).map(|i| format!("'approved-{i}'")).collect();
    run_allow(
        &env,
        &format!(
            "SELECT count(*)::text FROM customers WHERE name IN ('reset', 'approved', {}) OR email = 'app.current_store_id'",
            names.join(", ")
        ),
        Some(&["0"]),
        &mut r,
    )
    .await;
    let ors: Vec<String> = (0..1000)
        .map(|i| format!("name = 'approved reset {i}'"))
        .collect();
    run_allow(
        &env,
        &format!(
            "SELECT count(*)::text, 'reset approved'::text FROM customers WHERE {}",
            ors.join(" OR ")
        ),
        Some(&["0", "reset approved"]),
        &mut r,
    )
    .await;
    r.finish();
}

at_pools!(class1: class01_unparsable_text_fails_closed_pool_1, class01_unparsable_text_fails_closed_pool_4);

// ---------------------------------------------------------------------------------------------
// Class 2: functions that run SQL passed as text
// ---------------------------------------------------------------------------------------------

const EVIL_SQL: &str = "select set_config(''app.current_store_id'', ''south'', true)";

fn class2_deny() -> Vec<Case> {
    vec![
        Case::deny(
            "SELECT ('select to_tsvector(set_config(''app.current_store_id'',''south'',false))'::text).ts_stat",
        ),
        Case::deny(
            "SELECT (s.q).ts_stat FROM (VALUES ('select to_tsvector(name) from customers')) s(q)",
        ),
        Case::deny(format!("SELECT query_to_xml('{EVIL_SQL}', true, true, '')")),
        Case::deny("SELECT query_to_xml(q, true, true, '') FROM (VALUES ('select 1')) v(q)"),
        Case::deny(format!(
            "select PG_CATALOG.QUERY_TO_XMLSCHEMA('{EVIL_SQL}', true, true, '')"
        )),
        Case::deny(format!(
            "SELECT \"query_to_xml_and_xmlschema\"('{EVIL_SQL}', false, false, 'x')"
        )),
        Case::deny(format!(
            r#"SELECT U&"query\005fto\005fxml"('{EVIL_SQL}', true, true, '')"#
        )),
        Case::deny(format!(
            "WITH q AS (SELECT query_to_xml('{EVIL_SQL}', true, true, '') AS x) SELECT x FROM q"
        )),
        Case::deny("SELECT query_to_xml(current_setting('application_name'), true, true, '')"),
        Case::deny(
            "SELECT * FROM ts_stat('SELECT to_tsvector(set_config(''app.current_store_id'', ''south'', true))')",
        ),
        Case::deny("SELECT pg_catalog.ts_stat(repeat('x', 1), 'ab')"),
        Case::deny(
            "SELECT (SELECT word FROM ts_stat(format('select %s', 'to_tsvector(name) from customers')) LIMIT 1)",
        ),
        // ts_rewrite(query tsquery, select text) runs its second argument
        Case::deny(
            "SELECT ts_rewrite('a'::tsquery, 'SELECT set_config(''app.current_store_id'', ''south'', true)::tsquery, ''a''::tsquery')",
        ),
        Case::deny(
            "SELECT ts_rewrite('a'::tsquery, 'SELECT set_config(''app.current_store_id'', ''south'', true)::tsquery, ''a''::tsquery'); SELECT current_setting('app.current_store_id'), count(*) FROM customers",
        ),
        Case::deny(
            "select PG_CATALOG.TS_REWRITE('a & b'::tsquery, $q$SELECT 'a'::tsquery, set_config('app.current_store_id', 'south', false)::tsquery$q$)",
        ),
        Case::deny("SELECT ts_rewrite('a'::tsquery, q) FROM (VALUES ('select 1')) v(q)"),
        Case::deny(
            "SELECT 1 WHERE EXISTS (SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, pg_terminate_backend(2147483647)::text::tsquery'))",
        ),
        Case::deny(
            r#"SELECT U&"ts\005frewrite"('a'::tsquery, 'SELECT ''a''::tsquery, set_config(''app.current_store_id'', ''south'', true)::tsquery')"#,
        ),
        // exports of what the client could not read directly
        Case::deny("SELECT schema_to_xml('pg_catalog', true, true, '')"),
        Case::deny("SELECT SCHEMA_TO_XMLSCHEMA('PG_CATALOG', true, true, '')"),
        Case::deny("SELECT schema_to_xml(s, true, true, '') FROM (VALUES ('public')) v(s)"),
        Case::deny(
            "SELECT table_to_xml(t::regclass, true, true, '') FROM (VALUES ('customers')) v(t)",
        ),
        Case::deny("SELECT table_to_xml(12000::oid::regclass, true, true, '')"),
        // a constant table name reaches other sessions' statement text, statements, objects
        Case::deny("SELECT table_to_xml('pg_catalog.pg_stat_activity'::regclass, true, false, '')"),
        Case::deny("SELECT table_to_xml('pg_prepared_statements', true, false, '')"),
        Case::deny("SELECT table_to_xml('pg_largeobject_metadata', true, false, '')"),
    ]
}

/// Exports by constant name of what the client could read directly are allowed: the rows they
/// read are filtered by row-level security like any SELECT (only the attacker's own tenant).
fn class2_allow() -> Vec<String> {
    let own_only = |export: &str| {
        format!(
            "SELECT (x::text LIKE '%>south<%')::text, (x::text LIKE '%>north<%')::text FROM (SELECT {export} AS x) s"
        )
    };
    vec![
        own_only("table_to_xml('customers'::regclass, true, true, '')"),
        own_only("table_to_xml('customers', false, false, '')"),
        own_only("table_to_xml_and_xmlschema('public.customers'::regclass, true, true, '')"),
        own_only("schema_to_xml('public', true, true, '')"),
        own_only("schema_to_xml_and_xmlschema('public', true, true, '')"),
        own_only("database_to_xml(true, true, '')"),
        own_only("database_to_xml_and_xmlschema(true, true, '')"),
    ]
}

async fn class2(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new("class 2: functions that run SQL passed as text", pool);
    for case in class2_deny() {
        run_deny(&env, &case, &mut r).await;
    }
    for sql in class2_allow() {
        run_allow(&env, &sql, Some(&["false", "true"]), &mut r).await;
    }
    r.finish();
}

at_pools!(class2: class02_sql_text_functions_are_denied_pool_1, class02_sql_text_functions_are_denied_pool_4);

// ---------------------------------------------------------------------------------------------
// Class 3: definitions that run code later
// ---------------------------------------------------------------------------------------------

fn class3_deny() -> Vec<Case> {
    const AGG: &str = "CREATE AGGREGATE pg_temp.agg(text, boolean) (sfunc = set_config, stype = text, initcond = 'app.current_store_id')";
    vec![
        Case::deny(AGG),
        Case::deny(format!(
            "{AGG}; SELECT pg_temp.agg('south', true); SELECT current_setting('app.current_store_id'), count(*) FROM customers"
        )),
        Case::deny(
            "create aggregate PG_TEMP.Agg2 (text, bool) (SFUNC = pg_catalog.set_config, STYPE = pg_catalog.text, INITCOND = 'statement_timeout')",
        ),
        Case::deny(
            "CREATE OR REPLACE AGGREGATE pg_temp.\"agg3\"(text, boolean) (sfunc = \"set_config\", stype = text, initcond = 'search_path')",
        ),
        Case::deny("CREATE AGGREGATE pg_temp.agg4 (basetype = text, sfunc = textcat, stype = text)"),
        Case::deny("CREATE AGGREGATE agg5(text) (sfunc = textcat, stype = text)"),
        Case::deny(
            "CREATE OPERATOR pg_temp.### (leftarg = integer, rightarg = bigint, function = pg_terminate_backend)",
        ),
        Case::deny(
            "CREATE OPERATOR pg_temp.@@@ (rightarg = integer, procedure = pg_catalog.pg_cancel_backend)",
        ),
        Case::deny("create operator PG_TEMP.=== (LEFTARG = text, RIGHTARG = text, FUNCTION = textcat)"),
        Case::deny(
            "CREATE OPERATOR pg_temp.### (leftarg = int4, rightarg = int4, function = pg_advisory_lock); SELECT 1 OPERATOR(pg_temp.###) 2",
        ),
        Case::deny("CREATE CAST (bigint AS text) WITH FUNCTION pg_catalog.text(bigint)"),
        Case::deny("create cast (int4 AS bool) WITHOUT FUNCTION AS IMPLICIT"),
        Case::deny("CREATE CAST (text AS int4) WITH INOUT AS ASSIGNMENT"),
        Case::deny(
            "CREATE TYPE pg_temp.bt (INPUT = int4in, OUTPUT = int4out, INTERNALLENGTH = 4, PASSEDBYVALUE)",
        ),
        Case::deny("create type PG_TEMP.rng AS RANGE (subtype = int4)"),
        Case::deny(
            "CREATE TYPE pg_temp.rng2 AS RANGE (SUBTYPE = int8, MULTIRANGE_TYPE_NAME = pg_temp.rng2m)",
        ),
        Case::deny(
            "CREATE CONVERSION pg_temp.myconv FOR 'LATIN1' TO 'UTF8' FROM iso8859_1_to_utf8",
        ),
        Case::deny(
            "CREATE DEFAULT CONVERSION pg_temp.c2 FOR 'LATIN1' TO 'UTF8' FROM pg_catalog.iso8859_1_to_utf8",
        ),
        Case::deny(
            "CREATE TRIGGER t BEFORE UPDATE ON customers FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        ),
        Case::deny(
            "create constraint trigger ct after insert on public.customers for each row execute procedure pg_catalog.suppress_redundant_updates_trigger()",
        ),
        Case::deny(
            "CREATE TABLE pg_temp.tt (a text, v tsvector); CREATE TRIGGER t2 BEFORE INSERT ON pg_temp.tt FOR EACH ROW EXECUTE FUNCTION tsvector_update_trigger(v, 'pg_catalog.english', a)",
        ),
        Case::deny(
            "CREATE OR REPLACE TRIGGER t3 AFTER INSERT ON customers EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        ),
        Case::deny("ALTER FUNCTION pg_catalog.lower(text) SET search_path = pg_temp"),
        Case::deny("alter function lower(text) set work_mem TO '1MB'"),
        Case::deny("ALTER FUNCTION lower(text) SET search_path FROM CURRENT"),
        Case::deny("ALTER ROUTINE abs(integer) SET statement_timeout = 1"),
        Case::deny("ALTER PROCEDURE p() SET search_path TO public"),
        Case::deny("ALTER FUNCTION pg_temp.agg(text, boolean) SET app.current_store_id = 'south'"),
        Case::deny("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql RETURN 1"),
        Case::deny(
            "create or replace function PG_TEMP.g(x text) returns text language sql immutable as $f$ select x $f$",
        ),
        Case::deny("CREATE PROCEDURE pg_temp.p() LANGUAGE sql BEGIN ATOMIC SELECT 1; END").single(),
        Case::deny(
            "CREATE FUNCTION pg_temp.h() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
        )
        .single(),
        Case::deny("DO $$ BEGIN PERFORM 1; END $$").single(),
        Case::deny("do 'begin null; end'").single(),
        Case::deny("DO LANGUAGE plpgsql $body$ BEGIN NULL; END $body$").single(),
        Case::deny("SELECT 1; DO $$BEGIN NULL; END$$"),
    ]
}

async fn class3(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new("class 3: definitions that run code later", pool);
    for case in class3_deny() {
        run_deny(&env, &case, &mut r).await;
    }
    r.finish();
}

at_pools!(class3: class03_code_running_definitions_are_denied_pool_1, class03_code_running_definitions_are_denied_pool_4);

// ---------------------------------------------------------------------------------------------
// Class 4: pg_settings and the settings that change how SQL text is read
// ---------------------------------------------------------------------------------------------

fn class4_deny() -> Vec<Case> {
    vec![
        // a spoofed pin on the setting's name: every write to pg_settings is set_config()
        Case::deny(
            "UPDATE pg_settings SET setting = 'off' FROM (SELECT 'work_mem'::text AS name) x WHERE x.name = 'work_mem' AND pg_settings.name = 'standard_conforming_strings'",
        ),
        Case::deny("UPDATE pg_settings SET setting = '64kB' WHERE name = 'work_mem'"),
        Case::deny("UPDATE pg_settings SET setting = 'south' WHERE name = 'app.current_store_id'"),
        Case::deny(
            "update PG_CATALOG.PG_SETTINGS set SETTING = 'south' where NAME = 'app.current_store_id'",
        ),
        Case::deny(
            "UPDATE pg_settings AS s SET setting = 'south' WHERE s.name = 'app.current_store_id'",
        ),
        Case::deny(
            r#"UPDATE "pg_settings" s SET "setting" = 'south' WHERE s.name = U&'\0061pp.current_store_id'"#,
        ),
        Case::deny("UPDATE pg_settings SET setting = 'south' WHERE name LIKE 'app.%'"),
        Case::deny(
            "UPDATE pg_settings SET setting = 'south' WHERE name = lower('APP.CURRENT_STORE_ID')",
        ),
        Case::deny(
            "WITH u AS (UPDATE pg_settings SET setting = 'south' WHERE name = 'app.current_store_id' RETURNING setting) SELECT * FROM u",
        ),
        Case::deny(
            "UPDATE pg_settings SET setting = 'south' WHERE name = 'app.current_store_id'; SELECT current_setting('app.current_store_id'), count(*) FROM customers",
        ),
        Case::deny(
            "CREATE TEMP VIEW sv AS SELECT * FROM pg_settings; UPDATE sv SET setting = 'south' WHERE name = 'app.current_store_id'",
        ),
        Case::deny(
            "CREATE VIEW pg_temp.sv2 AS SELECT name, setting FROM pg_catalog.pg_settings; UPDATE pg_temp.sv2 SET setting = 'off' WHERE name = 'standard_conforming_strings'",
        ),
        Case::deny(
            "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
        ),
        Case::deny(
            "update pg_catalog.pg_settings set setting = 'SJIS' where name = 'client_encoding'",
        ),
        Case::deny("UPDATE pg_settings SET setting = 'on' WHERE name = 'backslash_quote'"),
        Case::deny(
            "WITH x AS (UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings' RETURNING 1) SELECT count(*) FROM x",
        ),
        Case::deny("SET standard_conforming_strings = off"),
        Case::deny("SET standard_conforming_strings TO false"),
        Case::deny("set \"standard_conforming_strings\" = 0"),
        Case::deny("SET LOCAL standard_conforming_strings = off"),
        Case::deny("SET client_encoding = 'SJIS'"),
        Case::deny("SET NAMES 'SJIS'"),
        Case::deny("SET client_encoding TO 'BIG5'"),
        Case::deny("SET backslash_quote = on"),
    ]
}

/// Text the guard reads as one harmless SELECT (standard_conforming_strings on) but a server
/// with standard_conforming_strings off reads as `SET app.current_store_id = south` and a SELECT.
const SCS_SMUGGLE: &str = "SELECT 'x\\' , $$ ' ; SET app.current_store_id = south ; SELECT current_setting('app.current_store_id') AS leaked, (SELECT count(*) FROM customers)::text AS n -- $$";

/// A raw login with extra startup parameters: the open connection (and its read buffer) when
/// ReadyForQuery arrives, else Err((severity, code)).
async fn raw_login(
    proxy: &Proxy,
    params: &[(&str, &str)],
) -> Result<(tokio::net::TcpStream, Vec<u8>), (String, String)> {
    let mut stream = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let mut all = vec![("user", "app"), ("database", proxy.db.as_str())];
    all.extend_from_slice(params);
    stream
        .write_all(&startup_packet(196_608, &all))
        .await
        .unwrap();
    let mut buf = Vec::new();
    loop {
        let m = read_msg(&mut stream, &mut buf).await;
        match m.tag {
            'R' => {
                let kind = i32::from_be_bytes([m.body[0], m.body[1], m.body[2], m.body[3]]);
                if kind == 3 {
                    let tok = token(A);
                    let mut msg = vec![b'p'];
                    msg.extend_from_slice(&((tok.len() + 5) as i32).to_be_bytes());
                    msg.extend_from_slice(tok.as_bytes());
                    msg.push(0);
                    stream.write_all(&msg).await.unwrap();
                }
            }
            'E' => return Err((m.field(b'S'), m.code())),
            'Z' => return Ok((stream, buf)),
            _ => {}
        }
    }
}

async fn read_msg(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Msg {
    loop {
        if buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() > len {
                let m: Vec<u8> = buf.drain(..len + 1).collect();
                return Msg {
                    tag: m[0] as char,
                    body: m[5..].to_vec(),
                };
            }
        }
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("rlsgate answered within 10s")
            .expect("read");
        assert!(n > 0, "connection closed without an ErrorResponse");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether the smuggled SET took effect for this client (returns what it saw).
async fn smuggle(c: &Client) -> Option<String> {
    match c.simple_query(SCS_SMUGGLE).await {
        Ok(m) => {
            let rows = simple_values(&m);
            rows.iter()
                .any(|r| r.iter().any(|v| v == "south"))
                .then(|| summary(&rows))
        }
        Err(_) => None,
    }
}

async fn class4(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new("class 4: pg_settings and parser settings", pool);
    for case in class4_deny() {
        run_deny(&env, &case, &mut r).await;
    }
    for sql in [
        "SET standard_conforming_strings = on",
        "SET standard_conforming_strings TO 'on'",
        "SET client_encoding = 'UTF8'",
        "set client_encoding to 'utf8'",
        "SET NAMES 'UTF8'",
    ] {
        run_allow(&env, sql, None, &mut r).await;
    }
    // UPDATE pg_settings of standard_conforming_strings, then text read differently upstream
    {
        let s = env.sess().await;
        let a = s.a();
        if a.simple_query(
            "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
        )
        .await
        .is_ok()
            && let Some(seen) = smuggle(a).await
        {
            r.fail(
                "UPDATE pg_settings … standard_conforming_strings ⏎ smuggled SET",
                format!("ESCAPE: the attacker switched tenants: {seen}"),
            );
        }
        env.check_b(
            &s,
            &mut r,
            "UPDATE pg_settings scs=off + smuggle",
            "after the attempt",
        )
        .await;
        s.stop().await;
    }
    // startup parameters
    let s = env.sess().await;
    for options in [
        "-c standard_conforming_strings=off",
        "--standard_conforming_strings=off",
        "-c Standard_Conforming_Strings=0",
        "-c client_encoding=SJIS",
        "-c client_encoding=BIG5",
        "-c backslash_quote=on",
        "-c APP.Current_Store_Id=south",
    ] {
        let conn = format!("{} options='{options}'", s.proxy.conn_str(&token(A)));
        match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
            Err(e) => {
                if code(&e) != "42501" {
                    r.fail(
                        options,
                        format!("login refused with {}, want FATAL 42501", err_text(&e)),
                    );
                }
            }
            Ok((c, connection)) => {
                tokio::spawn(connection);
                r.fail(options, "login with this startup option was accepted");
                if let Some(seen) = smuggle(&c).await {
                    r.fail(
                        options,
                        format!("ESCAPE: smuggled SET switched tenants: {seen}"),
                    );
                }
            }
        }
    }
    for params in [
        [("standard_conforming_strings", "off")],
        [("client_encoding", "SJIS")],
        [("backslash_quote", "on")],
        [("options", "-c standard_conforming_strings=off")],
    ] {
        let what = format!("startup parameter {params:?}");
        match raw_login(&s.proxy, &params).await {
            Ok(_) => r.fail(&what, "login accepted"),
            Err((sev, c)) if sev == "FATAL" && c == "42501" => {}
            Err((sev, c)) => r.fail(&what, format!("refused with {sev} {c}, want FATAL 42501")),
        }
    }
    env.check_b(&s, &mut r, "startup parameters", "after refused logins")
        .await;
    s.stop().await;
    r.finish();
}

at_pools!(class4: class04_pg_settings_and_parser_settings_pool_1, class04_pg_settings_and_parser_settings_pool_4);

// ---------------------------------------------------------------------------------------------
// Class 5: session state must not reach the next tenant on the connection
// ---------------------------------------------------------------------------------------------

const CUSTOMERS_COLS: &str = "(customer_id bigint, store_id text, name text, email text)";

fn class5_temp_objects() -> Vec<Vec<Step>> {
    vec![
        vec![simple(format!(
            "CREATE TABLE pg_temp.customers {CUSTOMERS_COLS}"
        ))],
        vec![simple(format!(
            "create table PG_TEMP.\"customers\" {CUSTOMERS_COLS}"
        ))],
        vec![ext(format!(
            "CREATE TABLE pg_temp.customers {CUSTOMERS_COLS}"
        ))],
        vec![
            simple("CREATE TABLE pg_temp.warmup (a int)"),
            simple(format!(
                "CREATE TABLE {{TEMP_SCHEMA}}.customers {CUSTOMERS_COLS}"
            )),
        ],
        vec![simple(format!(
            "CREATE TABLE pg_temp_3.customers {CUSTOMERS_COLS}"
        ))],
        vec![simple(
            "CREATE VIEW pg_temp.customers AS SELECT * FROM public.customers WHERE name <> 'Dave Dalton'",
        )],
        vec![simple(
            "CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (VALUE <> 'south')",
        )],
        vec![simple(
            "create domain PG_TEMP.int4 as pg_catalog.int4 check (value > 100)",
        )],
        vec![simple("CREATE SEQUENCE pg_temp.s")],
        vec![simple("CREATE TYPE pg_temp.customers AS (a int)")],
        vec![simple(
            "SELECT * INTO pg_temp.customers FROM public.customers WHERE false",
        )],
        vec![simple(
            "WITH x AS (SELECT * FROM public.customers WHERE false) SELECT * INTO pg_temp.customers FROM x",
        )],
        vec![simple(
            "CREATE TABLE pg_temp.customers AS SELECT * FROM public.customers WHERE false",
        )],
        vec![simple(format!(
            "CREATE TABLE pg_temp.t {CUSTOMERS_COLS}; ALTER TABLE pg_temp.t RENAME TO customers"
        ))],
        vec![
            simple("SET search_path = pg_temp, public"),
            simple(format!("CREATE TABLE customers {CUSTOMERS_COLS}")),
        ],
        vec![simple(format!(
            "SET search_path = pg_temp, public; CREATE TABLE customers {CUSTOMERS_COLS}"
        ))],
        vec![
            simple("SELECT set_config('search_path', 'pg_temp, public', false)"),
            simple("CREATE VIEW customers AS SELECT * FROM public.customers WHERE false"),
        ],
        vec![
            ext("SET search_path TO \"pg_temp\""),
            ext("SELECT * INTO customers FROM public.customers WHERE false"),
        ],
        vec![
            simple("BEGIN"),
            simple(format!("CREATE TABLE pg_temp.customers {CUSTOMERS_COLS}")),
            simple("COMMIT"),
        ],
        vec![simple(format!(
            "BEGIN; SET LOCAL search_path = pg_temp, public; CREATE TABLE customers {CUSTOMERS_COLS}; COMMIT"
        ))],
        vec![simple(format!(
            "SELECT set_config('search_path', 'pg_temp, public', true); CREATE TABLE customers {CUSTOMERS_COLS}"
        ))],
        vec![simple(
            "CREATE TEXT SEARCH CONFIGURATION pg_temp.english (COPY = pg_catalog.simple)",
        )],
        vec![simple(
            "CREATE COLLATION pg_temp.\"POSIX\" FROM pg_catalog.\"C\"",
        )],
        // search_path from the startup packet, then an unqualified CREATE
        vec![
            simple("\\options -c search_path=pg_temp,public"),
            simple(format!("CREATE TABLE customers {CUSTOMERS_COLS}")),
        ],
        vec![
            simple("\\options --search_path=pg_temp"),
            ext("CREATE VIEW customers AS SELECT * FROM public.customers WHERE false"),
        ],
        vec![
            simple("\\options -c search_path=pg_temp"),
            ext("CREATE VIEW customers AS SELECT * FROM public.customers WHERE false"),
        ],
        vec![
            simple("\\options --search_path=pg_temp"),
            simple(format!("CREATE TABLE customers {CUSTOMERS_COLS}")),
        ],
        vec![
            simple("\\options -csearch_path=pg_temp,public"),
            simple("SELECT * INTO customers FROM public.customers WHERE false"),
        ],
        // a transaction-local search_path the guard cannot read
        vec![simple(format!(
            "SELECT set_config('search_path', 'pg' || '_temp', true); CREATE TABLE customers {CUSTOMERS_COLS}"
        ))],
        vec![simple(format!(
            "BEGIN; SELECT set_config('search_path', (SELECT 'pg_temp, public'), true); CREATE TABLE customers {CUSTOMERS_COLS}; COMMIT"
        ))],
        vec![simple(
            "EXPLAIN ANALYZE CREATE TABLE pg_temp.customers AS SELECT * FROM public.customers WHERE false",
        )],
        // the ordinary spelling, for comparison: pinned to the attacker
        vec![simple(format!(
            "CREATE TEMP TABLE customers {CUSTOMERS_COLS}"
        ))],
    ]
}

async fn class5_temp(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new("class 5: temporary objects by qualified name", pool).no_landing_rule();
    for (i, steps) in class5_temp_objects().iter().enumerate() {
        run_effect(&env, steps, &mut r, i).await;
    }
    // search_path as a parameter of the StartupMessage itself, then an unqualified CREATE
    for (i, param) in [
        ("search_path", "pg_temp"),
        ("search_path", "pg_temp, public"),
        ("options", "-c search_path=pg_temp"),
    ]
    .into_iter()
    .enumerate()
    {
        let case = format!("startup parameter {param:?} ⏎ CREATE TABLE customers …");
        let s = env.sess().await;
        let attacker = match raw_login(&s.proxy, &[param]).await {
            Ok((mut stream, mut buf)) => {
                let sql = format!("CREATE TABLE customers {CUSTOMERS_COLS}\0");
                let mut msg = vec![b'Q'];
                msg.extend_from_slice(&((sql.len() + 4) as i32).to_be_bytes());
                msg.extend_from_slice(sql.as_bytes());
                stream.write_all(&msg).await.unwrap();
                loop {
                    if read_msg(&mut stream, &mut buf).await.tag == 'Z' {
                        break;
                    }
                }
                Some(stream)
            }
            Err(_) => None,
        };
        if pool > 1 {
            env.check_b(&s, &mut r, &case, "while the attacker is connected")
                .await;
        }
        drop(attacker);
        tokio::time::sleep(Duration::from_millis(20)).await;
        env.check_b(&s, &mut r, &case, "after the attacker left")
            .await;
        env.check_b_insert(&s, &mut r, &case, 90 + i).await;
        s.stop().await;
    }
    r.finish();
}

at_pools!(class5_temp: class05_temp_objects_do_not_reach_other_tenants_pool_1, class05_temp_objects_do_not_reach_other_tenants_pool_4);

fn class5_settings() -> Vec<Vec<Step>> {
    vec![
        vec![simple(
            "SELECT set_config('statement_timeout', '4321', false)",
        )],
        vec![ext("SELECT set_config('statement_timeout', '4321', false)")],
        vec![simple(
            "SELECT set_config('statement_timeout', (SELECT '4321'), false)",
        )],
        vec![simple(
            "SELECT set_config('default_transaction_read_only', 'on', false), 1",
        )],
        vec![simple(
            "SELECT set_config('search_path', 'pg_temp', false) FROM customers LIMIT 1",
        )],
        vec![simple(
            "WITH x AS (SELECT set_config('statement_timeout', '4321', false)) SELECT * FROM x",
        )],
        vec![
            simple("BEGIN"),
            simple("SELECT set_config('statement_timeout', '4321', false)"),
            simple("COMMIT"),
        ],
        vec![simple(
            "UPDATE pg_settings SET setting = '4321' WHERE name = 'statement_timeout'",
        )],
        vec![ext(
            "UPDATE pg_settings SET setting = 'on' WHERE name = 'default_transaction_read_only'",
        )],
        vec![simple(
            "UPDATE pg_catalog.pg_settings s SET setting = 'pg_temp, public' WHERE s.name = 'search_path'",
        )],
        vec![simple(
            "WITH u AS (UPDATE pg_settings SET setting = '4321' WHERE name = 'statement_timeout' RETURNING 1) SELECT count(*) FROM u",
        )],
        // the ordinary spelling, for comparison (tracked and replayed for the attacker only)
        vec![simple("SET statement_timeout = 4321")],
        // SETs the proxy forgets because the transaction "failed", that stay on the server
        vec![
            simple("BEGIN"),
            simple("SET search_path = pg_catalog"),
            simple("SET default_transaction_read_only = on"),
            simple("SAVEPOINT s"),
            simple("ROLLBACK TO SAVEPOINT s"),
            simple("COMMIT"),
        ],
        vec![
            simple("BEGIN"),
            simple("SET statement_timeout = 4321"),
            simple("SAVEPOINT s"),
            simple("SELECT 1/0"),
            simple("ROLLBACK TO SAVEPOINT s"),
            simple("COMMIT"),
        ],
        vec![simple(
            "BEGIN; SET statement_timeout = 4321; SET search_path = pg_catalog; COMMIT; SELECT 1/0",
        )],
        vec![
            ext("BEGIN"),
            ext("SET statement_timeout = 4321"),
            ext("SAVEPOINT s"),
            ext("ROLLBACK TO SAVEPOINT s"),
            ext("COMMIT"),
        ],
        // a local call the proxy once read as session-level, hiding a real session-level one
        vec![
            simple(
                "SELECT set_config('work_mem', '1MB', 'yes'); SELECT 1 FROM (SELECT set_config('statement_timeout', '4321', false)) s",
            ),
            simple("RESET work_mem"),
        ],
        vec![
            simple(
                "SELECT set_config('work_mem', '1MB', 'Y'); SELECT set_config('default_transaction_read_only', 'on', 'of')",
            ),
            simple("RESET work_mem"),
        ],
    ]
}

async fn class5_set(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new("class 5: session settings", pool).no_landing_rule();
    for (i, steps) in class5_settings().iter().enumerate() {
        run_effect(&env, steps, &mut r, 100 + i).await;
    }
    r.finish();
}

at_pools!(class5_set: class05_session_settings_do_not_reach_other_tenants_pool_1, class05_session_settings_do_not_reach_other_tenants_pool_4);

fn class5_seed_deny() -> Vec<Case> {
    vec![
        // field-selection syntax calls the function too
        Case::deny("SELECT (0.5::float8).setseed"),
        Case::deny("SELECT (s.x).setseed FROM (SELECT 0.5::float8 AS x) s"),
        Case::deny("SELECT (42::bigint).pg_advisory_lock, (0.5::float8).SetSeed"),
        Case::deny("SELECT setseed(0.5)"),
        Case::deny("select PG_CATALOG.SETSEED(0.5)"),
        Case::deny("SELECT * FROM setseed(0.5)"),
        Case::deny("SELECT \"setseed\"(0.25), 1"),
        Case::deny("WITH s AS (SELECT setseed(0.5)) SELECT * FROM s"),
        Case::deny("SELECT 1; SELECT setseed(0.5)"),
        Case::deny("SELECT count(*) FROM customers WHERE setseed(0.5) IS NULL"),
    ]
}

/// After the attacker's `attempt` (seeding with 0.5), no victim's random() continues the seeded
/// sequence.
async fn seed_reaches_victims(env: &Env, attempt: &str, r: &mut Report) {
    let seeded = pg()
        .psql(&env.db, "SELECT setseed(0.5); SELECT random()::text;")
        .expect("psql")
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or_default()
        .to_string();
    let s = env.sess().await;
    let _ = s.a().simple_query(attempt).await;
    for b in &s.bs {
        if let Ok(m) = b.simple_query("SELECT random()::text").await {
            let v = simple_values(&m);
            if v.first().and_then(|r| r.first()) == Some(&seeded) {
                r.fail(
                    attempt,
                    format!(
                        "ESCAPE: the victim's random() continues the attacker's seeded sequence ({seeded})"
                    ),
                );
            }
        }
    }
    s.stop().await;
}

async fn class5_seq(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new("class 5: setseed, lastval, currval", pool);
    for case in class5_seed_deny() {
        run_deny(&env, &case, &mut r).await;
    }
    // Whatever the verdicts: B's random() is not the sequence A seeded.
    seed_reaches_victims(&env, "SELECT setseed(0.5)", &mut r).await;
    // lastval()/currval(): A's new id must not show in B's session
    for (k, insert) in [
        "INSERT INTO customers (store_id, name) VALUES ('north', 'seq-probe') RETURNING customer_id::text",
        "BEGIN; INSERT INTO customers (store_id, name) VALUES ('north', 'seq-probe') RETURNING customer_id::text; COMMIT",
    ]
    .iter()
    .enumerate()
    {
        let s = env.sess().await;
        let a_id = match s.a().simple_query(insert).await {
            Ok(m) => simple_values(&m)
                .first()
                .and_then(|r| r.first().cloned())
                .unwrap_or_default(),
            Err(e) => {
                r.fail(insert, format!("attacker's insert failed: {}", err_text(&e)));
                String::new()
            }
        };
        if k == 1 {
            // extended protocol too
            let _ = s
                .a()
                .query(
                    "INSERT INTO customers (store_id, name) VALUES ('north', 'seq-probe') RETURNING customer_id",
                    &[],
                )
                .await;
        }
        for (i, b) in s.bs.iter().enumerate() {
            for q in [
                "SELECT lastval()::text",
                "SELECT currval('public.customers_customer_id_seq')::text",
                "SELECT currval(pg_get_serial_sequence('customers', 'customer_id'))::text",
            ] {
                let got = if i % 2 == 0 {
                    b.simple_query(q).await.map(|m| simple_values(&m))
                } else {
                    b.query(q, &[]).await.map(|r| row_values(&r))
                };
                if let Ok(rows) = got {
                    let v = rows.first().and_then(|r| r.first()).cloned().unwrap_or_default();
                    if !a_id.is_empty() && v.parse::<i64>().unwrap_or(0) >= a_id.parse::<i64>().unwrap_or(i64::MAX) {
                        r.fail(
                            q,
                            format!("ESCAPE: victim {i} read the attacker's new id {v} (attacker inserted {a_id})"),
                        );
                    }
                }
            }
        }
        env.check_b(&s, &mut r, insert, "after the attacker's insert")
            .await;
        s.stop().await;
        admin_sql(&env.db, "DELETE FROM public.customers WHERE name = 'seq-probe'");
    }
    r.finish();
}

at_pools!(class5_seq: class05_setseed_and_sequence_state_pool_1, class05_setseed_and_sequence_state_pool_4);

// ---------------------------------------------------------------------------------------------
// Class 6: rlsgate's own server-side prepared statements (rg_…)
// ---------------------------------------------------------------------------------------------

fn class6_deny() -> Vec<Case> {
    vec![
        Case::deny("PREPARE rg_x AS SELECT 1"),
        Case::deny("prepare RG_X AS SELECT 1"),
        Case::deny("PREPARE \"rg_abc\"(int) AS SELECT $1"),
        Case::deny("PREPARE \"RG_Y\" AS SELECT 1"),
        Case::deny(r#"PREPARE U&"rg\005fx" AS SELECT 1"#),
        Case::deny("EXECUTE rg_x"),
        Case::deny("execute \"rg_0123456789abcdef\""),
        Case::deny("EXECUTE RG_X(1)"),
        Case::deny("EXPLAIN EXECUTE rg_x"),
        Case::deny("EXPLAIN (ANALYZE) EXECUTE rg_x"),
        Case::deny("CREATE TABLE pg_temp.t AS EXECUTE rg_x"),
        Case::deny("DEALLOCATE rg_x"),
        Case::deny("DEALLOCATE PREPARE \"rg_x\""),
        Case::deny("deallocate RG_X"),
        Case::deny(r#"DEALLOCATE U&"rg\005fx""#),
        Case::deny("SELECT 1; DEALLOCATE rg_x"),
        Case::deny("SELECT 1; DEALLOCATE ALL"),
        Case::deny("DEALLOCATE ALL; SELECT 1"),
        Case::deny("deallocate prepare all; select 1"),
        Case::deny("BEGIN; DEALLOCATE ALL; COMMIT").no_tx(),
        Case::deny("DEALLOCATE ALL").extended_only(),
        Case::deny("DEALLOCATE PREPARE ALL").extended_only(),
        Case::deny("SELECT * FROM pg_prepared_statements"),
        Case::deny("SELECT name, statement FROM pg_catalog.pg_prepared_statements"),
        Case::deny("TABLE pg_prepared_statements"),
        Case::deny("SELECT * FROM pg_prepared_statement()"),
        Case::deny("WITH p AS (SELECT statement FROM \"pg_prepared_statements\") SELECT * FROM p"),
        Case::deny("SELECT (SELECT count(*) FROM pg_prepared_statements)"),
    ]
}

async fn class6(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new("class 6: rlsgate's prepared statements", pool);
    for case in class6_deny() {
        run_deny(&env, &case, &mut r).await;
    }
    // DEALLOCATE ALL / DISCARD ALL alone are allowed and do not break B's statements
    {
        let s = env.sess().await;
        let b = &s.bs[0];
        let st = b
            .prepare("SELECT count(*)::text FROM customers WHERE name <> $1")
            .await
            .expect("B prepares");
        async fn run(
            c: &Client,
            st: &tokio_postgres::Statement,
        ) -> Result<Vec<Vec<String>>, String> {
            c.query(st, &[&"nobody"])
                .await
                .map(|r| row_values(&r))
                .map_err(|e| err_text(&e))
        }
        assert_eq!(run(b, &st).await.expect("B executes")[0][0], "2");
        for reset in ["DEALLOCATE ALL", "deallocate prepare all", "DISCARD ALL"] {
            if let Err(e) = s.a().simple_query(reset).await {
                r.fail(
                    reset,
                    format!(
                        "alone as a simple Query it must be allowed: {}",
                        err_text(&e)
                    ),
                );
            }
            match run(b, &st).await {
                Ok(v) if v[0][0] == "2" => {}
                Ok(v) => r.fail(
                    reset,
                    format!("victim's statement returned {}", summary(&v)),
                ),
                Err(e) => r.fail(reset, format!("victim's prepared statement broke: {e}")),
            }
        }
        env.check_b(&s, &mut r, "DEALLOCATE ALL alone", "after")
            .await;
        s.stop().await;
    }
    // B's statements are neither readable nor executable nor removable by A
    {
        let s = env.sess().await;
        let b = &s.bs[1];
        let secret = b
            .prepare("SELECT 'b-secret-literal'::text, count(*)::text FROM customers")
            .await
            .expect("B prepares");
        b.query(&secret, &[]).await.expect("B executes");
        let a = s.a();
        match a
            .simple_query("SELECT name, statement FROM pg_prepared_statements")
            .await
        {
            Err(_) => {}
            Ok(m) => {
                let rows = simple_values(&m);
                r.fail(
                    "SELECT name, statement FROM pg_prepared_statements",
                    format!(
                        "ESCAPE: the attacker read the server's prepared statements: {}",
                        summary(&rows)
                    ),
                );
                for row in rows.iter().filter(|r| r[1].contains("b-secret-literal")) {
                    let name = &row[0];
                    if let Ok(m) = a.simple_query(&format!("EXECUTE {name}")).await {
                        r.fail(
                            &format!("EXECUTE {name}"),
                            format!(
                                "ESCAPE: the attacker ran the victim's statement: {}",
                                summary(&simple_values(&m))
                            ),
                        );
                    }
                    if a.simple_query(&format!("DEALLOCATE {name}")).await.is_ok()
                        && let Err(e) = b.query(&secret, &[]).await
                    {
                        r.fail(
                            &format!("DEALLOCATE {name}"),
                            format!(
                                "ESCAPE: the attacker removed the victim's statement: {}",
                                err_text(&e)
                            ),
                        );
                    }
                }
            }
        }
        if let Err(e) = b.query(&secret, &[]).await {
            r.fail("victim's statement at the end", err_text(&e));
        }
        env.check_b(&s, &mut r, "prepared statement theft", "after")
            .await;
        s.stop().await;
    }
    r.finish();
}

at_pools!(class6: class06_internal_prepared_statements_pool_1, class06_internal_prepared_statements_pool_4);

// ---------------------------------------------------------------------------------------------
// Class 7: transaction control in an extended-protocol pipeline without Sync in between
// ---------------------------------------------------------------------------------------------

const PIPE_PROBE: &str = "SELECT current_setting('app.current_store_id', true), (SELECT count(*) FROM customers)::text, (SELECT count(*) FROM customers WHERE store_id <> 'north')::text";

fn data_row(m: &Msg) -> Vec<String> {
    let b = &m.body;
    let n = i16::from_be_bytes([b[0], b[1]]) as usize;
    let mut off = 2;
    let mut out = Vec::new();
    for _ in 0..n {
        let len = i32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
        off += 4;
        if len < 0 {
            out.push("NULL".into());
        } else {
            let len = len as usize;
            out.push(String::from_utf8_lossy(&b[off..off + len]).to_string());
            off += len;
        }
    }
    out
}

async fn class7(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new("class 7: unsynced pipelines with transaction control", pool);
    let pipelines: Vec<Vec<&str>> = vec![
        vec!["BEGIN", "COMMIT", PIPE_PROBE],
        vec!["BEGIN", "ROLLBACK", PIPE_PROBE],
        vec!["begin", "end", PIPE_PROBE],
        vec!["START TRANSACTION", "ABORT", PIPE_PROBE],
        vec!["BEGIN", "COMMIT AND CHAIN", PIPE_PROBE, "COMMIT"],
        vec!["BEGIN", "ROLLBACK AND CHAIN", PIPE_PROBE, "ROLLBACK"],
        vec![PIPE_PROBE, "COMMIT", PIPE_PROBE],
        vec!["SELECT 1", "ROLLBACK", PIPE_PROBE],
        vec!["BEGIN", "COMMIT", "BEGIN", PIPE_PROBE, "COMMIT", PIPE_PROBE],
        vec!["BEGIN", "SAVEPOINT s", "RELEASE s", "COMMIT", PIPE_PROBE],
    ];
    let s = env.sess().await;
    for p in &pipelines {
        for extended in [true, false] {
            let case = if extended {
                format!("extended, one Sync: {}", p.join(" | "))
            } else {
                format!("one simple Query: {}", p.join("; "))
            };
            let mut c = RawClient::connect(&s.proxy, &token(A)).await;
            if extended {
                for stmt in p {
                    c.parse("", stmt).await;
                    c.bind("", "").await;
                    c.execute("").await;
                }
                c.sync().await;
            } else {
                c.query(&p.join("; ")).await;
            }
            let msgs = c.until_ready().await;
            for e in msgs.iter().filter(|m| m.tag == 'E') {
                r.fail(&case, format!("error {} {}", e.code(), e.field(b'M')));
            }
            let rows: Vec<Vec<String>> = msgs
                .iter()
                .filter(|m| m.tag == 'D')
                .map(data_row)
                .filter(|r| r.len() == 3)
                .collect();
            let probes = p.iter().filter(|s| **s == PIPE_PROBE).count();
            if rows.len() != probes {
                r.fail(&case, format!("{} probe rows, want {probes}", rows.len()));
            }
            for row in rows {
                if row != [A, "3", "0"] {
                    r.fail(
                        &case,
                        format!(
                            "the SELECT saw tenant {:?}, {} own rows, {} foreign rows (want north, 3, 0)",
                            row[0], row[1], row[2]
                        ),
                    );
                }
            }
            // the connection goes on normally
            c.query(PIPE_PROBE).await;
            let msgs = c.until_ready().await;
            let row = msgs.iter().find(|m| m.tag == 'D').map(data_row);
            if row.as_deref() != Some(&[A.to_string(), "3".into(), "0".into()][..]) {
                r.fail(&case, format!("next simple query saw {row:?}"));
            }
            drop(c);
            env.check_b(&s, &mut r, &case, "after the pipeline").await;
        }
    }
    s.stop().await;
    r.finish();
}

at_pools!(class7: class07_unsynced_pipelines_keep_the_context_pool_1, class07_unsynced_pipelines_keep_the_context_pool_4);

// ---------------------------------------------------------------------------------------------
// Class 8: role and database defaults
// ---------------------------------------------------------------------------------------------

/// `p` (the pool size) is part of every value written, so the two class-8 tests (which share
/// the cluster-wide role) never see each other's leftovers.
fn class8_deny(db: &str, p: usize) -> Vec<Case> {
    vec![
        Case::deny(format!(
            "ALTER ROLE CURRENT_USER SET application_name = 'esc_mark_{p}'"
        )),
        Case::deny(format!(
            "alter user current_user set work_mem TO '42{p}1kB'"
        )),
        Case::deny(format!(
            "ALTER ROLE SESSION_USER SET lock_timeout = '42{p}1s'"
        )),
        Case::deny(format!("ALTER ROLE CURRENT_ROLE SET work_mem = '42{p}2kB'")),
        Case::deny(format!(
            r#"ALTER ROLE CURRENT_USER SET U&"work\005fmem" = '42{p}3kB'"#
        )),
        Case::deny(format!(
            "ALTER USER \"rlsgate_app\" IN DATABASE {db} SET work_mem = '42{p}4kB'"
        )),
        Case::deny(format!(
            "alter role rlsgate_app in database \"{db}\" set search_path = pg_temp, public"
        )),
        Case::deny("ALTER ROLE CURRENT_USER RESET application_name"),
        Case::deny("ALTER ROLE rlsgate_app RESET ALL"),
        Case::deny(format!("ALTER ROLE rlsgate_app IN DATABASE {db} RESET ALL")),
        Case::deny(format!("ALTER ROLE ALL SET work_mem = '42{p}5kB'")),
        Case::deny(format!("ALTER DATABASE {db} SET work_mem = '42{p}6kB'")),
        Case::deny(format!(
            "alter database \"{db}\" set search_path TO pg_temp"
        )),
        Case::deny(format!("ALTER DATABASE {db} RESET ALL")),
        Case::deny(format!(
            "SELECT 1; ALTER ROLE CURRENT_USER SET work_mem = '42{p}7kB'"
        )),
    ]
}

/// Superuser SQL that may meet a concurrent ALTER ROLE of another test ("tuple concurrently
/// updated"): retried.
fn admin_retry(db: &str, sql: &str) -> String {
    let mut last = String::new();
    for _ in 0..20 {
        match pg().psql(db, sql) {
            Ok(out) => return out.trim().to_string(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("admin sql failed 20 times: {last}");
}

/// Role/database defaults the cases could have written, cleaned up if present.
fn class8_leftovers(db: &str, p: usize) -> String {
    let found = admin_retry(
        db,
        &format!(
            "SELECT count(*) FROM pg_db_role_setting s, unnest(s.setconfig) c \
             WHERE (s.setdatabase = 0 AND (c LIKE 'work_mem=42{p}_kB' OR c = 'application_name=esc_mark_{p}' \
                                           OR c LIKE 'lock_timeout=42{p}1s')) \
                OR s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
    );
    let kept = admin_retry(
        db,
        "SELECT count(*) FROM pg_db_role_setting s, unnest(s.setconfig) c \
         WHERE s.setrole = 'rlsgate_app'::regrole AND s.setdatabase = 0 AND c = 'log_min_messages=error'",
    );
    let mut out = String::new();
    if found != "0" {
        out.push_str(&format!("{found} role/database default(s) written; "));
    }
    if kept != "1" {
        out.push_str("the role's own default log_min_messages was removed; ");
    }
    if !out.is_empty() {
        admin_retry(
            db,
            &format!(
                "ALTER ROLE rlsgate_app RESET work_mem; ALTER ROLE rlsgate_app RESET application_name; \
                 ALTER ROLE rlsgate_app RESET lock_timeout; ALTER ROLE rlsgate_app SET log_min_messages = 'error'; \
                 ALTER ROLE rlsgate_app IN DATABASE \"{db}\" RESET ALL; ALTER DATABASE \"{db}\" RESET ALL;"
            ),
        );
    }
    out
}

async fn class8(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new("class 8: role and database defaults", pool);
    for case in class8_deny(&env.db, pool) {
        run_deny(&env, &case, &mut r).await;
        let left = class8_leftovers(&env.db, pool);
        if !left.is_empty() {
            r.fail(&case.sql, format!("ESCAPE: {left}"));
        }
    }
    r.finish();
}

at_pools!(class8: class08_role_and_database_defaults_pool_1, class08_role_and_database_defaults_pool_4);

// ---------------------------------------------------------------------------------------------
// Class 9: other sessions' backends and statement text
// ---------------------------------------------------------------------------------------------

fn class9_deny() -> Vec<Case> {
    // Signals only ever target backends of this test's database (or no backend at all), so an
    // allowed one cannot disturb the other tests of this binary.
    vec![
        Case::deny("SELECT (2147483647).pg_terminate_backend"),
        Case::deny("SELECT (b.pid).pg_cancel_backend FROM (SELECT 2147483647 AS pid) b"),
        Case::deny("SELECT (x).\"pg_terminate_backend\" FROM (VALUES (2147483647)) v(x)"),
        Case::deny(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        ),
        Case::deny(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        ),
        Case::deny("SELECT pg_catalog.pg_terminate_backend(2147483647)"),
        Case::deny("select PG_CANCEL_BACKEND(2147483647)"),
        Case::deny("SELECT \"pg_terminate_backend\"(2147483647, 1000)"),
        Case::deny("SELECT * FROM pg_cancel_backend(2147483647)"),
        Case::deny("SELECT x FROM (VALUES (2147483647)) v(p), LATERAL pg_terminate_backend(p) x"),
        Case::deny("WITH t AS (SELECT pg_cancel_backend(2147483647)) SELECT * FROM t"),
        Case::deny(r#"SELECT U&"pg\005fterminate\005fbackend"(2147483647)"#),
        Case::deny("SELECT 1; SELECT pg_cancel_backend(pg_backend_pid())"),
        Case::deny("SELECT query FROM pg_stat_activity"),
        Case::deny("SELECT * FROM pg_catalog.pg_stat_activity"),
        Case::deny("TABLE pg_stat_activity"),
        Case::deny("WITH a AS (SELECT query FROM \"pg_stat_activity\") SELECT * FROM a"),
        Case::deny("COPY (SELECT query FROM pg_stat_activity) TO STDOUT"),
        Case::deny("SELECT (pg_stat_get_activity(NULL::int)).query"),
        Case::deny("SELECT query FROM pg_stat_get_activity(NULL)"),
        Case::deny("SELECT * FROM pg_catalog.pg_stat_get_activity(NULL::int)"),
        Case::deny("SELECT pg_stat_get_backend_activity(b) FROM pg_stat_get_backend_idset() b"),
        Case::deny("select PG_CATALOG.PG_STAT_GET_BACKEND_ACTIVITY(1)"),
    ]
}

async fn class9(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new("class 9: backend signals and activity", pool);
    for case in class9_deny() {
        run_deny(&env, &case, &mut r).await;
    }
    r.finish();
}

at_pools!(class9: class09_backend_signals_and_activity_pool_1, class09_backend_signals_and_activity_pool_4);

// ---------------------------------------------------------------------------------------------
// Class 10: large objects (shared by every tenant of the role)
// ---------------------------------------------------------------------------------------------

const LO_SECRET: u32 = 910_001;
const LO_OTHER: u32 = 910_002;

fn class10_deny() -> Vec<Case> {
    vec![
        Case::deny("SELECT convert_from((910001::oid).lo_get, 'UTF8')"),
        Case::deny("SELECT (910001::oid).lo_unlink"),
        Case::deny("SELECT (o.id).LO_GET FROM (SELECT 910001::oid AS id) o"),
        Case::deny("SELECT lo_create(0)"),
        Case::deny("SELECT pg_catalog.lo_creat(-1)"),
        Case::deny("SELECT lo_import('/etc/hostname')"),
        Case::deny("SELECT lo_import('/etc/hostname', 910003)"),
        Case::deny("SELECT lo_from_bytea(0, 'x')"),
        Case::deny("select LO_FROM_BYTEA(0, '\\x41'::bytea)"),
        Case::deny(format!("SELECT lo_get({LO_SECRET})")),
        Case::deny(format!(
            "SELECT convert_from(lo_get({LO_SECRET}, 0, 100), 'UTF8')"
        )),
        Case::deny(format!("SELECT \"lo_get\"({LO_SECRET})")),
        Case::deny(format!(
            "WITH l AS (SELECT lo_get({LO_SECRET}) AS b) SELECT b FROM l"
        )),
        Case::deny(format!("SELECT lo_put({LO_SECRET}, 0, 'pwned')")),
        Case::deny(format!("SELECT loread(lo_open({LO_SECRET}, 262144), 100)")),
        Case::deny(format!("SELECT lo_open({LO_SECRET}, 393216)")),
        Case::deny(format!("SELECT lowrite(lo_open({LO_SECRET}, 131072), 'x')")),
        Case::deny(format!(
            "SELECT lo_truncate(lo_open({LO_SECRET}, 131072), 0)"
        )),
        Case::deny(format!("SELECT lo_unlink({LO_OTHER})")),
        Case::deny(format!(
            "SELECT lo_export({LO_SECRET}, '/tmp/rlsgate-lo-export')"
        )),
        Case::deny("SELECT * FROM pg_largeobject"),
        Case::deny("SELECT oid FROM pg_largeobject_metadata"),
        Case::deny("SELECT count(*) FROM pg_catalog.pg_largeobject_metadata"),
    ]
}

fn lo_state(db: &str) -> String {
    admin_sql(
        db,
        &format!(
            "SELECT (SELECT count(*) FROM pg_largeobject_metadata)::text || ' ' || \
             coalesce((SELECT convert_from(lo_get(oid), 'UTF8') FROM pg_largeobject_metadata WHERE oid = {LO_SECRET}), 'missing') || ' ' || \
             coalesce((SELECT convert_from(lo_get(oid), 'UTF8') FROM pg_largeobject_metadata WHERE oid = {LO_OTHER}), 'missing')"
        ),
    )
}

/// The victim's two large objects, owned by the role every tenant shares.
fn lo_reset(db: &str) {
    admin_sql(
        db,
        &format!(
            "SELECT lo_unlink(oid) FROM pg_largeobject_metadata;
             SELECT lo_from_bytea({LO_SECRET}, 'south-secret'); ALTER LARGE OBJECT {LO_SECRET} OWNER TO rlsgate_app;
             SELECT lo_from_bytea({LO_OTHER}, 'south-other'); ALTER LARGE OBJECT {LO_OTHER} OWNER TO rlsgate_app;"
        ),
    );
}

async fn class10(pool: usize) {
    let env = Env::new(pool).await;
    lo_reset(&env.db);
    let want = "2 south-secret south-other";
    let mut r = Report::new("class 10: large objects", pool);
    for case in class10_deny() {
        run_deny(&env, &case, &mut r).await;
        let now = lo_state(&env.db);
        if now != want {
            r.fail(&case.sql, format!("ESCAPE: large objects changed: {now}"));
            lo_reset(&env.db);
        }
    }
    // libpq's large-object calls (FunctionCall messages) must not reach another tenant's object
    let s = env.sess().await;
    let file = std::env::temp_dir().join(format!("rlsgate-esc-lo-{}-{pool}", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let out = run_client(
        &s.proxy,
        "psql",
        &token(A),
        &[
            "-X",
            "-At",
            "-c",
            &format!("\\lo_export {LO_SECRET} {}", file.display()),
        ],
    );
    let read = std::fs::read_to_string(&file).unwrap_or_default();
    if out.status.success() || read.contains("south-secret") {
        r.fail(
            "psql \\lo_export (fast-path lo_open/loread)",
            format!("ESCAPE: the attacker exported another tenant's large object: {read:?}"),
        );
    }
    let _ = std::fs::remove_file(&file);
    let out = run_client(
        &s.proxy,
        "psql",
        &token(A),
        &["-X", "-At", "-c", &format!("\\lo_unlink {LO_OTHER}")],
    );
    if out.status.success() {
        r.fail(
            "psql \\lo_unlink (fast path)",
            "ESCAPE: the attacker removed another tenant's large object",
        );
    }
    env.check_b(&s, &mut r, "large objects over the fast path", "after")
        .await;
    s.stop().await;
    r.finish();
}

at_pools!(class10: class10_large_objects_pool_1, class10_large_objects_pool_4);

// ---------------------------------------------------------------------------------------------
// Beyond the review: the same classes through spellings it did not list
// ---------------------------------------------------------------------------------------------

fn extra_deny() -> Vec<Case> {
    vec![
        // the `seed` setting is setseed() under another name
        Case::deny("SET seed = 0.5"),
        Case::deny("SET SEED TO 0.5"),
        Case::deny("set local SEED = 0.5"),
        Case::deny("SELECT set_config('seed', '0.5', false)"),
        Case::deny("SELECT pg_catalog.set_config('SEED', '0.5', true)"),
    ]
}

/// SET SESSION CHARACTERISTICS changes session defaults (default_transaction_read_only,
/// default_transaction_isolation) like a session-level SET, without naming a setting.
fn extra_effects() -> Vec<Vec<Step>> {
    vec![
        vec![simple(
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        )],
        vec![ext(
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        )],
        vec![simple(
            "set session characteristics as transaction isolation level repeatable read, read only",
        )],
        vec![
            simple("BEGIN"),
            simple("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            simple("COMMIT"),
        ],
    ]
}

async fn extra(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new(
        "beyond the review: SET seed, SET SESSION CHARACTERISTICS",
        pool,
    )
    .no_landing_rule();
    for case in extra_deny() {
        run_deny(&env, &case, &mut r).await;
    }
    seed_reaches_victims(&env, "SET seed = 0.5", &mut r).await;
    seed_reaches_victims(&env, "SELECT set_config('seed', '0.5', false)", &mut r).await;
    for (i, steps) in extra_effects().iter().enumerate() {
        run_effect(&env, steps, &mut r, 200 + i).await;
    }
    r.finish();
}

at_pools!(extra: extra_seed_setting_and_session_characteristics_pool_1, extra_seed_setting_and_session_characteristics_pool_4);
