//! Privileges of three roles after configure() and migrate(): the
//! superuser, an application role `app` with SELECT, INSERT, UPDATE and
//! DELETE on the MAAS tables and their resolved views, and `nobody`, a role
//! with LOGIN and no privilege at all.
//!
//! The sweeps enumerate the extension's functions and relations from the
//! catalogs, so a function or table added later is checked without editing
//! this file. No assertion prints a value returned to a role, because that
//! value could be a secret.

use std::collections::BTreeSet;

use postgres::Client;
use vault_redirect_tests::stack::{db_error, describe, Stack};

/// Plaintext strings of the MAAS fixture and of [`EXTRA_TABLE`]. None of
/// them may reach `nobody`, and `app` reads them only through the views.
const SECRETS: &[&str] = &[
    "test-rpc-4f1c9e0b7a2d",
    "dGVzdC1vbWFwaS1rZXktbm90LXJlYWwtMDAwMDAwMDAwMA==",
    "test-macaroon-8c3d2e1f",
    "Test p@ss %20 #1?",
    "test-key-body",
    "test-cert-body",
    "test-ipmi-61a2b3",
    "test-redfish-9d8e7f",
    "test-vmhost-",
    "test-cloud-7e6d",
    "test-rootkey-scalar-2a1b",
    "test-db-pass-0f9e",
    "test-bmc-pass-1111",
    "test-bmc-pass-2222",
    "ipmi-user-pass-31",
    "ipmi-user-pass-32",
];

/// A wide table with a `text` secret column, next to the MAAS tables, so
/// that `resolve_column_text` has real references to be called with.
const EXTRA_TABLE: &str = "
    CREATE TABLE public.bmc_credential (
        bmc_id bigint, username text, password text,
        PRIMARY KEY (bmc_id, username));
    INSERT INTO public.bmc_credential VALUES
        (1, 'maas', 'ipmi-user-pass-31'), (2, 'ops/admin', 'ipmi-user-pass-32');
    SELECT vault_redirect.declare_column('public.bmc_credential', 'password');";

/// The roles. `app` gets what the MAAS application needs and `nobody`
/// nothing. PostgreSQL 15 grants CONNECT and TEMP on a database to PUBLIC,
/// so `nobody` can connect and create temporary tables.
const ROLES: &str = "
    CREATE ROLE app LOGIN;
    CREATE ROLE nobody LOGIN;
    GRANT SELECT, INSERT, UPDATE, DELETE
       ON public.maasserver_secret, public.maasserver_bmc, public.bmc_credential TO app;
    GRANT USAGE ON SCHEMA vault_redirect_resolved TO app;
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA vault_redirect_resolved TO app;";

/// Functions that every role may execute, each with the reason.
///
/// The resolved views are `security_invoker` views that call these for
/// each row, so every reader of a view needs them. They resolve a value
/// only when it is the reference of a row of a declared table that the
/// calling role can see, so they give no more than SELECT on that table.
/// The `*_written` twins make the same checks with a fresh snapshot, for
/// the RETURNING lists that transparent reads rewrite. The sweep still
/// calls them all as `nobody` with real references.
const EXECUTABLE_BY_EVERY_ROLE: &[&str] = &[
    "resolve_column_jsonb",
    "resolve_column_jsonb_written",
    "resolve_column_text",
    "resolve_column_text_written",
    "resolve_kv",
    "resolve_kv_written",
];

/// The columns of `vault_redirect.secret_columns`, which every role can
/// read. A new column must contain no secret before it is added here.
/// `secret_keys` contains the names of JSON keys, not their values.
const SECRET_COLUMNS_COLUMNS: &[&str] = &[
    "table_schema",
    "table_name",
    "column_name",
    "shape",
    "path_column",
    "key_columns",
    "path_prefix",
    "secret_keys",
    "view_schema",
    "declared_at",
    "migrated_at",
];

/// Starts a configured stack, migrates the MAAS tables and
/// [`EXTRA_TABLE`], and creates the roles `app` and `nobody`.
fn migrated_stack() -> Stack {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    stack.pg.psql(EXTRA_TABLE);
    stack
        .superuser()
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap_or_else(|e| panic!("migrate failed: {}", describe(&e)));
    stack.pg.psql(ROLES);
    stack
}

/// Connects as `role` with a statement timeout, so that a call that
/// unexpectedly reaches Vault cannot hang the test.
fn connect_as(stack: &Stack, role: &str) -> Client {
    let mut client = stack.pg.connect(role);
    client
        .batch_execute("SET statement_timeout = '20s'")
        .unwrap_or_else(|e| panic!("SET statement_timeout as {role}: {}", describe(&e)));
    client
}

/// Asserts that `sql` fails with SQLSTATE 42501 for the client's role.
/// `what` names the check in the failure message. A statement that
/// succeeds is reported without its result, which could be a secret.
fn expect_denied(client: &mut Client, sql: &str, what: &str) {
    match client.query(sql, &[]) {
        Ok(rows) => panic!(
            "{what}: expected SQLSTATE 42501, but `{sql}` succeeded and returned {} row(s)",
            rows.len()
        ),
        Err(error) => assert_eq!(
            db_error(&error).code().code(),
            "42501",
            "{what}: expected SQLSTATE 42501 from `{sql}`, got {}",
            describe(&error)
        ),
    }
}

