//! `verify()` checks that every reference resolves; `unmigrate()` moves
//! every secret back into its row, the way back from Vault.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use serde_json::Value;

use crate::backend;
use crate::declare::{self, Declaration};
use crate::errors::{require_superuser, Failure, OrRaise};
use crate::migrate::begin_bulk;
use crate::read::fetch;
use crate::reference;
use crate::rows::{ColumnScan, Row};

/// Returns the key of the reference a row contains, if its value is the row's
/// own reference. A value shaped like a reference to another path is
/// plaintext.
fn reference_of(scan: &ColumnScan, row: &Row) -> Result<Option<Option<String>>, Failure> {
    let Some(value) = &row.value else {
        return Ok(None);
    };
    let (target, key) = if scan.is_json {
        let parsed: Value = serde_json::from_str(value).unwrap_or(Value::Null);
        let found = match scan.secret_keys() {
            Some(_) => reference::marker(&parsed).map(|target| (target.to_owned(), None)),
            None => reference::parse_json(&parsed),
        };
        match found {
            Some(found) => found,
            None => return Ok(None),
        }
    } else {
        match value.strip_prefix(reference::TEXT_PREFIX) {
            Some(target) => (target.to_owned(), Some(reference::SCALAR_KEY.to_owned())),
            None => return Ok(None),
        }
    };
    if target != row.path {
        return Ok(None);
    }
    Ok(Some(key))
}

/// Returns the plaintext a row's reference stands for, as the column's text.
fn plaintext(scan: &ColumnScan, row: &Row, key: Option<&str>) -> Result<String, Failure> {
    let entry = fetch(&row.path).map_err(|f| f.context(&row.label))?;
    let missing = |reason: String| {
        Failure::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!(
                "{}: the secret at \"{}\" lacks the key the reference names",
                row.label, row.path
            ),
        )
        .detail(reason)
    };
    if let (true, Some(_)) = (scan.is_json, scan.secret_keys()) {
        let stored: Value =
            serde_json::from_str(row.value.as_deref().unwrap_or("{}")).unwrap_or(Value::Null);
        Ok(reference::merge_secret_keys(&stored, entry.data).to_string())
    } else if scan.is_json {
        let value = reference::kv_to_json(entry.data, key).map_err(missing)?;
        Ok(value.to_string())
    } else {
        let key = key.unwrap_or(reference::SCALAR_KEY);
        match reference::kv_to_text(&entry.data, key).map_err(missing)? {
            Some(text) => Ok(text),
            None => Err(missing(format!("the key \"{key}\" contains null"))),
        }
    }
}

/// Lists every reference that does not resolve: missing, deleted or
/// destroyed entries, entries without the referenced key, and references
/// found in a row they were not made for. An empty result means every
/// reference resolves. Superuser only.
#[allow(clippy::type_complexity)] // pgrx needs the row type spelled out here
#[pg_extern(volatile, parallel_unsafe)]
fn verify() -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(column_name, String),
        name!(row_label, String),
        name!(path, String),
        name!(problem, String),
    ),
> {
    require_superuser("vault_redirect.verify");
    // Its queries must read the stored references, not resolved values.
    let _suspended = crate::transparent::Suspended::new();
    let mut problems = Vec::new();
    for declaration in declare::load_declarations(None).or_raise() {
        let scan = ColumnScan::new(&declaration).or_raise();
        scan.for_each(|_, row| {
            let mut report = |problem: String| {
                problems.push((
                    declaration.display_table(),
                    declaration.column_name.clone(),
                    row.label.clone(),
                    row.path.clone(),
                    problem,
                ))
            };
            let key = match reference_of(&scan, &row) {
                Ok(Some(key)) => key,
                Ok(None) => {
                    if let Some(target) = foreign_target(&scan, &row) {
                        report(format!(
                            "the row holds the reference of \"{target}\", not its own, so it reads as that text"
                        ));
                    }
                    return Ok(());
                }
                Err(failure) => {
                    report(failure.message);
                    return Ok(());
                }
            };
            match plaintext(&scan, &row, key.as_deref()) {
                Ok(_) => {}
                Err(failure) if is_dangling(&failure) => {
                    let detail = failure.detail.unwrap_or_default();
                    report(format!("{} {detail}", failure.message).trim().to_owned());
                }
                Err(failure) => return Err(failure),
            }
            Ok(())
        })
        .or_raise();
    }
    TableIterator::new(problems)
}

/// Returns the path that a migrated row's value names when it is shaped like
/// a reference but not the row's own. Such a value can only come from a
/// writer that bypassed the write trigger.
fn foreign_target(scan: &ColumnScan, row: &Row) -> Option<String> {
    if !scan.is_migrated() {
        return None;
    }
    let value = row.value.as_deref()?;
    let target = if scan.is_json {
        let parsed: Value = serde_json::from_str(value).ok()?;
        reference::marker(&parsed)?.to_owned()
    } else {
        value.strip_prefix(reference::TEXT_PREFIX)?.to_owned()
    };
    (target != row.path).then_some(target)
}

/// Tells a reference that does not resolve from Vault being unavailable.
fn is_dangling(failure: &Failure) -> bool {
    failure.code == PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT
}

/// Moves every secret back from Vault into its row, checking each stored
/// value, and marks the columns as not migrated. The KV entries stay in
/// Vault: deleting them is a separate step. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn unmigrate() -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(column_name, String),
        name!(restored, i64),
        name!(already_plaintext, i64),
        name!(null_values, i64),
    ),
