//! The functions the resolved views call for each row: they turn the row's
//! own reference into the plaintext value read from Vault at that moment,
//! and pass a value that was not migrated yet through unchanged.

use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};
use serde_json::Value;

use crate::errors::{Failure, OrRaise};
use crate::read::fetch;
use crate::reference;

/// Resolves the value of a key/value table's row whose KV path is `path`.
#[pg_extern(stable, parallel_unsafe, cost = 10000)]
fn resolve_kv(table_name: &str, path: Option<&str>, value: Option<JsonB>) -> Option<JsonB> {
    let JsonB(value) = value?;
    let Some((target, key)) = reference::parse_json(&value) else {
        return Some(JsonB(value));
    };
    let path = path.unwrap_or_default();
    let row = format!("row with path \"{path}\" of {table_name}");
    check_own(&target, path, &row);
    Some(JsonB(resolve_json(&target, key.as_deref(), &row)))
}

/// Resolves a jsonb secret column of a wide table.
#[pg_extern(stable, parallel_unsafe, cost = 10000)]
fn resolve_column_jsonb(
    table_name: &str,
    path_prefix: &str,
    key_values: Vec<Option<String>>,
    column_name: &str,
    value: Option<JsonB>,
) -> Option<JsonB> {
    let JsonB(value) = value?;
    let Some((target, key)) = reference::parse_json(&value) else {
        return Some(JsonB(value));
    };
    let (expected, row) = row_identity(table_name, path_prefix, &key_values, column_name);
    check_own(&target, &expected, &row);
    Some(JsonB(resolve_json(&target, key.as_deref(), &row)))
}

/// Resolves a text secret column of a wide table.
#[pg_extern(stable, parallel_unsafe, cost = 10000)]
fn resolve_column_text(
    table_name: &str,
    path_prefix: &str,
    key_values: Vec<Option<String>>,
    column_name: &str,
    value: Option<&str>,
) -> Option<String> {
    let value = value?;
    let Some(target) = value.strip_prefix(reference::TEXT_PREFIX) else {
        return Some(value.to_owned());
    };
    let (expected, row) = row_identity(table_name, path_prefix, &key_values, column_name);
    check_own(target, &expected, &row);
    let entry = fetch(target).map_err(|f| f.context(&row)).or_raise();
    reference::kv_to_text(&entry.data, reference::SCALAR_KEY)
        .map_err(|reason| missing_key(&row, target, reason))
        .or_raise()
}

/// Returns the KV path a wide-table row's column gets, and how messages
/// name the row.
pub fn row_identity(
    table_name: &str,
    path_prefix: &str,
    key_values: &[Option<String>],
    column_name: &str,
) -> (String, String) {
    let keys: Vec<String> = key_values
        .iter()
        .map(|k| k.clone().unwrap_or_default())
        .collect();
    let path = reference::row_path(path_prefix, &keys, column_name);
    let row = format!("row ({}) of {table_name}", keys.join(", "));
    (path, row)
}

/// Raises unless a reference names its own row's path: a reference copied
/// from another row must not reveal that row's secret.
fn check_own(target: &str, expected: &str, row: &str) {
    if target != expected {
        foreign_reference(target, expected, row).raise();
    }
}

/// Describes a reference found in a row that it was not made for.
pub fn foreign_reference(target: &str, expected: &str, row: &str) -> Failure {
    Failure::new(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            format!("{row} holds a reference to \"{target}\", not to its own path \"{expected}\""),
        )
    .hint("A reference is valid only in the row it was made for: put the row's plaintext back, then run vault_redirect.migrate().")
}

fn resolve_json(target: &str, key: Option<&str>, row: &str) -> Value {
    let entry = fetch(target).map_err(|f| f.context(row)).or_raise();
    reference::kv_to_json(entry.data, key)
        .map_err(|reason| missing_key(row, target, reason))
        .or_raise()
}

fn missing_key(row: &str, target: &str, reason: String) -> Failure {
    Failure::new(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("{row}: the secret at \"{target}\" lacks the key the reference names"),
    )
    .detail(reason)
    .hint("Someone changed the entry's shape in Vault: put the key back.")
}