/// Asserts that `text` contains none of [`SECRETS`] nor `credentials`.
/// Reports which one by its position, never by its value.
fn assert_no_secret(text: &str, credentials: &[&str], what: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} contains a fixture secret");
    }
    for (i, credential) in credentials.iter().enumerate() {
        assert!(
            !text.contains(credential),
            "{what} contains credential #{i} (0: role_id, 1: secret_id)"
        );
    }
}

/// Quotes `value` as an SQL string literal.
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn query_strings(client: &mut Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .unwrap_or_else(|e| panic!("`{sql}` as the superuser failed: {}", describe(&e)))
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// One row of a declared column as the superuser reads it from the table:
/// what a role that copied the row's reference would pass to a resolver.
struct CopiedRow {
    table_oid: u32,
    column_name: String,
    /// `jsonb` or `text`, the type of the declared column.
    column_type: String,
    /// The path column's value, for a key/value table.
    path: Option<String>,
    /// The primary key values as text, for a wide table.
    key_values: Option<Vec<String>>,
    /// The column's value, which after migrate() is the row's reference.
    value: String,
}

/// Copies every non-NULL value of every declared column, with the row's
/// path or key values, as the superuser.
fn copied_rows(client: &mut Client) -> Vec<CopiedRow> {
    let declarations = client
        .query(
            "SELECT c.oid, d.column_name::text, d.path_column::text, d.key_columns::text[],
                    format_type(a.atttypid, NULL), format('%I.%I', d.table_schema, d.table_name)
               FROM vault_redirect.secret_columns d
               JOIN pg_namespace n ON n.nspname = d.table_schema
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = d.table_name
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = d.column_name
              ORDER BY 6, 2",
            &[],
        )
        .unwrap_or_else(|e| panic!("reading the declarations failed: {}", describe(&e)));
    let mut copied = Vec::new();
    for declaration in declarations {
        let table_oid: u32 = declaration.get(0);
        let column_name: String = declaration.get(1);
        let path_column: Option<String> = declaration.get(2);
        let key_columns: Vec<String> = declaration.get(3);
        let column_type: String = declaration.get(4);
        let table: String = declaration.get(5);
        let keys = match &path_column {
            Some(path_column) => format!("ARRAY[{}::text]", quote_ident(path_column)),
            None => {
                let items: Vec<String> = key_columns
                    .iter()
                    .map(|k| format!("{}::text", quote_ident(k)))
                    .collect();
                format!("ARRAY[{}]", items.join(", "))
            }
        };
        let sql = format!(
            "SELECT {keys}, {column}::text FROM {table} WHERE {column} IS NOT NULL",
            column = quote_ident(&column_name)
        );
        for row in client
            .query(&sql, &[])
            .unwrap_or_else(|e| panic!("`{sql}` failed: {}", describe(&e)))
        {
            let keys: Vec<String> = row.get(0);
            let (path, key_values) = match path_column {
                Some(_) => (keys.into_iter().next(), None),
                None => (None, Some(keys)),
            };
            copied.push(CopiedRow {
                table_oid,
                column_name: column_name.clone(),
                column_type: column_type.clone(),
                path,
                key_values,
                value: row.get(1),
            });
        }
    }
    copied
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A function of the extension, from pg_proc.
struct Function {
    name: String,
    /// Argument names, empty where the argument has none.
    arg_names: Vec<String>,
    /// Argument types as `format_type` writes them.
    arg_types: Vec<String>,
    returns_set: bool,
    /// Whether it returns `trigger`, so that only a trigger can call it.
    returns_trigger: bool,
}

fn extension_functions(client: &mut Client) -> Vec<Function> {
    client
        .query(
            "SELECT p.proname::text,
                    ARRAY(SELECT coalesce(p.proargnames[i], '') FROM generate_series(1, p.pronargs) i
                           ORDER BY i),
                    ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) WITH ORDINALITY AS a(t, i)
                           ORDER BY i),
                    p.proretset, p.prorettype = 'trigger'::regtype
               FROM pg_proc p
              WHERE p.pronamespace = 'vault_redirect'::regnamespace
              ORDER BY p.proname, p.oid",
            &[],
        )
        .unwrap_or_else(|e| panic!("listing the extension's functions failed: {}", describe(&e)))
        .iter()
        .map(|row| Function {
            name: row.get(0),
            arg_names: row.get(1),
            arg_types: row.get(2),
            returns_set: row.get(3),
            returns_trigger: row.get(4),
        })
        .collect()
}

