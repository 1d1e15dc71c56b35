//! Transparent reads: with vault_redirect.transparent_reads on and the
//! library preloaded, queries on the declared tables themselves return
//! plaintext, as the MAAS ORM issues them.

use std::io::Read;
use std::sync::{Arc, Mutex};

use postgres::Client;
use serde_json::{json, Value};
use vault_redirect_tests::stack::{db_error, describe, Stack};

const PATH: &str = "global/vcenter-password";
const PLAINTEXT: &str = "Test p@ss %20 #1? ñ";
const SELECT_VALUE: &str = "SELECT value FROM maasserver_secret WHERE path = $1";

fn reference(path: &str) -> Value {
    json!({"$vault_redirect": path})
}

/// Starts a configured stack with the MAAS fixture migrated, and a role
/// `maas` with the table privileges MAAS has, the setting on and the library
/// in the database's session_preload_libraries.
fn migrated_stack() -> Stack {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    stack
        .superuser()
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap_or_else(|e| panic!("migrate failed: {}", describe(&e)));
    stack.pg.psql(
        "CREATE ROLE maas LOGIN;
         GRANT SELECT, INSERT, UPDATE, DELETE ON maasserver_secret, maasserver_bmc TO maas;
         ALTER ROLE maas SET vault_redirect.transparent_reads = on;
         ALTER DATABASE postgres SET session_preload_libraries = 'vault_redirect';",
    );
    stack
}

fn json_value(client: &mut Client, sql: &str, path: &str) -> Value {
    client
        .query_one(sql, &[&path])
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)))
        .get(0)
}

fn text_value(client: &mut Client, sql: &str, path: &str) -> String {
    client
        .query_one(sql, &[&path])
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)))
        .get(0)
}

#[test]
fn orm_select_returns_plaintext() {
    let stack = migrated_stack();
    let mut maas = stack.pg.connect("maas");
    assert_eq!(
        json_value(&mut maas, SELECT_VALUE, PATH),
        json!({"secret": PLAINTEXT})
    );
    let scalar = json_value(&mut maas, SELECT_VALUE, "rootkey/3/material");
    assert_eq!(scalar, json!("test-rootkey-scalar-2a1b"));

    maas.batch_execute("SET vault_redirect.transparent_reads = off")
        .unwrap();
    assert_eq!(json_value(&mut maas, SELECT_VALUE, PATH), reference(PATH));

    let mut admin = stack.superuser();
    assert_eq!(json_value(&mut admin, SELECT_VALUE, PATH), reference(PATH));
}

#[test]
fn writes_return_plaintext() {
    let stack = migrated_stack();
    let mut maas = stack.pg.connect("maas");
    let touched = json_value(
        &mut maas,
        "UPDATE maasserver_secret SET updated = now() WHERE path = $1 RETURNING value",
        PATH,
    );
    assert_eq!(touched, json!({"secret": PLAINTEXT}));

    // SET merges into the plaintext, not into the reference, and the write
    // trigger sends the result to Vault.
    let merged = json_value(
        &mut maas,
        "UPDATE maasserver_secret SET value = value || '{\"extra\": 1}' WHERE path = $1
         RETURNING value",
        "global/rpc-shared",
    );
    let expected = json!({"secret": "test-rpc-4f1c9e0b7a2d", "extra": 1});
    assert_eq!(merged, expected);
    let stored = json_value(&mut stack.superuser(), SELECT_VALUE, "global/rpc-shared");
    assert_eq!(stored, reference("global/rpc-shared"));
    assert_eq!(stack.kv_get("global/rpc-shared"), Some(expected));

    let upserted = json_value(
        &mut maas,
        "INSERT INTO maasserver_secret (path, value) VALUES ($1, '{\"x\": 2}')
         ON CONFLICT (path) DO UPDATE SET value = maasserver_secret.value || EXCLUDED.value
         RETURNING value",
        "global/macaroon-key",
    );
    assert_eq!(
        upserted,
        json!({"secret": "test-macaroon-8c3d2e1f", "x": 2})
    );

    let deleted = json_value(
        &mut maas,
        "DELETE FROM maasserver_secret WHERE path = $1 RETURNING value",
        "bmc/1/power-parameters",
    );
    assert_eq!(deleted, json!({"power_pass": "test-ipmi-61a2b3"}));
}

