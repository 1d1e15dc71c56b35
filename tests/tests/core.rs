//! Configure, migrate and resolve against a real OpenBao and PostgreSQL.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use serde_json::json;
use vault_redirect_tests::stack::{contains_bytes, db_error, describe, Stack, MAAS_FIXTURE};

/// Plaintext strings of the fixture that must leave the tables.
const FIXTURE_SECRETS: &[&str] = &[
    "test-rpc-4f1c9e0b7a2d",
    "dGVzdC1vbWFwaS1rZXktbm90LXJlYWwtMDAwMDAwMDAwMA==",
    "test-macaroon-8c3d2e1f",
    "Test p@ss %20 #1? ñ",
    "test-key-body",
    "test-cert-body",
    "test-ipmi-61a2b3",
    "test-redfish-9d8e7f",
    "test-vmhost-ünïcode-日本-5c4b",
    "test-cloud-7e6d",
    "test-rootkey-scalar-2a1b",
    "test-db-pass-0f9e",
    "test-bmc-pass-1111",
    "test-bmc-pass-2222",
];

fn migrate(stack: &Stack) -> Vec<(String, String, i64, i64, i64)> {
    let mut client = stack.superuser();
    client
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap_or_else(|e| panic!("migrate failed: {}", describe(&e)))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

#[test]
fn configure_with_wrapped_token() {
    let stack = Stack::configured(&["token_no_default_policy=true"]);
    let mut client = stack.superuser();
    let row = client
        .query_one(
            "SELECT configured, url, secrets_mount, secrets_path, reachable, sealed
               FROM vault_redirect.status()",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(1), stack.bao.addr());
    assert_eq!(row.get::<_, String>(2), "secret");
    assert_eq!(row.get::<_, String>(3), "maas");
    assert!(row.get::<_, bool>(4));
    assert!(!row.get::<_, bool>(5));

    let mode = fs::metadata(stack.config_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "configuration file mode");

    // The probe entry is gone once configure returns; the server's marker
    // is the only entry left.
    assert_eq!(stack.bao.kv_list("secret", "maas"), ["_vault_redirect/"]);
    assert!(stack
        .bao
        .kv_get("secret", "maas/_vault_redirect/servers/pg-test")
        .is_some());
}

#[test]
fn configure_strips_trailing_slashes() {
    let stack = Stack::unconfigured(&[]);
    let wrapped = stack.bao.wrapped_secret_id("pg-primary");
    let mut client = stack.superuser();
    client
        .execute(
            "SELECT vault_redirect.configure($1, $2, $3, 'maas//', 'secret/')",
            &[&stack.bao.addr(), &stack.role_id, &wrapped],
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let row = client
        .query_one(
            "SELECT secrets_mount, secrets_path FROM vault_redirect.status()",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "secret");
    assert_eq!(row.get::<_, String>(1), "maas");
}

#[test]
fn reused_wrapped_token_rejected() {
    let stack = Stack::unconfigured(&[]);
    let wrapped = stack.bao.wrapped_secret_id("pg-primary");
    let mut client = stack.superuser();
    stack
        .configure(&mut client, &stack.role_id, &wrapped)
        .unwrap();

    let error = stack
        .configure(&mut client, &stack.role_id, &wrapped)
        .expect_err("a used wrapping token must be rejected");
    let db = db_error(&error);
    assert_eq!(db.code().code(), "28000", "{}", describe(&error));
    assert!(
        db.message().contains("already used or has expired"),
        "{}",
        describe(&error)
    );
    assert!(!db.message().contains(&wrapped));
    assert!(db.hint().is_some());
}

#[test]
fn wrong_role_id_keeps_previous_config() {
    let stack = Stack::configured(&[]);
    let before = fs::read(stack.config_file()).unwrap();
    stack.kv_put("global/check", &json!({"secret": "still-readable"}));

    let wrapped = stack.bao.wrapped_secret_id("pg-primary");
    let mut client = stack.superuser();
    let error = stack
        .configure(
            &mut client,
            "00000000-0000-0000-0000-000000000000",
            &wrapped,
        )
        .expect_err("a wrong role_id must fail");
    assert_eq!(
        db_error(&error).code().code(),
        "28P01",
        "{}",
        describe(&error)
    );

    assert_eq!(fs::read(stack.config_file()).unwrap(), before);
    let value: String = client
        .query_one("SELECT vault_redirect.read('global/check')", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)))
        .get(0);
    assert_eq!(value, "still-readable");
}

#[test]
fn configure_secret_id_stays_out() {
    let stack = Stack::configured(&[]);
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(stack.config_file()).unwrap()).unwrap();
    let secret_id = config["secret_id"].as_str().unwrap().to_owned();
    assert!(!secret_id.is_empty());

    // A failing configure and a resolve both run before the log is read.
    let mut client = stack.superuser();
    let _ = stack.configure(&mut client, &stack.role_id, "not-a-token");
    let settings = stack
        .pg
        .psql("SELECT string_agg(setting, ' ') FROM pg_settings;");
    assert!(!settings.contains(&secret_id));
    assert!(!stack.pg.log_contents().contains(&secret_id));
    let dump = stack
        .pg
        .psql("SELECT string_agg(t::text, ' ') FROM vault_redirect.secret_columns t;");
    assert!(!dump.contains(&secret_id));
}