/// Argument values for calls that no copied row fits: plausible values of
/// the argument's name and type. Credentials are placeholders, and the URL
/// is the test's own OpenBao server.
fn default_argument(name: &str, arg_type: &str, stack: &Stack, table_oid: u32) -> String {
    match (name, arg_type) {
        ("url", _) => literal(&stack.bao.addr()),
        ("role_id", _) => literal("not-a-role-id"),
        ("wrapped_token", _) => literal("not-a-wrapping-token"),
        ("table_oid", _) | (_, "oid") => format!("{table_oid}::oid"),
        ("table_name", _) => literal("public.maasserver_secret"),
        ("table_schema", _) => literal("public"),
        ("column_name" | "value_column", _) => literal("value"),
        ("path_column", _) => literal("path"),
        ("server_name", _) => literal("pg-test"),
        ("key", _) => literal("secret"),
        (_, "boolean") => "false".into(),
        (_, "integer" | "bigint" | "smallint") => "1".into(),
        (_, "jsonb") => literal(r#"{"$vault_redirect": "global/rpc-shared"}"#) + "::jsonb",
        (_, "text[]") => "ARRAY['global/rpc-shared']".into(),
        (_, arg_type) => format!("{}::{arg_type}", literal("global/rpc-shared")),
    }
}

/// Returns the value a copied row gives the argument, `Some(None)` when
/// the argument is not one that a row fills, and `None` when the row does
/// not fit the argument, such as a `path` for a wide table's row.
fn row_argument(name: &str, arg_type: &str, row: &CopiedRow) -> Option<Option<String>> {
    let value = match name {
        "table_oid" => format!("{}::oid", row.table_oid),
        "column_name" => literal(&row.column_name),
        "path" => literal(row.path.as_ref()?),
        "key_values" => {
            let items: Vec<String> = row
                .key_values
                .as_ref()?
                .iter()
                .map(|k| literal(k))
                .collect();
            format!("ARRAY[{}]::text[]", items.join(", "))
        }
        "value" if arg_type == row.column_type => format!("{}::{arg_type}", literal(&row.value)),
        "value" => return None,
        _ => return Some(None),
    };
    Some(Some(value))
}

/// Returns the SQL that calls `function` with `values` as its arguments.
fn call_sql(function: &Function, values: &[String]) -> String {
    let call = format!("vault_redirect.{}({})", function.name, values.join(", "));
    match function.returns_set {
        true => format!("SELECT * FROM {call}"),
        false => format!("SELECT {call}"),
    }
}

/// Builds one call of `function` for each copied row that fits all of its
/// arguments. Arguments that no row fills get default values.
fn row_calls(
    function: &Function,
    rows: &[CopiedRow],
    stack: &Stack,
    table_oid: u32,
) -> Vec<String> {
    let arguments = || function.arg_names.iter().zip(&function.arg_types);
    let mut calls = BTreeSet::new();
    for row in rows {
        let fitted: Option<Vec<Option<String>>> = arguments()
            .map(|(name, arg_type)| row_argument(name, arg_type, row))
            .collect();
        let Some(fitted) = fitted else { continue };
        if fitted.iter().all(Option::is_none) {
            continue;
        }
        let values: Vec<String> = fitted
            .into_iter()
            .zip(arguments())
            .map(|(value, (name, arg_type))| {
                value.unwrap_or_else(|| default_argument(name, arg_type, stack, table_oid))
            })
            .collect();
        calls.insert(call_sql(function, &values));
    }
    calls.into_iter().collect()
}

/// Builds the calls of `function` that the sweep makes: the calls of
/// [`row_calls`], or one call with default values when no row fits.
fn calls(function: &Function, rows: &[CopiedRow], stack: &Stack, table_oid: u32) -> Vec<String> {
    let calls = row_calls(function, rows, stack, table_oid);
    if !calls.is_empty() {
        return calls;
    }
    let values: Vec<String> = function
        .arg_names
        .iter()
        .zip(&function.arg_types)
        .map(|(name, arg_type)| default_argument(name, arg_type, stack, table_oid))
        .collect();
    vec![call_sql(function, &values)]
}

fn table_oid(client: &mut Client, table: &str) -> u32 {
    client
        .query_one("SELECT $1::text::regclass::oid", &[&table])
        .unwrap_or_else(|e| panic!("oid of {table}: {}", describe(&e)))
        .get(0)
}

#[test]
fn nobody_denied_every_function() {
    let stack = migrated_stack();
    let mut admin = stack.superuser();
    let functions = extension_functions(&mut admin);
    let names: BTreeSet<&str> = functions.iter().map(|f| f.name.as_str()).collect();
    for expected in ["configure", "migrate", "read", "resolve_kv", "status"] {
        assert!(
            names.contains(expected),
            "the pg_proc query lists no function {expected}: the sweep would miss functions"
        );
    }

    // The copied-reference attack: real oids, column names, paths, key
    // values and references, read from the tables by the superuser.
    let rows = copied_rows(&mut admin);
    let text_rows = rows.iter().filter(|r| r.column_type == "text").count();
    assert!(
        text_rows >= 2,
        "only {text_rows} copied rows of a text column"
    );
    assert!(rows.len() >= 15, "only {} copied rows", rows.len());
    let kv_oid = table_oid(&mut admin, "public.maasserver_secret");

    let mut nobody = connect_as(&stack, "nobody");
    let mut call_count = 0;
    for function in &functions {
        let calls = calls(function, &rows, &stack, kv_oid);
        if EXECUTABLE_BY_EVERY_ROLE.contains(&function.name.as_str()) {
            assert!(
                calls.len() >= 2,
                "{}: only {} calls with copied rows",
                function.name,
                calls.len()
            );
        }
        for sql in calls {
            expect_denied(
                &mut nobody,
                &sql,
                &format!("nobody calling {}", function.name),
            );
            call_count += 1;
        }
    }
    assert!(call_count > functions.len(), "only {call_count} calls made");

    // Only the listed functions are executable by a role without grants,
    // even where the function would deny the call itself.
    let executable = query_strings(
        &mut admin,
        "SELECT proname::text FROM pg_proc
          WHERE pronamespace = 'vault_redirect'::regnamespace
            AND has_function_privilege('nobody', oid, 'EXECUTE')
          ORDER BY 1",
    );
    assert_eq!(
        executable, EXECUTABLE_BY_EVERY_ROLE,
        "functions that nobody may execute; each needs a reason in EXECUTABLE_BY_EVERY_ROLE"
    );
}

/// Functions that the DBA may grant to chosen roles, each with the reason.
/// Every other function that is not executable by every role must also
/// deny a non-superuser itself.
///
/// `read` and `read_json` read any entry under the secrets path, which is
/// what the grant is for. `status` and `migration_progress` show no secret.
const GRANTABLE_BY_DBA: &[&str] = &["migration_progress", "read", "read_json", "status"];

#[test]
fn superuser_functions_check_caller() {
    // A stray GRANT must not open the superuser-only functions.
    let stack = migrated_stack();
    stack.pg.psql(
        "CREATE ROLE granted LOGIN;
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA vault_redirect TO granted;
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA vault_redirect TO granted;",
    );
    let mut admin = stack.superuser();
    let rows = copied_rows(&mut admin);
    let kv_oid = table_oid(&mut admin, "public.maasserver_secret");
    let mut granted = connect_as(&stack, "granted");
    let mut checked = 0;
    for function in extension_functions(&mut admin) {
        let name = function.name.as_str();
        if GRANTABLE_BY_DBA.contains(&name) || EXECUTABLE_BY_EVERY_ROLE.contains(&name) {
            continue;
        }
        for sql in calls(&function, &rows, &stack, kv_oid) {
            let what = format!("a non-superuser with EXECUTE calling {name}");
            // PostgreSQL checks EXECUTE on a trigger function only when a
            // trigger is created. Called as a plain function it must fail,
            // with whatever error.
            if function.returns_trigger {
                let result = granted.query(&sql, &[]);
                assert!(result.is_err(), "{what}: `{sql}` succeeded");
            } else {
                expect_denied(&mut granted, &sql, &what);
            }
        }
        checked += 1;
    }
    assert!(
        checked >= 11,
        "only {checked} superuser-only functions checked"
    );
}

#[test]
fn public_functions_run_as_caller() {
    // The resolvers check visibility with the calling role's privileges,
    // which is only true while they run as that role.
    let stack = Stack::configured(&[]);
    let definers = query_strings(
        &mut stack.superuser(),
        "SELECT proname::text FROM pg_proc
          WHERE pronamespace = 'vault_redirect'::regnamespace
            AND has_function_privilege('public', oid, 'EXECUTE') AND prosecdef
          ORDER BY 1",
    );
    assert!(
        definers.is_empty(),
        "SECURITY DEFINER functions executable by PUBLIC: {definers:?}"
    );
}

/// Asserts that the search_path a function pins ends with pg_temp and
/// names no schema in which `nobody` may create objects.
fn assert_search_path_safe(admin: &mut Client, function: &str, search_path: &str) {
    let schemas: Vec<&str> = search_path
        .split(',')
        .map(|s| s.trim().trim_matches('"'))
        .collect();
    // Without pg_temp listed, PostgreSQL searches the caller's temporary
    // schema first for tables and types.
    assert_eq!(
        schemas.last(),
        Some(&"pg_temp"),
        "{function}: search_path {search_path} must end with pg_temp"
    );
    for schema in &schemas[..schemas.len() - 1] {
        let creatable: bool = admin
            .query_one(
                "SELECT has_schema_privilege('nobody', $1::text, 'CREATE')",
                &[schema],
            )
            .unwrap_or_else(|e| panic!("{function}: schema {schema}: {}", describe(&e)))
            .get(0);
        assert!(
            !creatable,
            "{function}: every role can create objects in schema {schema} of its search_path"
        );
    }
}

#[test]
fn definer_and_public_functions_pin_search_path() {
    // A SECURITY DEFINER function runs as its owner, and a function that
    // every role may execute runs its queries for any caller. Either kind
    // must not look up operators, functions or tables through the caller's
    // search_path.
    let stack = Stack::configured(&[]);
    stack.pg.psql("CREATE ROLE nobody LOGIN;");
    let mut admin = stack.superuser();
    let functions = admin
        .query(
            "SELECT proname::text, prosecdef,
                    (SELECT substr(c, length('search_path=') + 1) FROM unnest(proconfig) c
                      WHERE c LIKE 'search_path=%')
               FROM pg_proc
              WHERE pronamespace = 'vault_redirect'::regnamespace
                AND (prosecdef OR has_function_privilege('public', oid, 'EXECUTE'))
              ORDER BY 1",
            &[],
        )
        .unwrap_or_else(|e| panic!("listing functions to check: {}", describe(&e)));
    assert!(
        functions.len() >= EXECUTABLE_BY_EVERY_ROLE.len(),
        "only {} functions are SECURITY DEFINER or executable by every role",
        functions.len()
    );
    for row in functions {
        let name: String = row.get(0);
        let definer: bool = row.get(1);
        let kind = match definer {
            true => "SECURITY DEFINER function",
            false => "function executable by every role",
        };
        let search_path: Option<String> = row.get(2);
        let Some(search_path) = search_path else {
            panic!("{kind} {name} has no search_path in proconfig");
        };
        assert_search_path_safe(&mut admin, &name, &search_path);
    }
}

#[test]
fn nobody_denied_every_relation() {
    let stack = migrated_stack();
    let mut admin = stack.superuser();
    let relations = query_strings(
        &mut admin,
        "SELECT format('%I.%I', n.nspname, c.relname)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname IN ('vault_redirect', 'vault_redirect_resolved', 'public')
            AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
          ORDER BY 1",
    );
    for expected in [
        "public.maasserver_bmc",
        "public.maasserver_secret",
        "vault_redirect.secret_columns",
        "vault_redirect.servers",
        "vault_redirect_resolved.maasserver_bmc",
        "vault_redirect_resolved.maasserver_secret",
    ] {
        assert!(
            relations.iter().any(|r| r == expected),
            "the relation query lists no {expected}"
        );
    }

    let mut nobody = connect_as(&stack, "nobody");
    for relation in &relations {
        if relation == "vault_redirect.secret_columns" {
            continue;
        }
        expect_denied(
            &mut nobody,
            &format!("SELECT * FROM {relation} LIMIT 1"),
            &format!("nobody reading {relation}"),
        );
    }

    // The declarations are readable by design, but by no role writable.
    for role in ["nobody", "app"] {
        let mut client = connect_as(&stack, role);
        for sql in [
            "INSERT INTO vault_redirect.secret_columns (table_schema, table_name, column_name,
                     shape, path_column, view_schema)
             VALUES ('pg_temp', 'mine', 'value', 'kv', 'path', 'pg_temp')",
            "UPDATE vault_redirect.secret_columns SET path_prefix = 'global'",
            "DELETE FROM vault_redirect.secret_columns",
            "TRUNCATE vault_redirect.secret_columns",
        ] {
            expect_denied(
                &mut client,
                sql,
                &format!("{role} writing vault_redirect.secret_columns"),
            );
        }
    }
}