/// A row that the statement itself inserts, which the write trigger turns
/// into its own reference, resolves in RETURNING.
#[test]
fn insert_returning_sees_new_row() {
    let stack = migrated_stack();
    let mut maas = stack.pg.connect("maas");
    let inserted = json_value(
        &mut maas,
        "INSERT INTO maasserver_secret (path, value)
         VALUES ($1, '{\"secret\": \"fresh-row-secret\"}') RETURNING value",
        "node/9/token",
    );
    assert_eq!(inserted, json!({"secret": "fresh-row-secret"}));

    // The STABLE resolver checks the row with the statement's snapshot,
    // which does not contain the row the statement inserted. With the
    // setting off, only the explicit call resolves.
    maas.batch_execute("SET vault_redirect.transparent_reads = off")
        .unwrap();
    let error = maas
        .query_one(
            "INSERT INTO maasserver_secret (path, value)
             VALUES ($1, '{\"secret\": \"other-secret\"}')
             RETURNING vault_redirect.resolve_kv('maasserver_secret'::regclass, 'value',
                                                 path, value)",
            &[&"node/10/token"],
        )
        .expect_err("the statement snapshot misses the new row");
    assert_eq!(
        db_error(&error).code().code(),
        "42501",
        "{}",
        describe(&error)
    );
}

#[test]
fn nested_queries_resolve() {
    let stack = migrated_stack();
    let mut maas = stack.pg.connect("maas");
    let cases = [
        "SELECT value->>'secret' FROM maasserver_secret WHERE path = $1",
        "SELECT (SELECT value FROM maasserver_secret WHERE path = $1)->>'secret'",
        "WITH s AS (SELECT path, value FROM maasserver_secret)
         SELECT value->>'secret' FROM s WHERE path = $1",
        "SELECT q.v->>'secret' FROM (SELECT path, value AS v FROM maasserver_secret) q
          WHERE q.path = $1",
        "SELECT e.value #>> '{}' FROM maasserver_secret t, jsonb_each(t.value) e
          WHERE t.path = $1",
    ];
    for sql in cases {
        assert_eq!(text_value(&mut maas, sql, PATH), PLAINTEXT, "{sql}");
    }

    maas.batch_execute(
        "BEGIN;
         DECLARE c CURSOR FOR SELECT value->>'secret' FROM maasserver_secret
          WHERE path = 'global/vcenter-password';",
    )
    .unwrap();
    let fetched: String = maas.query_one("FETCH c", &[]).unwrap().get(0);
    assert_eq!(fetched, PLAINTEXT);
    maas.batch_execute("COMMIT").unwrap();

    let mut copied = String::new();
    maas.copy_out(
        "COPY (SELECT value->>'secret' FROM maasserver_secret
               WHERE path = 'global/vcenter-password') TO STDOUT",
    )
    .unwrap_or_else(|e| panic!("{}", describe(&e)))
    .read_to_string(&mut copied)
    .unwrap();
    assert_eq!(copied.trim_end(), PLAINTEXT);
    let plan: Vec<String> = maas
        .query("EXPLAIN (VERBOSE) SELECT value FROM maasserver_secret", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        plan.iter().any(|line| line.contains("resolve_kv(")),
        "{plan:?}"
    );

    // WHERE compares the stored references.
    let matches: i64 = maas
        .query_one(
            "SELECT count(*) FROM maasserver_secret WHERE value->>'secret' = $1",
            &[&PLAINTEXT],
        )
        .unwrap()
        .get(0);
    assert_eq!(matches, 0);
}

