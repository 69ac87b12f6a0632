//! The guard's shape path against its full classification, without a database.
//!
//! `Guard::analyze` answers a text whose shape (the text with its literals replaced by `$n`)
//! classifies as a plain allow without parsing the text. This test proves that answer is the
//! one the full classification gives, on a large corpus: every SQL string the project's guard
//! tests, benches and unit tests already use, generated statements (pgbench, ORM-style SQL with
//! inline values, function calls with literal arguments, SET/COPY/DO/PREPARE/DDL, typed
//! literals, comments with quotes, odd identifiers and whitespace), and each of them again with
//! its literals swapped for values the guard cares about (protected setting names, catalog
//! names, SQL text, quotes, numbers, empty strings). Every text goes through three guards
//! (default options; everything allowed and more settings protected; caches so small that
//! entries are evicted all the time), twice each (the second time from a cache).
//!
//! Deterministic: a fixed-seed generator, so a failure names a reproducible text.

use std::collections::BTreeMap;

use rlsgate::config::GuardConfig;
use rlsgate::guard::{Analysis, Guard, Route, Verdict, shape_key};

/// splitmix64: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

// ---------------------------------------------------------------------------------------------
// Texts the project already feeds the guard
// ---------------------------------------------------------------------------------------------

const SOURCES: &[(&str, &str)] = &[
    ("tests/guard_corpus.rs", include_str!("guard_corpus.rs")),
    ("tests/escapes.rs", include_str!("escapes.rs")),
    ("tests/guard_fuzz.rs", include_str!("guard_fuzz.rs")),
    ("tests/lexer_guard.rs", include_str!("lexer_guard.rs")),
    ("tests/refusals.rs", include_str!("refusals.rs")),
    ("tests/wrap_diff.rs", include_str!("wrap_diff.rs")),
    (
        "tests/sql_exec_catalog.rs",
        include_str!("sql_exec_catalog.rs"),
    ),
    (
        "benches/common/cases.rs",
        include_str!("../benches/common/cases.rs"),
    ),
    ("src/guard/mod.rs", include_str!("../src/guard/mod.rs")),
    (
        "src/guard/pinned.rs",
        include_str!("../src/guard/pinned.rs"),
    ),
    (
        "src/guard/normalize.rs",
        include_str!("../src/guard/normalize.rs"),
    ),
    (
        "src/doctor/functions.rs",
        include_str!("../src/doctor/functions.rs"),
    ),
];

