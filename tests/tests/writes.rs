//! Writes to migrated columns go to Vault: INSERT, UPDATE, DELETE and
//! TRUNCATE, through MAAS's own statements, with rollbacks, savepoints,
//! failures at commit, concurrent writers and the deletion queue.

use std::thread;
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::{json, Value};
use vault_redirect_tests::bao::approle_policy;
use vault_redirect_tests::stack::{contains_bytes, db_error, describe, Stack};

/// MAAS's upsert of a secret, as its ORM sends it.
const UPSERT: &str = "INSERT INTO maasserver_secret (created, updated, path, value)
                      VALUES (now(), now(), $1, $2)
                      ON CONFLICT (path) DO UPDATE
                         SET value = EXCLUDED.value, updated = EXCLUDED.updated
                      RETURNING path";

/// Starts a stack with the MAAS tables migrated, and an application role
/// `app` that may read and write them but nothing of the extension.
fn migrated_stack() -> Stack {
    let stack = Stack::configured(&["token_no_default_policy=true"]);
    stack.load_maas_schema();
    stack.pg.psql(
        "SELECT * FROM vault_redirect.migrate();
         CREATE ROLE app LOGIN;
         GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE
            ON public.maasserver_secret, public.maasserver_bmc TO app;
         GRANT USAGE ON SCHEMA vault_redirect_resolved TO app;
         GRANT SELECT ON ALL TABLES IN SCHEMA vault_redirect_resolved TO app;",
    );
    stack
}

/// Returns the value the resolved view shows for a path.
fn resolved(client: &mut Client, path: &str) -> Option<Value> {
    client
        .query_opt(
            "SELECT value FROM vault_redirect_resolved.maasserver_secret WHERE path = $1",
            &[&path],
        )
        .unwrap_or_else(|e| panic!("reading {path} through the view failed: {}", describe(&e)))
        .map(|row| row.get(0))
}

/// Returns what the row itself holds for a path.
fn stored(client: &mut Client, path: &str) -> Option<Value> {
    client
        .query_opt(
            "SELECT value FROM public.maasserver_secret WHERE path = $1",
            &[&path],
        )
        .unwrap()
        .map(|row| row.get(0))
}

fn reference(path: &str) -> Value {
    json!({ "$vault_redirect": path })
}

/// Waits until `check` holds, for at most a minute.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn queue_length(client: &mut Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM vault_redirect.deletion_queue", &[])
        .unwrap()
        .get(0)
}

/// Returns the bytes of a table's files and of every WAL segment, after a
/// checkpoint.
fn heap_and_wal(stack: &Stack, table: &str) -> Vec<u8> {
    stack.pg.psql("CHECKPOINT;");
    let mut bytes = stack.table_files(table);
    bytes.extend(stack.wal_files());
    bytes
}

#[test]
fn maas_statements_write_to_vault() {
    let stack = migrated_stack();
    let mut app = stack.pg.connect("app");

    // INSERT ... ON CONFLICT for a new path, then for an existing one.
    let new_value = json!({ "secret": "w-new-6a1f2c" });
    let returned: String = app
        .query_one(UPSERT, &[&"global/new-key", &new_value])
        .unwrap_or_else(|e| panic!("upsert of a new path failed: {}", describe(&e)))
        .get(0);
    assert_eq!(returned, "global/new-key");
    assert_eq!(
        stored(&mut app, "global/new-key"),
        Some(reference("global/new-key"))
    );
    assert_eq!(stack.kv_get("global/new-key"), Some(new_value.clone()));
    assert_eq!(resolved(&mut app, "global/new-key"), Some(new_value));

    let replaced = json!({ "secret": "w-upserted-0b9e" });
    app.query_one(UPSERT, &[&"global/rpc-shared", &replaced])
        .unwrap_or_else(|e| panic!("upsert of an existing path failed: {}", describe(&e)));
    assert_eq!(stack.kv_get("global/rpc-shared"), Some(replaced.clone()));
    assert_eq!(resolved(&mut app, "global/rpc-shared"), Some(replaced));

    // UPDATE ... SET value = $1 WHERE path = $2, with a scalar value.
    let scalar = json!("w-scalar-77d3");
    let updated = app
        .execute(
            "UPDATE maasserver_secret SET value = $1 WHERE path = $2",
            &[&scalar, &"rootkey/3/material"],
        )
        .unwrap();
    assert_eq!(updated, 1);
    assert_eq!(
        stored(&mut app, "rootkey/3/material"),
        Some(json!({ "$vault_redirect": "rootkey/3/material", "key": "secret" }))
    );
    assert_eq!(
        stack.kv_get("rootkey/3/material"),
        Some(json!({ "secret": "w-scalar-77d3" }))
    );
    assert_eq!(resolved(&mut app, "rootkey/3/material"), Some(scalar));

    // An UPDATE that leaves the secret alone sends nothing to Vault.
    let version_before = stack
        .bao
        .kv_metadata("secret", "maas/global/omapi-key")
        .unwrap()["current_version"]
        .clone();
    app.execute(
        "UPDATE maasserver_secret SET updated = now() WHERE path = 'global/omapi-key'",
        &[],
    )
    .unwrap();
    let version_after = stack
        .bao
        .kv_metadata("secret", "maas/global/omapi-key")
        .unwrap()["current_version"]
        .clone();
    assert_eq!(
        version_before, version_after,
        "an unchanged secret was written again"
    );

    // DELETE ... WHERE path LIKE 'bmc/3/%' removes the entries after commit.
    for id in ["bmc/3/power-parameters", "bmc/3/extra"] {
        app.query_one(UPSERT, &[&id, &json!({ "power_pass": "w-bmc3-c41d" })])
            .unwrap();
        assert!(stack.kv_get(id).is_some(), "{id} was not written to Vault");
    }
    let deleted = app
        .execute(
            "DELETE FROM maasserver_secret WHERE path LIKE 'bmc/3/%'",
            &[],
        )
        .unwrap();
    assert_eq!(deleted, 2);
    eventually("the KV entries of the deleted rows are gone", || {
        stack.kv_get("bmc/3/power-parameters").is_none() && stack.kv_get("bmc/3/extra").is_none()
    });
    let mut admin = stack.superuser();
    eventually("the deletion queue is empty", || {
        queue_length(&mut admin) == 0
    });
    assert!(
        stack.kv_get("bmc/1/power-parameters").is_some(),
        "another BMC's entry was deleted"
    );

    // None of the plaintext written reached the table files or the WAL.
    let files = heap_and_wal(&stack, "public.maasserver_secret");
    for plaintext in [
        "w-new-6a1f2c",
        "w-upserted-0b9e",
        "w-scalar-77d3",
        "w-bmc3-c41d",
    ] {
        assert!(
            !contains_bytes(&files, plaintext),
            "{plaintext} is in the heap or WAL"
        );
    }
}