#[test]
fn wide_table_keeps_types() {
    let stack = migrated_stack();
    stack.pg.psql(
        "CREATE TABLE creds (id int, site text, pass text, extra jsonb, pin varchar(60),
                             PRIMARY KEY (id, site));
         INSERT INTO creds VALUES (1, 'a/b', 'pass-1', '{\"k\": \"extra-1\"}', 'pin-1'),
                                  (2, 'c', NULL, '[1, 2]', '');
         SELECT vault_redirect.declare_column('creds', 'pass');
         SELECT vault_redirect.declare_column('creds', 'extra');
         SELECT vault_redirect.declare_column('creds', 'pin');
         SELECT * FROM vault_redirect.migrate();
         GRANT SELECT ON creds TO maas;",
    );
    let stored = stack
        .pg
        .psql("SELECT pin FROM creds WHERE id = 1;")
        .trim()
        .to_owned();
    assert_eq!(stored, "$vault_redirect:public/creds/1/a%2Fb/pin");

    let mut maas = stack.pg.connect("maas");
    let statement = maas
        .prepare("SELECT pass, extra, pin FROM creds ORDER BY id")
        .unwrap();
    let types: Vec<String> = statement
        .columns()
        .iter()
        .map(|c| c.type_().name().to_owned())
        .collect();
    assert_eq!(types, ["text", "jsonb", "varchar"]);
    let rows = maas
        .query(&statement, &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert_eq!(
        rows[0].get::<_, Option<String>>(0).as_deref(),
        Some("pass-1")
    );
    assert_eq!(rows[0].get::<_, Value>(1), json!({"k": "extra-1"}));
    assert_eq!(rows[0].get::<_, String>(2), "pin-1");
    assert_eq!(rows[1].get::<_, Option<String>>(0), None);
    assert_eq!(rows[1].get::<_, Value>(1), json!([1, 2]));
    assert_eq!(rows[1].get::<_, String>(2), "");
}

#[test]
fn no_privileges_no_secret() {
    let stack = migrated_stack();
    stack.pg.psql(
        "CREATE ROLE nobody LOGIN;
         ALTER ROLE nobody SET vault_redirect.transparent_reads = on;
         CREATE TABLE creds (id int PRIMARY KEY, pass text);
         INSERT INTO creds VALUES (1, 'wide-secret');
         SELECT vault_redirect.declare_column('creds', 'pass');
         SELECT * FROM vault_redirect.migrate();",
    );
    let mut nobody = stack.pg.connect("nobody");
    let error = nobody
        .query(SELECT_VALUE, &[&PATH])
        .expect_err("no SELECT on the table");
    assert_eq!(
        db_error(&error).code().code(),
        "42501",
        "{}",
        describe(&error)
    );
    let crafted = [
        "SELECT vault_redirect.resolve_kv_written('maasserver_secret'::regclass, 'value',
                 'global/vcenter-password', '{\"$vault_redirect\": \"global/vcenter-password\"}')::text",
        "SELECT vault_redirect.resolve_column_text_written('creds'::regclass, 'pass',
                 ARRAY['1'], '$vault_redirect:public/creds/1/pass')",
        "SELECT vault_redirect.resolve_column_jsonb_written('maasserver_bmc'::regclass,
                 'power_parameters', ARRAY['1'],
                 '{\"$vault_redirect\": \"public/maasserver_bmc/1/power_parameters\"}')::text",
    ];
    for sql in crafted {
        let error = nobody.query_one(sql, &[]).expect_err(sql);
        assert_eq!(
            db_error(&error).code().code(),
            "42501",
            "{sql}: {}",
            describe(&error)
        );
    }
}

