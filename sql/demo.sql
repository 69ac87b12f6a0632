-- rlsgate demo schema: a small multi-tenant retail database protected by
-- Row Level Security.
--
-- Load it as a superuser into a FRESH database:
--
--     psql -v ON_ERROR_STOP=1 -d <db> -f sql/demo.sql
--
-- The file is plain SQL (no psql meta-commands), so it can also be sent as
-- one simple-protocol batch by a driver (e.g. tokio-postgres batch_execute).
-- It may be loaded into several databases of the same cluster: the
-- cluster-wide roles are created only when missing. It sets no password for
-- rlsgate_app; the loader does that (ALTER ROLE rlsgate_app PASSWORD '...').
--
-- Tenant = store. Every policy reads the tenant from the setting
--     app.current_store_id
-- which rlsgate applies (SET LOCAL) at the start of every transaction.
-- Without the setting every table reads as empty and every write is rejected.
--
-- Seed data (row counts differ per store on purpose so tests can tell the
-- tenants apart; ids are deterministic in a fresh database):
--
--   table                north  south  east   total
--   -------------------  -----  -----  -----  -----
--   stores                   1      1     1      3
--   customers                3      2     1      6   ids north 1-3, south 4-5, east 6
--   products                 4      3     2      9   ids north 1-4, south 5-7, east 8-9
--   sales_transactions       2      1     1      4   ids north 1-2, south 3,   east 4
--   sales_items              3      2     1      6   tx1: 2 items, tx2: 1, tx3: 2, tx4: 1
--
-- Roles (cluster-wide, created if missing):
--   rlsgate_owner  NOLOGIN; owns every table (FORCE ROW LEVEL SECURITY makes
--                  the policies apply to it too).
--   rlsgate_app    LOGIN NOSUPERUSER NOBYPASSRLS, not an owner: the role the
--                  proxy's upstream pool logs in as.

-- ---------------------------------------------------------------------------
-- Roles. Idempotent, and tolerant of another database being loaded at the
-- same moment (a concurrent CREATE ROLE of the same name raises
-- unique_violation / duplicate_object, which just means "it exists now").
-- ---------------------------------------------------------------------------
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rlsgate_owner') THEN
        BEGIN
            CREATE ROLE rlsgate_owner NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;

    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rlsgate_app') THEN
        BEGIN
            CREATE ROLE rlsgate_app LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;

    -- A pre-existing rlsgate_app with dangerous attributes would silently
    -- defeat every policy: fix the attributes (only when needed, so parallel
    -- loads do not fight over the pg_authid row).
    IF EXISTS (SELECT FROM pg_roles
               WHERE rolname = 'rlsgate_app'
                 AND (rolsuper OR rolbypassrls OR NOT rolcanlogin)) THEN
        ALTER ROLE rlsgate_app LOGIN NOSUPERUSER NOBYPASSRLS;
    END IF;
END
$$;

BEGIN;

-- ---------------------------------------------------------------------------
-- Tables (schema public, so the default search_path finds them).
-- ---------------------------------------------------------------------------
CREATE TABLE stores (
    store_id text PRIMARY KEY,
    name     text NOT NULL
);

CREATE TABLE customers (
    customer_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    store_id    text NOT NULL REFERENCES stores,
    name        text NOT NULL,
    email       text,
    -- Natural key scoped to the tenant: a global UNIQUE (email) would let one
    -- tenant probe another tenant's customers through duplicate-key errors.
    CONSTRAINT customers_store_email_key UNIQUE (store_id, email),
    -- Target for the same-tenant foreign key from sales_transactions.
    CONSTRAINT customers_store_customer_key UNIQUE (store_id, customer_id)
);

CREATE TABLE products (
    product_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    store_id   text NOT NULL REFERENCES stores,
    name       text NOT NULL,
    price      numeric(10,2) NOT NULL CHECK (price >= 0),
    CONSTRAINT products_store_name_key UNIQUE (store_id, name)
);

CREATE TABLE sales_transactions (
    transaction_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    store_id       text NOT NULL REFERENCES stores,
    customer_id    bigint REFERENCES customers,
    created_at     timestamptz NOT NULL DEFAULT now(),
    total          numeric(12,2) NOT NULL DEFAULT 0,
    -- Foreign-key checks bypass RLS, so a plain FK on customer_id alone would
    -- let a tenant attach another tenant's customer id. The composite key
    -- forces the customer to belong to the same store (MATCH SIMPLE: a NULL
    -- customer_id, i.e. a walk-in sale, is allowed).
    CONSTRAINT sales_transactions_store_customer_fkey
        FOREIGN KEY (store_id, customer_id) REFERENCES customers (store_id, customer_id)
);

