-- Who may call what. Functions are executable by PUBLIC unless revoked, so
-- every function is revoked here and granted back only where stated.
--
-- Superusers only (they also check it themselves): configure, declare_*,
-- migrate. They change the server's Vault credentials or the tables.
--
-- Granted by the DBA to chosen roles: read and read_json read any entry
-- under the secrets path; the resolve_* functions are what the resolved
-- views call. status shows no secret but the Vault address.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA vault_redirect FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA vault_redirect FROM PUBLIC;