#[test]
fn secret_columns_holds_no_secret() {
    let stack = migrated_stack();
    let secret_id = stack.stored_secret_id();
    let credentials = [stack.role_id.as_str(), secret_id.as_str()];
    let mut nobody = connect_as(&stack, "nobody");
    let rows = query_strings(
        &mut nobody,
        "SELECT t::text FROM vault_redirect.secret_columns t ORDER BY 1",
    );
    assert_eq!(rows.len(), 3, "declared columns read by nobody");
    assert_no_secret(
        &rows.join("\n"),
        &credentials,
        "vault_redirect.secret_columns",
    );
    let columns = query_strings(
        &mut nobody,
        "SELECT attname::text FROM pg_attribute
          WHERE attrelid = 'vault_redirect.secret_columns'::regclass
            AND attnum > 0 AND NOT attisdropped
          ORDER BY attnum",
    );
    assert_eq!(
        columns, SECRET_COLUMNS_COLUMNS,
        "columns of vault_redirect.secret_columns, which every role can read"
    );
}

#[test]
fn lookalike_temp_table_denied() {
    let stack = migrated_stack();
    let mut nobody = connect_as(&stack, "nobody");
    let error = nobody
        .batch_execute("CREATE TABLE public.mine (path text PRIMARY KEY, value jsonb)")
        .expect_err("nobody must not create tables in public");
    assert_eq!(
        db_error(&error).code().code(),
        "42501",
        "CREATE TABLE in public as nobody: {}",
        describe(&error)
    );

    // Temporary tables of the declared tables' names, shapes and
    // references, first on nobody's search_path.
    nobody
        .batch_execute(
            r#"CREATE TEMP TABLE maasserver_secret (path text PRIMARY KEY, value jsonb);
               INSERT INTO maasserver_secret VALUES
                   ('global/omapi-key', '{"$vault_redirect": "global/omapi-key"}');
               CREATE TEMP TABLE maasserver_bmc (id bigint PRIMARY KEY, power_parameters jsonb);
               INSERT INTO maasserver_bmc VALUES
                   (1, '{"$vault_redirect": "public/maasserver_bmc/1/power_parameters"}');
               CREATE TEMP TABLE bmc_credential (
                   bmc_id bigint, username text, password text, PRIMARY KEY (bmc_id, username));
               INSERT INTO bmc_credential VALUES
                   (1, 'maas', '$vault_redirect:public/bmc_credential/1/maas/password');
               CREATE TEMP TABLE secret_columns (LIKE vault_redirect.secret_columns INCLUDING DEFAULTS);
               INSERT INTO secret_columns (table_schema, table_name, column_name, shape,
                       path_column, view_schema)
               SELECT nspname, 'maasserver_secret', 'value', 'kv', 'path', nspname
                 FROM pg_namespace WHERE oid = pg_my_temp_schema();
               SET search_path = pg_temp, public;"#,
        )
        .unwrap_or_else(|e| panic!("creating nobody's temporary tables: {}", describe(&e)));
    let attempts = [
        (
            "resolve_kv on a temporary look-alike",
            r#"SELECT vault_redirect.resolve_kv('maasserver_secret'::regclass::oid, 'value',
                      'global/omapi-key', '{"$vault_redirect": "global/omapi-key"}')::text"#,
        ),
        (
            "resolve_column_jsonb on a temporary look-alike",
            r#"SELECT vault_redirect.resolve_column_jsonb('maasserver_bmc'::regclass::oid,
                      'power_parameters', ARRAY['1'],
                      '{"$vault_redirect": "public/maasserver_bmc/1/power_parameters"}')::text"#,
        ),
        (
            "resolve_column_text on a temporary look-alike",
            "SELECT vault_redirect.resolve_column_text('bmc_credential'::regclass::oid,
                    'password', ARRAY['1', 'maas'],
                    '$vault_redirect:public/bmc_credential/1/maas/password')",
        ),
        (
            "resolve_kv on the real table with temporary tables first on the search_path",
            r#"SELECT vault_redirect.resolve_kv('public.maasserver_secret'::regclass::oid,
                      'value', 'global/omapi-key',
                      '{"$vault_redirect": "global/omapi-key"}')::text"#,
        ),
        (
            "a view over nobody's temporary table",
            r#"SELECT vault_redirect.resolve_kv(t.tableoid, 'value', t.path, t.value)::text
                 FROM pg_temp.maasserver_secret t"#,
        ),
    ];
    for (what, sql) in attempts {
        expect_denied(&mut nobody, sql, &format!("nobody: {what}"));
    }

    // The extension's trigger functions write to Vault, so no role but a
    // superuser may attach them to a table.
    let triggers = query_strings(
        &mut stack.superuser(),
        "SELECT proname::text FROM pg_proc
          WHERE pronamespace = 'vault_redirect'::regnamespace
            AND prorettype = 'trigger'::regtype
          ORDER BY 1",
    );
    for trigger in triggers {
        expect_denied(
            &mut nobody,
            &format!(
                "CREATE TRIGGER mine BEFORE INSERT OR UPDATE OR DELETE ON pg_temp.maasserver_secret
                    FOR EACH ROW EXECUTE FUNCTION vault_redirect.{trigger}()"
            ),
            &format!("nobody attaching {trigger} to its temporary table"),
        );
    }
}

