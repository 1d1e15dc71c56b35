-- Declared secret columns. pg_dump keeps this table's rows, so a restored
-- database records which columns contain references.
CREATE TABLE vault_redirect.secret_columns (
    table_schema name NOT NULL,
    table_name name NOT NULL,
    column_name name NOT NULL,
    -- 'kv': a key/value table whose path_column gives each row's KV path;
    -- 'column': a wide table, the path made of path_prefix, the primary
    -- key values and the column name.
    shape text NOT NULL CHECK (shape IN ('kv', 'column')),
    path_column name,
    key_columns name[] NOT NULL DEFAULT '{}',
    path_prefix text NOT NULL DEFAULT '',
    -- For a jsonb column of a wide table: the keys whose values are secret.
    -- The other keys stay in the row. NULL: the whole value is secret.
    secret_keys text[] CHECK (secret_keys IS NULL OR (shape = 'column' AND cardinality(secret_keys) > 0)),
    view_schema name NOT NULL,
    declared_at timestamptz NOT NULL DEFAULT now(),
    migrated_at timestamptz,
    PRIMARY KEY (table_schema, table_name, column_name),
    CHECK ((shape = 'kv') = (path_column IS NOT NULL))
);
SELECT pg_catalog.pg_extension_config_dump('vault_redirect.secret_columns', '');

COMMENT ON TABLE vault_redirect.secret_columns IS
    'Columns whose secrets vault_redirect keeps in Vault KV v2';

-- Servers that must have their own Vault configuration before migrate()
-- runs, besides the standbys streaming from this server. pg_dump keeps it.
CREATE TABLE vault_redirect.servers (
    name text PRIMARY KEY CHECK (name <> '' AND position('/' in name) = 0),
    added_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('vault_redirect.servers', '');

-- KV entries of deleted rows, waiting for the deletion worker. Rows come
-- and go with the transactions that delete declared rows. What stays here
-- could not be deleted yet, and last_error gives the reason. pg_dump leaves it out,
-- because a restored database must not delete the entries of its source.
CREATE TABLE vault_redirect.deletion_queue (
    path text PRIMARY KEY,
    table_schema name NOT NULL,
    table_name name NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    last_attempt_at timestamptz,
    last_error text
);

COMMENT ON TABLE vault_redirect.deletion_queue IS
    'KV entries of deleted rows that vault_redirect has yet to delete from Vault';