#[test]
fn migrate_leaves_no_plaintext() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    let summary = migrate(&stack);
    assert_eq!(
        summary,
        vec![
            (
                "public.maasserver_bmc".into(),
                "power_parameters".into(),
                3,
                0,
                0
            ),
            ("public.maasserver_secret".into(), "value".into(), 11, 0, 0),
        ]
    );

    // Every value is its row's own reference.
    let leftovers = stack.pg.psql(
        "SELECT count(*) FROM maasserver_secret
          WHERE value <> jsonb_build_object('$vault_redirect', path)
            AND value <> jsonb_build_object('$vault_redirect', path, 'key', 'secret');
         SELECT count(*) FROM maasserver_bmc
          WHERE power_parameters <> jsonb_build_object('$vault_redirect',
                'public/maasserver_bmc/' || id || '/power_parameters');",
    );
    assert_eq!(leftovers.split_whitespace().collect::<Vec<_>>(), ["0", "0"]);
    let text = stack.pg.psql(
        "SELECT string_agg(value::text, ' ') FROM maasserver_secret;
         SELECT string_agg(power_parameters::text, ' ') FROM maasserver_bmc;",
    );
    for secret in FIXTURE_SECRETS {
        assert!(!text.contains(secret), "{secret} is still in a table");
    }

    // The KV entries hold the MAAS layout.
    assert_eq!(
        stack.kv_get("global/rpc-shared"),
        Some(json!({"secret": "test-rpc-4f1c9e0b7a2d"}))
    );
    assert_eq!(
        stack.kv_get("rootkey/3/material"),
        Some(json!({"secret": "test-rootkey-scalar-2a1b"}))
    );
    assert_eq!(
        stack.kv_get("controller/abc123/database-creds"),
        Some(json!({"user": "maas", "pass": "test-db-pass-0f9e", "name": "maasdb"}))
    );

    // The old row versions are still in the heap until the purge step.
    stack.pg.psql("CHECKPOINT;");
    let before = stack.table_files("maasserver_secret");
    assert!(contains_bytes(&before, "test-rpc-4f1c9e0b7a2d"));

    stack
        .pg
        .psql("VACUUM FULL maasserver_secret; VACUUM FULL maasserver_bmc; CHECKPOINT;");
    let mut files = stack.table_files("maasserver_secret");
    files.extend(stack.table_files("maasserver_bmc"));
    assert!(!files.is_empty());
    for secret in FIXTURE_SECRETS {
        assert!(
            !contains_bytes(&files, secret),
            "{secret} is still in a data file"
        );
    }
}

#[test]
fn view_returns_original_values() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    stack.pg.psql(
        "CREATE TABLE original_secret AS SELECT * FROM maasserver_secret;
         CREATE TABLE original_bmc AS SELECT * FROM maasserver_bmc;",
    );
    migrate(&stack);

    let differences = stack.pg.psql(
        "SELECT count(*) FROM (
             (SELECT * FROM vault_redirect_resolved.maasserver_secret
              EXCEPT SELECT * FROM original_secret)
             UNION ALL
             (SELECT * FROM original_secret
              EXCEPT SELECT * FROM vault_redirect_resolved.maasserver_secret)) d;
         SELECT count(*) FROM (
             (SELECT * FROM vault_redirect_resolved.maasserver_bmc
              EXCEPT SELECT * FROM original_bmc)
             UNION ALL
             (SELECT * FROM original_bmc
              EXCEPT SELECT * FROM vault_redirect_resolved.maasserver_bmc)) d;",
    );
    assert_eq!(
        differences.split_whitespace().collect::<Vec<_>>(),
        ["0", "0"]
    );

    let mut client = stack.superuser();
    let unicode: String = client
        .query_one(
            "SELECT value->>'power_pass' FROM vault_redirect_resolved.maasserver_secret
              WHERE path = 'bmc/15/power-parameters'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(unicode, "test-vmhost-ünïcode-日本-5c4b");
    let scalar: serde_json::Value = client
        .query_one(
            "SELECT value FROM vault_redirect_resolved.maasserver_secret
              WHERE path = 'rootkey/3/material'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(scalar, json!("test-rootkey-scalar-2a1b"));
}

#[test]
fn vault_change_seen_next_query() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    migrate(&stack);
    let mut client = stack.superuser();
    let query = "SELECT value->>'secret' FROM vault_redirect_resolved.maasserver_secret
                  WHERE path = 'global/rpc-shared'";
    let first: String = client.query_one(query, &[]).unwrap().get(0);
    assert_eq!(first, "test-rpc-4f1c9e0b7a2d");

    stack.kv_put("global/rpc-shared", &json!({"secret": "rotated-in-vault"}));
    let second: String = client.query_one(query, &[]).unwrap().get(0);
    assert_eq!(second, "rotated-in-vault");
}

