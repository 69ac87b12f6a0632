-- rlsgate hardened ("signed") mode: the database itself refuses a forged tenant context.
--
-- Install as a superuser, once per database (idempotent):
--     psql -v app_role=rlsgate_app -f sql/hardened.sql "dbname=app"
-- `app_role` is the role rlsgate's pool logs in as (default rlsgate_app). Then install
-- rlsgate's signing key as the owner role or a superuser (see install_key below), set
-- `[context] mode = "signed"` and write policies as
--     USING (store_id = (SELECT rlsgate.tenant()))
-- (evaluated once per statement; `store_id = rlsgate.tenant()` works too and can use an index,
-- but is called again for every row a filter looks at).
--
-- How it works:
-- * The seal: a sequence whose session-local `currval` only rlsgate.enter (SECURITY DEFINER,
--   owned by rlsgate_owner) can set. The application role may read it (currval), never set it.
--   It survives ROLLBACK; DISCARD SEQUENCES / DISCARD ALL clear it (then every policy raises
--   until rlsgate seals the connection again).
-- * rlsgate.enter(tenant, expires, nonce, key_id, mac) is what rlsgate runs (with bind
--   parameters, in a transaction of its own) when a server connection starts serving another
--   tenant. It first invalidates the seal, then verifies HMAC-SHA256(key, tenant, this
--   backend's pid, expiry, nonce) with a key the application role cannot read, the expiry,
--   and that the nonce is above every nonce this backend pid accepted before; only then it seals
--   the connection for the tenant (56 bits of sha256(tenant)).
-- * rlsgate.tenant() returns current_setting('app.current_store_id') when the seal matches
--   it (56 bits of sha256 of the setting against the seal), and raises 42501 otherwise. A client
--   that forges the setting (should it ever get past rlsgate's statement guard) gets an error,
--   never another tenant's rows.
--
-- The tenant setting's name is fixed here as app.current_store_id; if your [context] maps the
-- tenant to another setting, replace it in rlsgate.tenant() below.
--
-- Requirements and limits: PostgreSQL 15 or later (unlogged sequences); a primary (enter
-- writes the backend's nonce to an unlogged table); no pgcrypto needed (HMAC is built from the
-- builtin sha256).

\set ON_ERROR_STOP on
\if :{?app_role}
\else
\set app_role rlsgate_app
\endif

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rlsgate_owner') THEN
        BEGIN
            CREATE ROLE rlsgate_owner NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$;

BEGIN;

CREATE SCHEMA IF NOT EXISTS rlsgate AUTHORIZATION rlsgate_owner;
REVOKE ALL ON SCHEMA rlsgate FROM PUBLIC;
GRANT USAGE ON SCHEMA rlsgate TO :"app_role";

-- The signing keys (current and previous during a rotation), stored as HMAC pads:
-- ikey = key XOR 0x36.., okey = key XOR 0x5c.. (RFC 2104). Nobody but the owner reads them.
CREATE TABLE IF NOT EXISTS rlsgate.keys (
    id    text PRIMARY KEY,
    ikey  bytea NOT NULL,
    okey  bytea NOT NULL,
    added timestamptz NOT NULL DEFAULT pg_catalog.now()
);
ALTER TABLE rlsgate.keys OWNER TO rlsgate_owner;
REVOKE ALL ON rlsgate.keys FROM PUBLIC;

-- The highest nonce accepted per backend pid. rlsgate's nonces are microseconds of its clock
-- (plus a counter): a backend that reuses a pid starts above what its predecessor accepted.
CREATE UNLOGGED TABLE IF NOT EXISTS rlsgate.backend_nonce (
    pid   integer PRIMARY KEY,
    nonce bigint NOT NULL
);
ALTER TABLE rlsgate.backend_nonce OWNER TO rlsgate_owner;
REVOKE ALL ON rlsgate.backend_nonce FROM PUBLIC;

-- The seal: -1 = invalid (never equal to a tenant's 56-bit hash).
CREATE UNLOGGED SEQUENCE IF NOT EXISTS rlsgate.seal MINVALUE -1 START WITH -1;
ALTER SEQUENCE rlsgate.seal OWNER TO rlsgate_owner;
REVOKE ALL ON SEQUENCE rlsgate.seal FROM PUBLIC;
-- currval only: SELECT allows currval and reading last_value, never setval or nextval.
GRANT SELECT ON SEQUENCE rlsgate.seal TO :"app_role";

-- The key id rlsgate computes too: "k" and the first 16 hex digits of sha256(key).
CREATE OR REPLACE FUNCTION rlsgate.key_id(p_key text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 'k' || substr(encode(sha256(convert_to(p_key, 'UTF8')), 'hex'), 1, 16) $$;
ALTER FUNCTION rlsgate.key_id(text) OWNER TO rlsgate_owner;

-- Install a signing key (run as rlsgate_owner or a superuser, never granted to the
-- application role): SELECT rlsgate.install_key(:'key') with psql -v key="$RLSGATE_SIGNING_KEY".
CREATE OR REPLACE FUNCTION rlsgate.install_key(p_key text) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k  bytea := convert_to(p_key, 'UTF8');
    i  bytea;
    o  bytea;
    id text := rlsgate.key_id(p_key);
BEGIN
    IF length(k) < 32 THEN
        RAISE EXCEPTION 'rlsgate: a signing key must be at least 32 bytes long'
            USING ERRCODE = '22023';
    END IF;
    IF length(k) > 64 THEN
        k := sha256(k);
    END IF;
    k := k || decode(repeat('00', 64 - length(k)), 'hex');
    i := k;
    o := k;
    FOR n IN 0..63 LOOP
        i := set_byte(i, n, get_byte(k, n) # 54);
        o := set_byte(o, n, get_byte(k, n) # 92);
    END LOOP;
    INSERT INTO rlsgate.keys (id, ikey, okey) VALUES (id, i, o)
        ON CONFLICT ON CONSTRAINT keys_pkey DO NOTHING;
    RETURN id;
END
$$;
ALTER FUNCTION rlsgate.install_key(text) OWNER TO rlsgate_owner;
REVOKE ALL ON FUNCTION rlsgate.install_key(text) FROM PUBLIC;

-- Remove a key after a rotation: SELECT rlsgate.remove_key('k0123456789abcdef').
CREATE OR REPLACE FUNCTION rlsgate.remove_key(p_id text) RETURNS boolean
LANGUAGE sql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$ WITH gone AS (DELETE FROM rlsgate.keys WHERE id = p_id RETURNING 1)
      SELECT EXISTS (SELECT FROM gone) $$;
ALTER FUNCTION rlsgate.remove_key(text) OWNER TO rlsgate_owner;
REVOKE ALL ON FUNCTION rlsgate.remove_key(text) FROM PUBLIC;

-- Whether a key id is installed (rlsgate asks at start; reveals nothing about the key).
CREATE OR REPLACE FUNCTION rlsgate.key_installed(p_id text) RETURNS boolean
LANGUAGE sql STABLE STRICT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT EXISTS (SELECT FROM rlsgate.keys WHERE id = p_id) $$;
ALTER FUNCTION rlsgate.key_installed(text) OWNER TO rlsgate_owner;
REVOKE ALL ON FUNCTION rlsgate.key_installed(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rlsgate.key_installed(text) TO :"app_role";

-- Seal this backend for a tenant. Every failure leaves the seal invalid.
CREATE OR REPLACE FUNCTION rlsgate.enter(
    p_tenant text, p_expires bigint, p_nonce bigint, p_key text, p_mac bytea)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now  bigint;
    v_ikey bytea;
    v_okey bytea;
    v_mac  bytea;
    v_pid  integer := pg_backend_pid();
BEGIN
    -- First of all: from here until the end, a failure leaves no usable seal (setval is not
    -- undone by the error that may follow).
    PERFORM setval('rlsgate.seal', -1, true);
    IF p_tenant IS NULL OR p_expires IS NULL OR p_nonce IS NULL OR p_key IS NULL OR p_mac IS NULL THEN
        RAISE EXCEPTION 'rlsgate: incomplete tenant seal' USING ERRCODE = '42501';
    END IF;
    v_now := extract(epoch FROM clock_timestamp())::bigint;
    IF p_expires < v_now THEN
        RAISE EXCEPTION 'rlsgate: the tenant seal expired % s ago (clock skew between rlsgate and the database?)',
            v_now - p_expires USING ERRCODE = '42501';
    END IF;
    IF p_expires > v_now + 600 THEN
        RAISE EXCEPTION 'rlsgate: the tenant seal expires too far in the future (clock skew between rlsgate and the database?)'
            USING ERRCODE = '42501';
    END IF;
    SELECT k.ikey, k.okey INTO v_ikey, v_okey FROM rlsgate.keys k WHERE k.id = p_key;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'rlsgate: signing key % is not installed in this database', p_key
            USING ERRCODE = '42501',
                  HINT = 'install it with rlsgate.install_key (see sql/hardened.sql)';
    END IF;
    v_mac := sha256(v_okey || sha256(v_ikey || convert_to(
        'rlsgate-seal-v1:' || p_tenant || ':' || v_pid || ':' || p_expires || ':' || p_nonce,
        'UTF8')));
    -- (compared as hashes: how long the comparison takes says nothing about the MAC)
    IF sha256(v_mac) <> sha256(p_mac) THEN
        RAISE EXCEPTION 'rlsgate: the tenant seal does not verify' USING ERRCODE = '42501';
    END IF;
    INSERT INTO rlsgate.backend_nonce AS b (pid, nonce) VALUES (v_pid, p_nonce)
        ON CONFLICT (pid) DO UPDATE SET nonce = excluded.nonce
        WHERE b.nonce < excluded.nonce;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'rlsgate: the tenant seal was used before (replay)' USING ERRCODE = '42501';
    END IF;
    PERFORM setval('rlsgate.seal',
        ('x' || substr(encode(sha256(convert_to(p_tenant, 'UTF8')), 'hex'), 1, 14))::bit(56)::bigint,
        true);
END
$$;
ALTER FUNCTION rlsgate.enter(text, bigint, bigint, text, bytea) OWNER TO rlsgate_owner;
REVOKE ALL ON FUNCTION rlsgate.enter(text, bigint, bigint, text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rlsgate.enter(text, bigint, bigint, text, bytea) TO :"app_role";

-- The tenant, for policies: the tenant setting when the seal matches it; 42501 otherwise.
-- PL/pgSQL, not SQL: PostgreSQL would inline a SQL function, parsing its body again every time
-- a query is planned (about 40 us per statement with unnamed statements); a PL/pgSQL body is
-- compiled once per session. Not SECURITY DEFINER and no SET clause (both cost every call):
-- every name and operator is schema-qualified instead, because the body is compiled with the
-- search_path of the session's first call. STABLE: as `store_id = rlsgate.tenant()` it can
-- drive an index scan, as `(SELECT rlsgate.tenant())` it runs once per statement.
CREATE OR REPLACE FUNCTION rlsgate.tenant() RETURNS text
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF pg_catalog.int8send(pg_catalog.currval('rlsgate.seal'::pg_catalog.regclass))
       OPERATOR(pg_catalog.=)
       ('\x00'::pg_catalog.bytea OPERATOR(pg_catalog.||) pg_catalog.substr(pg_catalog.sha256(
           pg_catalog.convert_to(pg_catalog.current_setting('app.current_store_id', true), 'UTF8')), 1, 7))
    THEN
        RETURN pg_catalog.current_setting('app.current_store_id', true);
    END IF;
    RAISE EXCEPTION 'rlsgate: the tenant context of this connection is not sealed by rlsgate'
        USING ERRCODE = '42501';
END
$$;
ALTER FUNCTION rlsgate.tenant() OWNER TO rlsgate_owner;
REVOKE ALL ON FUNCTION rlsgate.tenant() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rlsgate.tenant() TO :"app_role";


COMMIT;
