//! The functions the resolved views call for each row. Each turns the row's
//! own reference into the value read from Vault at that moment, and passes
//! any other value through unchanged.
//!
//! They can be executed by every role, because they resolve a reference only
//! when (1) the table and column are declared, (2) the value is exactly the
//! reference that row's key gives under the declaration, and (3) a row with
//! that key and that value is visible to the calling role, with its table
//! privileges, column privileges and row-level security applied.
//!
//! Each comes twice. The STABLE one checks (3) with the calling statement's
//! snapshot, which suits SELECT, UPDATE's SET expressions and DELETE's
//! RETURNING. The VOLATILE `*_written` twin checks it with a fresh snapshot
//! that includes the rows the calling statement wrote, for RETURNING of
//! INSERT and UPDATE and for INSERT ... ON CONFLICT DO UPDATE SET.
//!
//! Their queries run as the caller, so each pins its search_path to
//! pg_catalog. With the caller's search_path, a role could put its own `=`
//! operator ahead of pg_catalog's and make the visibility check true for
//! any row.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use pgrx::{JsonB, PgSqlErrorCode};
use serde_json::Value;

use crate::declare::{self, Declaration};
use crate::errors::{Failure, OrRaise};
use crate::query::{select_by_value, select_value, Snapshot};
use crate::reference;
use crate::transparent::Suspended;

/// Resolves the value column of a declared key/value table.
#[pg_extern(stable, parallel_unsafe, cost = 10000)]
#[search_path(pg_catalog, pg_temp)]
fn resolve_kv(
    table_oid: pg_sys::Oid,
    column_name: &str,
    path: Option<&str>,
    value: Option<JsonB>,
) -> Option<JsonB> {
    kv(Snapshot::Statement, table_oid, column_name, path, value)
}

/// Like `resolve_kv`, for rows the calling statement wrote.
#[pg_extern(volatile, parallel_unsafe, cost = 10000)]
#[search_path(pg_catalog, pg_temp)]
fn resolve_kv_written(
    table_oid: pg_sys::Oid,
    column_name: &str,
    path: Option<&str>,
    value: Option<JsonB>,
) -> Option<JsonB> {
    kv(Snapshot::Fresh, table_oid, column_name, path, value)
}

/// Resolves a declared jsonb column of a wide table.
#[pg_extern(stable, parallel_unsafe, cost = 10000)]
#[search_path(pg_catalog, pg_temp)]
fn resolve_column_jsonb(
    table_oid: pg_sys::Oid,
    column_name: &str,
    key_values: Option<Vec<Option<String>>>,
    value: Option<JsonB>,
) -> Option<JsonB> {
    column_jsonb(
        Snapshot::Statement,
        table_oid,
        column_name,
        key_values,
        value,
    )
}

/// Like `resolve_column_jsonb`, for rows the calling statement wrote.
#[pg_extern(volatile, parallel_unsafe, cost = 10000)]
#[search_path(pg_catalog, pg_temp)]
fn resolve_column_jsonb_written(
    table_oid: pg_sys::Oid,
    column_name: &str,
    key_values: Option<Vec<Option<String>>>,
    value: Option<JsonB>,
) -> Option<JsonB> {
    column_jsonb(Snapshot::Fresh, table_oid, column_name, key_values, value)
}

/// Resolves a declared text column of a wide table.
#[pg_extern(stable, parallel_unsafe, cost = 10000)]
#[search_path(pg_catalog, pg_temp)]
fn resolve_column_text(
    table_oid: pg_sys::Oid,
    column_name: &str,
    key_values: Option<Vec<Option<String>>>,
    value: Option<&str>,
) -> Option<String> {
    column_text(
        Snapshot::Statement,
        table_oid,
        column_name,
        key_values,
        value,
    )
}

/// Like `resolve_column_text`, for rows the calling statement wrote.
#[pg_extern(volatile, parallel_unsafe, cost = 10000)]
#[search_path(pg_catalog, pg_temp)]
fn resolve_column_text_written(
    table_oid: pg_sys::Oid,
    column_name: &str,
    key_values: Option<Vec<Option<String>>>,
    value: Option<&str>,
) -> Option<String> {
    column_text(Snapshot::Fresh, table_oid, column_name, key_values, value)
}