#[test]
fn settings_and_files_hold_no_secret() {
    let stack = migrated_stack();
    let secret_id = stack.stored_secret_id();
    let credentials = [stack.role_id.as_str(), secret_id.as_str()];
    let config_file = stack.config_file();
    let config_file = config_file.to_str().expect("scratch paths are UTF-8");

    for role in ["nobody", "app"] {
        let mut client = connect_as(&stack, role);
        // A call that returns before any check loads the library, which
        // registers the settings in this session.
        client
            .query_one(
                "SELECT vault_redirect.resolve_kv(0, 'value', NULL, '{}')::text",
                &[],
            )
            .unwrap_or_else(|e| panic!("{role}: loading the library: {}", describe(&e)));
        let ours = query_strings(
            &mut client,
            "SELECT name || '=' || coalesce(setting, '') FROM pg_settings
              WHERE name LIKE 'vault_redirect.%' ORDER BY 1",
        );
        assert!(
            ours.len() >= 5,
            "{role} sees only {} vault_redirect settings",
            ours.len()
        );
        assert_no_secret(
            &ours.join("\n"),
            &credentials,
            &format!("vault_redirect settings read by {role}"),
        );
        let all = query_strings(
            &mut client,
            "SELECT string_agg(name || '=' || coalesce(setting, ''), ' ') FROM pg_settings",
        );
        assert_no_secret(
            &all.join(""),
            &credentials,
            &format!("pg_settings read by {role}"),
        );
        for name in ["secret_id", "role_id", "token", "wrapped_token", "url"] {
            let value = query_strings(
                &mut client,
                &format!("SELECT coalesce(current_setting('vault_redirect.{name}', true), '')"),
            );
            assert_eq!(
                value,
                [""],
                "{role}: current_setting('vault_redirect.{name}') is set"
            );
        }

        client
            .batch_execute("CREATE TEMP TABLE sink (line text)")
            .unwrap_or_else(|e| panic!("{role}: CREATE TEMP TABLE: {}", describe(&e)));
        let file = literal(config_file);
        let reads = [
            format!("SELECT pg_read_file({file})"),
            "SELECT pg_read_file('vault_redirect.conf')".to_owned(),
            format!("SELECT pg_read_binary_file({file})"),
            format!("SELECT pg_stat_file({file})"),
            "SELECT pg_ls_dir('.')".to_owned(),
            format!("COPY sink FROM {file}"),
            format!(
                "COPY sink FROM PROGRAM {}",
                literal(&format!("cat {config_file}"))
            ),
            format!("SELECT lo_import({file})"),
        ];
        for sql in reads {
            expect_denied(
                &mut client,
                &sql,
                &format!("{role} reading the configuration file"),
            );
        }
    }
}

