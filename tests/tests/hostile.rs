//! Attempts to read secrets without the rights to, and hostile or awkward
//! input: every case ends in a clean round trip or a clear error, and no
//! secret reaches a role that may not read it.

use serde_json::json;
use vault_redirect_tests::stack::{db_error, describe, Stack};

fn expect_code(result: Result<impl Sized, postgres::Error>, code: &str, what: &str) {
    match result {
        Ok(_) => panic!("{what} succeeded, expected {code}"),
        Err(error) => assert_eq!(
            db_error(&error).code().code(),
            code,
            "{what}: {}",
            describe(&error)
        ),
    }
}

#[test]
fn crafted_resolve_calls_denied() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    stack
        .superuser()
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap();
    stack.pg.psql(
        "CREATE ROLE mallory LOGIN;
         CREATE TABLE public.mine (path text PRIMARY KEY, value jsonb);
         INSERT INTO public.mine VALUES
             ('global/omapi-key', '{\"$vault_redirect\": \"global/omapi-key\"}');
         ALTER TABLE public.mine OWNER TO mallory;",
    );
    let mut mallory = stack.pg.connect("mallory");
    // The resolve functions are executable by every role, but resolve only
    // rows of declared tables that the caller can see.
    let attempts = [
        "SELECT vault_redirect.resolve_kv('public.maasserver_secret'::regclass::oid, 'value',
                'global/omapi-key', '{\"$vault_redirect\": \"global/omapi-key\"}')::text",
        "SELECT vault_redirect.resolve_kv('public.mine'::regclass::oid, 'value',
                'global/omapi-key', '{\"$vault_redirect\": \"global/omapi-key\"}')::text",
        "SELECT vault_redirect.resolve_column_jsonb('public.maasserver_bmc'::regclass::oid,
                'power_parameters', ARRAY['1'],
                '{\"$vault_redirect\": \"public/maasserver_bmc/1/power_parameters\"}')::text",
    ];
    for sql in attempts {
        expect_code(mallory.query_one(sql, &[]), "42501", sql);
    }
    // A reference that is not the row's own is returned as it is.
    let passed: String = mallory
        .query_one(
            "SELECT vault_redirect.resolve_kv('public.maasserver_secret'::regclass::oid, 'value',
                    'other/path', '{\"$vault_redirect\": \"global/omapi-key\"}')::text",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!passed.contains("dGVzdC1vbWFwaS1rZXk"));
    for sql in [
        "SELECT vault_redirect.read('global/omapi-key')",
        "SELECT * FROM vault_redirect.status()",
        "SELECT * FROM vault_redirect_resolved.maasserver_secret",
        "SELECT * FROM maasserver_secret",
    ] {
        expect_code(mallory.query(sql, &[]), "42501", sql);
    }
}

#[test]
fn row_level_security_hides_secrets() {
    let stack = Stack::configured(&[]);
    stack.pg.psql(
        "CREATE TABLE tenant_pw (tenant text PRIMARY KEY, pw text);
         INSERT INTO tenant_pw VALUES ('alice', 'alice-pw-1'), ('bob', 'bob-pw-2');
         SELECT vault_redirect.declare_column('tenant_pw', 'pw');
         SELECT * FROM vault_redirect.migrate();
         ALTER TABLE tenant_pw ENABLE ROW LEVEL SECURITY;
         CREATE ROLE alice LOGIN;
         CREATE POLICY own ON tenant_pw TO alice USING (tenant = current_user);
         GRANT SELECT ON tenant_pw TO alice;
         GRANT USAGE ON SCHEMA vault_redirect_resolved TO alice;
         GRANT SELECT ON vault_redirect_resolved.tenant_pw TO alice;",
    );
    let mut alice = stack.pg.connect("alice");
    let rows = alice
        .query(
            "SELECT tenant, pw FROM vault_redirect_resolved.tenant_pw",
            &[],
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let seen: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(seen, [("alice".to_owned(), "alice-pw-1".to_owned())]);
    expect_code(
        alice.query_one(
            "SELECT vault_redirect.resolve_column_text('public.tenant_pw'::regclass::oid, 'pw',
                    ARRAY['bob'], '$vault_redirect:public/tenant_pw/bob/pw')",
            &[],
        ),
        "42501",
        "resolving bob's hidden row",
    );
}