#[test]
fn row_security_hides_secrets() {
    let stack = migrated_stack();
    stack.pg.psql(
        "ALTER TABLE maasserver_secret ENABLE ROW LEVEL SECURITY;
         CREATE POLICY global_only ON maasserver_secret TO maas
             USING (path LIKE 'global/%');",
    );
    let mut maas = stack.pg.connect("maas");
    assert_eq!(
        json_value(&mut maas, SELECT_VALUE, PATH),
        json!({"secret": PLAINTEXT})
    );
    let hidden = maas
        .query(SELECT_VALUE, &[&"bmc/1/power-parameters"])
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert!(hidden.is_empty());
    let all: Vec<Value> = maas
        .query("SELECT value FROM maasserver_secret", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)))
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(all.len(), 5);
    assert!(!all
        .iter()
        .any(|v| v.to_string().contains("test-ipmi-61a2b3")));

    let error = maas
        .query_one(
            "SELECT vault_redirect.resolve_kv_written('maasserver_secret'::regclass, 'value',
                     'bmc/1/power-parameters',
                     '{\"$vault_redirect\": \"bmc/1/power-parameters\"}')::text",
            &[],
        )
        .expect_err("the row is hidden by the policy");
    assert_eq!(
        db_error(&error).code().code(),
        "42501",
        "{}",
        describe(&error)
    );
}

/// Changing the setting invalidates cached plans, so a prepared statement
/// follows the current value.
#[test]
fn prepared_statement_follows_setting() {
    let stack = migrated_stack();
    let mut maas = stack.pg.connect("maas");
    let statement = maas.prepare(SELECT_VALUE).unwrap();
    let run = |client: &mut Client| -> Value {
        client
            .query_one(&statement, &[&PATH])
            .unwrap_or_else(|e| panic!("{}", describe(&e)))
            .get(0)
    };
    assert_eq!(run(&mut maas), json!({"secret": PLAINTEXT}));
    maas.batch_execute("SET vault_redirect.transparent_reads = off")
        .unwrap();
    assert_eq!(run(&mut maas), reference(PATH));
    maas.batch_execute("SET vault_redirect.transparent_reads = on")
        .unwrap();
    assert_eq!(run(&mut maas), json!({"secret": PLAINTEXT}));
}

/// Without the preload, statements return references until something loads
/// the library, which then warns.
#[test]
fn without_preload_reads_references() {
    let stack = migrated_stack();
    stack
        .pg
        .psql("ALTER DATABASE postgres RESET session_preload_libraries;");
    let notices = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&notices);
    let mut maas = stack
        .pg
        .config("maas")
        .notice_callback(move |notice| sink.lock().unwrap().push(notice.message().to_owned()))
        .connect(postgres::NoTls)
        .unwrap();
    assert_eq!(json_value(&mut maas, SELECT_VALUE, PATH), reference(PATH));

    // Any call of an extension function loads the library.
    maas.batch_execute("SELECT vault_redirect.resolve_kv(0, 'value', NULL, NULL)")
        .unwrap();
    let warned = notices
        .lock()
        .unwrap()
        .iter()
        .any(|message| message.contains("was loaded only now"));
    assert!(warned, "{:?}", notices.lock().unwrap());
    assert_eq!(
        json_value(&mut maas, SELECT_VALUE, PATH),
        json!({"secret": PLAINTEXT})
    );
}