#[test]
fn app_reads_through_views() {
    let stack = migrated_stack();
    let mut app = connect_as(&stack, "app");
    let cases = [
        (
            "SELECT value->>'secret' FROM vault_redirect_resolved.maasserver_secret
              WHERE path = 'global/rpc-shared'",
            "test-rpc-4f1c9e0b7a2d",
        ),
        (
            "SELECT power_parameters->>'power_pass' FROM vault_redirect_resolved.maasserver_bmc
              WHERE id = 1",
            "test-bmc-pass-1111",
        ),
        (
            "SELECT password FROM vault_redirect_resolved.bmc_credential
              WHERE bmc_id = 2 AND username = 'ops/admin'",
            "ipmi-user-pass-32",
        ),
    ];
    for (sql, expected) in cases {
        let value = query_strings(&mut app, sql);
        assert!(
            value == [expected],
            "app reading `{sql}` did not get the fixture's plaintext"
        );
    }
    // The tables themselves contain references only.
    let tables = query_strings(
        &mut app,
        "SELECT concat_ws(' ',
                (SELECT string_agg(value::text, ' ') FROM public.maasserver_secret),
                (SELECT string_agg(power_parameters::text, ' ') FROM public.maasserver_bmc),
                (SELECT string_agg(password, ' ') FROM public.bmc_credential))",
    );
    assert_no_secret(&tables.join(""), &[], "the tables read by app");
}

