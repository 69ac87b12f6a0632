-- Claim-mapped settings in RLS policies: owner-only rows with an admin bypass, inside a tenant.
--
-- rlsgate config:
--   [context]
--   "app.current_store_id" = "store_id"
--   "app.user_id"          = "sub"
--   "app.user_role"        = "role"
--
-- Load after sql/demo.sql, as the owner of the tables (a superuser here).

CREATE TABLE IF NOT EXISTS notes (
    note_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    store_id text NOT NULL REFERENCES stores,
    owner    text NOT NULL,
    body     text NOT NULL
);
ALTER TABLE notes OWNER TO rlsgate_owner;
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
ALTER TABLE notes FORCE ROW LEVEL SECURITY;
CREATE INDEX IF NOT EXISTS notes_store_owner ON notes (store_id, owner);
GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO rlsgate_app;

-- Always inside the caller's tenant; then either the caller's own notes or, for the store's
-- admins, all of the store's notes. Writes only as oneself (admins included).
DROP POLICY IF EXISTS notes_read ON notes;
CREATE POLICY notes_read ON notes FOR SELECT USING (
    store_id = (SELECT nullif(current_setting('app.current_store_id', true), ''))
    AND (
        owner = (SELECT nullif(current_setting('app.user_id', true), ''))
        OR (SELECT current_setting('app.user_role', true)) = 'admin'
    )
);
DROP POLICY IF EXISTS notes_write ON notes;
CREATE POLICY notes_write ON notes FOR ALL USING (
    store_id = (SELECT nullif(current_setting('app.current_store_id', true), ''))
    AND owner = (SELECT nullif(current_setting('app.user_id', true), ''))
) WITH CHECK (
    store_id = (SELECT nullif(current_setting('app.current_store_id', true), ''))
    AND owner = (SELECT nullif(current_setting('app.user_id', true), ''))
);

INSERT INTO notes (store_id, owner, body) VALUES
    ('north', 'alice', 'alice note 1'),
    ('north', 'alice', 'alice note 2'),
    ('north', 'bob',   'bob note'),
    ('south', 'carol', 'carol note');