/// The string literals of a Rust source file, unescaped (`"…"`, `r"…"`, `r#"…"#`, byte and C
/// strings alike). Format strings come out with their `{…}` holes; those texts just do not parse.
fn rust_strings(src: &str) -> Vec<String> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '/' if c.get(i + 1) == Some(&'/') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if c.get(i + 1) == Some(&'*') => {
                i += 2;
                while i + 1 < c.len() && !(c[i] == '*' && c[i + 1] == '/') {
                    i += 1;
                }
                i += 2;
            }
            // a char literal ('x', '\'', '\u{1F600}') or a lifetime ('a)
            '\'' => {
                if c.get(i + 1) == Some(&'\\') {
                    i += 3;
                    while i < c.len() && c[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if c.get(i + 2) == Some(&'\'') {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            '"' => {
                let (text, end) = cooked_string(&c, i + 1);
                out.push(text);
                i = end;
            }
            ch if ch.is_alphanumeric() || ch == '_' => {
                let start = i;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                if matches!(word.as_str(), "r" | "br" | "cr") && matches!(c.get(i), Some('"' | '#'))
                {
                    let hashes = c[i..].iter().take_while(|&&h| h == '#').count();
                    if c.get(i + hashes) == Some(&'"') {
                        let body = i + hashes + 1;
                        let mut j = body;
                        while j < c.len()
                            && !(c[j] == '"'
                                && c[j + 1..]
                                    .iter()
                                    .take(hashes)
                                    .filter(|&&h| h == '#')
                                    .count()
                                    == hashes)
                        {
                            j += 1;
                        }
                        out.push(c[body..j.min(c.len())].iter().collect());
                        i = j + 1 + hashes;
                    }
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// A `"…"` string's content from `start` (after the quote): the text and where it ends.
fn cooked_string(c: &[char], start: usize) -> (String, usize) {
    let mut s = String::new();
    let mut i = start;
    while i < c.len() {
        match c[i] {
            '"' => return (s, i + 1),
            '\\' => {
                i += 1;
                match c.get(i) {
                    Some('n') => s.push('\n'),
                    Some('t') => s.push('\t'),
                    Some('r') => s.push('\r'),
                    Some('0') => s.push('\0'),
                    Some('x') => {
                        let hex: String = c[i + 1..(i + 3).min(c.len())].iter().collect();
                        if let Some(ch) =
                            u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32)
                        {
                            s.push(ch);
                        }
                        i += 2;
                    }
                    Some('u') => {
                        let close = c[i..]
                            .iter()
                            .position(|&x| x == '}')
                            .map_or(c.len(), |p| i + p);
                        let hex: String = c[(i + 2).min(close)..close].iter().collect();
                        if let Some(ch) =
                            u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32)
                        {
                            s.push(ch);
                        }
                        i = close;
                    }
                    Some('\n') => {
                        while c.get(i + 1).is_some_and(|x| x.is_whitespace()) {
                            i += 1;
                        }
                    }
                    Some(&other) => s.push(other),
                    None => {}
                }
                i += 1;
            }
            other => {
                s.push(other);
                i += 1;
            }
        }
    }
    (s, i)
}

// ---------------------------------------------------------------------------------------------
// Generated texts
// ---------------------------------------------------------------------------------------------

/// String literals, as SQL: names and values the guard's rules look at, and awkward quoting.
const STRINGS: &[&str] = &[
    "'north'",
    "'app.current_store_id'",
    "'APP.Current_Store_ID'",
    "' app.current_store_id'",
    "'app.user_id'",
    "'search_path'",
    "'pg_temp'",
    "'pg_temp_3, public'",
    "'public'",
    "'statement_timeout'",
    "'work_mem'",
    "'standard_conforming_strings'",
    "'client_encoding'",
    "'backslash_quote'",
    "'idle_session_timeout'",
    "'seed'",
    "'role'",
    "'session_authorization'",
    "'restrict_nonsystem_relation_kind'",
    "'off'",
    "'on'",
    "'true'",
    "'false'",
    "'SJIS'",
    "'UTF8'",
    "'safe_encoding'",
    "'pg_authid'",
    "'pg_stat_activity'",
    "'pg_largeobject'",
    "'pg_settings'",
    "'pg_prepared_statements'",
    "'pg_catalog'",
    "'information_schema'",
    "'customers'",
    "'public.customers'",
    "'16582'",
    "'rg_0123456789abcdef'",
    "'x'' ; DROP TABLE t; --'",
    "''",
    "''''",
    "'it''s'",
    "'select 1'",
    "'select 1 as one'",
    "'select set_config(''app.current_store_id'',''x'',true)'",
    "'SET app.current_store_id = ''south'''",
    "'select query_to_xml(''select 1'', true, true, '''')'",
    "'/etc/passwd'",
    "'dbname=postgres'",
    "'plpgsql'",
    "'BEGIN PERFORM 1; END'",
    "'1 day'",
    "'7 days'",
    "'2024-01-01'",
    "'2024-01-01 12:00:00+00'",
    "'UTC'",
    "'{1,2,3}'",
    "'{\"a\": 1}'",
    "'a''b''c'",
    "'é ü ñ'",
    "'/* not a comment */'",
    "'-- not a comment'",
    "'\"not an identifier\"'",
    "'$1'",
    "'a\\b'",
    "'line\nbreak'",
];

const NUMBERS: &[&str] = &[
    "0",
    "1",
    "2",
    "42",
    "12345",
    "16582",
    "2147483648",
    "99999999999999999999",
    "1.5",
    ".5",
    "0.0",
    "1e10",
    "1.5E-3",
    "2e+3",
    "-1",
    "- 7",
];

/// The third argument of set_config and other boolean-ish spots.
const BOOLS: &[&str] = &["true", "false", "'true'", "'off'", "'t'", "'no'", "1"];

/// Identifiers, some of them quoted with quotes, dollars and semicolons inside.
const IDENTS: &[&str] = &[
    "customers",
    "t1",
    "\"customers\"",
    "\"we\"\"ird\"",
    "\"it's\"",
    "\"$user\"",
    "\"a;b\"",
    "\"x -- y\"",
    "\"/* z */\"",
    "pg_settings",
    "\"PG_SETTINGS\"",
    "public.customers",
];

/// Statement templates: `{s}` a string literal, `{n}` a number, `{b}` a boolean-ish value,
/// `{i}` an identifier. Families group them for the report (and for the share of texts the
/// shape path must answer: `ordinary`, `pgbench`).
const TEMPLATES: &[(&str, &[&str])] = &[
    (
        "pgbench",
        &[
            "UPDATE pgbench_accounts SET abalance = abalance + {n} WHERE aid = {n}",
            "SELECT abalance FROM pgbench_accounts WHERE aid = {n}",
            "UPDATE pgbench_tellers SET tbalance = tbalance + {n} WHERE tid = {n}",
            "UPDATE pgbench_branches SET bbalance = bbalance + {n} WHERE bid = {n}",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({n}, {n}, {n}, {n}, CURRENT_TIMESTAMP)",
            "select abalance from pgbench_accounts where aid={n}",
        ],
    ),
    (
        "ordinary",
        &[
            "SELECT \"app_customer\".\"id\", \"app_customer\".\"name\" FROM \"app_customer\" WHERE (\"app_customer\".\"store_id\" = {s} AND \"app_customer\".\"id\" = {n}) LIMIT 21",
            "SELECT \"users\".* FROM \"users\" WHERE \"users\".\"email\" = {s} LIMIT {n}",
            "select c1_0.id,c1_0.name,c1_0.email from customers c1_0 where c1_0.id={n}",
            "SELECT * FROM {i} WHERE name = {s} AND note <> {s} ORDER BY 1 DESC NULLS LAST LIMIT {n} OFFSET {n}",
            "INSERT INTO \"customers\" (\"store_id\", \"name\", \"email\", \"created_at\") VALUES ({s}, {s}, {s}, {s}) RETURNING \"id\"",
            "INSERT INTO customers (store_id, name) VALUES ({s}, {s}), ({s}, {s}) ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
            "UPDATE \"customers\" SET \"name\" = {s}, \"updated_at\" = {s} WHERE \"customers\".\"id\" = {n}",
            "UPDATE customers SET balance = balance * {n} WHERE id IN ({n}, {n}, {n}) RETURNING *",
            "DELETE FROM \"customers\" WHERE \"customers\".\"id\" IN ({n}, {n}, {n})",
            "DELETE FROM sessions WHERE expires_at < {s}::timestamptz",
            "SELECT c.name, sum(i.quantity * i.unit_price) AS total FROM customers c JOIN sales_transactions t ON t.customer_id = c.customer_id JOIN sales_items i ON i.transaction_id = t.transaction_id WHERE t.created_at > {s} AND c.id <> {n} GROUP BY c.name HAVING sum(i.quantity) > {n} ORDER BY total DESC",
            "SELECT * FROM customers WHERE id = (SELECT max(id) FROM customers WHERE name LIKE {s} ESCAPE {s})",
            "SELECT * FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.id AND o.total > {n})",
            "WITH recent AS (SELECT * FROM orders WHERE created_at > now() - {s}::interval) SELECT count(*) FROM recent WHERE status = {s}",
            "WITH RECURSIVE r(n) AS (SELECT {n} UNION ALL SELECT n + {n} FROM r WHERE n < {n}) SELECT sum(n) FROM r",
            "SELECT CASE WHEN price > {n} THEN {s} WHEN price > {n} THEN {s} ELSE {s} END FROM products",
            "SELECT * FROM products WHERE price BETWEEN {n} AND {n} AND tags @> ARRAY[{s}, {s}]",
            "SELECT * FROM products WHERE id = ANY(ARRAY[{n}, {n}, {n}])",
            "SELECT data->>{s} FROM events WHERE data @> {s}::jsonb AND kind = {s}",
            "SELECT row_number() OVER (PARTITION BY store_id ORDER BY id) FROM customers WHERE id > {n}",
            "SELECT * FROM generate_series({n}, {n}) g, LATERAL (SELECT g * {n}) x",
            "SELECT {s} || name, lower({s}), length({s}), coalesce(note, {s}) FROM customers",
            "SELECT id FROM jobs WHERE state = {s} ORDER BY id LIMIT {n} FOR UPDATE SKIP LOCKED",
            "SELECT a FROM t WHERE b = {n} UNION ALL SELECT a FROM u WHERE c = {s}",
            "SELECT {n}::numeric(10,2), CAST({s} AS varchar(20)), {s}::date, {n}::int8",
            "SELECT date {s}, timestamp {s}, interval {s}, interval {s} day, int4 {s}",
            "SELECT now() - interval {s} AS since FROM customers WHERE created_at > date {s}",
            "SELECT {s} AT TIME ZONE {s}, extract(epoch FROM now()) - {n}",
            "SELECT substring({s} FROM {n} FOR {n}), position({s} IN {s}), trim(both {s} FROM {s}), overlay({s} PLACING {s} FROM {n})",
            "SELECT xmlelement(name x, {s}), xmlparse(document {s})",
            "SELECT current_setting({s})",
            "SELECT current_setting({s}, {b})",
            "SELECT relname FROM pg_class WHERE relname = {s}",
            "SELECT * FROM pg_class WHERE oid = {s}::regclass",
            "SELECT {s}::regclass, x::regclass FROM t",
            "SELECT regclass {s}",
            "SELECT pg_advisory_xact_lock({n})",
            "SELECT pg_notify({s}, {s})",
            "SELECT nextval({s}), setval({s}, {n})",
            "SELECT pg_sleep({n})",
            "SELECT has_table_privilege({s}, {s})",
            "SELECT format({s}, {s}, {n})",
            "SELECT 1 FROM t WHERE x = {n} -- it's a comment with {s}\n",
            "/* don't */ SELECT {s} AS \"it's\" /* 'quoted' */",
            "SELECT a[{n}], a[{n}:{n}] FROM t WHERE b = {s}",
            "SELECT name {s} FROM customers",
            "SELECT {n}, {n}, {n}",
            "VALUES ({n}, {s}), ({n}, {s})",
            "TABLE customers LIMIT {n}",
            "EXPLAIN SELECT * FROM customers WHERE id = {n}",
            "EXPLAIN ANALYZE SELECT count(*) FROM customers WHERE name = {s}",
            "COPY (SELECT * FROM customers WHERE id > {n}) TO STDOUT",
            "CALL do_something({n}, {s})",
            "EXECUTE p({n}, {s})",
            "DECLARE c CURSOR FOR SELECT * FROM customers WHERE id > {n}",
            "SELECT * FROM customers c JOIN {i} x ON x.id = c.id WHERE c.id = {n}",
        ],
    ),
    (
        "functions",
        &[
            "SELECT set_config({s}, {s}, {b})",
            "SELECT pg_catalog.set_config({s}, {s}, {b})",
            "SELECT set_config({s}, {s}, {b}) FROM customers WHERE id = {n}",
            "SELECT set_config(name, {s}, {b}) FROM pg_settings WHERE name = {s}",
            "SELECT set_config(name, {s}, {b}) FROM {i} WHERE name = {s}",
            "UPDATE pg_settings SET setting = {s} WHERE name = {s}",
            "SELECT query_to_xml({s}, true, true, {s})",
            "SELECT query_to_xml({s}, {b}, {b}, {s})",
            "SELECT ts_stat({s})",
            "SELECT ts_rewrite({s}::tsquery, {s})",
            "SELECT * FROM crosstab({s}, {n}) AS t(a text, b text)",
            "SELECT * FROM crosstab({s}, {s}) AS t(a text, b text)",
            "SELECT pg_read_file({s})",
            "SELECT pg_read_file({s}, {n}, {n})",
            "SELECT dblink({s}, {s})",
            "SELECT lo_import({s})",
            "SELECT lo_get({n})",
            "SELECT convert_from(lo_get({n}), {s})",
            "SELECT table_to_xml({s}::regclass, true, true, {s})",
            "SELECT table_to_xml({s}, true, false, {s})",
            "SELECT schema_to_xml({s}, true, true, {s})",
            "SELECT cursor_to_xml({s}::refcursor, {n}, true, true, {s})",
            "SELECT pg_advisory_lock({n})",
            "SELECT pg_try_advisory_lock_shared({n}, {n})",
            "SELECT pg_terminate_backend({n})",
            "SELECT setseed({n})",
            "SELECT * FROM pg_stat_activity WHERE pid = {n}",
            "SELECT * FROM pg_largeobject WHERE loid = {n}",
            "SELECT count(*) FROM customers WHERE set_config({s}, {s}, {b}) IS NOT NULL",
            "SELECT extract({s} FROM now())",
        ],
    ),
    (
        "settings",
        &[
            "SET statement_timeout = {n}",
            "SET LOCAL statement_timeout = {n}",
            "SET statement_timeout TO {s}",
            "SET search_path = {s}",
            "SET LOCAL search_path = {s}",
            "SET search_path TO {s}, {s}",
            "SET app.current_store_id = {s}",
            "SET LOCAL app.current_store_id = {s}",
            "SET SESSION app.current_store_id TO {s}",
            "SET TIME ZONE {s}",
            "SET LOCAL TIME ZONE {s}",
            "SET application_name TO {s}",
            "SET standard_conforming_strings = {s}",
            "SET LOCAL standard_conforming_strings = {s}",
            "SET client_encoding = {s}",
            "SET backslash_quote = {s}",
            "SET SESSION AUTHORIZATION {s}",
            "SET ROLE {s}",
            "SET SCHEMA {s}",
            "SET NAMES {s}",
            "SET seed = {n}",
            "SET idle_session_timeout = {n}",
            "SET LOCAL work_mem = {s}",
            "SET TRANSACTION SNAPSHOT {s}",
            "SET {i} = {s}",
            "ALTER ROLE r SET search_path = {s}",
            "ALTER DATABASE d SET app.current_store_id = {s}",
            "ALTER SYSTEM SET work_mem = {s}",
            "ALTER ROLE r PASSWORD {s}",
            "CREATE ROLE r PASSWORD {s}",
            "RESET ALL",
            "SHOW search_path",
        ],
    ),
    (
        "utility",
        &[
            "COPY customers FROM STDIN WITH (FORMAT csv, DELIMITER {s})",
            "COPY customers TO STDOUT WITH (FORMAT {s})",
            "COPY customers FROM {s}",
            "COPY customers TO {s}",
            "COPY customers FROM PROGRAM {s}",
            "COPY customers (id, name) FROM STDIN WHERE id > {n}",
            "DO {s}",
            "DO LANGUAGE plpgsql {s}",
            "LOAD {s}",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS {s}",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = {s} RETURN {n}",
            "ALTER FUNCTION f() SET search_path = {s}",
            "PREPARE p AS SELECT * FROM customers WHERE id = {n}",
            "PREPARE rg_x AS SELECT {n}",
            "EXECUTE rg_1({n})",
            "DECLARE c CURSOR WITH HOLD FOR SELECT {n}",
            "FETCH {n} FROM c",
            "MOVE FORWARD {n} IN c",
            "NOTIFY ch, {s}",
            "LISTEN ch",
            "CREATE TABLE t (x int DEFAULT {n}, y text DEFAULT {s})",
            "CREATE TABLE pg_temp.t (x int DEFAULT {n})",
            "CREATE TEMP TABLE t AS SELECT {n}",
            "SELECT {s} AS name INTO TEMP x",
            "SELECT {s} AS name INTO pg_settings",
            "CREATE VIEW v AS SELECT {s} AS x",
            "CREATE VIEW v AS SELECT * FROM pg_settings WHERE name = {s}",
            "ALTER TABLE t ALTER COLUMN x SET DEFAULT {s}",
            "ALTER TABLE t SET (fillfactor = {n})",
            "CREATE INDEX i ON t (x) WHERE y = {n}",
            "CREATE INDEX CONCURRENTLY i ON t (x) WHERE y = {n}",
            "COMMENT ON TABLE t IS {s}",
            "COMMENT ON LARGE OBJECT {n} IS {s}",
            "GRANT SELECT ON LARGE OBJECT {n} TO r",
            "CREATE TYPE e AS ENUM ({s}, {s})",
            "ALTER TYPE e ADD VALUE {s}",
            "CREATE SEQUENCE s START {n}",
            "CREATE POLICY p ON t USING (store_id = {s})",
            "VACUUM (PARALLEL {n}) customers",
            "ANALYZE (BUFFER_USAGE_LIMIT {s}) customers",
            "REINDEX (CONCURRENTLY {b}) TABLE customers",
            "CREATE DATABASE d TEMPLATE {s}",
            "PREPARE TRANSACTION {s}",
            "COMMIT PREPARED {s}",
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "SAVEPOINT s",
            "ROLLBACK AND CHAIN",
            "TRUNCATE customers",
            "DEALLOCATE ALL",
            "DISCARD ALL",
            "SELECT {n}; SELECT {s}",
            "BEGIN; SELECT * FROM customers WHERE id = {n}; COMMIT",
        ],
    ),
];

/// Values written into the literals of a text (over its shape key).
fn any_literal(rng: &mut Rng) -> &'static str {
    let pool = if rng.chance(60) { STRINGS } else { NUMBERS };
    pool[rng.below(pool.len())]
}

/// `template` with its holes filled.
fn fill(rng: &mut Rng, template: &str) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let hole = &rest[at..];
        let (value, len) = match hole.get(..3) {
            Some("{s}") => (*rng.pick(STRINGS), 3),
            Some("{n}") => (*rng.pick(NUMBERS), 3),
            Some("{b}") => (*rng.pick(BOOLS), 3),
            Some("{i}") => (*rng.pick(IDENTS), 3),
            _ => ("{", 1),
        };
        out.push_str(value);
        rest = &hole[len..];
    }
    out.push_str(rest);
    out
}

/// Values as an application sends them: an integer where the template has `{n}`, a string
/// (names, dates, quotes) where it has `{s}`, the first identifier, plain booleans.
fn realistic_fill(rng: &mut Rng, template: &str) -> String {
    const NAMES: &[&str] = &[
        "'north'",
        "'south'",
        "'alice@example.com'",
        "'Bob O''Brien'",
        "'2024-05-01'",
        "'2024-05-01 10:00:00+02'",
        "'active'",
        "'%smith%'",
        "''",
        "'{1,2}'",
        "'Zoë'",
        "'1 day'",
    ];
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let hole = &rest[at..];
        let (value, len) = match hole.get(..3) {
            Some("{s}") => (rng.pick(NAMES).to_string(), 3),
            Some("{n}") => (rng.below(1_000_000).to_string(), 3),
            Some("{b}") => (rng.pick(&["true", "false"]).to_string(), 3),
            Some("{i}") => (IDENTS[0].to_string(), 3),
            _ => ("{".to_string(), 1),
        };
        out.push_str(&value);
        rest = &hole[len..];
    }
    out.push_str(rest);
    out
}

