-- rlsgate audit sink: the table the proxy's audit writer (src/audit.rs) inserts events into.
--
-- Run as a superuser (or a role with CREATEROLE that owns the database) in the database named by
-- `[audit] sink`. It may be the application database or, better, a separate one. Idempotent:
-- running it again changes nothing.
--
-- Who writes: a dedicated login role, rlsgate_audit_writer, with USAGE on the schema and INSERT
-- on the table, nothing else: no SELECT, UPDATE, DELETE or TRUNCATE, so a compromised proxy can
-- add events but can neither read the history nor rewrite or erase it. Give it a password after
-- running this file (kept out of here on purpose):
--     ALTER ROLE rlsgate_audit_writer PASSWORD '…';
-- and point the sink at it:
--     [audit] sink = "host=… dbname=… user=rlsgate_audit_writer password=${RLSGATE_AUDIT_PASSWORD}"
--
-- Who reads: security staff, through their own roles (GRANT SELECT ON rlsgate_audit.events TO …).
-- Retention (DELETE of old rows) is a job for an administrator, not for the writer.
--
-- Not reachable through the proxy: the tenant role rlsgate's pool logs in as (rlsgate_app in
-- sql/demo.sql) gets no privilege on the schema or the table, and PUBLIC's defaults are revoked
-- below. Never grant rlsgate_audit_writer to the tenant role (or the reverse), and never use the
-- writer role as upstream.user: tenants would then share one role with the audit trail.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'rlsgate_audit_writer') THEN
        CREATE ROLE rlsgate_audit_writer
            LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS;
    END IF;
END
$$;

CREATE SCHEMA IF NOT EXISTS rlsgate_audit;

CREATE TABLE IF NOT EXISTS rlsgate_audit.events (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       timestamptz NOT NULL,            -- when the proxy recorded the event
    event    text NOT NULL,                   -- login_ok, login_failed, login_throttled,
                                              -- statement_denied, token_expired, reauth
    peer     text,                            -- client address:port
    username text,                            -- StartupMessage user name (free text; may be absent)
    tenant   text,                            -- tenant claim of the token, when known
    detail   jsonb NOT NULL DEFAULT '{}'      -- the event's other fields (kid, jti, reason, rule,
                                              -- statement fingerprint, …); never tokens or SQL text
);

COMMENT ON TABLE rlsgate_audit.events IS
    'rlsgate audit events; written (INSERT only) by rlsgate_audit_writer, see sql/audit.sql';

CREATE INDEX IF NOT EXISTS events_at_idx ON rlsgate_audit.events (at);
CREATE INDEX IF NOT EXISTS events_tenant_at_idx ON rlsgate_audit.events (tenant, at);

-- Nobody but the owner and the roles granted below.
REVOKE ALL ON SCHEMA rlsgate_audit FROM PUBLIC;
REVOKE ALL ON rlsgate_audit.events FROM PUBLIC;

-- The writer: INSERT only. The identity column needs no sequence privilege.
GRANT USAGE ON SCHEMA rlsgate_audit TO rlsgate_audit_writer;
GRANT INSERT ON rlsgate_audit.events TO rlsgate_audit_writer;
