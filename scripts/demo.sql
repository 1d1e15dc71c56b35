-- First part of the vault_redirect demo, run by scripts/demo.sh with psql
-- as the postgres superuser. It creates MAAS-shaped tables, moves their
-- secrets to OpenBao and shows the tables before and after.
--
-- Expects the psql variables `url` (OpenBao address), `role_id` and
-- `wrapped` (a response-wrapped AppRole secret_id), so that the credentials
-- never appear in this file or on stdout.
--
-- Every secret below is made up for this demo and protects nothing.

\set ON_ERROR_STOP on
\set QUIET on
\pset null '(null)'
\set QUIET off

\echo
\echo '== MAAS-shaped tables with plaintext secrets'

BEGIN;

CREATE TABLE public.maasserver_secret (
    created timestamptz NOT NULL,
    updated timestamptz NOT NULL,
    path text NOT NULL,
    value jsonb NOT NULL,
    CONSTRAINT maasserver_secret_pkey PRIMARY KEY (path)
);

CREATE TABLE public.maasserver_bmc (
    id bigint NOT NULL PRIMARY KEY,
    created timestamptz NOT NULL,
    updated timestamptz NOT NULL,
    power_type character varying(10) NOT NULL,
    ip_address_id bigint,
    power_parameters jsonb NOT NULL,
    created_by_commissioning boolean
);

CREATE TABLE public.maasserver_config (
    id bigint NOT NULL PRIMARY KEY,
    name character varying(255) NOT NULL UNIQUE,
    value jsonb
);

INSERT INTO public.maasserver_secret (created, updated, path, value) VALUES
    (now(), now(), 'global/rpc-shared',
     '{"secret": "01394f6d8e27cf09f92ace523e4ff2a5"}'),
    (now(), now(), 'global/omapi-key',
     '{"secret": "h6uF7/IUWJc8nI+mqWzQwvqcx2sYQH2KW8fcjJO1m2JntNB9zEQ/UyOwVe8VjGdmyRQ5aSywffsXltKN9HD8Cg=="}'),
    (now(), now(), 'global/macaroon-key',
     '{"secret": "c93975003b85124af71c1b82619067c2f1a42ffbbdfe1eef"}'),
    (now(), now(), 'global/ipmi-k_g-key',
     '{"secret": "61496a1f7b73adb7af7f19d002b1f9141cf21657"}'),
    (now(), now(), 'global/vcenter-password',
     '{"secret": "Demo p@ss %41 #7? not-real"}'),
    (now(), now(), 'global/tls',
     '{"key": "-----BEGIN PRIVATE KEY-----\nREVNTyBPTkxZIC0gbm90IGEgcmVhbCBwcml2YXRlIGtleSAtIHZhdWx0X3JlZGlyZWN0IGRlbW8gZGF0YSA=\n-----END PRIVATE KEY-----\n", "cert": "-----BEGIN CERTIFICATE-----\nREVNTyBPTkxZIC0gbm90IGEgcmVhbCBjZXJ0aWZpY2F0ZSAtIHZhdWx0X3JlZGlyZWN0IGRlbW8gZGF0YSA=\n-----END CERTIFICATE-----\n", "cacert": ""}'),
    (now(), now(), 'bmc/1/power-parameters',
     '{"power_pass": "ipmi-demo-5668285e1c93"}'),
    (now(), now(), 'bmc/2/power-parameters',
     '{"power_pass": "redfish-demo-dc4b5e6b50ac", "power_key": null}'),
    (now(), now(), 'bmc/15/power-parameters',
     '{"power_pass": "vmhost-démo-ünïcode-712c881b5fc0", "certificate": "", "key": ""}'),
    (now(), now(), 'node/7/deploy-metadata',
     '{"meta-data": {"instance-id": "node-7"}, "user-data": "#cloud-config\npassword: 202dd2cf2206a8bc"}'),
    (now(), now(), 'rootkey/3/material',
     '{"secret": "46bb333cf6b86dd6e65bafe1a59843a57f018025cdd3056c"}'),
    (now(), now(), 'controller/abc123/database-creds',
     '{"user": "maas", "pass": "f0b5911590eedbdfcfa869d4", "name": "maasdb"}');

-- Addresses are from 192.0.2.0/24 (TEST-NET-1, RFC 5737): nothing is
-- contacted there. Rows 1, 2 and 15 keep their passwords in
-- maasserver_secret; row 16 is a legacy row with its password in the row.
INSERT INTO public.maasserver_bmc
    (id, created, updated, power_type, ip_address_id, power_parameters, created_by_commissioning)
VALUES
    (1, now(), now(), 'ipmi', NULL,
     '{"power_address": "192.0.2.11", "power_user": "maas", "power_driver": "LAN_2_0"}', true),
    (2, now(), now(), 'redfish', NULL,
     '{"power_address": "192.0.2.12", "power_user": "admin", "node_id": "1"}', true),
    (15, now(), now(), 'lxd', NULL,
     '{"power_address": "https://192.0.2.15:8443", "project": "default", "instance_name": "vm-15"}', false),
    (16, now(), now(), 'ipmi', NULL,
     '{"power_address": "192.0.2.16", "power_user": "root", "power_pass": "legacy-bb4ada97d7f6"}', NULL);

INSERT INTO public.maasserver_config (id, name, value) VALUES
    (1, 'maas_name', '"demo-maas"'),
    (2, 'vault_enabled', 'false');

COMMIT;

SELECT path, value FROM public.maasserver_secret ORDER BY path;
SELECT id, power_type, power_parameters FROM public.maasserver_bmc ORDER BY id;

\echo
\echo '== Installing and configuring vault_redirect (AppRole login with the wrapped secret_id)'

CREATE EXTENSION vault_redirect;
-- Terse errors leave out the statement text, which would show the
-- credentials if configure() failed.
\set VERBOSITY terse
SELECT vault_redirect.configure(:'url', :'role_id', :'wrapped', 'maas', 'secret');
\set VERBOSITY default

\echo
\echo '== Declaring the secret columns'

SELECT vault_redirect.declare_kv_table('public.maasserver_secret', 'path', 'value');
-- Only the password and key of a BMC are secret; the address and user
-- stay in the row.
SELECT vault_redirect.declare_column('public.maasserver_bmc', 'power_parameters',
       secret_keys => ARRAY['power_pass', 'power_key']);

\echo
\echo '== Moving the secrets to OpenBao'

SELECT * FROM vault_redirect.migrate();

\echo
\echo '== The tables now contain references only'

SELECT path, value FROM public.maasserver_secret ORDER BY path;
SELECT id, power_type, power_parameters FROM public.maasserver_bmc ORDER BY id;

\echo
\echo '== Rewriting the tables, so that no old row version with plaintext remains in them'

VACUUM FULL public.maasserver_secret;
VACUUM FULL public.maasserver_bmc;
CHECKPOINT;

\echo
\echo '== The resolved views read the secrets from OpenBao'

SELECT path, value FROM vault_redirect_resolved.maasserver_secret ORDER BY path;
SELECT id, power_type, power_parameters FROM vault_redirect_resolved.maasserver_bmc ORDER BY id;
SELECT vault_redirect.read('global/vcenter-password') AS vcenter_password;
SELECT vault_redirect.read_json('controller/abc123/database-creds') AS database_creds;

\echo
\echo '== maasserver_config holds no secret and is not declared'

SELECT id, name, value FROM public.maasserver_config ORDER BY id;