#[test]
fn second_migrate_changes_nothing() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    migrate(&stack);
    let checksum = "SELECT md5(string_agg(t::text, '|' ORDER BY path)) FROM maasserver_secret t;
                    SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM maasserver_bmc t;";
    let before = stack.pg.psql(checksum);
    let version_before =
        stack.bao.kv_metadata("secret", "maas/global/tls").unwrap()["current_version"].clone();

    let error = stack
        .superuser()
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .expect_err("a second migrate is refused");
    assert_eq!(
        db_error(&error).code().code(),
        "42710",
        "{}",
        describe(&error)
    );
    assert_eq!(stack.pg.psql(checksum), before);
    let version_after =
        stack.bao.kv_metadata("secret", "maas/global/tls").unwrap()["current_version"].clone();
    assert_eq!(version_after, version_before);

    // A column declared later is migrated while the others are skipped.
    stack.pg.psql(
        "CREATE TABLE late (id int PRIMARY KEY, token text);
         INSERT INTO late VALUES (1, 'late-secret');
         SELECT vault_redirect.declare_column('late', 'token');",
    );
    let summary = migrate(&stack);
    assert_eq!(
        summary,
        vec![
            ("public.late".into(), "token".into(), 1, 0, 0),
            (
                "public.maasserver_bmc".into(),
                "power_parameters".into(),
                0,
                3,
                0
            ),
            ("public.maasserver_secret".into(), "value".into(), 0, 11, 0),
        ]
    );
    assert_eq!(stack.pg.psql(checksum), before);
}

#[test]
fn null_and_empty_round_trip() {
    let stack = Stack::configured(&[]);
    stack.pg.psql(
        "CREATE TABLE creds (id int PRIMARY KEY, pass text, extra jsonb);
         INSERT INTO creds VALUES
             (1, NULL, NULL), (2, '', '\"\"'), (3, 'x', 'null'), (4, ' ', '{}'), (5, 'ü', '[]');
         CREATE TABLE original AS SELECT * FROM creds;
         SELECT vault_redirect.declare_column('creds', 'pass');
         SELECT vault_redirect.declare_column('creds', 'extra');",
    );
    let summary = migrate(&stack);
    assert_eq!(
        summary,
        vec![
            ("public.creds".into(), "extra".into(), 4, 0, 1),
            ("public.creds".into(), "pass".into(), 4, 0, 1),
        ]
    );
    assert_eq!(
        stack.kv_get("public/creds/2/pass"),
        Some(json!({"secret": ""}))
    );
    let mismatches = stack.pg.psql(
        "SELECT count(*) FROM original o JOIN vault_redirect_resolved.creds v USING (id)
          WHERE o.pass IS DISTINCT FROM v.pass OR o.extra IS DISTINCT FROM v.extra;
         SELECT count(*) FROM vault_redirect_resolved.creds;",
    );
    assert_eq!(
        mismatches.split_whitespace().collect::<Vec<_>>(),
        ["0", "5"]
    );
}

#[test]
fn read_needs_execute_grant() {
    let stack = Stack::configured(&[]);
    stack.kv_put("global/rpc-shared", &json!({"secret": "granted-only"}));
    stack.pg.psql(
        "CREATE ROLE nobody LOGIN;
         CREATE ROLE reader LOGIN;
         GRANT USAGE ON SCHEMA vault_redirect TO nobody, reader;
         GRANT EXECUTE ON FUNCTION vault_redirect.read(text, text) TO reader;",
    );
    for function in [
        "vault_redirect.read('global/rpc-shared')",
        "vault_redirect.read_json('global/rpc-shared')::text",
    ] {
        let error = stack
            .pg
            .connect("nobody")
            .query_one(&format!("SELECT {function}"), &[])
            .expect_err("no EXECUTE grant");
        assert_eq!(
            db_error(&error).code().code(),
            "42501",
            "{}",
            describe(&error)
        );
    }
    let value: String = stack
        .pg
        .connect("reader")
        .query_one("SELECT vault_redirect.read('global/rpc-shared')", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)))
        .get(0);
    assert_eq!(value, "granted-only");

    let error = stack
        .pg
        .connect("reader")
        .execute(
            "SELECT vault_redirect.configure('http://127.0.0.1:1', 'a', 'b', 'c')",
            &[],
        )
        .expect_err("configure is for superusers");
    assert_eq!(db_error(&error).code().code(), "42501");
}