#[test]
fn plaintext_after_migration_migrates() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    let mut client = stack.superuser();
    client
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap();
    // A write after the migration goes to Vault at once.
    client
        .execute(
            "INSERT INTO maasserver_secret (path, value) VALUES ('global/late', '{\"secret\": \"late-1\"}')",
            &[],
        )
        .unwrap();
    assert_eq!(
        stack.kv_get("global/late"),
        Some(json!({"secret": "late-1"}))
    );
    let error = client
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .expect_err("nothing is left to migrate");
    assert_eq!(
        db_error(&error).code().code(),
        "42710",
        "{}",
        describe(&error)
    );

    // Plaintext that a superuser let in with the trigger disabled is moved
    // by the next migrate().
    client
        .batch_execute(
            "ALTER TABLE maasserver_secret DISABLE TRIGGER zz_vault_redirect_write;
             INSERT INTO maasserver_secret (path, value) VALUES ('global/bypass', '{\"secret\": \"late-2\"}');
             ALTER TABLE maasserver_secret ENABLE ALWAYS TRIGGER zz_vault_redirect_write;",
        )
        .unwrap();
    let moved: i64 = client
        .query_one(
            "SELECT sum(migrated)::bigint FROM vault_redirect.migrate()",
            &[],
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)))
        .get(0);
    assert_eq!(moved, 1);
    assert_eq!(
        stack.kv_get("global/bypass"),
        Some(json!({"secret": "late-2"}))
    );
}

#[test]
fn reference_lookalike_is_plaintext() {
    let stack = Stack::configured(&[]);
    stack.pg.psql(
        "CREATE TABLE notes (id int PRIMARY KEY, body text, doc jsonb);
         INSERT INTO notes VALUES
             (1, '$vault_redirect:hello', '{\"$vault_redirect\": \"elsewhere\"}'),
             (2, 'plain', '{}');
         SELECT vault_redirect.declare_column('notes', 'body');
         SELECT vault_redirect.declare_column('notes', 'doc');",
    );
    let before = stack
        .pg
        .psql("SELECT body, doc FROM vault_redirect_resolved.notes ORDER BY id;");
    stack
        .superuser()
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let after = stack
        .pg
        .psql("SELECT body, doc FROM vault_redirect_resolved.notes ORDER BY id;");
    assert_eq!(after, before);
    assert_eq!(
        stack.kv_get("public/notes/1/body"),
        Some(json!({"secret": "$vault_redirect:hello"}))
    );
}

