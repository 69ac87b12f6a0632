//! Fail-closed property of the guard, without a database: random and mutated SQL — long and
//! deeply nested expressions, unicode escapes, odd string syntaxes, byte-level damage — is
//! either parsed and classified or denied; it is never allowed unparsed. Semantics-preserving
//! mutations of known escapes (case, whitespace, comments, quoting, unicode escapes, wrapping in
//! CTEs/subqueries/EXPLAIN/PREPARE) are always denied.
//!
//! Deterministic: a fixed-seed generator, so a failure names a reproducible text.

use rlsgate::config::GuardConfig;
use rlsgate::guard::{Analysis, Guard, Verdict};

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn guard() -> Guard {
    Guard::new(&GuardConfig::default())
}

/// The property every text must satisfy; returns the analysis for further checks.
fn assert_fail_closed(g: &Guard, sql: &str) -> Analysis {
    let a = g.analyze_uncached(sql);
    let parses = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).is_ok();
    if !a.parsed || !parses {
        match &a.verdict {
            Verdict::Deny(d) => assert!(
                d.sqlstate == "42601" || d.sqlstate == "42501",
                "unparsable text denied with {}: {sql:?}",
                d.sqlstate
            ),
            Verdict::Allow => panic!("unparsable text allowed: {sql:?}"),
        }
    }
    a
}

/// Escapes, each one statement that must be denied whatever its spelling.
const ATTACKS: &[&str] = &[
    "SELECT set_config('app.current_store_id', 'south', false)",
    "SET app.current_store_id = 'south'",
    "RESET app.current_store_id",
    "SET ROLE postgres",
    "SELECT query_to_xml('select set_config(''app.current_store_id'',''south'',true)', true, false, '')",
    "UPDATE pg_settings SET setting = 'south' WHERE name = 'app.current_store_id'",
    "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
    "CREATE AGGREGATE pg_temp.agg(text, boolean) (sfunc = set_config, stype = text, initcond = 'app.current_store_id')",
    "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql AS 'select 1'",
    "DO 'begin null; end'",
    "ALTER ROLE CURRENT_USER SET app.current_store_id = 'south'",
    "ALTER DATABASE shop SET search_path = evil",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
    "SELECT query FROM pg_stat_activity",
    "SELECT lo_import('/etc/passwd')",
    "SELECT * FROM pg_largeobject",
    "SELECT setseed(0.5)",
    "SELECT * FROM pg_prepared_statements",
    "DEALLOCATE rg_0123456789abcdef",
    "TRUNCATE customers",
    "SELECT ts_rewrite('a'::tsquery, 'select set_config(''app.current_store_id'',''x'',true)::tsquery, ''b''::tsquery')",
    "SELECT * FROM crosstab('select set_config(''app.current_store_id'',''x'',true), 1, 2') AS t(a text, b text)",
    "SET standard_conforming_strings = off",
    "SET client_encoding = 'SJIS'",
    "SELECT convert_from((16582::oid).lo_get, 'UTF8')",
    "SELECT (9355).pg_terminate_backend",
    "SELECT ('select 1'::text).ts_stat",
    "UPDATE pg_settings SET setting = 'off' FROM (SELECT 'work_mem'::text AS name) x WHERE x.name = 'work_mem' AND pg_settings.name = 'standard_conforming_strings'",
    "SET seed = 0.5",
];

/// Rewrites that keep a statement's meaning.
fn mutate(rng: &mut Rng, sql: &str) -> String {
    let mut out = sql.to_string();
    for _ in 0..1 + rng.below(3) {
        out = match rng.below(7) {
            // random case of every ASCII letter outside quotes
            0 => {
                let mut quoted = false;
                out.chars()
                    .map(|c| {
                        if c == '\'' {
                            quoted = !quoted;
                        }
                        if !quoted && c.is_ascii_alphabetic() && rng.chance(50) {
                            if c.is_ascii_lowercase() {
                                c.to_ascii_uppercase()
                            } else {
                                c.to_ascii_lowercase()
                            }
                        } else {
                            c
                        }
                    })
                    .collect()
            }
            // whitespace and comments between tokens
            1 => out
                .split(' ')
                .map(str::to_string)
                .collect::<Vec<_>>()
                .join(*rng.pick(&[
                    " /* x */ ",
                    "\n\t",
                    "--c\n",
                    "  ",
                    " /* a /* nested */ b */ ",
                ])),
            2 => format!("/* lead */ {out} -- trail"),
            // the statement behind other statements
            3 => format!("SELECT 1; {out}"),
            4 => format!("{out}; SELECT 1"),
            5 => {
                if out.trim_start().to_ascii_uppercase().starts_with("SELECT") {
                    match rng.below(4) {
                        0 => format!("WITH x AS ({out}) SELECT * FROM x"),
                        1 => format!("SELECT * FROM ({out}) s"),
                        2 => format!("EXPLAIN ANALYZE {out}"),
                        _ => format!("PREPARE p{} AS {out}", rng.below(1000)),
                    }
                } else {
                    out
                }
            }
            // unicode-escaped identifiers
            _ => out
                .replace("set_config", "U&\"set\\005fconfig\"")
                .replace("pg_settings", "U&\"pg\\005fsettings\""),
        };
    }
    out
}