fn kv(
    snapshot: Snapshot,
    table_oid: pg_sys::Oid,
    column_name: &str,
    path: Option<&str>,
    value: Option<JsonB>,
) -> Option<JsonB> {
    let _suspended = Suspended::new();
    let JsonB(value) = value?;
    let Some((target, key)) = reference::parse_json(&value) else {
        return Some(JsonB(value));
    };
    let path = path?;
    let declaration = declared(table_oid, column_name).or_raise();
    if target != path || declaration.path_column.is_none() {
        return Some(JsonB(value));
    }
    let row = format!(
        "row with path \"{path}\" of {}",
        declaration.display_table()
    );
    check_visible(
        &declaration,
        &[path.to_owned()],
        &value.to_string(),
        true,
        snapshot,
    )
    .or_raise();
    Some(JsonB(resolve_json(&target, key.as_deref(), &row, snapshot)))
}

fn column_jsonb(
    snapshot: Snapshot,
    table_oid: pg_sys::Oid,
    column_name: &str,
    key_values: Option<Vec<Option<String>>>,
    value: Option<JsonB>,
) -> Option<JsonB> {
    let _suspended = Suspended::new();
    let JsonB(value) = value?;
    let Some(target) = reference::marker(&value).map(str::to_owned) else {
        return Some(JsonB(value));
    };
    let declaration = declared(table_oid, column_name).or_raise();
    // A column declared with secret keys keeps its other keys next to the
    // marker. Any other column's reference is the marker and a key at most.
    let key = match &declaration.secret_keys {
        Some(_) => None,
        None => match reference::parse_json(&value) {
            Some((_, key)) => key,
            None => return Some(JsonB(value)),
        },
    };
    let Some(row) = own_row_of(
        &declaration,
        column_name,
        key_values,
        &target,
        &value.to_string(),
        true,
        snapshot,
    ) else {
        return Some(JsonB(value));
    };
    if declaration.secret_keys.is_some() {
        let entry = fetch_as_of(&target, snapshot)
            .map_err(|f| f.context(&row))
            .or_raise();
        return Some(JsonB(reference::merge_secret_keys(&value, entry.data)));
    }
    Some(JsonB(resolve_json(&target, key.as_deref(), &row, snapshot)))
}

fn column_text(
    snapshot: Snapshot,
    table_oid: pg_sys::Oid,
    column_name: &str,
    key_values: Option<Vec<Option<String>>>,
    value: Option<&str>,
) -> Option<String> {
    let _suspended = Suspended::new();
    let value = value?;
    let Some(target) = value.strip_prefix(reference::TEXT_PREFIX) else {
        return Some(value.to_owned());
    };
    let Some(row) = own_row(
        table_oid,
        column_name,
        key_values,
        target,
        value,
        false,
        snapshot,
    ) else {
        return Some(value.to_owned());
    };
    let entry = fetch_as_of(target, snapshot)
        .map_err(|f| f.context(&row))
        .or_raise();
    reference::kv_to_text(&entry.data, reference::SCALAR_KEY)
        .map_err(|reason| missing_key(&row, target, reason))
        .or_raise()
}

/// Checks a wide-table value of reference shape. Returns `None` when it is
/// not the row's own reference, which makes it plaintext. Returns the row's
/// label when it is and the row is visible to the caller. Raises when the
/// row is not visible or the column is not declared.
fn own_row(
    table_oid: pg_sys::Oid,
    column_name: &str,
    key_values: Option<Vec<Option<String>>>,
    target: &str,
    value: &str,
    is_json: bool,
    snapshot: Snapshot,
) -> Option<String> {
    let declaration = declared(table_oid, column_name).or_raise();
    own_row_of(
        &declaration,
        column_name,
        key_values,
        target,
        value,
        is_json,
        snapshot,
    )
}

fn own_row_of(
    declaration: &Declaration,
    column_name: &str,
    key_values: Option<Vec<Option<String>>>,
    target: &str,
    value: &str,
    is_json: bool,
    snapshot: Snapshot,
) -> Option<String> {
    let keys = key_values.unwrap_or_default();
    let (expected, row) = row_identity(
        &declaration.display_table(),
        &declaration.path_prefix,
        &keys,
        column_name,
    );
    if target != expected || declaration.path_column.is_some() {
        return None;
    }
    check_visible(declaration, &flatten(&keys), value, is_json, snapshot).or_raise();
    Some(row)
}