#[test]
fn declare_edge_cases_rejected() {
    let stack = Stack::configured(&[]);
    stack.pg.psql(
        "CREATE SCHEMA s2;
         CREATE TABLE public.dup (id int PRIMARY KEY, pw text);
         CREATE TABLE s2.dup (id int PRIMARY KEY, pw text);
         CREATE TABLE tspk (ts timestamptz PRIMARY KEY, pw text);
         CREATE TABLE reserved (id int PRIMARY KEY, pw text);
         SELECT vault_redirect.declare_column('public.dup', 'pw');",
    );
    let mut client = stack.superuser();
    let cases = [
        (
            "SELECT vault_redirect.declare_column('s2.dup', 'pw')",
            "42P07",
        ),
        (
            "SELECT vault_redirect.declare_column('tspk', 'pw')",
            "0A000",
        ),
        (
            "SELECT vault_redirect.declare_column('reserved', 'pw', '_vault_redirect/servers')",
            "42939",
        ),
        ("SELECT vault_redirect.read('global/%2e%2e/x')", "22023"),
        ("SELECT vault_redirect.read('/global/x')", "22023"),
        ("SELECT vault_redirect.read('global//x')", "22023"),
    ];
    for (sql, code) in cases {
        let error = client.execute(sql, &[]).expect_err(sql);
        let db = db_error(&error);
        assert_eq!(db.code().code(), code, "{sql}: {}", describe(&error));
        assert!(db.hint().is_some(), "{sql} has no hint");
    }
    // Another view schema resolves the clash.
    client
        .execute(
            "SELECT vault_redirect.declare_column('s2.dup', 'pw', view_schema => 's2_resolved')",
            &[],
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
}

#[test]
fn short_varchar_names_row() {
    let stack = Stack::configured(&[]);
    stack.pg.psql(
        "CREATE TABLE pins (id int PRIMARY KEY, pin varchar(5));
         INSERT INTO pins VALUES (7, '1234');
         SELECT vault_redirect.declare_column('pins', 'pin');",
    );
    let error = stack
        .superuser()
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .expect_err("the reference does not fit");
    let db = db_error(&error);
    assert_eq!(db.code().code(), "22001", "{}", describe(&error));
    assert!(
        db.message().contains("row (7) of public.pins"),
        "{}",
        describe(&error)
    );
    assert!(db.hint().unwrap_or_default().contains("Widen"));
    assert_eq!(stack.pg.psql("SELECT pin FROM pins;").trim(), "1234");
}

#[test]
fn dropped_column_undeclared() {
    let stack = Stack::configured(&[]);
    stack.pg.psql(
        "CREATE TABLE creds (id int PRIMARY KEY, a text, b text);
         INSERT INTO creds VALUES (1, 'a-secret', 'b-secret');
         SELECT vault_redirect.declare_column('creds', 'a');
         SELECT vault_redirect.declare_column('creds', 'b');
         ALTER TABLE creds DROP COLUMN a CASCADE;",
    );
    let mut client = stack.superuser();
    let error = client
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .expect_err("the dropped column is still declared");
    let db = db_error(&error);
    assert_eq!(db.code().code(), "42703", "{}", describe(&error));
    assert!(db.hint().unwrap_or_default().contains("undeclare"));

    client
        .execute(
            "SELECT vault_redirect.undeclare('public', 'creds', 'a')",
            &[],
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    client
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let b: String = client
        .query_one("SELECT b FROM vault_redirect_resolved.creds", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)))
        .get(0);
    assert_eq!(b, "b-secret");

    // A column that holds references cannot be undeclared.
    expect_code(
        client.execute(
            "SELECT vault_redirect.undeclare('public', 'creds', 'b')",
            &[],
        ),
        "55000",
        "undeclare of a migrated column",
    );
}

