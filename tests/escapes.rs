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
use support::escape_cases::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, SimpleQueryMessage};

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

fn proxy_config(db: &str, pool: usize) -> String {
    // A victim waiting for a connection pinned to the attacker gives up after 1 s.
    let config =
        config_text(db, pool, "").replace("checkout_timeout = \"5s\"", "checkout_timeout = \"1s\"");
    if pool == 1 {
        return config;
    }
    // With `keep_context` (the default) a checkout prefers a connection that keeps nothing over
    // one that keeps the attacker's context, so a victim would rarely follow the attacker onto
    // its connection here. The pool-1 runs cover that mode, every victim on the attacker's
    // connection (cleaned with RESET ALL whenever it kept the attacker's context); these runs
    // keep the stack order the landing checks rely on.
    config.replace("[upstream]\n", "[upstream]\nkeep_context = false\n")
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

async fn class5_set(pool: usize) {
    let env = Env::new(pool).await;
    let mut r = Report::new("class 5: session settings", pool).no_landing_rule();
    for (i, steps) in class5_settings().iter().enumerate() {
        run_effect(&env, steps, &mut r, 100 + i).await;
    }
    r.finish();
}

at_pools!(class5_set: class05_session_settings_do_not_reach_other_tenants_pool_1, class05_session_settings_do_not_reach_other_tenants_pool_4);

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
