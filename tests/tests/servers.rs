//! Every server configured before migrate: the registry in Vault, a real
//! streaming standby, the order of migrate()'s preconditions and the
//! reminders.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use postgres::error::DbError;
use postgres::{Client, NoTls};
use serde_json::json;
use vault_redirect_tests::stack::{db_error, describe, Stack, MOUNT, SECRETS_PATH};
use vault_redirect_tests::Pg;

fn integration(client: &mut Client) -> (String, Vec<String>) {
    let row = client
        .query_one(
            "SELECT integration, missing_servers FROM vault_redirect.status()",
            &[],
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    (row.get(0), row.get(1))
}

fn migrate_error(client: &mut Client) -> postgres::Error {
    client
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .expect_err("migrate must be refused")
}

/// Waits until `check` holds, or panics after `seconds`.
fn wait_for(seconds: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn standby_configured_before_migrate() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    let standby = stack.pg.start_standby("pg-standby");
    let mut primary = stack.superuser();
    wait_for(30, "the standby to stream", || {
        primary
            .query(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = 'pg-standby'",
                &[],
            )
            .map(|rows| !rows.is_empty())
            .unwrap_or(false)
    });

    assert_eq!(
        integration(&mut primary),
        ("servers_missing".to_owned(), vec!["pg-standby".to_owned()])
    );
    let error = migrate_error(&mut primary);
    let db = db_error(&error);
    assert_eq!(db.code().code(), "55006", "{}", describe(&error));
    assert_eq!(
        db.message(),
        "vault_redirect is not configured on: pg-standby"
    );

    // The standby received the primary's file with the base backup, and
    // must not use it.
    let mut replica = standby.connect("postgres");
    let error = replica
        .query_one("SELECT vault_redirect.read('global/rpc-shared')", &[])
        .expect_err("the copied configuration is not used");
    let db = db_error(&error);
    assert_eq!(db.code().code(), "55000", "{}", describe(&error));
    assert!(
        db.message().contains("copied from server \"pg-test\""),
        "{}",
        describe(&error)
    );

    // The standby gets its own AppRole; configure writes no table.
    let role_id = stack
        .bao
        .setup_approle("pg-standby", MOUNT, SECRETS_PATH, &[]);
    let wrapped = stack.bao.wrapped_secret_id("pg-standby");
    stack
        .configure(&mut replica, &role_id, &wrapped)
        .unwrap_or_else(|e| panic!("configure on the standby: {}", describe(&e)));
    let in_recovery: bool = replica
        .query_one("SELECT pg_is_in_recovery()", &[])
        .unwrap()
        .get(0);
    assert!(in_recovery);

    assert_eq!(
        integration(&mut primary),
        ("not_migrated".to_owned(), vec![])
    );
    let servers: Vec<(String, bool)> = primary
        .query(
            "SELECT server_name, configured FROM vault_redirect.servers() ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        servers,
        [
            ("pg-standby".to_owned(), true),
            ("pg-test".to_owned(), true)
        ]
    );

    primary
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap_or_else(|e| panic!("migrate: {}", describe(&e)));
    assert_eq!(integration(&mut primary), ("complete".to_owned(), vec![]));

    // The standby replays the references and resolves them with its own
    // AppRole.
    wait_for(30, "the standby to replay the migration", || {
        replica
            .query_one(
                "SELECT value ? '$vault_redirect' FROM maasserver_secret WHERE path = 'global/rpc-shared'",
                &[],
            )
            .map(|row| row.get::<_, bool>(0))
            .unwrap_or(false)
    });
    let value: serde_json::Value = replica
        .query_one(
            "SELECT value FROM vault_redirect_resolved.maasserver_secret WHERE path = 'global/rpc-shared'",
            &[],
        )
        .unwrap_or_else(|e| panic!("{}", describe(&e)))
        .get(0);
    assert_eq!(value, json!({"secret": "test-rpc-4f1c9e0b7a2d"}));
    assert_eq!(integration(&mut replica).0, "complete");
}

#[test]
fn preconditions_in_order() {
    let stack = Stack::unconfigured(&[]);
    stack.load_maas_schema();
    let mut client = stack.superuser();

    // This server is not configured.
    let error = migrate_error(&mut client);
    assert_eq!(
        db_error(&error).code().code(),
        "55000",
        "{}",
        describe(&error)
    );

    // Other servers the operator declared are not configured; names sorted.
    client
        .batch_execute(
            "SELECT vault_redirect.add_server('zeta'); SELECT vault_redirect.add_server('alpha');",
        )
        .unwrap();
    let wrapped = stack.bao.wrapped_secret_id("pg-primary");
    stack
        .configure(&mut client, &stack.role_id, &wrapped)
        .unwrap();
    let error = migrate_error(&mut client);
    let db = db_error(&error);
    assert_eq!(db.code().code(), "55006", "{}", describe(&error));
    assert_eq!(
        db.message(),
        "vault_redirect is not configured on: alpha, zeta"
    );
    assert!(db.hint().unwrap_or_default().contains("configure"));

    // Vault login fails: the secret_id is destroyed and tokens revoked.
    client
        .batch_execute(
            "SELECT vault_redirect.remove_server('zeta'); SELECT vault_redirect.remove_server('alpha');",
        )
        .unwrap();
    let secret_id = stack.stored_secret_id();
    stack.bao.destroy_secret_id("pg-primary", &secret_id);
    stack.bao.revoke_approle_tokens();
    let error = migrate_error(&mut client);
    assert_eq!(
        db_error(&error).code().code(),
        "28P01",
        "{}",
        describe(&error)
    );

    // Configured again, it migrates, and a second run is refused.
    let wrapped = stack.bao.wrapped_secret_id("pg-primary");
    stack
        .configure(&mut client, &stack.role_id, &wrapped)
        .unwrap();
    client
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let error = migrate_error(&mut client);
    assert_eq!(
        db_error(&error).code().code(),
        "42710",
        "{}",
        describe(&error)
    );
}

fn collecting_client(pg: &Pg) -> (Client, Arc<Mutex<Vec<DbError>>>) {
    let notices: Arc<Mutex<Vec<DbError>>> = Arc::default();
    let sink = Arc::clone(&notices);
    let mut config = pg.config("postgres");
    config.notice_callback(move |notice| sink.lock().unwrap().push(notice));
    let client = config.connect(NoTls).expect("connect");
    (client, notices)
}

fn messages(notices: &Arc<Mutex<Vec<DbError>>>, severity: &str) -> Vec<String> {
    notices
        .lock()
        .unwrap()
        .iter()
        .filter(|n| n.severity() == severity)
        .map(|n| n.message().to_owned())
        .collect()
}

#[test]
fn incomplete_integration_reminders() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    stack.kv_put("global/check", &json!({"secret": "x"}));

    // A session's first use of Vault gets one NOTICE, later ones none.
    let (mut client, notices) = collecting_client(&stack.pg);
    for _ in 0..3 {
        client
            .query_one("SELECT vault_redirect.read('global/check')", &[])
            .unwrap_or_else(|e| panic!("{}", describe(&e)));
    }
    let notes = messages(&notices, "NOTICE");
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("run vault_redirect.migrate()"),
        "{notes:?}"
    );

    // status() warns every time while incomplete.
    client
        .query("SELECT * FROM vault_redirect.status()", &[])
        .unwrap();
    assert_eq!(messages(&notices, "WARNING").len(), 1);

    // configure() warns too when other servers are missing.
    client
        .batch_execute("SELECT vault_redirect.add_server('pg-other')")
        .unwrap();
    let wrapped = stack.bao.wrapped_secret_id("pg-primary");
    stack
        .configure(&mut client, &stack.role_id, &wrapped)
        .unwrap();
    let warnings = messages(&notices, "WARNING");
    assert!(
        warnings
            .last()
            .unwrap()
            .contains("configure 1 other server(s): pg-other"),
        "{warnings:?}"
    );

    // Complete: no reminder.
    client
        .batch_execute("SELECT vault_redirect.remove_server('pg-other')")
        .unwrap();
    client
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let before = messages(&notices, "WARNING").len();
    assert_eq!(integration(&mut client).0, "complete");
    assert_eq!(messages(&notices, "WARNING").len(), before);
}
