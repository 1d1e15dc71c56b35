-- Privileges of each function. Functions are executable by PUBLIC unless revoked, so
-- every function is revoked here and granted back only where stated.
--
-- Superusers only (they also check it themselves): configure, declare_*,
-- undeclare, migrate, unmigrate, verify, delete_vault_entries, add_server,
-- remove_server, servers, process_deletions, gc. They change the server's
-- Vault credentials, the tables or Vault.
--
-- No role: the trigger functions redirect_write, redirect_confirm,
-- redirect_begin, redirect_end, redirect_delete and redirect_truncate.
-- PostgreSQL checks EXECUTE on a trigger function only when a trigger is
-- created, which declare_* do as a superuser. The triggers then fire for
-- every role that writes to the table.
--
-- Granted by the DBA to chosen roles: read and read_json read any entry
-- under the secrets path; status and migration_progress show no secret.
--
-- Every role: the resolve_* functions that the resolved views and
-- transparent reads call, the *_written twins included. They
-- resolve a reference only for a declared column and only when a row with
-- that key and that reference is visible to the calling role, so they give
-- no more than SELECT on the declared table already gives. They read the
-- declarations, so the schema and vault_redirect.secret_columns (names of
-- tables and columns, no secret) are readable by every role.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA vault_redirect FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA vault_redirect FROM PUBLIC;
GRANT USAGE ON SCHEMA vault_redirect TO PUBLIC;
GRANT SELECT ON vault_redirect.secret_columns TO PUBLIC;
GRANT EXECUTE ON FUNCTION vault_redirect.resolve_kv(oid, text, text, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION vault_redirect.resolve_column_jsonb(oid, text, text[], jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION vault_redirect.resolve_column_text(oid, text, text[], text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION vault_redirect.resolve_kv_written(oid, text, text, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION vault_redirect.resolve_column_jsonb_written(oid, text, text[], jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION vault_redirect.resolve_column_text_written(oid, text, text[], text) TO PUBLIC;