/// The extension's own functions and CREATE VIEW see the stored values
/// while the setting is on.
#[test]
fn extension_functions_see_references() {
    let stack = migrated_stack();
    let mut admin = stack.superuser();
    admin
        .batch_execute(
            "SET vault_redirect.transparent_reads = on;
             CREATE VIEW secret_copy AS SELECT path, value FROM maasserver_secret;",
        )
        .unwrap();
    assert_eq!(
        json_value(&mut admin, SELECT_VALUE, PATH),
        json!({"secret": PLAINTEXT})
    );
    let definition: String = admin
        .query_one("SELECT pg_get_viewdef('secret_copy'::regclass)", &[])
        .unwrap()
        .get(0);
    assert!(!definition.contains("resolve"), "{definition}");

    let broken = admin
        .query("SELECT * FROM vault_redirect.verify()", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert!(broken.is_empty());
    let error = admin
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .expect_err("everything is migrated already");
    assert_eq!(
        db_error(&error).code().code(),
        "42710",
        "{}",
        describe(&error)
    );
}

/// MAAS's four statements on `maasserver_secret`, unchanged, with writes
/// redirected to Vault and reads resolved in place.
#[test]
fn maas_statements_round_trip() {
    let stack = migrated_stack();
    let mut maas = stack.pg.connect("maas");
    let upsert = "INSERT INTO maasserver_secret (created, updated, path, value)
                  VALUES (now(), now(), $1, $2)
                  ON CONFLICT (path) DO UPDATE
                     SET value = EXCLUDED.value, updated = EXCLUDED.updated
                  RETURNING value";

    let new_value = json!({"secret": "w-orm-1b7e"});
    let returned: Value = maas
        .query_one(upsert, &[&"bmc/3/power-parameters", &new_value])
        .unwrap_or_else(|e| panic!("upsert failed: {}", describe(&e)))
        .get(0);
    assert_eq!(returned, new_value, "RETURNING of a new row");
    assert_eq!(
        stack.kv_get("bmc/3/power-parameters"),
        Some(new_value.clone())
    );

    let replaced = json!({"secret": "w-orm-2c8f"});
    let returned: Value = maas
        .query_one(upsert, &[&"bmc/3/power-parameters", &replaced])
        .unwrap()
        .get(0);
    assert_eq!(returned, replaced, "RETURNING of an updated row");
    assert_eq!(
        json_value(&mut maas, SELECT_VALUE, "bmc/3/power-parameters"),
        replaced
    );

    let updated = json!({"secret": "w-orm-3d9a"});
    maas.execute(
        "UPDATE maasserver_secret SET value = $1 WHERE path = $2",
        &[&updated, &"bmc/3/power-parameters"],
    )
    .unwrap();
    assert_eq!(
        json_value(&mut maas, SELECT_VALUE, "bmc/3/power-parameters"),
        updated
    );
    let mut admin = stack.superuser();
    assert_eq!(
        json_value(&mut admin, SELECT_VALUE, "bmc/3/power-parameters"),
        reference("bmc/3/power-parameters"),
        "the row keeps the reference"
    );

    // Inside a transaction, the reads see its own writes before they reach
    // Vault.
    let mut tx = maas.transaction().unwrap();
    tx.execute(
        "UPDATE maasserver_secret SET value = $1 WHERE path = $2",
        &[
            &json!({"secret": "w-orm-pending"}),
            &"bmc/3/power-parameters",
        ],
    )
    .unwrap();
    let inside: Value = tx
        .query_one(SELECT_VALUE, &[&"bmc/3/power-parameters"])
        .unwrap()
        .get(0);
    assert_eq!(inside, json!({"secret": "w-orm-pending"}));
    tx.rollback().unwrap();
    assert_eq!(stack.kv_get("bmc/3/power-parameters"), Some(updated));

    let deleted = maas
        .execute(
            "DELETE FROM maasserver_secret WHERE path LIKE 'bmc/3/%'",
            &[],
        )
        .unwrap();
    assert_eq!(deleted, 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while stack.kv_get("bmc/3/power-parameters").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the entry of the deleted row is still in Vault"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A SECURITY DEFINER function runs its queries as its owner, so the
/// caller's setting must not turn what it returns into plaintext.
#[test]
fn definer_functions_not_rewritten() {
    let stack = migrated_stack();
    stack.pg.psql(
        "CREATE FUNCTION public.value_of(p text) RETURNS jsonb LANGUAGE sql SECURITY DEFINER
             SET search_path = pg_catalog
             AS $$ SELECT value FROM public.maasserver_secret WHERE path = p $$;
         REVOKE ALL ON FUNCTION public.value_of(text) FROM PUBLIC;
         CREATE ROLE lowpriv LOGIN;
         GRANT EXECUTE ON FUNCTION public.value_of(text) TO lowpriv;",
    );
    let mut lowpriv = stack.pg.connect("lowpriv");
    lowpriv
        .batch_execute("SET vault_redirect.transparent_reads = on")
        .unwrap();
    assert_eq!(
        json_value(&mut lowpriv, "SELECT public.value_of($1)", PATH),
        reference(PATH)
    );
}