-- No store_id here: an item belongs to the tenant of its parent transaction.
CREATE TABLE sales_items (
    item_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id bigint NOT NULL REFERENCES sales_transactions ON DELETE CASCADE,
    product_id     bigint NOT NULL REFERENCES products,
    quantity       int NOT NULL CHECK (quantity > 0),
    unit_price     numeric(10,2) NOT NULL CHECK (unit_price >= 0)
);

-- ---------------------------------------------------------------------------
-- Indexes leading with the tenant column (every policy filters on it).
-- The UNIQUE constraints above already provide (store_id, email),
-- (store_id, customer_id) and (store_id, name) on products.
-- ---------------------------------------------------------------------------
CREATE INDEX sales_transactions_store_created_idx ON sales_transactions (store_id, created_at);
CREATE INDEX sales_transactions_store_customer_idx ON sales_transactions (store_id, customer_id);
CREATE INDEX sales_items_transaction_idx ON sales_items (transaction_id);
CREATE INDEX sales_items_product_idx ON sales_items (product_id);

-- ---------------------------------------------------------------------------
-- Seed data, inserted by the superuser loading this file (superusers bypass
-- RLS). Insertion order fixes the identity values listed at the top.
-- ---------------------------------------------------------------------------
INSERT INTO stores (store_id, name) VALUES
    ('north', 'North Street Market'),
    ('south', 'South Harbour Shop'),
    ('east',  'East End Corner Store');

INSERT INTO customers (store_id, name, email) VALUES
    ('north', 'Alice Archer',  'alice@north.example'),    -- 1
    ('north', 'Bob Baker',     'bob@north.example'),      -- 2
    ('north', 'Carol Carter',  'carol@north.example'),    -- 3
    ('south', 'Dave Dalton',   'dave@south.example'),     -- 4
    ('south', 'Erin Ellis',    'erin@south.example'),     -- 5
    ('east',  'Frank Foster',  'frank@east.example');     -- 6

INSERT INTO products (store_id, name, price) VALUES
    ('north', 'Coffee beans 1kg', 14.50),   -- 1
    ('north', 'Whole milk 1l',     1.20),   -- 2
    ('north', 'Sourdough loaf',    4.80),   -- 3
    ('north', 'Orange juice 1l',   3.10),   -- 4
    ('south', 'Sunscreen SPF50',  11.90),   -- 5
    ('south', 'Beach towel',      19.00),   -- 6
    ('south', 'Sparkling water',   0.90),   -- 7
    ('east',  'Green tea 50 bags', 5.60),   -- 8
    ('east',  'Rice 5kg',          9.40);   -- 9

INSERT INTO sales_transactions (store_id, customer_id, created_at) VALUES
    ('north', 1,    '2024-03-01 09:15:00+00'),   -- 1
    ('north', NULL, '2024-03-01 17:40:00+00'),   -- 2 (walk-in)
    ('south', 4,    '2024-03-02 11:05:00+00'),   -- 3
    ('east',  6,    '2024-03-03 08:30:00+00');   -- 4

INSERT INTO sales_items (transaction_id, product_id, quantity, unit_price) VALUES
    (1, 1, 1, 14.50),   -- north
    (1, 2, 2,  1.20),   -- north
    (2, 3, 1,  4.80),   -- north
    (3, 5, 1, 11.90),   -- south
    (3, 7, 6,  0.90),   -- south
    (4, 9, 1,  9.40);   -- east

UPDATE sales_transactions t
   SET total = s.total
  FROM (SELECT transaction_id, sum(quantity * unit_price) AS total
          FROM sales_items GROUP BY transaction_id) s
 WHERE s.transaction_id = t.transaction_id;

-- ---------------------------------------------------------------------------
-- Ownership: everything belongs to rlsgate_owner (identity sequences follow
-- their table), never to the role the proxy logs in as.
-- ---------------------------------------------------------------------------
ALTER TABLE stores             OWNER TO rlsgate_owner;
ALTER TABLE customers          OWNER TO rlsgate_owner;
ALTER TABLE products           OWNER TO rlsgate_owner;
ALTER TABLE sales_transactions OWNER TO rlsgate_owner;
ALTER TABLE sales_items        OWNER TO rlsgate_owner;