/// Returns the KV path a wide-table row's column gets, and how messages
/// name the row.
pub fn row_identity(
    table_name: &str,
    path_prefix: &str,
    key_values: &[Option<String>],
    column_name: &str,
) -> (String, String) {
    let keys = flatten(key_values);
    let path = reference::row_path(path_prefix, &keys, column_name);
    let row = format!("row ({}) of {table_name}", keys.join(", "));
    (path, row)
}

fn flatten(key_values: &[Option<String>]) -> Vec<String> {
    key_values
        .iter()
        .map(|k| k.clone().unwrap_or_default())
        .collect()
}

/// Returns the declaration of a column, or raises when it is not declared:
/// no other table's values are ever resolved.
fn declared(table_oid: pg_sys::Oid, column_name: &str) -> Result<Declaration, Failure> {
    let not_declared = || {
        Failure::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "column \"{column_name}\" of table {table_oid:?} is not a declared secret column"
            ),
        )
        .hint("Read secrets through the resolved views of declared tables.")
    };
    let schema = select_value::<String>(
        "SELECT n.nspname::text FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        &[table_oid.into()],
    )?
    .ok_or_else(not_declared)?;
    let name = select_value::<String>(
        "SELECT relname::text FROM pg_catalog.pg_class WHERE oid = $1",
        &[table_oid.into()],
    )?
    .ok_or_else(not_declared)?;
    declare::load_declarations(Some((&schema, &name)))?
        .into_iter()
        .find(|d| d.column_name == column_name)
        .ok_or_else(not_declared)
}

/// Raises unless the calling role can see a row of the declared table with
/// these key values and this value: the reference must come from a row the
/// role may read, not from the caller's arguments. `snapshot` decides
/// whether rows written by the calling statement count.
fn check_visible(
    declaration: &Declaration,
    keys: &[String],
    value: &str,
    is_json: bool,
    snapshot: Snapshot,
) -> Result<(), Failure> {
    let key_columns: Vec<String> = match &declaration.path_column {
        Some(path_column) => vec![path_column.clone()],
        None => declaration.key_columns.clone(),
    };
    let mut conditions = Vec::new();
    for (i, column) in key_columns.iter().enumerate() {
        conditions.push(format!("t.{}::text = ${}", quote_identifier(column), i + 1));
    }
    // jsonb compares by value, so the text form of `value` does not matter.
    conditions.push(format!(
        "t.{} = ${}::{}",
        quote_identifier(&declaration.column_name),
        key_columns.len() + 1,
        if is_json { "jsonb" } else { "text" }
    ));
    let query = format!(
        "SELECT 1 FROM {} t WHERE {} LIMIT 1",
        declaration.qualified_table(),
        conditions.join(" AND ")
    );
    let mut args: Vec<DatumWithOid<'_>> = keys.iter().map(|k| k.as_str().into()).collect();
    args.push(value.into());
    if key_columns.len() != keys.len() || select_by_value(&query, &args, snapshot, 1)?.is_empty() {
        return Err(Failure::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "permission denied: no row of {} visible to the current role holds this reference",
                declaration.display_table()
            ),
        )
        .hint("Read secrets through the resolved view; the role needs SELECT on the table and its rows."));
    }
    Ok(())
}

fn resolve_json(target: &str, key: Option<&str>, row: &str, snapshot: Snapshot) -> Value {
    let entry = fetch_as_of(target, snapshot)
        .map_err(|f| f.context(row))
        .or_raise();
    reference::kv_to_json(entry.data, key)
        .map_err(|reason| missing_key(row, target, reason))
        .or_raise()
}

/// Reads an entry for a resolver. The fresh-snapshot twins resolve rows
/// the running statement wrote, so they also see what its INSERT proposes.
fn fetch_as_of(target: &str, snapshot: Snapshot) -> Result<crate::vault::KvEntry, Failure> {
    crate::read::fetch_with(target, snapshot == Snapshot::Fresh)
}

fn missing_key(row: &str, target: &str, reason: String) -> Failure {
    Failure::new(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("{row}: the secret at \"{target}\" lacks the key the reference names"),
    )
    .detail(reason)
    .hint("Someone changed the entry's shape in Vault: put the key back.")
}
