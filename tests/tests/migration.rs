//! Dry runs, check-and-set writes, verify() and the way back with
//! unmigrate(), against a real OpenBao and PostgreSQL.

use serde_json::json;
use vault_redirect_tests::stack::{db_error, describe, Stack};

const CHECKSUM: &str =
    "SELECT md5(string_agg(t::text, '|' ORDER BY path)) FROM maasserver_secret t;
                        SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM maasserver_bmc t;";

fn run(stack: &Stack, sql: &str) -> Vec<postgres::Row> {
    stack
        .superuser()
        .query(sql, &[])
        .unwrap_or_else(|e| panic!("{sql} failed: {}", describe(&e)))
}

#[test]
fn dry_run_touches_nothing() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    let before = stack.pg.psql(CHECKSUM);
    let rows = run(
        &stack,
        "SELECT * FROM vault_redirect.migrate(dry_run => true)",
    );
    let moved: Vec<i64> = rows.iter().map(|r| r.get(2)).collect();
    assert_eq!(moved, [3, 11]);
    assert_eq!(stack.pg.psql(CHECKSUM), before);
    assert_eq!(stack.bao.kv_list("secret", "maas"), ["_vault_redirect/"]);
    let migrated: bool = run(&stack, "SELECT migrated FROM vault_redirect.status()")[0].get(0);
    assert!(!migrated);
}

#[test]
fn migrate_with_cas_required() {
    let stack = Stack::configured(&[]);
    stack.bao.request(
        "POST",
        "/v1/secret/config",
        Some(&json!({"cas_required": true})),
    );
    stack.load_maas_schema();
    run(&stack, "SELECT * FROM vault_redirect.migrate()");
    assert_eq!(
        stack.kv_get("global/rpc-shared"),
        Some(json!({"secret": "test-rpc-4f1c9e0b7a2d"}))
    );
}

#[test]
fn different_entry_not_overwritten() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    stack.kv_put(
        "global/rpc-shared",
        &json!({"secret": "written-by-someone-else"}),
    );
    let before = stack.pg.psql(CHECKSUM);

    let error = stack
        .superuser()
        .query("SELECT * FROM vault_redirect.migrate()", &[])
        .expect_err("an entry with other data must stop the migration");
    let db = db_error(&error);
    assert_eq!(db.code().code(), "23505", "{}", describe(&error));
    assert!(db.message().contains("secret/data/maas/global/rpc-shared"));
    assert!(db.message().contains("global/rpc-shared"), "names the row");

    assert_eq!(stack.pg.psql(CHECKSUM), before);
    assert_eq!(
        stack.kv_get("global/rpc-shared"),
        Some(json!({"secret": "written-by-someone-else"}))
    );
}

#[test]
fn rerun_reuses_identical_entries() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    // An interrupted run left this entry behind, identical to the row.
    stack.kv_put(
        "global/rpc-shared",
        &json!({"secret": "test-rpc-4f1c9e0b7a2d"}),
    );
    let rows = run(&stack, "SELECT migrated FROM vault_redirect.migrate()");
    let moved: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(moved, [3, 11]);
    let version = stack
        .bao
        .kv_metadata("secret", "maas/global/rpc-shared")
        .unwrap()["current_version"]
        .clone();
    assert_eq!(version, json!(1));
}

#[test]
fn verify_lists_dangling_references() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    run(&stack, "SELECT * FROM vault_redirect.migrate()");
    assert!(run(&stack, "SELECT * FROM vault_redirect.verify()").is_empty());

    stack.bao.kv_delete_all("secret", "maas/global/omapi-key");
    stack
        .bao
        .kv_delete_all("secret", "maas/public/maasserver_bmc/2/power_parameters");
    let problems = run(
        &stack,
        "SELECT table_name, path FROM vault_redirect.verify() ORDER BY path",
    );
    let found: Vec<(String, String)> = problems.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        found,
        [
            (
                "public.maasserver_secret".to_owned(),
                "global/omapi-key".to_owned()
            ),
            (
                "public.maasserver_bmc".to_owned(),
                "public/maasserver_bmc/2/power_parameters".to_owned()
            ),
        ]
    );
}

#[test]
fn unmigrate_restores_every_value() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    let original = stack.pg.psql(CHECKSUM);
    run(&stack, "SELECT * FROM vault_redirect.migrate()");
    assert_ne!(stack.pg.psql(CHECKSUM), original);

    let rows = run(
        &stack,
        "SELECT restored, already_plaintext FROM vault_redirect.unmigrate()",
    );
    let restored: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(restored, [(3, 0), (11, 0)]);
    assert_eq!(stack.pg.psql(CHECKSUM), original);
    let migrated: bool = run(&stack, "SELECT migrated FROM vault_redirect.status()")[0].get(0);
    assert!(!migrated);
    // The KV entries stay until deleted on purpose.
    assert!(stack.kv_get("global/tls").is_some());

    // Migrating again reuses the entries and changes no version.
    run(&stack, "SELECT * FROM vault_redirect.migrate()");
    let version =
        stack.bao.kv_metadata("secret", "maas/global/tls").unwrap()["current_version"].clone();
    assert_eq!(version, json!(1));
}

#[test]
fn unmigrate_dangling_changes_nothing() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    run(&stack, "SELECT * FROM vault_redirect.migrate()");
    let migrated = stack.pg.psql(CHECKSUM);
    stack
        .bao
        .kv_delete_all("secret", "maas/node/7/deploy-metadata");

    let error = stack
        .superuser()
        .query("SELECT * FROM vault_redirect.unmigrate()", &[])
        .expect_err("a dangling reference stops unmigrate");
    let db = db_error(&error);
    assert_eq!(db.code().code(), "42704", "{}", describe(&error));
    assert!(db.message().contains("node/7/deploy-metadata"));
    assert_eq!(stack.pg.psql(CHECKSUM), migrated);
}

#[test]
fn delete_entries_after_unmigrate() {
    let stack = Stack::configured(&[]);
    stack.load_maas_schema();
    run(&stack, "SELECT * FROM vault_redirect.migrate()");

    let error = stack
        .superuser()
        .query(
            "SELECT * FROM vault_redirect.delete_vault_entries(dry_run => false)",
            &[],
        )
        .expect_err("entries of migrated columns are still referenced");
    assert_eq!(
        db_error(&error).code().code(),
        "55000",
        "{}",
        describe(&error)
    );

    run(&stack, "SELECT * FROM vault_redirect.unmigrate()");
    let plaintext = stack.pg.psql(CHECKSUM);
    let counts = |rows: Vec<postgres::Row>| -> Vec<(i64, i64, i64)> {
        rows.iter()
            .map(|r| (r.get(2), r.get(3), r.get(4)))
            .collect()
    };

    // The default is a dry run.
    let planned = counts(run(
        &stack,
        "SELECT * FROM vault_redirect.delete_vault_entries()",
    ));
    assert_eq!(planned, [(3, 0, 0), (11, 0, 0)]);
    assert!(stack.kv_get("global/tls").is_some());

    // An entry changed in Vault since is kept.
    stack.kv_put("global/rpc-shared", &json!({"secret": "changed-in-vault"}));
    let done = counts(run(
        &stack,
        "SELECT * FROM vault_redirect.delete_vault_entries(dry_run => false)",
    ));
    assert_eq!(done, [(3, 0, 0), (10, 1, 0)]);
    assert!(stack.kv_get("global/tls").is_none());
    assert_eq!(
        stack.kv_get("global/rpc-shared"),
        Some(json!({"secret": "changed-in-vault"}))
    );
    assert_eq!(stack.pg.psql(CHECKSUM), plaintext);
}