#[test]
fn column_privilege_hides_secret() {
    let stack = migrated_stack();
    stack.pg.psql(
        "REVOKE SELECT ON public.maasserver_secret, public.maasserver_bmc,
                public.bmc_credential FROM app;
         GRANT SELECT (path) ON public.maasserver_secret TO app;
         GRANT SELECT (id) ON public.maasserver_bmc TO app;
         GRANT SELECT (bmc_id, username) ON public.bmc_credential TO app;",
    );
    let mut admin = stack.superuser();
    let rows = copied_rows(&mut admin);
    let mut app = connect_as(&stack, "app");
    let paths = query_strings(
        &mut app,
        "SELECT path FROM public.maasserver_secret ORDER BY path",
    );
    assert_eq!(paths.len(), 11, "paths app reads from the table");
    // A view's query names every column of its table, and PostgreSQL
    // checks the column privileges of all of them, so without SELECT on
    // the secret column app reads no column through the view.
    expect_denied(
        &mut app,
        "SELECT path FROM vault_redirect_resolved.maasserver_secret",
        "app reading only the path through the view",
    );

    for (view, column) in [
        ("maasserver_secret", "value"),
        ("maasserver_bmc", "power_parameters"),
        ("bmc_credential", "password"),
    ] {
        expect_denied(
            &mut app,
            &format!("SELECT {column} FROM vault_redirect_resolved.{view}"),
            &format!("app reading {view}.{column} without the column privilege"),
        );
        expect_denied(
            &mut app,
            &format!("SELECT * FROM vault_redirect_resolved.{view}"),
            &format!("app reading every column of {view} without {column}'s privilege"),
        );
    }
    expect_copied_references_denied(&mut app, &rows, &stack, "app without column privileges");
}

/// Calls every resolver with every copied row it fits and expects 42501.
/// A resolver that no row fits is not called.
fn expect_copied_references_denied(
    client: &mut Client,
    rows: &[CopiedRow],
    stack: &Stack,
    who: &str,
) {
    let functions = extension_functions(&mut stack.superuser());
    let mut call_count = 0;
    for function in functions
        .iter()
        .filter(|f| EXECUTABLE_BY_EVERY_ROLE.contains(&f.name.as_str()))
    {
        for sql in row_calls(function, rows, stack, 0) {
            expect_denied(client, &sql, &format!("{who} calling {}", function.name));
            call_count += 1;
        }
    }
    assert!(call_count >= rows.len(), "only {call_count} resolver calls");
}

/// Row-level security that hides one row of each declared table from
/// `app`: the SQL to enable it, and the copied rows of the hidden rows.
const HIDE_ONE_ROW_EACH: &str = "
    ALTER TABLE public.maasserver_secret ENABLE ROW LEVEL SECURITY;
    CREATE POLICY visible ON public.maasserver_secret TO app
        USING (path <> 'global/omapi-key');
    ALTER TABLE public.maasserver_bmc ENABLE ROW LEVEL SECURITY;
    CREATE POLICY visible ON public.maasserver_bmc TO app USING (id <> 2);
    ALTER TABLE public.bmc_credential ENABLE ROW LEVEL SECURITY;
    CREATE POLICY visible ON public.bmc_credential TO app USING (username <> 'ops/admin');";

/// Returns the copied rows of the rows that [`HIDE_ONE_ROW_EACH`] hides.
fn hidden_rows(admin: &mut Client) -> Vec<CopiedRow> {
    let hidden: Vec<CopiedRow> = copied_rows(admin)
        .into_iter()
        .filter(|row| {
            row.path.as_deref() == Some("global/omapi-key")
                || row.key_values.as_deref() == Some(&["2".to_owned()][..])
                || row.key_values.as_deref() == Some(&["2".to_owned(), "ops/admin".to_owned()][..])
        })
        .collect();
    assert_eq!(hidden.len(), 3, "copied rows of the hidden rows");
    hidden
}

#[test]
fn row_security_hides_row() {
    let stack = migrated_stack();
    stack.pg.psql(HIDE_ONE_ROW_EACH);
    let hidden = hidden_rows(&mut stack.superuser());
    let mut app = connect_as(&stack, "app");

    let visible = query_strings(
        &mut app,
        "SELECT concat_ws(' ',
                (SELECT string_agg(value::text, ' ') FROM vault_redirect_resolved.maasserver_secret),
                (SELECT string_agg(power_parameters::text, ' ')
                   FROM vault_redirect_resolved.maasserver_bmc),
                (SELECT string_agg(password, ' ') FROM vault_redirect_resolved.bmc_credential))",
    );
    let visible = visible.join("");
    assert!(
        visible.contains("test-rpc-4f1c9e0b7a2d"),
        "app does not see the plaintext of a visible row"
    );
    for secret in [
        "dGVzdC1vbWFwaS1rZXktbm90LXJlYWwtMDAwMDAwMDAwMA==",
        "test-bmc-pass-2222",
        "ipmi-user-pass-32",
    ] {
        assert!(
            !visible.contains(secret),
            "app reads a row that row-level security hides through a view"
        );
    }
    let filtered = query_strings(
        &mut app,
        "SELECT path FROM vault_redirect_resolved.maasserver_secret
          WHERE path = 'global/omapi-key'",
    );
    assert!(filtered.is_empty(), "app sees the hidden row's path");

    expect_copied_references_denied(&mut app, &hidden, &stack, "app resolving a hidden row");
}