#[test]
fn rollback_and_savepoints_leave_vault_alone() {
    let stack = migrated_stack();
    let mut app = stack.pg.connect("app");
    let original = stack.kv_get("global/macaroon-key").unwrap();

    let mut tx = app.transaction().unwrap();
    tx.execute(
        "UPDATE maasserver_secret SET value = '{\"secret\": \"w-rolled-back\"}' WHERE path = 'global/macaroon-key'",
        &[],
    )
    .unwrap();

    // The transaction reads its own write before it commits.
    let inside: Value = tx
        .query_one(
            "SELECT value FROM vault_redirect_resolved.maasserver_secret WHERE path = 'global/macaroon-key'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(inside, json!({ "secret": "w-rolled-back" }));
    tx.execute(UPSERT, &[&"global/never", &json!({ "secret": "w-never" })])
        .unwrap();
    tx.rollback().unwrap();
    assert_eq!(stack.kv_get("global/macaroon-key"), Some(original));
    assert_eq!(
        stack.kv_get("global/never"),
        None,
        "a rolled-back insert reached Vault"
    );

    // A savepoint rolled back drops its writes; the rest commits.
    let mut tx = app.transaction().unwrap();
    tx.execute(UPSERT, &[&"global/sp", &json!({ "secret": "w-kept" })])
        .unwrap();
    let mut savepoint = tx.savepoint("sp").unwrap();
    savepoint
        .execute(UPSERT, &[&"global/sp", &json!({ "secret": "w-dropped" })])
        .unwrap();
    savepoint
        .execute(
            UPSERT,
            &[&"global/sp-inner", &json!({ "secret": "w-dropped" })],
        )
        .unwrap();
    savepoint.rollback().unwrap();
    tx.commit().unwrap();
    assert_eq!(
        stack.kv_get("global/sp"),
        Some(json!({ "secret": "w-kept" }))
    );
    assert_eq!(stack.kv_get("global/sp-inner"), None);
    assert_eq!(
        resolved(&mut app, "global/sp"),
        Some(json!({ "secret": "w-kept" }))
    );
}

#[test]
fn commit_fails_when_vault_is_sealed() {
    let stack = migrated_stack();
    let mut app = stack.pg.connect("app");
    stack.bao.seal();
    let error = app
        .query_one(
            UPSERT,
            &[&"global/while-sealed", &json!({ "secret": "w-sealed" })],
        )
        .expect_err("a write while Vault is sealed must fail");
    let db = db_error(&error);
    assert!(
        db.message().contains("sealed") && db.message().contains("global/while-sealed"),
        "the error names the state and the row: {}",
        describe(&error)
    );
    stack.bao.unseal();
    assert_eq!(
        stored(&mut app, "global/while-sealed"),
        None,
        "the row was kept"
    );
    assert_eq!(stack.kv_get("global/while-sealed"), None);

    // The same connection works again once Vault is unsealed.
    app.query_one(
        UPSERT,
        &[&"global/while-sealed", &json!({ "secret": "w-after" })],
    )
    .unwrap_or_else(|e| panic!("write after unseal failed: {}", describe(&e)));
    assert_eq!(
        stack.kv_get("global/while-sealed"),
        Some(json!({ "secret": "w-after" }))
    );
}

#[test]
fn failed_commit_undoes_earlier_writes() {
    let stack = migrated_stack();
    let mut admin = stack.superuser();

    // A second declared table, whose row is written after the first.
    admin
        .batch_execute(
            "CREATE TABLE public.other (id int PRIMARY KEY, pass text);
             SELECT vault_redirect.declare_column('public.other', 'pass');
             SELECT * FROM vault_redirect.migrate();",
        )
        .unwrap();
    let original = stack.kv_get("global/tls").unwrap();
    let mut tx = admin.transaction().unwrap();
    tx.execute(
        "UPDATE maasserver_secret SET value = '{\"key\": \"w-undone\"}' WHERE path = 'global/tls'",
        &[],
    )
    .unwrap();
    tx.execute("INSERT INTO public.other VALUES (1, 'w-other')", &[])
        .unwrap();

    // The policy now refuses the second table's paths, so that the first
    // write of the commit succeeds and the second fails.
    let denying_policy = format!(
        "{}path \"secret/data/maas/public/other/*\" {{ capabilities = [\"deny\"] }}\n",
        approle_policy("secret", "maas")
    );
    let (status, _) = stack.bao.request(
        "PUT",
        "/v1/sys/policies/acl/pg-primary-policy",
        Some(&json!({ "policy": denying_policy })),
    );
    assert!(
        status == 200 || status == 204,
        "policy update answered {status}"
    );
    let error = tx.commit().expect_err("the commit must fail");
    assert!(
        describe(&error).contains("public.other"),
        "the error names the row whose write failed: {}",
        describe(&error)
    );
    assert_eq!(
        stack.kv_get("global/tls"),
        Some(original),
        "the first write was not undone"
    );
    assert_eq!(
        stored(&mut admin, "global/tls"),
        Some(reference("global/tls"))
    );
}

#[test]
fn deletions_wait_while_vault_is_sealed() {
    let stack = migrated_stack();
    let mut app = stack.pg.connect("app");
    let mut admin = stack.superuser();
    stack.bao.seal();
    app.execute(
        "DELETE FROM maasserver_secret WHERE path = 'global/vcenter-password'",
        &[],
    )
    .unwrap_or_else(|e| panic!("a delete must not need Vault: {}", describe(&e)));
    eventually("the worker records its failed attempt", || {
        admin
            .query_opt(
                "SELECT last_error FROM vault_redirect.deletion_queue
                  WHERE path = 'global/vcenter-password' AND attempts > 0",
                &[],
            )
            .unwrap()
            .and_then(|row| row.get::<_, Option<String>>(0))
            .is_some_and(|e| e.contains("sealed"))
    });
    stack.bao.unseal();
    let row = admin
        .query_one("SELECT * FROM vault_redirect.process_deletions()", &[])
        .unwrap_or_else(|e| panic!("process_deletions failed: {}", describe(&e)));
    let (deleted, remaining): (i64, i64) = (row.get(0), row.get(2));
    assert!(deleted <= 1, "deleted {deleted}");
    assert_eq!(remaining, 0);
    assert_eq!(stack.kv_get("global/vcenter-password"), None);
}

#[test]
fn deleted_then_inserted_again_keeps_the_secret() {
    let stack = migrated_stack();
    let mut app = stack.pg.connect("app");
    let mut tx = app.transaction().unwrap();
    tx.execute(
        "DELETE FROM maasserver_secret WHERE path = 'global/omapi-key'",
        &[],
    )
    .unwrap();
    tx.execute(
        UPSERT,
        &[&"global/omapi-key", &json!({ "secret": "w-again" })],
    )
    .unwrap();
    tx.commit().unwrap();
    let mut admin = stack.superuser();
    eventually("the deletion queue is empty", || {
        queue_length(&mut admin) == 0
    });
    assert_eq!(
        stack.kv_get("global/omapi-key"),
        Some(json!({ "secret": "w-again" }))
    );
    assert_eq!(
        resolved(&mut app, "global/omapi-key"),
        Some(json!({ "secret": "w-again" }))
    );
}

#[test]
fn changing_the_path_moves_the_secret() {
    let stack = migrated_stack();
    let mut app = stack.pg.connect("app");
    let original = stack.kv_get("global/rpc-shared").unwrap();
    app.execute(
        "UPDATE maasserver_secret SET path = 'global/rpc-renamed' WHERE path = 'global/rpc-shared'",
        &[],
    )
    .unwrap();
    assert_eq!(
        stored(&mut app, "global/rpc-renamed"),
        Some(reference("global/rpc-renamed"))
    );
    assert_eq!(stack.kv_get("global/rpc-renamed"), Some(original.clone()));
    eventually("the old entry is deleted", || {
        stack.kv_get("global/rpc-shared").is_none()
    });
    assert_eq!(resolved(&mut app, "global/rpc-renamed"), Some(original));
}

#[test]
fn truncate_queues_every_entry() {
    let stack = migrated_stack();
    let mut app = stack.pg.connect("app");
    app.execute("TRUNCATE maasserver_bmc", &[]).unwrap();
    eventually("the wide table's entries are deleted", || {
        stack
            .kv_get("public/maasserver_bmc/1/power_parameters")
            .is_none()
            && stack
                .kv_get("public/maasserver_bmc/2/power_parameters")
                .is_none()
    });
    assert!(stack.kv_get("global/rpc-shared").is_some());
}

#[test]
fn wide_table_rows_write_to_vault() {
    let stack = migrated_stack();
    let mut app = stack.pg.connect("app");
    let params = json!({ "power_address": "192.0.2.40", "power_pass": "w-bmc40-5e1a" });
    app.execute(
        "INSERT INTO maasserver_bmc (id, power_type, power_parameters) VALUES (40, 'ipmi', $1)",
        &[&params],
    )
    .unwrap();
    let row: Value = app
        .query_one(
            "SELECT power_parameters FROM maasserver_bmc WHERE id = 40",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(row, reference("public/maasserver_bmc/40/power_parameters"));
    let view: Value = app
        .query_one(
            "SELECT power_parameters FROM vault_redirect_resolved.maasserver_bmc WHERE id = 40",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(view, params);

    // COPY goes through the same trigger.
    let mut writer = app
        .copy_in("COPY maasserver_bmc (id, power_type, power_parameters) FROM STDIN")
        .unwrap();
    use std::io::Write;
    writer
        .write_all(b"41\tipmi\t{\"power_pass\": \"w-copied-8f2b\"}\n")
        .unwrap();
    writer.finish().unwrap();
    assert_eq!(
        stack.kv_get("public/maasserver_bmc/41/power_parameters"),
        Some(json!({ "power_pass": "w-copied-8f2b" }))
    );
    let files = heap_and_wal(&stack, "public.maasserver_bmc");
    assert!(!contains_bytes(&files, "w-bmc40-5e1a"));
    assert!(!contains_bytes(&files, "w-copied-8f2b"));
}

#[test]
fn concurrent_writers_of_one_secret() {
    let stack = migrated_stack();

    // Two sessions update the same row: the second waits for the first, and
    // Vault ends with the value of the transaction that committed last.
    let mut first = stack.pg.connect("app");
    let mut tx = first.transaction().unwrap();
    tx.execute(
        "UPDATE maasserver_secret SET value = '{\"secret\": \"w-first\"}' WHERE path = 'global/rpc-shared'",
        &[],
    )
    .unwrap();
    let config = stack.pg.config("app");
    let second = thread::spawn(move || {
        let mut client = config.connect(postgres::NoTls).unwrap();
        client
            .execute(
                "UPDATE maasserver_secret SET value = '{\"secret\": \"w-second\"}' WHERE path = 'global/rpc-shared'",
                &[],
            )
            .unwrap()
    });
    thread::sleep(Duration::from_millis(500));
    tx.commit().unwrap();
    assert_eq!(second.join().unwrap(), 1);
    assert_eq!(
        stack.kv_get("global/rpc-shared"),
        Some(json!({ "secret": "w-second" }))
    );

    // Many sessions upsert one new path at once; whatever order they commit
    // in, the row and Vault agree with the last commit.
    let writers: Vec<_> = (0..6)
        .map(|i| {
            let config = stack.pg.config("app");
            thread::spawn(move || {
                let mut client = config.connect(postgres::NoTls).unwrap();
                for round in 0..5 {
                    let value = json!({ "secret": format!("w-race-{i}-{round}") });
                    client.query_one(UPSERT, &[&"global/race", &value]).unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let mut app = stack.pg.connect("app");
    assert_eq!(
        stored(&mut app, "global/race"),
        Some(reference("global/race"))
    );
    let in_vault = stack.kv_get("global/race").unwrap();
    assert!(
        in_vault["secret"].as_str().unwrap().starts_with("w-race-"),
        "{in_vault}"
    );
    assert_eq!(resolved(&mut app, "global/race"), Some(in_vault));
}

#[test]
fn gc_finds_orphans_only() {
    let stack = migrated_stack();
    let mut admin = stack.superuser();
    stack.kv_put("global/orphan", &json!({ "secret": "w-orphan" }));
    stack.kv_put(
        "public/maasserver_bmc/99/power_parameters",
        &json!({ "x": 1 }),
    );
    let orphans = |client: &mut Client, dry_run: bool| -> Vec<(String, String)> {
        client
            .query(
                "SELECT path, action FROM vault_redirect.gc(dry_run => $1)",
                &[&dry_run],
            )
            .unwrap_or_else(|e| panic!("gc failed: {}", describe(&e)))
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let listed = orphans(&mut admin, true);
    assert_eq!(
        listed,
        vec![
            ("global/orphan".to_owned(), "orphan".to_owned()),
            (
                "public/maasserver_bmc/99/power_parameters".to_owned(),
                "orphan".to_owned()
            ),
        ]
    );
    assert!(stack.kv_get("global/orphan").is_some(), "a dry run deleted");
    let deleted = orphans(&mut admin, false);
    assert_eq!(deleted.len(), 2);
    assert!(deleted.iter().all(|(_, action)| action == "deleted"));
    assert_eq!(stack.kv_get("global/orphan"), None);
    assert!(orphans(&mut admin, true).is_empty());
    let problems: i64 = admin
        .query_one("SELECT count(*) FROM vault_redirect.verify()", &[])
        .unwrap()
        .get(0);
    assert_eq!(problems, 0, "gc removed an entry a row uses");

    // gc is for superusers only.
    let mut app = stack.pg.connect("app");
    let error = app
        .query("SELECT * FROM vault_redirect.gc()", &[])
        .expect_err("app must not run gc");
    assert_eq!(db_error(&error).code().code(), "42501");
}

#[test]
fn unmigrate_stops_the_redirection() {
    let stack = migrated_stack();
    let mut admin = stack.superuser();
    let mut app = stack.pg.connect("app");
    app.query_one(
        UPSERT,
        &[&"global/before-unmigrate", &json!({ "secret": "w-b" })],
    )
    .unwrap();
    admin
        .batch_execute("SELECT * FROM vault_redirect.unmigrate()")
        .unwrap_or_else(|e| panic!("unmigrate failed: {}", describe(&e)));
    assert_eq!(
        stored(&mut app, "global/before-unmigrate"),
        Some(json!({ "secret": "w-b" }))
    );
    app.query_one(
        UPSERT,
        &[&"global/after-unmigrate", &json!({ "secret": "w-a" })],
    )
    .unwrap();
    assert_eq!(
        stored(&mut app, "global/after-unmigrate"),
        Some(json!({ "secret": "w-a" })),
        "a column that is not migrated keeps plaintext"
    );
    assert_eq!(stack.kv_get("global/after-unmigrate"), None);
}

#[test]
fn role_without_privileges_cannot_write() {
    let stack = migrated_stack();
    stack.pg.psql("CREATE ROLE nobody LOGIN;");
    let mut nobody = stack.pg.connect("nobody");
    for statement in [
        "INSERT INTO public.maasserver_secret (path, value) VALUES ('global/x', '{}')",
        "UPDATE public.maasserver_secret SET value = '{}' WHERE path = 'global/tls'",
        "DELETE FROM public.maasserver_secret",
        "INSERT INTO vault_redirect.deletion_queue (path, table_schema, table_name) VALUES ('global/tls', 'public', 'maasserver_secret')",
        "SELECT * FROM vault_redirect.deletion_queue",
    ] {
        let error = nobody
            .execute(statement, &[])
            .expect_err("a role without privileges must not write");
        assert_eq!(db_error(&error).code().code(), "42501", "{statement}: {}", describe(&error));
    }
    assert!(stack.kv_get("global/tls").is_some());
}

/// Starts a stack whose BMC power parameters keep only `power_pass` and
/// `power_key` in Vault, migrated.
fn secret_keys_stack() -> Stack {
    let stack = Stack::configured(&["token_no_default_policy=true"]);
    stack.pg.psql(vault_redirect_tests::stack::MAAS_FIXTURE);
    stack.pg.psql(
        "SELECT vault_redirect.declare_kv_table('public.maasserver_secret', 'path', 'value');
         SELECT vault_redirect.declare_column('public.maasserver_bmc', 'power_parameters',
                secret_keys => ARRAY['power_pass', 'power_key']);
         SELECT * FROM vault_redirect.migrate();
         CREATE ROLE app LOGIN;
         GRANT SELECT, INSERT, UPDATE, DELETE ON public.maasserver_bmc TO app;
         GRANT USAGE ON SCHEMA vault_redirect_resolved TO app;
         GRANT SELECT ON vault_redirect_resolved.maasserver_bmc TO app;",
    );
    stack
}

fn bmc_row(client: &mut Client, id: i64) -> Value {
    client
        .query_one(
            "SELECT power_parameters FROM maasserver_bmc WHERE id = $1",
            &[&id],
        )
        .unwrap()
        .get(0)
}

fn bmc_view(client: &mut Client, id: i64) -> Value {
    client
        .query_one(
            "SELECT power_parameters FROM vault_redirect_resolved.maasserver_bmc WHERE id = $1",
            &[&id],
        )
        .unwrap_or_else(|e| panic!("reading BMC {id} failed: {}", describe(&e)))
        .get(0)
}

#[test]
fn secret_keys_split_and_merge() {
    let stack = secret_keys_stack();
    let mut app = stack.pg.connect("app");
    let path = |id: i64| format!("public/maasserver_bmc/{id}/power_parameters");

    // migrate() moved only the secret keys.
    assert_eq!(
        bmc_row(&mut app, 1),
        json!({ "power_address": "192.0.2.11", "power_user": "maas", "$vault_redirect": path(1) })
    );
    assert_eq!(
        stack.kv_get(&path(1)),
        Some(json!({ "power_pass": "test-bmc-pass-1111" }))
    );
    assert_eq!(
        bmc_view(&mut app, 1),
        json!({ "power_address": "192.0.2.11", "power_user": "maas", "power_pass": "test-bmc-pass-1111" })
    );

    // A row without secret keys stays as it is.
    assert_eq!(bmc_row(&mut app, 16), json!({}));
    assert_eq!(stack.kv_get(&path(16)), None);
    assert_eq!(bmc_view(&mut app, 16), json!({}));

    // An insert splits the object the same way.
    let params =
        json!({ "power_address": "192.0.2.50", "power_pass": "w-p50", "power_key": "w-k50" });
    app.execute(
        "INSERT INTO maasserver_bmc (id, power_type, power_parameters) VALUES (50, 'ipmi', $1)",
        &[&params],
    )
    .unwrap();
    assert_eq!(
        bmc_row(&mut app, 50),
        json!({ "power_address": "192.0.2.50", "$vault_redirect": path(50) })
    );
    assert_eq!(
        stack.kv_get(&path(50)),
        Some(json!({ "power_pass": "w-p50", "power_key": "w-k50" }))
    );
    assert_eq!(bmc_view(&mut app, 50), params);

    // Changing a key that is not secret sends nothing to Vault.
    app.execute(
        "UPDATE maasserver_bmc SET power_parameters = power_parameters || '{\"power_user\": \"root\"}'
          WHERE id = 50",
        &[],
    )
    .unwrap();
    assert_eq!(
        stack.kv_get(&path(50)),
        Some(json!({ "power_pass": "w-p50", "power_key": "w-k50" }))
    );
    assert_eq!(bmc_view(&mut app, 50)["power_user"], json!("root"));

    // A secret key merged into the stored row replaces that key only.
    app.execute(
        "UPDATE maasserver_bmc SET power_parameters = power_parameters || '{\"power_pass\": \"w-p50-new\"}'
          WHERE id = 50",
        &[],
    )
    .unwrap();
    assert_eq!(
        stack.kv_get(&path(50)),
        Some(json!({ "power_pass": "w-p50-new", "power_key": "w-k50" }))
    );
    assert!(bmc_row(&mut app, 50).get("power_pass").is_none());

    // The marker key is reserved.
    let error = app
        .execute(
            "INSERT INTO maasserver_bmc (id, power_type, power_parameters)
             VALUES (51, 'ipmi', '{\"$vault_redirect\": \"global/rpc-shared\", \"power_pass\": \"x\"}')",
            &[],
        )
        .expect_err("a value naming another path must be rejected");
    let db = db_error(&error);
    assert_eq!(db.code().code(), "22023", "{}", describe(&error));
    assert!(db.message().contains("row (51)"), "{}", describe(&error));

    // The fixture's own secrets were in the WAL before the migration; what
    // was written since never is.
    let files = heap_and_wal(&stack, "public.maasserver_bmc");
    for plaintext in ["w-p50", "w-k50"] {
        assert!(
            !contains_bytes(&files, plaintext),
            "{plaintext} is in the heap or WAL"
        );
    }

    // unmigrate() puts the objects back together.
    let mut admin = stack.superuser();
    admin
        .batch_execute("SELECT * FROM vault_redirect.unmigrate()")
        .unwrap_or_else(|e| panic!("unmigrate failed: {}", describe(&e)));
    assert_eq!(
        bmc_row(&mut admin, 1),
        json!({ "power_address": "192.0.2.11", "power_user": "maas", "power_pass": "test-bmc-pass-1111" })
    );
    assert_eq!(
        bmc_row(&mut admin, 50),
        json!({ "power_address": "192.0.2.50", "power_user": "root", "power_pass": "w-p50-new", "power_key": "w-k50" })
    );
    assert_eq!(bmc_row(&mut admin, 16), json!({}));
}

#[test]
fn secret_keys_invalid_declarations() {
    let stack = Stack::configured(&[]);
    stack.pg.psql(vault_redirect_tests::stack::MAAS_FIXTURE);
    let mut admin = stack.superuser();
    for (keys, column) in [
        ("ARRAY['power_pass']", "power_type"),
        ("ARRAY[]::text[]", "power_parameters"),
        ("ARRAY['power_pass', 'power_pass']", "power_parameters"),
        ("ARRAY['']", "power_parameters"),
        ("ARRAY['$vault_redirect']", "power_parameters"),
    ] {
        let error = admin
            .execute(
                &format!(
                    "SELECT vault_redirect.declare_column('public.maasserver_bmc', '{column}', secret_keys => {keys})"
                ),
                &[],
            )
            .expect_err("an invalid declaration must be rejected");
        let db = db_error(&error);
        assert_eq!(
            db.code().code(),
            "22023",
            "{keys} on {column}: {}",
            describe(&error)
        );
        assert!(db.message().contains("secret_keys"), "{}", describe(&error));
        assert!(db.hint().is_some(), "{keys}: no hint");
    }
}

#[test]
fn on_conflict_keeps_what_was_not_stored() {
    let stack = migrated_stack();
    let mut app = stack.pg.connect("app");
    let original = stack.kv_get("global/omapi-key").unwrap();

    // DO NOTHING skips the proposed row, and Vault keeps the stored secret.
    let inserted = app
        .execute(
            "INSERT INTO maasserver_secret (path, value)
             VALUES ('global/omapi-key', '{\"secret\": \"w-skipped\"}'),
                    ('global/brand-new', '{\"secret\": \"w-first\"}'),
                    ('global/brand-new', '{\"secret\": \"w-second\"}')
             ON CONFLICT (path) DO NOTHING",
            &[],
        )
        .unwrap();
    assert_eq!(inserted, 1);
    assert_eq!(stack.kv_get("global/omapi-key"), Some(original.clone()));
    assert_eq!(
        stack.kv_get("global/brand-new"),
        Some(json!({ "secret": "w-first" }))
    );

    // DO UPDATE that leaves the secret column alone keeps the secret.
    app.execute(
        "INSERT INTO maasserver_secret (path, value) VALUES ('global/omapi-key', '{\"secret\": \"w-ignored\"}')
         ON CONFLICT (path) DO UPDATE SET updated = now()",
        &[],
    )
    .unwrap();
    assert_eq!(stack.kv_get("global/omapi-key"), Some(original.clone()));
    assert_eq!(resolved(&mut app, "global/omapi-key"), Some(original));

    // DO UPDATE ... WHERE false updates nothing.
    app.execute(
        "INSERT INTO maasserver_secret (path, value) VALUES ('global/tls', '{\"key\": \"w-ignored\"}')
         ON CONFLICT (path) DO UPDATE SET value = EXCLUDED.value WHERE false",
        &[],
    )
    .unwrap();
    assert!(stack.kv_get("global/tls").unwrap().get("cert").is_some());
}

#[test]
fn references_written_by_superusers_only() {
    let stack = migrated_stack();
    let mut app = stack.pg.connect("app");
    let error = app
        .execute(
            "INSERT INTO maasserver_secret (path, value)
             VALUES ('global/copied', '{\"$vault_redirect\": \"global/copied\"}')",
            &[],
        )
        .expect_err("app must not store a reference");
    let db = db_error(&error);
    assert_eq!(db.code().code(), "42501", "{}", describe(&error));
    assert!(
        db.message().contains("global/copied"),
        "{}",
        describe(&error)
    );
    assert!(db.hint().is_some());

    // Writing back the reference a row already holds changes nothing.
    app.execute(
        "UPDATE maasserver_secret SET value = value WHERE path = 'global/tls'",
        &[],
    )
    .unwrap_or_else(|e| panic!("rewriting the same reference failed: {}", describe(&e)));

    // A superuser may, as pg_restore does: the row points to its entry.
    let mut admin = stack.superuser();
    stack.kv_put("global/restored", &json!({ "secret": "w-restored" }));
    admin
        .execute(
            "INSERT INTO maasserver_secret (path, value)
             VALUES ('global/restored', '{\"$vault_redirect\": \"global/restored\"}')",
            &[],
        )
        .unwrap_or_else(|e| panic!("restoring a reference failed: {}", describe(&e)));
    assert_eq!(
        resolved(&mut admin, "global/restored"),
        Some(json!({ "secret": "w-restored" }))
    );
}

#[test]
fn declarations_keep_namespaces_apart() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    let mut admin = stack.superuser();
    admin
        .batch_execute(
            "CREATE TABLE other_kv (path text PRIMARY KEY, value jsonb);
             CREATE TABLE nested (id int PRIMARY KEY, pass text);",
        )
        .unwrap();
    for (sql, code) in [
        (
            "SELECT vault_redirect.declare_kv_table('other_kv', 'path', 'value')",
            "0A000",
        ),
        (
            "SELECT vault_redirect.declare_column('nested', 'pass', path_prefix => 'public/maasserver_bmc/x')",
            "22023",
        ),
        (
            "SELECT vault_redirect.declare_column('nested', 'pass', path_prefix => 'public')",
            "22023",
        ),
    ] {
        let error = admin.execute(sql, &[]).expect_err(sql);
        let db = db_error(&error);
        assert_eq!(db.code().code(), code, "{sql}: {}", describe(&error));
        assert!(db.hint().is_some(), "{sql}: no hint");
    }
    admin
        .execute(
            "SELECT vault_redirect.declare_column('nested', 'pass', path_prefix => 'public/maasserver_bmc2')",
            &[],
        )
        .unwrap_or_else(|e| panic!("a prefix beside another failed: {}", describe(&e)));
}

#[test]
fn partitions_and_replica_role_redirect() {
    let stack = Stack::configured(&[]);
    let mut admin = stack.superuser();
    admin
        .batch_execute(
            "CREATE TABLE creds (site int, id int, pass text, PRIMARY KEY (site, id))
                 PARTITION BY LIST (site);
             CREATE TABLE creds_1 PARTITION OF creds FOR VALUES IN (1);
             CREATE TABLE creds_2 PARTITION OF creds FOR VALUES IN (2);
             INSERT INTO creds VALUES (1, 1, 'w-part-old-1'), (2, 1, 'w-part-old-2');
             SELECT vault_redirect.declare_column('creds', 'pass');
             SELECT * FROM vault_redirect.migrate();",
        )
        .unwrap_or_else(|e| panic!("setting up the partitioned table failed: {}", describe(&e)));

    // Rows of different partitions can share a ctid; each gets its own
    // reference.
    for site in [1, 2] {
        let stored: String = admin
            .query_one(
                "SELECT pass FROM creds WHERE site = $1 AND id = 1",
                &[&site],
            )
            .unwrap()
            .get(0);
        assert_eq!(
            stored,
            format!("$vault_redirect:public/creds/{site}/1/pass")
        );
        assert_eq!(
            stack.kv_get(&format!("public/creds/{site}/1/pass")),
            Some(json!({ "secret": format!("w-part-old-{site}") }))
        );
    }
    let problems: i64 = admin
        .query_one("SELECT count(*) FROM vault_redirect.verify()", &[])
        .unwrap()
        .get(0);
    assert_eq!(problems, 0);

    // A row written to a partition goes to Vault under the declared table.
    admin
        .execute("INSERT INTO creds VALUES (2, 7, 'w-part-new')", &[])
        .unwrap();
    assert_eq!(
        stack.kv_get("public/creds/2/7/pass"),
        Some(json!({ "secret": "w-part-new" }))
    );
    let stored: String = admin
        .query_one("SELECT pass FROM creds_2 WHERE id = 7", &[])
        .unwrap()
        .get(0);
    assert_eq!(stored, "$vault_redirect:public/creds/2/7/pass");

    // The triggers fire as in logical replication and pg_restore too.
    admin
        .batch_execute(
            "SET session_replication_role = replica;
             INSERT INTO creds VALUES (1, 8, 'w-replica');
             RESET session_replication_role;",
        )
        .unwrap();
    assert_eq!(
        stack.kv_get("public/creds/1/8/pass"),
        Some(json!({ "secret": "w-replica" }))
    );
    let files = heap_and_wal(&stack, "creds_1");
    assert!(!contains_bytes(&files, "w-replica"));
}

#[test]
fn prepare_transaction_refused() {
    let stack = migrated_stack();
    stack.pg.append_conf("max_prepared_transactions = 2");
    stack.pg.restart();
    let mut app = stack.pg.connect("app");
    app.batch_execute(
        "BEGIN;
         UPDATE maasserver_secret SET value = '{\"secret\": \"w-prepared\"}' WHERE path = 'global/tls';",
    )
    .unwrap();
    let error = app
        .batch_execute("PREPARE TRANSACTION 'vault_redirect_test'")
        .expect_err("preparing a transaction with pending secrets must fail");
    let db = db_error(&error);
    assert_eq!(db.code().code(), "0A000", "{}", describe(&error));
    assert!(db.hint().is_some());
    assert!(stack.kv_get("global/tls").unwrap().get("cert").is_some());

    // A transaction without secrets prepares as usual.
    app.batch_execute(
        "BEGIN;
         UPDATE maasserver_secret SET updated = now() WHERE path = 'global/tls';
         PREPARE TRANSACTION 'vault_redirect_plain';",
    )
    .unwrap_or_else(|e| panic!("a plain prepared transaction failed: {}", describe(&e)));
    app.batch_execute("COMMIT PREPARED 'vault_redirect_plain'")
        .unwrap_or_else(|e| panic!("COMMIT PREPARED failed: {}", describe(&e)));
}

#[test]
fn proposals_end_with_their_statement() {
    let stack = migrated_stack();
    let mut app = stack.pg.connect("app");

    // One Query message: the DO NOTHING proposal of the first INSERT must
    // not reach Vault through the second INSERT of the same path.
    app.batch_execute(
        "BEGIN;
         INSERT INTO maasserver_secret (path, value)
         VALUES ('global/omapi-key', '{\"secret\": \"w-not-stored\"}') ON CONFLICT DO NOTHING;
         DELETE FROM maasserver_secret WHERE path = 'global/omapi-key';
         INSERT INTO maasserver_secret (path, value)
         VALUES ('global/omapi-key', '{\"secret\": \"w-stored\"}');
         COMMIT;",
    )
    .unwrap();
    assert_eq!(
        stack.kv_get("global/omapi-key"),
        Some(json!({ "secret": "w-stored" }))
    );

    // A DO block: the proposal ignored by DO NOTHING must not be taken by
    // a later UPDATE that writes back the row's reference.
    let original = stack.kv_get("global/macaroon-key").unwrap();
    app.batch_execute(
        "DO $$ BEGIN
           INSERT INTO maasserver_secret (path, value)
           VALUES ('global/macaroon-key', '{\"secret\": \"w-ignored\"}') ON CONFLICT DO NOTHING;
           UPDATE maasserver_secret SET value = value, updated = now()
            WHERE path = 'global/macaroon-key';
         END $$;",
    )
    .unwrap();
    assert_eq!(stack.kv_get("global/macaroon-key"), Some(original));

    // An error inside a savepoint ends the statements it interrupted.
    app.batch_execute(
        "DO $$ BEGIN
           BEGIN
             INSERT INTO maasserver_secret (path, value)
             VALUES ('global/in-block', '{\"secret\": \"w-block\"}');
             PERFORM 1 / 0;
           EXCEPTION WHEN division_by_zero THEN NULL;
           END;
           INSERT INTO maasserver_secret (path, value)
           VALUES ('global/after-block', '{\"secret\": \"w-after\"}');
         END $$;",
    )
    .unwrap();
    assert_eq!(stack.kv_get("global/in-block"), None);
    assert_eq!(
        stack.kv_get("global/after-block"),
        Some(json!({ "secret": "w-after" }))
    );
}

#[test]
fn serialization_failure_puts_values_back() {
    let stack = migrated_stack();
    let original_a = stack.kv_get("global/rpc-shared").unwrap();
    let original_b = stack.kv_get("global/omapi-key").unwrap();
    let mut first = stack.pg.connect("app");
    let mut second = stack.pg.connect("app");
    for client in [&mut first, &mut second] {
        client
            .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
            .unwrap();
    }

    // A write skew: each reads the row the other writes.
    first
        .query(
            "SELECT value FROM maasserver_secret WHERE path = 'global/rpc-shared'",
            &[],
        )
        .unwrap();
    second
        .query(
            "SELECT value FROM maasserver_secret WHERE path = 'global/omapi-key'",
            &[],
        )
        .unwrap();
    first
        .execute(
            "UPDATE maasserver_secret SET value = '{\"secret\": \"w-by-first\"}' WHERE path = 'global/omapi-key'",
            &[],
        )
        .unwrap();
    second
        .execute(
            "UPDATE maasserver_secret SET value = '{\"secret\": \"w-by-second\"}' WHERE path = 'global/rpc-shared'",
            &[],
        )
        .unwrap();
    first.batch_execute("COMMIT").unwrap();
    let error = second
        .batch_execute("COMMIT")
        .expect_err("the second commit must fail to serialize");
    assert_eq!(
        db_error(&error).code().code(),
        "40001",
        "{}",
        describe(&error)
    );

    // The second commit wrote its secret before PostgreSQL refused it, and
    // the abort put the earlier value back. PostgreSQL sends the error
    // before it aborts, so the session's next statement is what waits for
    // the abort to end.
    second.batch_execute("SELECT 1").unwrap();
    assert_eq!(stack.kv_get("global/rpc-shared"), Some(original_a));
    assert_ne!(stack.kv_get("global/omapi-key"), Some(original_b));
    assert_eq!(
        stack.kv_get("global/omapi-key"),
        Some(json!({ "secret": "w-by-first" }))
    );
}

#[test]
fn verify_reports_foreign_references() {
    let stack = migrated_stack();
    let mut admin = stack.superuser();
    admin
        .batch_execute(
            "ALTER TABLE maasserver_secret DISABLE TRIGGER zz_vault_redirect_write;
             UPDATE maasserver_secret SET value = '{\"$vault_redirect\": \"global/tls\"}'
              WHERE path = 'global/omapi-key';
             ALTER TABLE maasserver_secret ENABLE ALWAYS TRIGGER zz_vault_redirect_write;",
        )
        .unwrap();
    let problems: Vec<(String, String)> = admin
        .query("SELECT path, problem FROM vault_redirect.verify()", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, "global/omapi-key");
    assert!(problems[0].1.contains("global/tls"), "{problems:?}");
}

#[test]
fn cancel_during_commit_rolls_back() {
    let stack = migrated_stack();
    let original = stack.kv_get("global/tls").unwrap();
    let mut writer = stack.pg.connect("app");

    // A backstop, so that a cancel that is never acted on fails the test
    // instead of hanging it.
    writer
        .batch_execute(
            "SET statement_timeout = '30s';
             BEGIN;
             UPDATE maasserver_secret SET value = '{\"key\": \"w-canceled\"}' WHERE path = 'global/tls';",
        )
        .unwrap();
    let pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let mut admin = stack.superuser();
    stack.bao.suspend();
    let commit = thread::spawn(move || {
        let result = writer.batch_execute("COMMIT");
        (writer, result)
    });

    // Waits until the COMMIT is stuck in its request to the stopped server.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state: Option<String> = admin
            .query_one("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .unwrap()
            .get(0);
        if state.as_deref() == Some("active") || commit.is_finished() {
            break;
        }
        assert!(Instant::now() < deadline, "the COMMIT did not start");
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(500));
    let canceled_at = Instant::now();
    admin
        .execute("SELECT pg_cancel_backend($1)", &[&pid])
        .unwrap();
    let (mut writer, result) = commit.join().expect("the commit thread panicked");
    let delay = canceled_at.elapsed();
    stack.bao.resume();

    let error = result.expect_err("a canceled COMMIT fails");
    assert_eq!(
        db_error(&error).code().code(),
        "57014",
        "{}",
        describe(&error)
    );
    assert!(
        delay < Duration::from_secs(5),
        "the COMMIT returned {delay:?} after the cancel"
    );
    writer.batch_execute("SELECT 1").unwrap();
    assert_eq!(stack.kv_get("global/tls"), Some(original.clone()));
    assert_eq!(
        stored(&mut writer, "global/tls"),
        Some(reference("global/tls"))
    );
    assert_eq!(resolved(&mut writer, "global/tls"), Some(original));
}

#[test]
fn other_database_not_configured() {
    let stack = migrated_stack();
    stack.pg.psql("CREATE DATABASE other;");
    let mut other = stack
        .pg
        .config("postgres")
        .dbname("other")
        .connect(postgres::NoTls)
        .unwrap();
    other
        .batch_execute(
            "CREATE EXTENSION vault_redirect;
             CREATE TABLE maasserver_secret (path text PRIMARY KEY, value jsonb);
             SELECT vault_redirect.declare_kv_table('maasserver_secret', 'path', 'value');",
        )
        .unwrap();

    // The configuration belongs to database postgres: another database of
    // the cluster, maybe a copy of it, must not delete or replace its
    // entries.
    for sql in [
        "SELECT * FROM vault_redirect.gc(dry_run => false)",
        "SELECT * FROM vault_redirect.migrate()",
        "SELECT vault_redirect.read('global/tls', 'key')",
    ] {
        let error = other.query(sql, &[]).expect_err(sql);
        let db = db_error(&error);
        assert_eq!(db.code().code(), "55000", "{sql}: {}", describe(&error));
        assert!(
            db.message().contains("\"postgres\""),
            "{}",
            describe(&error)
        );
        assert!(db.hint().is_some());
    }
    let wrapped = stack.bao.wrapped_secret_id("pg-primary");
    let error = stack
        .configure(&mut other, &stack.role_id, &wrapped)
        .expect_err("configure() must not take the configuration from postgres");
    assert_eq!(
        db_error(&error).code().code(),
        "55000",
        "{}",
        describe(&error)
    );
    assert!(stack.kv_get("global/tls").is_some());
    let mut app = stack.pg.connect("app");
    assert!(resolved(&mut app, "global/tls").is_some());
}

#[test]
fn deletions_need_fresh_snapshots() {
    let stack = migrated_stack();
    let mut admin = stack.superuser();
    for sql in [
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT * FROM vault_redirect.gc(dry_run => false)",
        "BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT * FROM vault_redirect.process_deletions()",
        "BEGIN; DELETE FROM maasserver_secret WHERE path = 'global/tls';
         SELECT * FROM vault_redirect.process_deletions()",
    ] {
        let error = admin.batch_execute(sql).expect_err(sql);
        let db = db_error(&error);
        assert_eq!(db.code().code(), "25000", "{sql}: {}", describe(&error));
        assert!(db.hint().is_some());
        admin.batch_execute("ROLLBACK").unwrap();
    }
    assert!(stack.kv_get("global/tls").is_some());
    assert!(resolved(&mut admin, "global/tls").is_some());
}

#[test]
fn char_keys_keep_their_paths() {
    let stack = migrated_stack();
    let mut admin = stack.superuser();
    admin
        .batch_execute(
            "CREATE TABLE ck (k char(5) PRIMARY KEY, pw text);
             INSERT INTO ck VALUES ('ab', 'w-ck-old');
             SELECT vault_redirect.declare_column('ck', 'pw');
             SELECT * FROM vault_redirect.migrate();
             UPDATE ck SET pw = 'w-ck-new' WHERE k = 'ab';
             INSERT INTO ck VALUES ('ef', 'w-ck-ef');",
        )
        .unwrap_or_else(|e| panic!("writing the char-keyed table failed: {}", describe(&e)));
    assert_eq!(
        stack.kv_get("public/ck/ab/pw"),
        Some(json!({ "secret": "w-ck-new" }))
    );
    assert_eq!(
        stack.kv_get("public/ck/ef/pw"),
        Some(json!({ "secret": "w-ck-ef" }))
    );
    let read: Vec<String> = admin
        .query("SELECT pw FROM vault_redirect_resolved.ck ORDER BY k", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(read, ["w-ck-new", "w-ck-ef"]);
    let problems: i64 = admin
        .query_one("SELECT count(*) FROM vault_redirect.verify()", &[])
        .unwrap()
        .get(0);
    assert_eq!(problems, 0);
    let orphans: i64 = admin
        .query_one("SELECT count(*) FROM vault_redirect.gc()", &[])
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0);
}