#[test]
fn view_filter_skips_excluded_rows() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    migrate(&stack);
    // A dangling reference: any query that resolves this row fails.
    stack.bao.kv_delete_all("secret", "maas/global/omapi-key");
    let mut client = stack.superuser();

    let value: String = client
        .query_one(
            "SELECT value->>'secret' FROM vault_redirect_resolved.maasserver_secret
              WHERE path = $1",
            &[&"global/rpc-shared"],
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)))
        .get(0);
    assert_eq!(value, "test-rpc-4f1c9e0b7a2d");
    let paths = client
        .query(
            "SELECT path, created FROM vault_redirect_resolved.maasserver_secret",
            &[],
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert_eq!(paths.len(), 11);
    let limited = client
        .query(
            "SELECT value FROM vault_redirect_resolved.maasserver_secret
              WHERE path LIKE 'bmc/%' ORDER BY path LIMIT 2",
            &[],
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert_eq!(limited.len(), 2);

    let error = client
        .query(
            "SELECT * FROM vault_redirect_resolved.maasserver_secret",
            &[],
        )
        .expect_err("the dangling row is resolved");
    let db = db_error(&error);
    assert_eq!(db.code().code(), "42704", "{}", describe(&error));
    assert!(
        db.message().contains("global/omapi-key"),
        "{}",
        describe(&error)
    );
    assert!(
        db.message().contains("maasserver_secret"),
        "{}",
        describe(&error)
    );
}

#[test]
fn search_path_keeps_app_sql() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    migrate(&stack);
    stack.pg.psql(
        "CREATE ROLE app LOGIN;
         GRANT SELECT ON maasserver_secret TO app;
         GRANT USAGE ON SCHEMA vault_redirect_resolved TO app;
         GRANT SELECT ON vault_redirect_resolved.maasserver_secret TO app;
         ALTER ROLE app SET search_path = vault_redirect_resolved, public;",
    );
    let mut app = stack.pg.connect("app");
    let value: serde_json::Value = app
        .query_one(
            "SELECT value FROM maasserver_secret WHERE path = $1",
            &[&"global/vcenter-password"],
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)))
        .get(0);
    assert_eq!(value, json!({"secret": "Test p@ss %20 #1? ñ"}));

    // Without the grant on the table itself the view shows nothing.
    stack
        .pg
        .psql("REVOKE SELECT ON maasserver_secret FROM app;");
    let error = app
        .query("SELECT value FROM maasserver_secret", &[])
        .expect_err("security_invoker view needs the table grant");
    assert_eq!(db_error(&error).code().code(), "42501");
}

#[test]
fn fixture_loads_as_plain_sql() {
    // The fixture is plain SQL that needs no extension.
    let pg = vault_redirect_tests::Pg::start();
    pg.psql(MAAS_FIXTURE);
    assert_eq!(
        pg.psql("SELECT count(*) FROM maasserver_secret;").trim(),
        "11"
    );
}

#[test]
fn declare_rejects_bad_targets() {
    let stack = Stack::configured(&[]);
    stack.pg.psql(
        "CREATE TABLE nokey (a int, secret text);
         CREATE VIEW a_view AS SELECT 1 AS id, 'x'::text AS secret;
         CREATE TABLE kv (path text, value jsonb);",
    );
    let mut client = stack.superuser();
    let cases = [
        (
            "SELECT vault_redirect.declare_column('a_view', 'secret')",
            "42809",
        ),
        (
            "SELECT vault_redirect.declare_column('nokey', 'secret')",
            "42P16",
        ),
        (
            "SELECT vault_redirect.declare_column('nokey', 'missing')",
            "42703",
        ),
        (
            "SELECT vault_redirect.declare_kv_table('kv', 'path', 'value')",
            "42P10",
        ),
        (
            "SELECT vault_redirect.declare_kv_table('kv', 'value', 'path')",
            "42804",
        ),
    ];
    for (sql, code) in cases {
        let error = client.execute(sql, &[]).expect_err(sql);
        let db = db_error(&error);
        assert_eq!(db.code().code(), code, "{sql}: {}", describe(&error));
        assert!(db.hint().is_some(), "{sql} has no hint");
    }
}