#[test]
fn every_spelling_of_every_escape_is_denied() {
    let g = guard();
    let mut rng = Rng(0x5eed_0001);
    for attack in ATTACKS {
        let a = assert_fail_closed(&g, attack);
        assert!(a.is_denied(), "seed attack allowed: {attack:?}");
        for _ in 0..200 {
            let m = mutate(&mut rng, attack);
            let a = assert_fail_closed(&g, &m);
            assert!(a.is_denied(), "mutated attack allowed: {m:?}");
        }
    }
}

/// Byte-level damage of attacks and ordinary statements: whatever parses is classified, the
/// rest is denied.
#[test]
fn damaged_text_is_parsed_or_denied() {
    let g = guard();
    let mut rng = Rng(0x5eed_0002);
    let ordinary = [
        "SELECT id, name FROM customers WHERE store_id = 'north' AND note <> 'approved'",
        "INSERT INTO customers (name) VALUES ('x') RETURNING id",
        "SELECT E'a\\'b', $$x$$, $t$y$t$, U&'\\0041', B'101', X'ff', 'it''s'",
        "SELECT 1::int + 2.5e3 - .5 FROM generate_series(1, 3)",
    ];
    let pieces: Vec<&str> = ATTACKS.iter().chain(ordinary.iter()).copied().collect();
    let junk = [
        "'", "\"", "$$", "/*", "*/", "--", "\\", ";", "(", ")", "U&\"", "E'", "\0x", "é", "$1",
        "::",
    ];
    for _ in 0..3000 {
        let mut s: Vec<char> = rng.pick(&pieces).chars().collect();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(s.len() + 1);
            match rng.below(3) {
                0 if at < s.len() => {
                    s.remove(at);
                }
                1 => {
                    for (i, c) in rng.pick(&junk).chars().enumerate() {
                        s.insert(at + i, c);
                    }
                }
                _ => {
                    let n = rng.below(6).min(s.len() - at.min(s.len()));
                    s.drain(at..at + n);
                }
            }
        }
        let text: String = s.into_iter().filter(|c| *c != '\0').collect();
        assert_fail_closed(&g, &text);
    }
}

#[test]
fn long_and_deep_text_is_parsed_or_denied() {
    let g = guard();
    // a long chain of + terms: too deep for the parser's tree decoding → denied, never allowed
    for n in [10, 100, 500, 5000, 50_000, 400_000] {
        let sql = format!("SELECT {}", vec!["1"; n].join("+"));
        assert_fail_closed(&g, &sql);
        let sql = format!(
            "SELECT set_config(U&\"\\0061pp\".x, 'y', false) + {}",
            vec!["1"; n].join("+")
        );
        assert!(assert_fail_closed(&g, &sql).is_denied());
    }
    for depth in [10, 200, 2000] {
        let sql = format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth));
        assert_fail_closed(&g, &sql);
        let sql = format!(
            "SELECT {}set_config('app.current_store_id', 'x', false){}",
            "(".repeat(depth),
            ")".repeat(depth)
        );
        assert!(
            assert_fail_closed(&g, &sql).is_denied(),
            "nested set_config {depth}"
        );
        let sql = format!(
            "SELECT * FROM {}SELECT 1{}",
            "(".repeat(depth),
            ") s".repeat(depth)
        );
        assert_fail_closed(&g, &sql);
    }
}

#[test]
fn a_long_legitimate_expression_is_allowed_whatever_words_it_holds() {
    let g = guard();
    let terms: Vec<String> = (0..60)
        .map(|i| format!("(CASE WHEN status = 'approved' THEN {i} ELSE 0 END)"))
        .collect();
    let sql = format!(
        "SELECT {} AS total, 'reset role discard set_config' AS words FROM customers",
        terms.join(" + ")
    );
    let a = assert_fail_closed(&g, &sql);
    assert!(a.parsed, "{sql}");
    assert!(!a.is_denied(), "{:?}", a.verdict);
}