> {
    // Its queries must read the stored references, not resolved values.
    let _suspended = crate::transparent::Suspended::new();
    let mut summary = Vec::new();
    for declaration in begin_bulk("vault_redirect.unmigrate") {
        let (restored, plain, nulls) = unmigrate_column(&declaration).or_raise();
        pgrx::log!(
            "vault_redirect: restored {restored} values of {}.{} from Vault",
            declaration.display_table(),
            declaration.column_name
        );
        summary.push((
            declaration.display_table(),
            declaration.column_name.clone(),
            restored,
            plain,
            nulls,
        ));
    }
    TableIterator::new(summary)
}

fn unmigrate_column(declaration: &Declaration) -> Result<(i64, i64, i64), Failure> {
    let scan = ColumnScan::new(declaration)?;
    scan.lock()?;
    // First, so that the write trigger lets the plaintext into the rows.
    scan.set_migrated(false)?;
    let (mut restored, mut plain, mut nulls) = (0, 0, 0);
    scan.for_each(|client, row| {
        if row.value.is_none() {
            nulls += 1;
            return Ok(());
        }
        let Some(key) = reference_of(&scan, &row)? else {
            plain += 1;
            return Ok(());
        };
        let text = plaintext(&scan, &row, key.as_deref())?;
        let stored = scan.update_returning(client, &row, &text)?;
        if !same_value(scan.is_json, stored.as_deref(), &text) {
            return Err(Failure::new(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!(
                    "{}: the value stored differs from the one read from Vault",
                    row.label
                ),
            )
            .hint("Nothing was changed: the transaction is rolled back."));
        }
        restored += 1;
        Ok(())
    })?;
    Ok((restored, plain, nulls))
}

fn same_value(is_json: bool, stored: Option<&str>, expected: &str) -> bool {
    let Some(stored) = stored else {
        return false;
    };
    if !is_json {
        return stored == expected;
    }
    let parse = |text: &str| serde_json::from_str::<Value>(text).ok();
    parse(stored).is_some() && parse(stored) == parse(expected)
}

/// Deletes the KV entries that unmigrate() left behind: for each row of a
/// column that is not migrated, the entry at the row's path, when it contains
/// exactly what migrating the row would write. An entry with other data is
/// kept and counted. With `dry_run`, the default, only counts. Superuser
/// only.
#[pg_extern(volatile, parallel_unsafe)]
fn delete_vault_entries(
    dry_run: default!(bool, true),
) -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(column_name, String),
        name!(deleted, i64),
        name!(kept_different, i64),
        name!(absent, i64),
    ),
> {
    // Its queries must read the stored references, not resolved values.
    let _suspended = crate::transparent::Suspended::new();
    let mut summary = Vec::new();
    for declaration in begin_bulk("vault_redirect.delete_vault_entries") {
        let migrated = crate::query::select_value::<bool>(
            "SELECT migrated_at IS NOT NULL FROM vault_redirect.secret_columns
              WHERE table_schema = $1 AND table_name = $2 AND column_name = $3",
            &[
                declaration.table_schema.as_str().into(),
                declaration.table_name.as_str().into(),
                declaration.column_name.as_str().into(),
            ],
        )
        .or_raise()
        .unwrap_or(false);
        if migrated {
            Failure::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "{}.{} is migrated: its rows refer to the entries",
                    declaration.display_table(),
                    declaration.column_name
                ),
            )
            .hint("Run vault_redirect.unmigrate() first.")
            .raise();
        }
        let counts = delete_column_entries(&declaration, dry_run).or_raise();
        summary.push((
            declaration.display_table(),
            declaration.column_name.clone(),
            counts.0,
            counts.1,
            counts.2,
        ));
    }
    TableIterator::new(summary)
}

fn delete_column_entries(
    declaration: &Declaration,
    dry_run: bool,
) -> Result<(i64, i64, i64), Failure> {
    let scan = ColumnScan::new(declaration)?;
    scan.lock()?;
    let (mut deleted, mut kept, mut absent) = (0, 0, 0);
    scan.for_each(|_, row| {
        let Some(value) = &row.value else {
            return Ok(());
        };
        if reference_of(&scan, &row)?.is_some() {
            return Ok(());
        }
        let expected = if scan.is_json {
            let parsed: Value = serde_json::from_str(value).unwrap_or(Value::Null);
            match scan.secret_keys() {
                Some(keys) => match reference::split_secret_keys(&parsed, keys) {
                    Some((secret, _)) => secret,
                    None => return Ok(()),
                },
                None => reference::json_to_kv(parsed).0,
            }
        } else {
            reference::text_to_kv(value)
        };
        let path = crate::vault::KvPath::parse(&row.path)
            .map_err(|e| Failure::from(e).context(&row.label))?;
        backend::with_client(|client, _| {
            match client.kv_read(&path) {
                Err(crate::vault::VaultError::NotFound { .. }) => absent += 1,
                Err(e) => return Err(Failure::from(e).context(&row.label)),
                Ok(entry) if entry.data != expected => kept += 1,
                Ok(_) => {
                    if !dry_run {
                        client.kv_delete_all(&path)?;
                    }
                    deleted += 1;
                }
            }
            Ok(())
        })
    })?;
    Ok((deleted, kept, absent))
}
