//! Faults in the middle of a migration: every declared column is left
//! byte for byte as it was, and a rerun completes the job.

use std::thread;
use std::time::Duration;

use vault_redirect_tests::stack::{db_error, describe, Stack};

/// Rows in the table migrated under fault. There are enough for the migration to
/// take a few seconds, so that the fault lands in the middle of it.
const ROWS: u32 = 1500;
const CHECKSUM: &str = "SELECT md5(string_agg(t::text, '|' ORDER BY path)) FROM big_secret t;";

fn big_table(stack: &Stack) {
    stack.pg.psql(&format!(
        "CREATE TABLE big_secret (path text PRIMARY KEY, value jsonb NOT NULL);
         INSERT INTO big_secret
              SELECT 'node/' || g || '/power', jsonb_build_object('secret', md5(g::text))
                FROM generate_series(1, {ROWS}) g;
         SELECT vault_redirect.declare_kv_table('big_secret', 'path', 'value');"
    ));
}

/// Runs migrate() while `fault` strikes after `delay`, and returns the
/// migration's error.
fn migrate_under(
    stack: &Stack,
    delay: Duration,
    fault: impl FnOnce(i32) + Send,
) -> postgres::Error {
    let mut client = stack.superuser();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    thread::scope(|scope| {
        scope.spawn(move || {
            thread::sleep(delay);
            fault(pid);
        });
        client
            .query("SELECT * FROM vault_redirect.migrate()", &[])
            .expect_err("the fault must stop the migration")
    })
}

fn assert_rerun_completes(stack: &Stack) {
    let mut client = stack.superuser();
    let migrated: i64 = client
        .query_one(
            "SELECT sum(migrated + already_migrated)::bigint FROM vault_redirect.migrate()",
            &[],
        )
        .unwrap_or_else(|e| panic!("rerun failed: {}", describe(&e)))
        .get(0);
    assert_eq!(migrated, i64::from(ROWS));
    let dangling = client
        .query("SELECT * FROM vault_redirect.verify()", &[])
        .unwrap();
    assert!(dangling.is_empty());
    let plaintext: i64 = client
        .query_one(
            "SELECT count(*) FROM big_secret WHERE NOT value ? '$vault_redirect'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(plaintext, 0);
}

#[test]
fn seal_mid_migration() {
    let stack = Stack::configured(&[]);
    big_table(&stack);
    let before = stack.pg.psql(CHECKSUM);
    let error = migrate_under(&stack, Duration::from_millis(800), |_| stack.bao.seal());
    assert_eq!(
        db_error(&error).code().code(),
        "57P03",
        "{}",
        describe(&error)
    );
    assert_eq!(stack.pg.psql(CHECKSUM), before);

    stack.bao.unseal();
    assert_rerun_completes(&stack);
}

#[test]
fn cancel_mid_migration() {
    let stack = Stack::configured(&[]);
    big_table(&stack);
    let before = stack.pg.psql(CHECKSUM);
    let error = migrate_under(&stack, Duration::from_millis(800), |pid| {
        stack.pg.psql(&format!("SELECT pg_cancel_backend({pid});"));
    });
    assert_eq!(
        db_error(&error).code().code(),
        "57014",
        "{}",
        describe(&error)
    );
    assert_eq!(stack.pg.psql(CHECKSUM), before);
    assert_rerun_completes(&stack);
}

#[test]
fn kill_backend_mid_migration() {
    let stack = Stack::configured(&[]);
    big_table(&stack);
    let before = stack.pg.psql(CHECKSUM);
    let error = migrate_under(&stack, Duration::from_millis(800), |pid| {
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    });
    assert!(
        error.as_db_error().is_none() || error.is_closed(),
        "{error}"
    );

    // The postmaster restarts every backend after the crash; the log prints
    // "ready to accept connections" once more when it is done.
    let mut recovered = false;
    for _ in 0..150 {
        let ready = stack
            .pg
            .log_contents()
            .matches("ready to accept connections")
            .count();
        if ready >= 2 && stack.pg.try_psql("SELECT 1;").is_ok() {
            recovered = true;
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert!(recovered, "PostgreSQL did not recover after the crash");
    assert_eq!(stack.pg.psql(CHECKSUM), before);
    assert_rerun_completes(&stack);
}

#[test]
fn progress_visible_from_other_session() {
    let stack = Stack::configured(&[]);
    big_table(&stack);
    let mut watcher = stack.superuser();
    let mut seen_running = None;
    thread::scope(|scope| {
        let migration = scope.spawn(|| {
            stack
                .superuser()
                .query("SELECT * FROM vault_redirect.migrate()", &[])
                .map(|_| ())
                .map_err(|e| describe(&e))
        });
        while !migration.is_finished() {
            let rows = watcher
                .query(
                    "SELECT running, rows_done, rows_total FROM vault_redirect.migration_progress()",
                    &[],
                )
                .unwrap_or_else(|e| panic!("{}", describe(&e)));
            if let Some(row) = rows.first() {
                let (running, done, total): (bool, i64, i64) = (row.get(0), row.get(1), row.get(2));
                if running && done > 0 {
                    seen_running = Some((done, total));
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
        migration.join().unwrap().unwrap();
    });
    let (done, total) = seen_running.expect("another session saw the migration running");
    assert_eq!(total, i64::from(ROWS));
    assert!(done > 0);
    assert!(done <= total);

    let row = watcher
        .query_one(
            "SELECT running, rows_done, rows_total FROM vault_redirect.migration_progress()",
            &[],
        )
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i64>(1), i64::from(ROWS));
}

#[test]
fn openbao_killed_mid_migration() {
    let bao = vault_redirect_tests::Bao::start_persistent();
    let mut stack = Stack::configured_on(bao, &[]);
    big_table(&stack);
    let before = stack.pg.psql(CHECKSUM);
    let error = {
        let bao = &mut stack.bao;
        let mut client = stack.pg.connect("postgres");
        thread::scope(|scope| {
            let migration =
                scope.spawn(move || client.query("SELECT * FROM vault_redirect.migrate()", &[]));
            thread::sleep(Duration::from_millis(800));
            bao.stop();
            migration
                .join()
                .unwrap()
                .expect_err("a stopped Vault stops the migration")
        })
    };
    assert_eq!(
        db_error(&error).code().code(),
        "08001",
        "{}",
        describe(&error)
    );
    assert_eq!(stack.pg.psql(CHECKSUM), before);

    stack.bao.restart();
    assert_rerun_completes(&stack);
}

#[test]
fn seal_mid_unmigrate() {
    let stack = Stack::configured(&[]);
    big_table(&stack);
    stack
        .superuser()
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let migrated = stack.pg.psql(CHECKSUM);
    let mut client = stack.superuser();
    let error = thread::scope(|scope| {
        scope.spawn(|| {
            thread::sleep(Duration::from_millis(600));
            stack.bao.seal();
        });
        client
            .query("SELECT * FROM vault_redirect.unmigrate()", &[])
            .expect_err("sealing stops unmigrate")
    });
    assert_eq!(
        db_error(&error).code().code(),
        "57P03",
        "{}",
        describe(&error)
    );
    assert_eq!(stack.pg.psql(CHECKSUM), migrated);

    stack.bao.unseal();
    let restored: i64 = client
        .query_one("SELECT restored FROM vault_redirect.unmigrate()", &[])
        .unwrap_or_else(|e| panic!("{}", describe(&e)))
        .get(0);
    assert_eq!(restored, i64::from(ROWS));
    let references: i64 = client
        .query_one(
            "SELECT count(*) FROM big_secret WHERE value ? '$vault_redirect'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(references, 0);
}
