//! Failure handling against real OpenBao servers: sealed, stopped, hung and
//! rate-limited servers, expired or revoked credentials, policy gaps and TLS
//! trust. The tests check the SQLSTATE, message and hint that the extension
//! raises for each fault, the time it takes where a bound applies, and that
//! the session and the extension recover once the fault is gone.

use std::fs;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use postgres::error::DbError;
use postgres::{Client, NoTls};
use serde_json::json;
use vault_redirect_tests::bao::approle_policy;
use vault_redirect_tests::stack::{db_error, describe, Stack, MOUNT, ROLE, SECRETS_PATH};
use vault_redirect_tests::Bao;

/// Entry, under the secrets path, that the tests read.
const ENTRY: &str = "global/x";
const VALUE: &str = "failure-test-value";

/// The minimal policy without the `list` capability on the secrets path.
/// In OpenBao 2.7 the glob `secret/metadata/maas/*` also matches
/// `secret/metadata/maas/`, so the list capability is left out of that
/// line too.
const POLICY_WITHOUT_LIST: &str = r#"path "secret/metadata/maas/*" { capabilities = ["read", "update", "delete"] }
path "secret/data/maas/*" { capabilities = ["read", "create", "update", "delete"] }
"#;

/// A policy written as for KV version 1: it names `secret/maas/*` without
/// the `data/` and `metadata/` segments of the KV v2 API, so it grants
/// nothing on the paths the extension uses.
const POLICY_WITHOUT_DATA_SEGMENT: &str = r#"path "secret/maas/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "secret/maas/" { capabilities = ["list"] }
"#;

/// Selects every column that `vault_redirect.status()` must have, so a
/// missing one fails the query.
const STATUS_QUERY: &str = "SELECT configured, url, reachable, sealed, initialized, server_version,
        round_trip_ms, token_ttl_seconds, last_error, error
   FROM vault_redirect.status()";

fn read(client: &mut Client, path: &str) -> Result<String, postgres::Error> {
    client
        .query_one("SELECT vault_redirect.read($1)", &[&path])
        .map(|row| row.get(0))
}

fn read_ok(client: &mut Client, path: &str) -> String {
    read(client, path).unwrap_or_else(|e| panic!("read of {path} failed: {}", describe(&e)))
}

/// Asserts that `error` is a database error with SQLSTATE `expected`, and
/// returns it.
fn expect_sqlstate<'a>(error: &'a postgres::Error, expected: &str) -> &'a DbError {
    let db = db_error(error);
    assert_eq!(db.code().code(), expected, "{}", describe(error));
    db
}

fn hint_of(db: &DbError) -> &str {
    db.hint().unwrap_or_default()
}

/// Writes the test entry and reads it once, so that the session has logged
/// in and has an open connection to Vault before a fault is injected.
fn put_and_read(stack: &Stack, client: &mut Client) {
    stack.kv_put(ENTRY, &json!({ "secret": VALUE }));
    assert_eq!(read_ok(client, ENTRY), VALUE);
}

/// Configures the extension with a new wrapped secret_id on `client`.
fn configure(stack: &Stack, client: &mut Client) -> Result<(), postgres::Error> {
    let wrapped = stack.bao.wrapped_secret_id(ROLE);
    stack.configure(client, &stack.role_id, &wrapped)
}