#[test]
fn renamed_column_stops_writes() {
    let stack = Stack::configured(&[]);
    stack.pg.psql(
        "CREATE TABLE creds (id int PRIMARY KEY, pass text);
         INSERT INTO creds VALUES (1, 'old-secret');
         SELECT vault_redirect.declare_column('creds', 'pass');
         SELECT * FROM vault_redirect.migrate();
         ALTER TABLE creds RENAME COLUMN pass TO password;",
    );
    let mut client = stack.superuser();
    // The write trigger cannot find the declared column, so it stops the
    // write rather than let plaintext into the renamed column.
    let error = client
        .execute("INSERT INTO creds VALUES (2, 'new-secret')", &[])
        .expect_err("a write to a table whose declared column was renamed");
    let db = db_error(&error);
    assert_eq!(db.code().code(), "42703", "{}", describe(&error));
    assert!(db.message().contains("\"pass\""), "{}", describe(&error));
    assert!(db.hint().unwrap_or_default().contains("undeclare"));
    let rows: i64 = client
        .query_one("SELECT count(*) FROM creds", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the failed INSERT stored a row");
    assert_eq!(
        stack.kv_get("public/creds/1/pass"),
        Some(json!({"secret": "old-secret"}))
    );
}

#[test]
fn successful_configure_logs_no_credentials() {
    let stack = Stack::configured(&[]);
    let log = stack.pg.log_contents();
    assert!(log.contains("configured for"), "the milestone is logged");
    assert!(
        !log.contains(&stack.role_id),
        "the role_id is in the server log"
    );
    assert!(!log.contains("vault_redirect.configure("));
}

#[test]
fn failed_configure_logs_literals() {
    // PostgreSQL writes the statement of a failed call to the server log
    // under the default log_min_error_statement, literals included. The
    // tokens here are made up.
    let stack = Stack::configured(&[]);
    let logged = "made-up-wrapping-token-7f3a91";
    let hidden = "made-up-wrapping-token-9c2e44";
    let call = |token: &str| {
        format!(
            "SELECT vault_redirect.configure('{}', 'made-up-role-id', '{token}', 'maas')",
            stack.bao.addr()
        )
    };

    let mut client = stack.superuser();
    client
        .batch_execute(&call(logged))
        .expect_err("a made-up wrapping token fails");
    client
        .batch_execute("SET log_min_error_statement = panic")
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    client
        .batch_execute(&call(hidden))
        .expect_err("a made-up wrapping token fails");

    let log = stack.pg.log_contents();
    assert!(
        log.contains(logged),
        "the failed configure() statement is not in the server log"
    );
    assert!(
        !log.contains(hidden),
        "the failed configure() statement is logged after SET log_min_error_statement = panic"
    );
}

#[test]
fn odd_keys_and_identifiers_round_trip() {
    let stack = Stack::configured(&[]);
    stack.pg.psql(
        "CREATE SCHEMA \"My Schema\";
         CREATE TABLE \"My Schema\".\"My Table\" (
             \"Region\" text, \"Node Id\" int, \"Pass Word\" text,
             PRIMARY KEY (\"Region\", \"Node Id\"));
         INSERT INTO \"My Schema\".\"My Table\" VALUES
             ('eu/west %41 #1?', 1, 'pw with spaces & ünï'),
             ('..', 2, 'dots'),
             ('', 3, 'empty region'),
             ('trailing ', 4, 'trailing space');
         CREATE TABLE big (id int PRIMARY KEY, blob text);
         INSERT INTO big VALUES (1, repeat('x', 1100000));
         CREATE TABLE original AS SELECT * FROM \"My Schema\".\"My Table\";
         SELECT vault_redirect.declare_column('\"My Schema\".\"My Table\"', 'Pass Word');
         SELECT vault_redirect.declare_column('big', 'blob');",
    );
    stack
        .superuser()
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let differences = stack.pg.psql(
        "SELECT count(*) FROM (
             (SELECT * FROM vault_redirect_resolved.\"My Table\" EXCEPT SELECT * FROM original)
             UNION ALL
             (SELECT * FROM original EXCEPT SELECT * FROM vault_redirect_resolved.\"My Table\")) d;
         SELECT length(blob) FROM vault_redirect_resolved.big;
         SELECT count(*) FROM \"My Schema\".\"My Table\" WHERE \"Pass Word\" NOT LIKE '$vault_redirect:%';",
    );
    assert_eq!(
        differences.split_whitespace().collect::<Vec<_>>(),
        ["0", "1100000", "0"]
    );
    // Each key value is one path segment, with `/` and `%` escaped.
    assert_eq!(
        stack.kv_get("My Schema/My Table/eu%2Fwest %2541 #1?/1/Pass Word"),
        Some(json!({"secret": "pw with spaces & ünï"}))
    );
    assert_eq!(
        stack.kv_get("My Schema/My Table/%../2/Pass Word"),
        Some(json!({"secret": "dots"}))
    );
}

#[test]
fn pg_dump_holds_no_secret_id() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    stack
        .superuser()
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap();
    let secret_id = stack.stored_secret_id();
    let output = std::process::Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "/usr/lib/postgresql/15/bin/pg_dump",
            "-h",
        ])
        .arg(stack.pg.data_dir())
        .args(["-p", &stack.pg.port().to_string(), "-d", "postgres"])
        .current_dir("/")
        .output()
        .expect("pg_dump runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dump = String::from_utf8_lossy(&output.stdout);
    assert!(
        dump.contains("secret_columns"),
        "the declarations are dumped"
    );
    assert!(!dump.contains(&secret_id));
    assert!(
        !dump.contains("test-rpc-4f1c9e0b7a2d"),
        "a migrated secret is in the dump"
    );
}
