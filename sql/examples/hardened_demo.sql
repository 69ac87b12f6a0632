-- The demo schema (sql/demo.sql) with signed-mode policies: after sql/hardened.sql, every
-- policy takes the tenant from rlsgate.tenant(), which raises instead of answering when the
-- tenant setting was not made by rlsgate (see sql/hardened.sql). Run as a superuser:
--     psql -f sql/hardened.sql -f sql/examples/hardened_demo.sql "dbname=app"
-- The `(SELECT …)` form is evaluated once per statement and can use an index on store_id.

\set ON_ERROR_STOP on

BEGIN;

ALTER POLICY tenant_isolation ON stores
    USING      (store_id = (SELECT rlsgate.tenant()))
    WITH CHECK (store_id = (SELECT rlsgate.tenant()));

ALTER POLICY tenant_isolation ON customers
    USING      (store_id = (SELECT rlsgate.tenant()))
    WITH CHECK (store_id = (SELECT rlsgate.tenant()));

ALTER POLICY tenant_isolation ON products
    USING      (store_id = (SELECT rlsgate.tenant()))
    WITH CHECK (store_id = (SELECT rlsgate.tenant()));

ALTER POLICY tenant_isolation ON sales_transactions
    USING      (store_id = (SELECT rlsgate.tenant()))
    WITH CHECK (store_id = (SELECT rlsgate.tenant()));

ALTER POLICY tenant_isolation ON sales_items
    USING (EXISTS (
        SELECT 1 FROM sales_transactions t
         WHERE t.transaction_id = sales_items.transaction_id
           AND t.store_id = (SELECT rlsgate.tenant())))
    WITH CHECK (
        EXISTS (
            SELECT 1 FROM sales_transactions t
             WHERE t.transaction_id = sales_items.transaction_id
               AND t.store_id = (SELECT rlsgate.tenant()))
        AND EXISTS (
            SELECT 1 FROM products p
             WHERE p.product_id = sales_items.product_id
               AND p.store_id = (SELECT rlsgate.tenant())));

COMMIT;