/// Whitespace and comments that change nothing for Postgres, around and inside a text (one of
/// eight spellings, the last three none).
fn decorate(spelling: usize, sql: &str) -> String {
    match spelling % 8 {
        0 => format!("/* it's \"here\" */ {sql}"),
        1 => format!("{sql} -- don't"),
        2 => format!("\n\t {sql}\r\n\x0c"),
        3 => sql.replacen(' ', "\t\r\n ", 2),
        4 => sql.replacen(' ', " /* ' */ ", 1),
        5 => sql.replacen(' ', " --'\n", 1),
        _ => sql.to_string(),
    }
}

/// The text with each `$n` of `key` replaced by a value.
fn write_in(key: &str, mut value: impl FnMut(usize) -> String) -> String {
    let mut out = String::with_capacity(key.len() + 32);
    let mut chars = key.char_indices().peekable();
    while let Some((_, ch)) = chars.next() {
        if ch == '$' {
            let mut n = 0usize;
            while let Some(&(_, d)) = chars.peek().filter(|(_, d)| d.is_ascii_digit()) {
                n = n * 10 + (d as usize - '0' as usize);
                chars.next();
            }
            out.push_str(&value(n));
        } else {
            out.push(ch);
        }
    }
    out
}

/// Other values in the literals of `sql` (the same value everywhere, and random values).
fn variants(rng: &mut Rng, sql: &str, how_many: usize) -> Vec<String> {
    let Some(key) = shape_key(sql) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(how_many);
    for k in 0..how_many {
        if k % 2 == 0 {
            let v = any_literal(rng).to_string();
            out.push(write_in(&key, |_| v.clone()));
        } else {
            out.push(write_in(&key, |_| any_literal(rng).to_string()));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

fn verdict_name(v: &Verdict) -> String {
    match v {
        Verdict::Allow => "Allow".into(),
        Verdict::Deny(d) => format!("Deny({}, {})", d.rule, d.sqlstate),
    }
}

/// Where the analysis through the caches differs from the full classification.
fn differences(fast: &Analysis, full: &Analysis) -> Vec<String> {
    let mut d = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            d.push(format!("{name}: {a} (fast) vs {b} (full)"));
        }
    };
    field(
        "verdict",
        verdict_name(&fast.verdict),
        verdict_name(&full.verdict),
    );
    field(
        "parsed",
        format!("{}", fast.parsed),
        format!("{}", full.parsed),
    );
    field(
        "statements",
        format!("{}", fast.statements.len()),
        format!("{}", full.statements.len()),
    );
    for (i, (a, b)) in fast.statements.iter().zip(&full.statements).enumerate() {
        field(
            &format!("statement {i} range"),
            format!("{}..{}", a.start, a.end),
            format!("{}..{}", b.start, b.end),
        );
        field(
            &format!("statement {i} tx"),
            format!("{:?}", a.tx),
            format!("{:?}", b.tx),
        );
        field(
            &format!("statement {i} no_tx_block"),
            format!("{}", a.no_tx_block),
            format!("{}", b.no_tx_block),
        );
        field(
            &format!("statement {i} block_sensitive"),
            format!("{}", a.block_sensitive),
            format!("{}", b.block_sensitive),
        );
        field(
            &format!("statement {i} setting"),
            format!("{:?}", a.setting),
            format!("{:?}", b.setting),
        );
        field(
            &format!("statement {i} deallocate"),
            format!("{:?}", a.deallocate),
            format!("{:?}", b.deallocate),
        );
    }
    field(
        "tx_effect",
        format!("{:?}", fast.tx_effect()),
        format!("{:?}", full.tx_effect()),
    );
    field(
        "session_state",
        format!("{:?}", fast.session_state),
        format!("{:?}", full.session_state),
    );
    field(
        "session_set",
        format!("{}", fast.session_set),
        format!("{}", full.session_set),
    );
    field(
        "untracked_set",
        format!("{}", fast.untracked_set),
        format!("{}", full.untracked_set),
    );
    field(
        "reset",
        format!("{:?}", fast.reset),
        format!("{:?}", full.reset),
    );
    field(
        "copy_from_stdin",
        format!("{}", fast.copy_from_stdin),
        format!("{}", full.copy_from_stdin),
    );
    if d.is_empty() && fast != full {
        d.push(format!("other: {fast:?} (fast) vs {full:?} (full)"));
    }
    d
}

struct Checker {
    guards: Vec<(&'static str, Guard)>,
    /// (family, route of the first answer) → texts, for the first guard
    routes: BTreeMap<(&'static str, &'static str), usize>,
    texts: BTreeMap<&'static str, usize>,
    shape_answers: usize,
    comparisons: usize,
    disagreements: Vec<String>,
}

impl Checker {
    fn new() -> Self {
        let permissive = GuardConfig {
            protected: vec![
                "app.*".into(),
                "statement_timeout".into(),
                "work_mem".into(),
            ],
            allow_do_blocks: true,
            allow_create_function: true,
            allow_large_objects: true,
            allow_notifications: true,
            ..GuardConfig::default()
        };
        let tiny = GuardConfig {
            verdict_cache_size: 12,
            verdict_cache_bytes: 16 << 10,
            ..GuardConfig::default()
        };
        Checker {
            guards: vec![
                ("default", Guard::new(&GuardConfig::default())),
                ("permissive", Guard::new(&permissive)),
                ("tiny-cache", Guard::new(&tiny)),
            ],
            routes: BTreeMap::new(),
            texts: BTreeMap::new(),
            shape_answers: 0,
            comparisons: 0,
            disagreements: Vec::new(),
        }
    }

    fn check(&mut self, family: &'static str, sql: &str) {
        *self.texts.entry(family).or_default() += 1;
        for (g, (name, guard)) in self.guards.iter().enumerate() {
            let full = guard.analyze_uncached(sql);
            for round in 0..2 {
                let (fast, route) = guard.analyze_routed(sql);
                self.comparisons += 1;
                if route == Route::Shape {
                    self.shape_answers += 1;
                }
                if g == 0 && round == 0 {
                    let route = match route {
                        Route::ExactText => "exact",
                        Route::Shape => "shape",
                        Route::Classified => "classified",
                    };
                    *self.routes.entry((family, route)).or_default() += 1;
                }
                let diff = differences(&fast, &full);
                if !diff.is_empty() {
                    let finding = matches!(
                        (&fast.verdict, &full.verdict),
                        (Verdict::Allow, Verdict::Deny(_))
                    );
                    self.disagreements.push(format!(
                        "{}[{name}, {route:?}, round {round}] {sql:?}\n    {}",
                        if finding {
                            "FINDING (fast allows, full denies) "
                        } else {
                            ""
                        },
                        diff.join("\n    ")
                    ));
                }
            }
        }
    }
}

#[test]
fn the_shape_path_agrees_with_full_classification() {
    let mut rng = Rng(0x5eed_d1ff);
    let mut c = Checker::new();

    // what the project's tests, benches and unit tests already send the guard, and other values
    // in them
    let mut from_sources = 0;
    for (_, src) in SOURCES {
        for text in rust_strings(src) {
            if text.trim().len() < 4 {
                continue;
            }
            from_sources += 1;
            c.check("sources", &text);
            for v in variants(&mut rng, &text, 4) {
                c.check("sources-mutated", &v);
            }
        }
    }

    for (family, templates) in TEMPLATES {
        for template in *templates {
            // as an application sends it: one spelling, fresh values of the same kind each time
            let spelling = rng.below(8);
            for _ in 0..30 {
                let text = decorate(spelling, &realistic_fill(&mut rng, template));
                c.check(family, &text);
                // with the final `;` psql and pgbench send, and with a second statement
                c.check("semicolon", &format!("{text};"));
                c.check("semicolon", &format!("{text} ;\n "));
                c.check("semicolon", &format!("{text}; {text}"));
            }
            // values the guard cares about, any spelling, and other values again
            for _ in 0..12 {
                let filled = fill(&mut rng, template);
                let text = decorate(rng.below(8), &filled);
                c.check("adversarial", &text);
                c.check("adversarial", &format!("{text};"));
                for v in variants(&mut rng, &text, 3) {
                    c.check("adversarial-mutated", &v);
                }
            }
        }
    }

    let total: usize = c.texts.values().sum();
    eprintln!(
        "{total} texts ({from_sources} from the project's sources), {} comparisons, {} answered by shape",
        c.comparisons, c.shape_answers
    );
    for ((family, route), n) in &c.routes {
        eprintln!("  {family:<18} {route:<11} {n}");
    }
    if !c.disagreements.is_empty() {
        let shown: Vec<&String> = c.disagreements.iter().take(40).collect();
        panic!(
            "{} disagreements between the shape path and full classification:\n{}",
            c.disagreements.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    // The comparison only proves something where the shape path answered.
    assert!(total >= 5000, "corpus too small: {total}");
    assert!(
        c.shape_answers >= 5000,
        "the shape path answered only {} times",
        c.shape_answers
    );
    for family in ["pgbench", "ordinary"] {
        let shaped = c.routes.get(&(family, "shape")).copied().unwrap_or(0);
        let all = c.texts[family];
        assert!(
            shaped * 10 >= all * 8,
            "{family}: only {shaped} of {all} texts answered by shape"
        );
    }
}

/// Many threads on one guard: the sharded caches give every thread the full answer.
#[test]
fn concurrent_clients_get_the_full_answer() {
    let guard = Guard::new(&GuardConfig::default());
    let mut rng = Rng(0x5eed_c0c0);
    let texts: Vec<String> = TEMPLATES
        .iter()
        .flat_map(|(_, templates)| templates.iter())
        .flat_map(|t| (0..4).map(|_| fill(&mut rng, t)).collect::<Vec<_>>())
        .collect();
    let expected: Vec<Analysis> = texts.iter().map(|t| guard.analyze_uncached(t)).collect();
    std::thread::scope(|s| {
        for k in 0..4 {
            let (guard, texts, expected) = (&guard, &texts, &expected);
            s.spawn(move || {
                let n = texts.len();
                for round in 0..3 {
                    // each thread from its own starting point
                    for j in 0..n {
                        let i = (j + k * n / 4) % n;
                        let got = guard.analyze(&texts[i]);
                        assert_eq!(
                            *got, expected[i],
                            "thread {k} round {round}: {:?}",
                            texts[i]
                        );
                    }
                }
            });
        }
    });
}