#[test]
fn own_operators_cannot_bypass_rls() {
    // An application role often owns a schema, for example when it owns
    // its database, whose public schema belongs to the database owner in
    // PostgreSQL 15. Its own `=` operators ahead of pg_catalog on its
    // search_path must not change the resolvers' visibility check.
    let stack = migrated_stack();
    stack.pg.psql(HIDE_ONE_ROW_EACH);
    stack.pg.psql("CREATE SCHEMA app_own AUTHORIZATION app;");

    let mut admin = stack.superuser();
    let mut targets = hidden_rows(&mut admin);
    // A key/value row that names another table's entry: the check would
    // accept it on any visible row of maasserver_secret.
    targets.push(CopiedRow {
        table_oid: table_oid(&mut admin, "public.maasserver_secret"),
        column_name: "value".into(),
        column_type: "jsonb".into(),
        path: Some("public/maasserver_bmc/2/power_parameters".into()),
        key_values: None,
        value: r#"{"$vault_redirect": "public/maasserver_bmc/2/power_parameters"}"#.into(),
    });

    let mut app = connect_as(&stack, "app");
    app.batch_execute(
        "CREATE FUNCTION app_own.always(text, text) RETURNS boolean
             LANGUAGE sql IMMUTABLE AS 'SELECT true';
         CREATE FUNCTION app_own.always(jsonb, jsonb) RETURNS boolean
             LANGUAGE sql IMMUTABLE AS 'SELECT true';
         CREATE OPERATOR app_own.= (LEFTARG = text, RIGHTARG = text, FUNCTION = app_own.always);
         CREATE OPERATOR app_own.= (LEFTARG = jsonb, RIGHTARG = jsonb, FUNCTION = app_own.always);
         SET search_path = app_own, pg_catalog, public;",
    )
    .unwrap_or_else(|e| panic!("app creating its operators: {}", describe(&e)));
    expect_copied_references_denied(
        &mut app,
        &targets,
        &stack,
        "app with its own = operators resolving a hidden row",
    );
}

/// Runs `sql` with `path` as its parameter and returns the first column of
/// the row, or the error. The value goes to assertions only.
fn read_view(client: &mut Client, sql: &str, path: &str) -> Result<String, String> {
    client
        .query_one(sql, &[&path])
        .map(|row| row.get(0))
        .map_err(|e| describe(&e))
}

/// A role that may write rows of the key/value table gives a row the path
/// and the reference of another table's entry, then reads it through the
/// view.
#[test]
fn kv_insert_cannot_read_other_tables() {
    let stack = migrated_stack();
    stack.pg.psql(
        "REVOKE ALL ON public.maasserver_bmc, public.bmc_credential FROM app;
         REVOKE ALL ON vault_redirect_resolved.maasserver_bmc,
                vault_redirect_resolved.bmc_credential FROM app;",
    );
    let mut app = connect_as(&stack, "app");
    for statement in [
        r#"INSERT INTO public.maasserver_secret (path, value) VALUES
               ('public/maasserver_bmc/1/power_parameters',
                '{"$vault_redirect": "public/maasserver_bmc/1/power_parameters"}')"#,
        r#"UPDATE public.maasserver_secret
              SET path = 'public/bmc_credential/1/maas/password',
                  value = '{"$vault_redirect": "public/bmc_credential/1/maas/password",
                            "key": "secret"}'
            WHERE path = 'global/macaroon-key'"#,
        r#"UPDATE public.maasserver_secret
              SET path = 'public/maasserver_bmc/2/power_parameters'
            WHERE path = 'global/omapi-key'"#,
    ] {
        let error = app
            .batch_execute(statement)
            .expect_err("app must not point a row at another table's entry");
        assert_eq!(
            db_error(&error).code().code(),
            "42501",
            "{statement}: {}",
            describe(&error)
        );
    }
    let query = "SELECT value::text FROM vault_redirect_resolved.maasserver_secret WHERE path = $1";
    for (path, secret) in [
        (
            "public/maasserver_bmc/1/power_parameters",
            "test-bmc-pass-1111",
        ),
        ("public/bmc_credential/1/maas/password", "ipmi-user-pass-31"),
    ] {
        let leaked = read_view(&mut app, query, path).is_ok_and(|value| value.contains(secret));
        assert!(
            !leaked,
            "app, without SELECT on the table that owns {path}, read its entry through a \
             maasserver_secret row it wrote"
        );
    }
}

/// A role that may write rows of the key/value table writes plaintext at
/// the path of another table's entry.
#[test]
fn kv_insert_cannot_overwrite_other_tables() {
    let stack = migrated_stack();
    stack.pg.psql(
        "REVOKE ALL ON public.maasserver_bmc FROM app;
         REVOKE ALL ON vault_redirect_resolved.maasserver_bmc FROM app;",
    );
    let mut app = connect_as(&stack, "app");
    let written = app.batch_execute(
        r#"INSERT INTO public.maasserver_secret (path, value) VALUES
               ('public/maasserver_bmc/1/power_parameters', '{"power_pass": "written-by-app"}')"#,
    );
    let pass: String = stack
        .superuser()
        .query_one(
            "SELECT power_parameters->>'power_pass' FROM vault_redirect_resolved.maasserver_bmc
              WHERE id = 1",
            &[],
        )
        .unwrap_or_else(|e| panic!("reading maasserver_bmc as the superuser: {}", describe(&e)))
        .get(0);
    assert!(
        pass == "test-bmc-pass-1111",
        "app, without privileges on maasserver_bmc, changed the secret of its row 1 \
         through a maasserver_secret row (the INSERT returned {:?})",
        written.map_err(|e| describe(&e))
    );
}