/// Waits until the backend `pid` runs a statement, or panics after 5 s.
/// Returns early if `reader`, the thread that sent the statement, has
/// already finished, so that the caller reports the statement's result.
fn wait_until_active<T>(admin: &mut Client, pid: i32, reader: &thread::JoinHandle<T>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if reader.is_finished() {
            return;
        }
        let row = admin
            .query_opt("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .unwrap_or_else(|e| panic!("{}", describe(&e)));
        let state: Option<String> = row.and_then(|row| row.get(0));
        if state.as_deref() == Some("active") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} did not start its statement within 5 s (state {state:?})"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Returns random hex for a test secret_id. Tests never print it.
fn random_secret_id() -> String {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("failed to read /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- seal state and server process --------------------------------------

#[test]
fn sealed_then_unsealed() {
    let stack = Stack::configured(&[]);
    let mut client = stack.superuser();
    put_and_read(&stack, &mut client);

    stack.bao.seal();
    let error = read(&mut client, ENTRY).expect_err("a sealed Vault fails the read");
    let db = expect_sqlstate(&error, "57P03");
    assert!(db.message().contains("is sealed"), "{}", describe(&error));
    assert!(
        db.message().contains(&stack.bao.addr()),
        "{}",
        describe(&error)
    );
    assert!(hint_of(db).contains("unseal"), "{}", describe(&error));

    let row = client
        .query_one("SELECT reachable, sealed FROM vault_redirect.status()", &[])
        .unwrap_or_else(|e| panic!("status() raised: {}", describe(&e)));
    assert!(row.get::<_, bool>("reachable"));
    assert_eq!(row.get::<_, Option<bool>>("sealed"), Some(true));

    stack.bao.unseal();
    assert_eq!(read_ok(&mut client, ENTRY), VALUE);
}

#[test]
fn stopped_then_started() {
    let mut stack = Stack::configured_on(Bao::start_persistent(), &[]);
    let mut client = stack.superuser();
    put_and_read(&stack, &mut client);

    stack.bao.stop();
    let error = read(&mut client, ENTRY).expect_err("a stopped Vault fails the read");
    let db = expect_sqlstate(&error, "08001");
    let expected = format!("could not connect to Vault at {}: ", stack.bao.addr());
    assert!(db.message().starts_with(&expected), "{}", describe(&error));
    assert!(
        db.message().to_lowercase().contains("refused"),
        "{}",
        describe(&error)
    );

    let row = client
        .query_one("SELECT reachable, error FROM vault_redirect.status()", &[])
        .unwrap_or_else(|e| panic!("status() raised: {}", describe(&e)));
    assert!(!row.get::<_, bool>("reachable"));
    let status_error: Option<String> = row.get("error");
    assert!(status_error.is_some_and(|e| !e.is_empty()));

    stack.bao.restart();
    assert_eq!(read_ok(&mut client, ENTRY), VALUE);
}

// ---- hung server: bounds and interrupts ----------------------------------

#[test]
fn hung_server_statement_timeout() {
    let stack = Stack::configured(&[]);
    let mut client = stack.superuser();
    put_and_read(&stack, &mut client);

    stack.bao.suspend();
    client
        .batch_execute("SET statement_timeout = '2s'")
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let started = Instant::now();
    let result = read(&mut client, ENTRY);
    let elapsed = started.elapsed();
    stack.bao.resume();

    let error = result.expect_err("a hung Vault fails the read");
    let db = expect_sqlstate(&error, "57014");
    assert!(
        db.message().contains("statement timeout"),
        "{}",
        describe(&error)
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "the read returned {elapsed:?} after it started, with statement_timeout = 2s"
    );

    // The same session works once the server responds again.
    client
        .query_one("SELECT 1", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert_eq!(read_ok(&mut client, ENTRY), VALUE);
}

#[test]
fn hung_server_cancel() {
    let stack = Stack::configured(&[]);
    let mut reader = stack.superuser();
    put_and_read(&stack, &mut reader);
    // A backstop, so that a cancel that is never acted on fails the test
    // instead of hanging it.
    reader
        .batch_execute("SET statement_timeout = '30s'")
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let pid: i32 = reader
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let mut admin = stack.superuser();

    stack.bao.suspend();
    let handle = thread::spawn(move || {
        let result = read(&mut reader, ENTRY);
        (reader, result, Instant::now())
    });
    wait_until_active(&mut admin, pid, &handle);
    thread::sleep(Duration::from_millis(500));
    let canceled_at = Instant::now();
    let signaled: bool = admin
        .query_one("SELECT pg_cancel_backend($1)", &[&pid])
        .unwrap_or_else(|e| panic!("{}", describe(&e)))
        .get(0);
    assert!(signaled, "pg_cancel_backend found no backend {pid}");
    let (mut reader, result, returned_at) = handle.join().expect("the reader thread panicked");
    stack.bao.resume();

    let error = result.expect_err("a canceled read fails");
    let db = expect_sqlstate(&error, "57014");
    assert!(
        db.message().contains("user request"),
        "{}",
        describe(&error)
    );
    let delay = returned_at.duration_since(canceled_at);
    assert!(
        delay < Duration::from_millis(1500),
        "the read returned {delay:?} after pg_cancel_backend"
    );

    reader
        .query_one("SELECT 1", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert_eq!(read_ok(&mut reader, ENTRY), VALUE);
}

#[test]
fn hung_server_terminate() {
    let stack = Stack::configured(&[]);
    let mut reader = stack.superuser();
    put_and_read(&stack, &mut reader);
    reader
        .batch_execute("SET statement_timeout = '30s'")
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let pid: i32 = reader
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let mut admin = stack.superuser();

    stack.bao.suspend();
    let handle = thread::spawn(move || {
        let result = read(&mut reader, ENTRY);
        (reader, result, Instant::now())
    });
    wait_until_active(&mut admin, pid, &handle);
    thread::sleep(Duration::from_millis(500));
    let terminated_at = Instant::now();
    let signaled: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap_or_else(|e| panic!("{}", describe(&e)))
        .get(0);
    assert!(signaled, "pg_terminate_backend found no backend {pid}");
    let (mut reader, result, returned_at) = handle.join().expect("the reader thread panicked");

    assert!(result.is_err(), "a terminated read returned a value");
    let delay = returned_at.duration_since(terminated_at);
    assert!(
        delay < Duration::from_millis(1500),
        "the read returned {delay:?} after pg_terminate_backend"
    );
    let deadline = terminated_at + Duration::from_millis(1500);
    loop {
        let count: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .unwrap()
            .get(0);
        if count == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} still runs 1.5 s after pg_terminate_backend"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(reader.query_one("SELECT 1", &[]).is_err());
    stack.bao.resume();

    // New sessions still work.
    assert_eq!(read_ok(&mut stack.superuser(), ENTRY), VALUE);
}

#[test]
fn request_timeout_setting() {
    let stack = Stack::configured(&[]);
    let mut client = stack.superuser();
    put_and_read(&stack, &mut client);

    stack.bao.suspend();
    client
        .batch_execute(
            "SET statement_timeout = '30s';
             SET vault_redirect.request_timeout_ms = 500;",
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let started = Instant::now();
    let result = read(&mut client, ENTRY);
    let elapsed = started.elapsed();
    stack.bao.resume();

    let error = result.expect_err("a hung Vault fails the read");
    let db = expect_sqlstate(&error, "08006");
    assert!(db.message().contains("timed out"), "{}", describe(&error));
    assert!(
        elapsed < Duration::from_secs(2),
        "the read returned {elapsed:?} after it started, with request_timeout_ms = 500"
    );
    assert_eq!(read_ok(&mut client, ENTRY), VALUE);
}

// ---- credentials ---------------------------------------------------------

#[test]
fn token_ttl_relogin() {
    let stack = Stack::configured(&["token_ttl=5s", "token_max_ttl=10s"]);
    stack.kv_put(ENTRY, &json!({ "secret": "before-change" }));
    let mut client = stack.superuser();
    client
        .batch_execute(
            "SET statement_timeout = '60s';
             CREATE TEMP TABLE seen (at timestamptz, value text);",
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)));

    // One statement of about 15 s outlives the token's maximum TTL of 10 s,
    // and the entry changes in Vault while it runs.
    let result = thread::scope(|scope| {
        scope.spawn(|| {
            thread::sleep(Duration::from_secs(7));
            stack.kv_put(ENTRY, &json!({ "secret": "after-change" }));
        });
        client.batch_execute(
            "DO $$
             BEGIN
                 FOR i IN 1..150 LOOP
                     INSERT INTO seen VALUES (clock_timestamp(), vault_redirect.read('global/x'));
                     PERFORM pg_sleep(0.1);
                 END LOOP;
             END
             $$;",
        )
    });
    result.unwrap_or_else(|e| panic!("the read loop failed: {}", describe(&e)));

    let row = client
        .query_one(
            "SELECT count(*),
                    count(*) FILTER (WHERE value = 'before-change'),
                    count(*) FILTER (WHERE value = 'after-change'),
                    extract(epoch FROM max(at) - min(at))::float8,
                    max(at) FILTER (WHERE value = 'before-change')
                        < min(at) FILTER (WHERE value = 'after-change')
               FROM seen",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 150);
    assert!(row.get::<_, i64>(1) > 0, "no read returned the first value");
    assert!(
        row.get::<_, i64>(2) > 0,
        "no read returned the changed value"
    );
    let span: f64 = row.get(3);
    assert!(span > 10.0, "the reads spanned only {span} s");
    assert_eq!(
        row.get::<_, Option<bool>>(4),
        Some(true),
        "a read returned the first value after one had returned the changed value"
    );
}

#[test]
fn revoked_token_relogin() {
    let stack = Stack::configured(&[]);
    let mut client = stack.superuser();
    put_and_read(&stack, &mut client);
    assert!(!stack.bao.approle_token_accessors().is_empty());

    stack.bao.revoke_approle_tokens();
    assert!(stack.bao.approle_token_accessors().is_empty());
    assert_eq!(read_ok(&mut client, ENTRY), VALUE);
    assert_eq!(
        stack.bao.approle_token_accessors().len(),
        1,
        "the read logged in once"
    );
}

#[test]
fn expired_secret_id() {
    let stack = Stack::configured(&["secret_id_ttl=3s"]);
    let mut client = stack.superuser();
    put_and_read(&stack, &mut client);

    thread::sleep(Duration::from_secs(5));
    // Without a valid token, the next read must log in with the expired
    // secret_id.
    stack.bao.revoke_approle_tokens();
    let error = read(&mut client, ENTRY).expect_err("the login with an expired secret_id fails");
    let db = expect_sqlstate(&error, "28P01");
    assert!(hint_of(db).contains("configure"), "{}", describe(&error));
}

// ---- policy probe during configure ---------------------------------------

#[test]
fn probe_names_missing_list() {
    let stack = Stack::unconfigured(&[]);
    stack
        .bao
        .write_policy(&format!("{ROLE}-policy"), POLICY_WITHOUT_LIST);
    let mut client = stack.superuser();

    let error = configure(&stack, &mut client).expect_err("the policy lacks list");
    let db = expect_sqlstate(&error, "42501");
    assert!(
        db.message().starts_with("policy probe failed: "),
        "{}",
        describe(&error)
    );
    assert!(
        db.message()
            .contains("permission denied to list secret/metadata/maas/"),
        "{}",
        describe(&error)
    );
    assert!(
        hint_of(db).contains(r#"path "secret/metadata/maas/" { capabilities = ["list"] }"#),
        "{}",
        describe(&error)
    );

    assert!(
        stack.bao.kv_list(MOUNT, SECRETS_PATH).is_empty(),
        "the probe entry is left in Vault"
    );
    assert!(!stack.config_file().exists());
}

#[test]
fn policy_without_data_segment() {
    let stack = Stack::unconfigured(&[]);
    stack
        .bao
        .write_policy(&format!("{ROLE}-policy"), POLICY_WITHOUT_DATA_SEGMENT);
    let mut client = stack.superuser();

    let error = configure(&stack, &mut client).expect_err("the policy grants no KV v2 path");
    let db = expect_sqlstate(&error, "42501");
    assert!(
        db.message().starts_with("policy probe failed: "),
        "{}",
        describe(&error)
    );
    assert!(
        db.message().contains("secret/data/maas/"),
        "{}",
        describe(&error)
    );
    assert!(
        hint_of(db).contains("secret/data/maas/"),
        "{}",
        describe(&error)
    );
    assert!(stack.bao.kv_list(MOUNT, SECRETS_PATH).is_empty());
    assert!(!stack.config_file().exists());
}

// ---- rate limit ----------------------------------------------------------

#[test]
fn rate_limit_bounded() {
    let stack = Stack::configured(&[]);
    let mut client = stack.superuser();
    put_and_read(&stack, &mut client);

    stack.bao.enable_rate_limit("vault-redirect-test", 1.0);
    client
        .batch_execute("SET statement_timeout = '60s'")
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let started = Instant::now();
    let result = client.query_one(
        "SELECT count(vault_redirect.read('global/x')) FROM generate_series(1, 20)",
        &[],
    );
    let elapsed = started.elapsed();
    stack.bao.disable_rate_limit("vault-redirect-test");

    assert!(
        elapsed < Duration::from_secs(60),
        "20 rate-limited reads took {elapsed:?}"
    );
    match result {
        Ok(row) => assert_eq!(row.get::<_, i64>(0), 20),
        Err(error) => {
            expect_sqlstate(&error, "53400");
        }
    }
    assert_eq!(read_ok(&mut client, ENTRY), VALUE);
}

// ---- TLS -----------------------------------------------------------------

/// Starts a dev TLS server and a cluster with the AppRole and the extension,
/// and copies the server's CA into the data directory. Returns the stack and
/// the path of that copy.
fn tls_stack() -> (Stack, String) {
    let stack = Stack::unconfigured_on(Bao::start_dev_tls(), &[]);
    let ca_path = stack.bao.ca_cert_path().expect("a dev TLS server has a CA");
    let ca_file = stack.install_ca_file(&ca_path, "vault-ca.pem");
    (stack, ca_file)
}

fn set_ca_file(client: &mut Client, ca_file: &str) {
    client
        .query_one(
            "SELECT set_config('vault_redirect.ca_file', $1, false)",
            &[&ca_file],
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
}

/// Checks a failed TLS configure: SQLSTATE 08001, the address, a cause that
/// names the certificate, and no configuration file written.
fn assert_certificate_rejected(stack: &Stack, error: &postgres::Error) {
    let db = expect_sqlstate(error, "08001");
    let expected = format!("could not connect to Vault at {}: ", stack.bao.addr());
    assert!(db.message().starts_with(&expected), "{}", describe(error));
    assert!(
        db.message().to_lowercase().contains("certificate"),
        "{}",
        describe(error)
    );
    assert!(!stack.config_file().exists());
}

#[test]
fn tls_right_ca() {
    let (stack, ca_file) = tls_stack();
    let mut client = stack.superuser();
    client
        .batch_execute(&format!("SET vault_redirect.ca_file = '{ca_file}'"))
        .unwrap_or_else(|e| panic!("{}", describe(&e)));

    configure(&stack, &mut client).unwrap_or_else(|e| panic!("{}", describe(&e)));
    put_and_read(&stack, &mut client);
    let row = client
        .query_one("SELECT url, reachable FROM vault_redirect.status()", &[])
        .unwrap_or_else(|e| panic!("status() raised: {}", describe(&e)));
    assert_eq!(row.get::<_, Option<String>>("url"), Some(stack.bao.addr()));
    assert!(row.get::<_, bool>("reachable"));
}

#[test]
fn tls_missing_ca() {
    let (stack, _) = tls_stack();
    let mut client = stack.superuser();
    let error = configure(&stack, &mut client).expect_err("an unknown CA is rejected");
    assert_certificate_rejected(&stack, &error);
}

#[test]
fn tls_wrong_ca() {
    let (stack, _) = tls_stack();
    let other_ca_file = {
        let other = Bao::start_dev_tls();
        let other_ca = other.ca_cert_path().expect("a dev TLS server has a CA");
        stack.install_ca_file(&other_ca, "other-ca.pem")
    };
    let mut client = stack.superuser();
    set_ca_file(&mut client, &other_ca_file);

    let error = configure(&stack, &mut client).expect_err("a certificate from another CA");
    assert_certificate_rejected(&stack, &error);
}

#[test]
fn tls_skip_verify_warns() {
    let (stack, ca_file) = tls_stack();
    let mut setup = stack.superuser();
    set_ca_file(&mut setup, &ca_file);
    configure(&stack, &mut setup).unwrap_or_else(|e| panic!("{}", describe(&e)));
    stack.kv_put(ENTRY, &json!({ "secret": VALUE }));

    // A superuser session without ca_file that skips verification.
    let notices: Arc<Mutex<Vec<DbError>>> = Arc::default();
    let sink = Arc::clone(&notices);
    let mut config = stack.pg.config("postgres");
    config.notice_callback(move |notice| sink.lock().unwrap().push(notice));
    let mut client = config
        .connect(NoTls)
        .unwrap_or_else(|e| panic!("failed to connect: {e}"));
    let warnings = || {
        notices
            .lock()
            .unwrap()
            .iter()
            .filter(|notice| notice.severity() == "WARNING")
            .count()
    };
    client
        .batch_execute("SET vault_redirect.tls_skip_verify = on")
        .unwrap_or_else(|e| panic!("{}", describe(&e)));

    assert_eq!(read_ok(&mut client, ENTRY), VALUE);
    let after_first = warnings();
    assert!(after_first >= 1, "the first read emitted no WARNING");
    assert_eq!(read_ok(&mut client, ENTRY), VALUE);
    assert!(
        warnings() > after_first,
        "the second read emitted no WARNING"
    );

    // Turning it off again makes the certificate check apply.
    client
        .batch_execute("RESET vault_redirect.tls_skip_verify")
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let error = read(&mut client, ENTRY).expect_err("verification is back on");
    expect_sqlstate(&error, "08001");

    // Only a superuser may turn verification off.
    stack.pg.psql(
        "CREATE ROLE app LOGIN;
         GRANT USAGE ON SCHEMA vault_redirect TO app;
         GRANT EXECUTE ON FUNCTION vault_redirect.read(text, text) TO app;",
    );
    let mut app = stack.pg.connect("app");
    // A first call loads the library, which defines the settings. Before
    // that, SET would only create a placeholder, which PostgreSQL checks
    // at load time. Without the CA, the read itself fails.
    let error = read(&mut app, ENTRY).expect_err("the session has no CA");
    expect_sqlstate(&error, "08001");
    let error = app
        .batch_execute("SET vault_redirect.tls_skip_verify = on")
        .expect_err("a non-superuser may not skip verification");
    expect_sqlstate(&error, "42501");
}

// ---- status --------------------------------------------------------------

#[test]
fn status_in_each_state() {
    let mut stack = Stack::configured_on(Bao::start_persistent(), &[]);
    let mut client = stack.superuser();
    let mut status = |state: &str| {
        client
            .query_one(STATUS_QUERY, &[])
            .unwrap_or_else(|e| panic!("status() raised while {state}: {}", describe(&e)))
    };

    let healthy = status("healthy");
    assert!(healthy.get::<_, bool>("configured"));
    assert_eq!(
        healthy.get::<_, Option<String>>("url"),
        Some(stack.bao.addr())
    );
    assert!(healthy.get::<_, bool>("reachable"));
    assert_eq!(healthy.get::<_, Option<bool>>("sealed"), Some(false));
    assert_eq!(healthy.get::<_, Option<bool>>("initialized"), Some(true));
    let version: Option<String> = healthy.get("server_version");
    assert!(version.is_some_and(|v| !v.is_empty()));
    let round_trip: Option<f64> = healthy.get("round_trip_ms");
    assert!(
        round_trip.is_some_and(|ms| ms > 0.0),
        "round_trip_ms is {round_trip:?}"
    );
    assert_eq!(healthy.get::<_, Option<String>>("error"), None);

    stack.bao.seal();
    let sealed = status("sealed");
    assert!(sealed.get::<_, bool>("configured"));
    assert!(sealed.get::<_, bool>("reachable"));
    assert_eq!(sealed.get::<_, Option<bool>>("sealed"), Some(true));

    stack.bao.unseal();
    stack.bao.stop();
    let stopped = status("stopped");
    assert!(stopped.get::<_, bool>("configured"));
    assert!(!stopped.get::<_, bool>("reachable"));
    let error: Option<String> = stopped.get("error");
    assert!(error.is_some_and(|e| !e.is_empty()));
}

// ---- secrets stay out of errors and logs ---------------------------------

/// A test secret_id and the wrapping token that carries it.
struct WrappedSecretId {
    secret_id: String,
    wrapped: String,
}

/// Creates a secret_id with a known value, wraps it, and adds both to
/// `secrets`.
fn wrap_new_secret_id(bao: &Bao, secrets: &mut Vec<String>) -> WrappedSecretId {
    let secret_id = random_secret_id();
    let wrapped = bao.wrapped_custom_secret_id(ROLE, &secret_id);
    secrets.push(secret_id.clone());
    secrets.push(wrapped.clone());
    WrappedSecretId { secret_id, wrapped }
}

#[test]
fn secrets_never_in_errors() {
    let mut stack = Stack::unconfigured_on(Bao::start_persistent(), &[]);
    let mut client = stack.superuser();
    let mut secrets: Vec<String> = Vec::new();
    let mut errors: Vec<(&str, postgres::Error)> = Vec::new();

    let first = wrap_new_secret_id(&stack.bao, &mut secrets);
    stack
        .configure(&mut client, &stack.role_id, &first.wrapped)
        .unwrap_or_else(|e| panic!("configure failed: {}", describe(&e)));
    assert!(
        stack.stored_secret_id() == first.secret_id,
        "the configuration file holds another secret_id than the one wrapped"
    );
    stack.kv_put(ENTRY, &json!({ "secret": VALUE }));

    // A used wrapping token.
    let error = stack
        .configure(&mut client, &stack.role_id, &first.wrapped)
        .expect_err("a used wrapping token");
    errors.push(("reused wrapping token", error));

    // The secret_id is unwrapped, then the login with a wrong role_id fails.
    let wrong_role = wrap_new_secret_id(&stack.bao, &mut secrets);
    let error = stack
        .configure(
            &mut client,
            "00000000-0000-0000-0000-000000000000",
            &wrong_role.wrapped,
        )
        .expect_err("a wrong role_id");
    errors.push(("wrong role_id", error));

    // The login succeeds, then the policy probe fails.
    let policy_name = format!("{ROLE}-policy");
    stack.bao.write_policy(&policy_name, POLICY_WITHOUT_LIST);
    let probe = wrap_new_secret_id(&stack.bao, &mut secrets);
    let error = stack
        .configure(&mut client, &stack.role_id, &probe.wrapped)
        .expect_err("a policy without list");
    errors.push(("policy probe", error));
    stack
        .bao
        .write_policy(&policy_name, &approle_policy(MOUNT, SECRETS_PATH));

    // A wrapping token that carries no secret_id.
    let other = stack
        .bao
        .wrap_other_data(&json!({ "note": "not a secret_id" }));
    secrets.push(other.clone());
    let error = stack
        .configure(&mut client, &stack.role_id, &other)
        .expect_err("a wrapping token of another kind");
    errors.push(("wrapping token of another kind", error));

    // Sealed.
    let sealed = wrap_new_secret_id(&stack.bao, &mut secrets);
    stack.bao.seal();
    let error = stack
        .configure(&mut client, &stack.role_id, &sealed.wrapped)
        .expect_err("a sealed Vault");
    errors.push(("configure while sealed", error));
    let error = read(&mut client, ENTRY).expect_err("a sealed Vault");
    errors.push(("read while sealed", error));
    stack.bao.unseal();

    // Stopped.
    let stopped = wrap_new_secret_id(&stack.bao, &mut secrets);
    stack.bao.stop();
    let error = stack
        .configure(&mut client, &stack.role_id, &stopped.wrapped)
        .expect_err("a stopped Vault");
    errors.push(("configure while stopped", error));
    let error = read(&mut client, ENTRY).expect_err("a stopped Vault");
    errors.push(("read while stopped", error));
    stack.bao.restart();

    // The stored secret_id no longer logs in.
    stack.bao.destroy_secret_id(ROLE, &first.secret_id);
    stack.bao.revoke_approle_tokens();
    let error = read(&mut client, ENTRY).expect_err("a destroyed secret_id");
    errors.push(("login with a destroyed secret_id", error));

    for (case, error) in &errors {
        let db = db_error(error);
        let fields = [
            ("message", Some(db.message())),
            ("detail", db.detail()),
            ("hint", db.hint()),
            ("context", db.where_()),
        ];
        for (field, text) in fields {
            let text = text.unwrap_or_default();
            for (index, secret) in secrets.iter().enumerate() {
                assert!(
                    !text.contains(secret.as_str()),
                    "the {field} of the error for {case} (SQLSTATE {}) contains test secret #{index}",
                    db.code().code()
                );
            }
        }
    }
    let log = stack.pg.log_contents();
    for (index, secret) in secrets.iter().enumerate() {
        assert!(
            !log.contains(secret.as_str()),
            "the server log contains test secret #{index}"
        );
    }
}
