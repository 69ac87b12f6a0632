//! The escape attempts of `tests/escapes.rs` and the denied statements of
//! `tests/guard_corpus.rs`, shared with `tests/hardened.rs`, which replays them with the guard
//! off against the database-side hardening.

use super::{admin_sql, demo_db};

/// Attacker.
pub const A: &str = "north";

/// Victim.
pub const B: &str = "south";

pub const DENIED: &[&str] = &["42501"];

pub const UNPARSABLE: &[&str] = &["42601"];

/// Text a newer grammar or a deeper stack might parse after all: then the guard must see what it
/// hides (42501); if it cannot parse it, it must refuse it (42601). Never allowed.
pub const UNPARSABLE_OR_DENIED: &[&str] = &["42601", "42501"];

#[derive(Clone)]
pub struct Case {
    pub sql: String,
    pub want: &'static [&'static str],
    /// simple Query (simple_query and batch_execute)
    pub simple: bool,
    /// extended protocol (prepare + query, and query_typed with the unnamed statement)
    pub extended: bool,
    /// also inside BEGIN … ROLLBACK: the denial must abort the block (25P02)
    pub tx: bool,
}

impl Case {
    pub fn deny(sql: impl Into<String>) -> Case {
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

    pub fn want(mut self, want: &'static [&'static str]) -> Case {
        self.want = want;
        self
    }

    /// One statement whose body contains `;`.
    pub fn single(mut self) -> Case {
        self.extended = true;
        self
    }

    /// Contains transaction control itself.
    pub fn no_tx(mut self) -> Case {
        self.tx = false;
        self
    }

    pub fn extended_only(mut self) -> Case {
        self.simple = false;
        self.extended = true;
        self
    }
}

/// One step of an attacker's sequence: allowed or denied, it must not reach the victims.
pub struct Step {
    pub sql: String,
    pub extended: bool,
}

pub fn simple(sql: impl Into<String>) -> Step {
    Step {
        sql: sql.into(),
        extended: false,
    }
}

pub fn ext(sql: impl Into<String>) -> Step {
    Step {
        sql: sql.into(),
        extended: true,
    }
}

pub fn chain(n: usize) -> String {
    vec!["1"; n].join("+")
}

pub fn nested_abs(depth: usize) -> String {
    format!("{}1{}", "abs(".repeat(depth), ")".repeat(depth))
}

/// `set_config('app.current_store_id', …)` with no protected word and no `set_config` in the text.
pub const HIDDEN_SET_CONFIG: &str =
    r#"U&"set\005fconfig"(U&'\0061pp.current_store_id', 'south', true)"#;

pub const HIDDEN_SETTING: &str = r#"U&'\0061pp.current_store_id'"#;