-- ---------------------------------------------------------------------------
-- Row Level Security. FORCE makes the policies apply to the owner as well.
-- The tenant expression is wrapped in a scalar subquery so the planner
-- evaluates it once per statement (an InitPlan) rather than per row.
-- nullif(..., '') matters: after a SET LOCAL ends, the setting reads as ''
-- (not NULL) for the rest of the session; both mean "no tenant".
-- USING filters what can be seen/updated/deleted; WITH CHECK rejects new or
-- updated rows that belong to another tenant.
-- ---------------------------------------------------------------------------
ALTER TABLE stores             ENABLE ROW LEVEL SECURITY;
ALTER TABLE stores             FORCE  ROW LEVEL SECURITY;
ALTER TABLE customers          ENABLE ROW LEVEL SECURITY;
ALTER TABLE customers          FORCE  ROW LEVEL SECURITY;
ALTER TABLE products           ENABLE ROW LEVEL SECURITY;
ALTER TABLE products           FORCE  ROW LEVEL SECURITY;
ALTER TABLE sales_transactions ENABLE ROW LEVEL SECURITY;
ALTER TABLE sales_transactions FORCE  ROW LEVEL SECURITY;
ALTER TABLE sales_items        ENABLE ROW LEVEL SECURITY;
ALTER TABLE sales_items        FORCE  ROW LEVEL SECURITY;

-- A tenant sees (and may only touch) its own store row.
CREATE POLICY tenant_isolation ON stores
    USING      (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')))
    WITH CHECK (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')));

CREATE POLICY tenant_isolation ON customers
    USING      (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')))
    WITH CHECK (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')));

CREATE POLICY tenant_isolation ON products
    USING      (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')))
    WITH CHECK (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')));

CREATE POLICY tenant_isolation ON sales_transactions
    USING      (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')))
    WITH CHECK (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')));

-- Items are isolated through their parent transaction. The tenant condition
-- is spelled out (not left to the parent's own policy) so this policy stays
-- correct even for a role that is exempt from RLS on sales_transactions.
-- WITH CHECK additionally requires the product to be one of the tenant's own
-- (foreign-key checks bypass RLS and would accept another store's product).
CREATE POLICY tenant_isolation ON sales_items
    USING (EXISTS (
        SELECT 1 FROM sales_transactions t
         WHERE t.transaction_id = sales_items.transaction_id
           AND t.store_id = (SELECT nullif(current_setting('app.current_store_id', true), ''))))
    WITH CHECK (
        EXISTS (
            SELECT 1 FROM sales_transactions t
             WHERE t.transaction_id = sales_items.transaction_id
               AND t.store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')))
        AND EXISTS (
            SELECT 1 FROM products p
             WHERE p.product_id = sales_items.product_id
               AND p.store_id = (SELECT nullif(current_setting('app.current_store_id', true), ''))));

-- ---------------------------------------------------------------------------
-- Privileges for the proxy's role: data access only, no ownership, no DDL.
-- Identity columns need no sequence privilege for INSERT; USAGE/SELECT on the
-- sequences is granted for clients that call currval()/nextval() or
-- pg_get_serial_sequence() themselves.
-- ---------------------------------------------------------------------------
GRANT USAGE ON SCHEMA public TO rlsgate_app;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON stores, customers, products, sales_transactions, sales_items
    TO rlsgate_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO rlsgate_app;

-- ---------------------------------------------------------------------------
-- Database-side hardening (DESIGN section 4). These close escape routes for
-- good, independent of the proxy's statement guard. Function privileges live
-- in this database's catalog, so they are applied per database.
-- ---------------------------------------------------------------------------

-- rlsgate pipelines SET LOCAL ahead of each transaction; Postgres answers it with
-- a WARNING ("SET LOCAL can only be used in transaction blocks") that rlsgate
-- swallows. Keep that warning out of the server log for the proxy's role.
ALTER ROLE rlsgate_app SET log_min_messages = 'error';

-- set_config() could rewrite app.current_store_id from inside any expression,
-- including SQL hidden in strings (query_to_xml('select set_config(...)')).
-- Revoking it from PUBLIC blocks direct calls and those indirect routes.
-- SET LOCAL still works, which is why rlsgate injects SET LOCAL.
REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM PUBLIC;

-- Without TEMP, a client cannot create a temporary function
-- (CREATE FUNCTION pg_temp.f() ... SET LOCAL app.current_store_id ...)
-- to smuggle a setting change past the proxy.
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
END
$$;

-- All tenants share the rlsgate_app role, so pg_stat_activity would show
-- every tenant the others' query text (including the injected
-- SET LOCAL app.current_store_id = '<tenant>' and query literals).
-- pg_stat_get_activity() backs the pg_stat_activity view;
-- pg_stat_get_backend_activity() returns one backend's query text directly.
-- Grant them back to monitoring roles explicitly if needed.
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_stat_get_backend_activity(integer) FROM PUBLIC;

-- Same channel through pg_stat_statements, when that extension is installed
-- in this database (it is not by default).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure
          FROM pg_proc p
          JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid
         WHERE e.extname = 'pg_stat_statements'
           AND p.proname LIKE 'pg_stat_statements%'
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;

-- Nobody but the schema owner creates objects in public (PostgreSQL 15's
-- default already; explicit for older servers and for restored databases).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

COMMIT;