pub fn class1_deny() -> Vec<Case> {
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

pub const EVIL_SQL: &str = "select set_config(''app.current_store_id'', ''south'', true)";

pub fn class2_deny() -> Vec<Case> {
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

pub fn class3_deny() -> Vec<Case> {
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

pub fn class4_deny() -> Vec<Case> {
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

pub const CUSTOMERS_COLS: &str = "(customer_id bigint, store_id text, name text, email text)";

pub fn class5_temp_objects() -> Vec<Vec<Step>> {
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

pub fn class5_settings() -> Vec<Vec<Step>> {
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

pub fn class5_seed_deny() -> Vec<Case> {
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

pub fn class6_deny() -> Vec<Case> {
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

/// `p` (the pool size) is part of every value written, so the two class-8 tests (which share
/// the cluster-wide role) never see each other's leftovers.
pub fn class8_deny(db: &str, p: usize) -> Vec<Case> {
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

pub fn class9_deny() -> Vec<Case> {
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

pub const LO_SECRET: u32 = 910_001;

pub const LO_OTHER: u32 = 910_002;

pub fn class10_deny() -> Vec<Case> {
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

pub fn extra_deny() -> Vec<Case> {
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
pub fn extra_effects() -> Vec<Vec<Step>> {
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

/// (expected SQLSTATE, statement)
pub const GUARD_CORPUS_DENY: &[(&str, &str)] = &[
    ("42501", "SET app.current_store_id = 'south'"),
    ("42501", "SET SESSION app.current_store_id = 'south'"),
    ("42501", "SET LOCAL app.current_store_id = 'south'"),
    ("42501", "SET app.current_store_id TO DEFAULT"),
    ("42501", "SET app.current_store_id FROM CURRENT"),
    ("42501", "RESET app.current_store_id"),
    ("42501", "set app.CURRENT_STORE_ID = 'south'"),
    ("42501", "SET \"app\".\"current_store_id\" = 'south'"),
    ("42501", "SET \"APP\".\"CURRENT_STORE_ID\" = 'south'"),
    ("42501", "SET \"app.current_store_id\" = 'south'"),
    ("42501", "SET U&\"\\0061pp\".current_store_id = 'south'"),
    ("42501", "SET /* c */ app . current_store_id = 'south'"),
    ("42501", "SET\n\tapp.current_store_id\n=\n'south'"),
    (
        "42501",
        "/* leading */ SET app.current_store_id='south' -- trailing",
    ),
    ("42501", "SET app.current_store_id = south"),
    ("42501", "SET app.current_store_id TO 'south'"),
    ("42501", "SET SESSION app.current_store_id TO 'south'"),
    ("42501", "SET app.user_id = 'someone-else'"),
    ("42501", "SET app.brand_new_setting = 'x'"),
    (
        "42501",
        "SELECT set_config('app.current_store_id', 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "SELECT pg_catalog.set_config('app.current_store_id', 'south', false)",
    ),
    (
        "42501",
        "SELECT \"set_config\"('app.current_store_id', 'south', false)",
    ),
    (
        "42501",
        "SELECT PG_CATALOG.SET_CONFIG('app.current_store_id', 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config('APP.CURRENT_STORE_ID', 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config(' app.current_store_id', 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config('app.' || 'current_store_id', 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config($$app.current_store_id$$, 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config($x$app.current_store_id$x$, 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config(E'app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "SELECT set_config(U&'app.current\\005fstore_id', 'south', true)",
    ),
    (
        "42501",
        "SELECT set_config('app.current_store_id'::text, 'south', true)",
    ),
    (
        "42501",
        "SELECT set_config('app.current_store_id' COLLATE \"C\", 'south', true)",
    ),
    (
        "42501",
        "SELECT set_config(format('%s.current_store_id', 'app'), 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config(lower('APP.CURRENT_STORE_ID'), 'south', false)",
    ),
    ("42501", "SELECT set_config(NULL, 'south', true)"),
    (
        "42501",
        "SELECT set_config(name, 'south', false) FROM (VALUES ('app.current_store_id')) v(name)",
    ),
    (
        "42501",
        "SELECT set_config(current_setting('app.current_store_id'), 'x', true)",
    ),
    (
        "42501",
        "SELECT count(*) FROM customers WHERE set_config('app.current_store_id', 'south', true) IS NOT NULL",
    ),
    (
        "42501",
        "WITH x AS (SELECT set_config('app.current_store_id', 'south', true)) SELECT * FROM x",
    ),
    (
        "42501",
        "WITH x AS MATERIALIZED (SELECT 1) SELECT set_config('app.current_store_id', 'south', true) FROM x",
    ),
    (
        "42501",
        "EXPLAIN ANALYZE SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "EXPLAIN (ANALYZE, BUFFERS) SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "CREATE TABLE evil AS SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "SELECT * FROM set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "SELECT (SELECT set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "SELECT 1 WHERE EXISTS (SELECT set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "VALUES (set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "SELECT array_agg(set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "SELECT CASE WHEN true THEN set_config('app.current_store_id', 'south', true) END",
    ),
    (
        "42501",
        "SELECT coalesce(NULL, set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "SELECT xmlelement(name x, set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "SELECT row_to_json(t) FROM (SELECT set_config('app.current_store_id', 'south', true)) t",
    ),
    (
        "42501",
        "UPDATE customers SET name = name WHERE set_config('app.current_store_id', 'south', true) <> ''",
    ),
    (
        "42501",
        "INSERT INTO customers (store_id, name) SELECT 'north', set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "DELETE FROM customers WHERE set_config('app.current_store_id', 'south', true) = 'x'",
    ),
    (
        "42501",
        "COPY (SELECT set_config('app.current_store_id', 'south', true)) TO STDOUT",
    ),
    (
        "42501",
        "PREPARE p AS SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "PREPARE p2(text) AS SELECT set_config($1, 'south', true)",
    ),
    (
        "42501",
        "DECLARE c CURSOR FOR SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "SELECT query_to_xml('select set_config(''app.current_store_id'',''south'',true)', true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xml($q$select set_config('app.current_store_id','south',true)$q$, true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xml('select ' || 'set_config(''app.current_store_id'',''south'',true)', true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xml(repeat('x', 1), true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xmlschema('select set_config(''app.current_store_id'',''south'',true)', true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xml_and_xmlschema('select set_config(''app.current_store_id'',''south'',true)', true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xml('select query_to_xml(''select set_config(''''app.current_store_id'''',''''south'''',true)'', true, true, '''')', true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xml('DO $$ BEGIN PERFORM 1; END $$', true, true, '')",
    ),
    (
        "42501",
        "SELECT ts_stat('select set_config(''app.current_store_id'',''south'',true)::tsvector')",
    ),
    (
        "42501",
        "SELECT table_to_xml(('cust' || 'omers')::regclass, true, true, '')",
    ),
    (
        "42501",
        "SELECT cursor_to_xml(c::refcursor, 1, true, true, '') FROM (VALUES ('c')) v(c)",
    ),
    (
        "42501",
        "SELECT dblink('dbname=postgres', 'select set_config(''app.current_store_id'',''south'',false)')",
    ),
    ("42501", "SELECT dblink_exec('dbname=postgres', 'select 1')"),
    (
        "42501",
        "DO $$ BEGIN PERFORM set_config('app.current_store_id', 'south', true); END $$",
    ),
    ("42501", "DO $$ BEGIN NULL; END $$"),
    (
        "42501",
        "DO LANGUAGE plpgsql $$ BEGIN EXECUTE 'SET app.current_store_id = ''south'''; END $$",
    ),
    (
        "42501",
        "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql AS $$ SELECT set_config('app.current_store_id', 'south', true) $$",
    ),
    (
        "42501",
        "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'",
    ),
    ("42501", "CREATE PROCEDURE p() LANGUAGE sql AS 'select 1'"),
    (
        "42501",
        "CREATE FUNCTION g() RETURNS int LANGUAGE sql SET app.current_store_id = 'south' AS 'select 1'",
    ),
    ("42501", "SET ROLE postgres"),
    ("42501", "SET ROLE NONE"),
    ("42501", "RESET ROLE"),
    ("42501", "SET LOCAL ROLE rlsgate_owner"),
    ("42501", "SET \"role\" = 'rlsgate_owner'"),
    ("42501", "SET SESSION AUTHORIZATION postgres"),
    ("42501", "SET SESSION AUTHORIZATION DEFAULT"),
    ("42501", "RESET SESSION AUTHORIZATION"),
    ("42501", "SET session_authorization = 'postgres'"),
    ("42501", "SELECT set_config('role', 'rlsgate_owner', false)"),
    (
        "42501",
        "SELECT set_config('session_authorization', 'postgres', false)",
    ),
    (
        "42501",
        "ALTER ROLE rlsgate_app SET app.current_store_id = 'south'",
    ),
    ("42501", "ALTER ROLE ALL SET app.current_store_id = 'south'"),
    (
        "42501",
        "ALTER ROLE rlsgate_app IN DATABASE postgres SET app.current_store_id = 'south'",
    ),
    (
        "42501",
        "ALTER DATABASE postgres SET app.current_store_id = 'south'",
    ),
    (
        "42501",
        "ALTER DATABASE postgres RESET app.current_store_id",
    ),
    ("42501", "ALTER SYSTEM SET app.current_store_id = 'south'"),
    ("42501", "LOAD 'plpgsql'"),
    ("42501", "SET standard_conforming_strings = off"),
    ("42501", "SET backslash_quote = on"),
    ("42501", "SET client_encoding = 'SJIS'"),
    (
        "42501",
        "SELECT set_config('standard_conforming_strings', 'off', false)",
    ),
    (
        "42501",
        "CREATE VIEW v AS SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "CREATE TABLE t (x text DEFAULT set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "CREATE RULE r AS ON INSERT TO customers DO ALSO SELECT set_config('app.current_store_id', 'south', true)",
    ),
    ("42501", "SELECT 1; SET app.current_store_id = 'south'"),
    (
        "42501",
        "SET app.current_store_id = 'south'; SELECT count(*) FROM customers",
    ),
    (
        "42501",
        "BEGIN; SET LOCAL app.current_store_id = 'south'; SELECT count(*) FROM customers; COMMIT",
    ),
    (
        "42501",
        "SELECT 1; COMMIT; SELECT set_config('app.current_store_id', 'south', false)",
    ),
    ("42501", "SELECT 1; RESET ALL"),
    ("42501", "DISCARD ALL; SELECT 1"),
    (
        "42501",
        "SELECT set_config('app.current_store_id', 'south', false) SELECT",
    ),
    // notification channels are shared by every tenant of the database
    ("42501", "LISTEN channel_a"),
    ("42501", "listen \"Channel A\""),
    ("42501", "NOTIFY channel_a"),
    ("42501", "NOTIFY channel_a, 'north was here'"),
    ("42501", "SELECT pg_notify('channel_a', 'x')"),
    (
        "42501",
        "SELECT pg_catalog.pg_notify('channel_a', current_setting('app.current_store_id'))",
    ),
    ("42501", "SELECT * FROM pg_notify('channel_a', 'x')"),
    ("42501", "SELECT \"PG_NOTIFY\"('channel_a', 'x')"),
    (
        "42501",
        "WITH n AS (SELECT pg_notify('channel_a', name) FROM customers) SELECT count(*) FROM n",
    ),
    (
        "42501",
        "SELECT count(*) FROM customers WHERE pg_notify('channel_a', name) IS NULL",
    ),
    (
        "42501",
        "EXPLAIN ANALYZE SELECT pg_notify('channel_a', 'x')",
    ),
    ("42501", "PREPARE pn AS SELECT pg_notify('channel_a', $1)"),
    (
        "42501",
        "CREATE RULE r AS ON INSERT TO customers DO ALSO NOTIFY channel_a",
    ),
    (
        "42501",
        "CREATE VIEW vn AS SELECT pg_notify('channel_a', 'x')",
    ),
    (
        "42501",
        "SELECT query_to_xml('select pg_notify(''channel_a'', ''x'')', true, true, '')",
    ),
    ("0A000", "CREATE TEMP TABLE scratch (x int)"),
    ("0A000", "CREATE TEMPORARY VIEW tv AS SELECT 1"),
    ("0A000", "DECLARE hc CURSOR WITH HOLD FOR SELECT 1"),
    ("0A000", "PREPARE q AS SELECT 1"),
    ("0A000", "SELECT pg_advisory_lock(42)"),
    ("0A000", "SELECT pg_try_advisory_lock_shared(42)"),
];

/// A fresh demo database where only the guard stands in the way.
pub fn escape_db() -> String {
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
