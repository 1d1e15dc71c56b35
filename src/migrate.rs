//! `vault_redirect.migrate()`: moves each plaintext secret of the declared
//! columns into KV v2 and leaves the row's reference in its place, inside
//! the calling transaction.

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use pgrx::PgSqlErrorCode;
use serde_json::{Map, Value};

use crate::backend;
use crate::declare::{self, key_array, Declaration};
use crate::errors::{require_superuser, Failure, OrRaise};
use crate::reference;
use crate::resolve::foreign_reference;
use crate::vault::KvPath;

/// Rows fetched from a declared table at a time, which bounds memory.
const BATCH_ROWS: i64 = 100;

/// Key of the advisory lock that lets one migration run at a time.
const LOCK_KEY: i64 = 0x7661_756c_745f_7264; // "vault_rd"

/// Moves every plaintext value of every declared column into Vault, and
/// returns one row of counts per column. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn migrate() -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(column_name, String),
        name!(migrated, i64),
        name!(already_migrated, i64),
        name!(null_values, i64),
    ),
> {
    require_superuser("vault_redirect.migrate");
    backend::current_config()
        .and_then(|c| c.ok_or_else(Failure::not_configured))
        .or_raise();
    Spi::run_with_args("SELECT pg_advisory_xact_lock($1)", &[LOCK_KEY.into()])
        .map_err(Failure::from)
        .or_raise();
    let declarations = declare::load_declarations(None).or_raise();
    if declarations.is_empty() {
        Failure::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "no secret columns are declared",
        )
        .hint("Declare them first with vault_redirect.declare_kv_table() or vault_redirect.declare_column().")
        .raise();
    }
    let mut summary = Vec::new();
    for declaration in &declarations {
        let counts = migrate_column(declaration).or_raise();
        pgrx::log!(
            "vault_redirect: migrated {} values of {}.{} ({} already migrated, {} NULL)",
            counts.migrated,
            declaration.display_table(),
            declaration.column_name,
            counts.already,
            counts.nulls
        );
        summary.push((
            declaration.display_table(),
            declaration.column_name.clone(),
            counts.migrated,
            counts.already,
            counts.nulls,
        ));
    }
    TableIterator::new(summary)
}

#[derive(Default)]
struct Counts {
    migrated: i64,
    already: i64,
    nulls: i64,
}

/// What to do with one row.
enum Plan {
    Skip,
    Move {
        path: KvPath,
        data: Map<String, Value>,
        reference: String,
    },
}

fn migrate_column(declaration: &Declaration) -> Result<Counts, Failure> {
    let table = declare::find_table(&declaration.qualified_table())?;
    let column_type = declare::column_type(&table, &declaration.column_name)?;
    let is_json = column_type == "jsonb";
    let column = quote_identifier(&declaration.column_name);
    let keys = match &declaration.path_column {
        Some(path_column) => key_array("t", std::slice::from_ref(path_column)),
        None => key_array("t", &declaration.key_columns),
    };
    let qualified = table.qualified();
    // Readers go on; writers wait until the transaction ends.
    Spi::run(&format!(
        "LOCK TABLE {qualified} IN SHARE ROW EXCLUSIVE MODE"
    ))?;
    let select = format!("SELECT t.ctid::text, {keys}, t.{column}::text FROM {qualified} t");
    let update = format!(
        "UPDATE {qualified} SET {column} = $1::{} WHERE ctid = $2::tid",
        if is_json { "jsonb" } else { "text" }
    );

    Spi::connect_mut(|client| {
        let mut counts = Counts::default();
        let mut cursor = client.open_cursor(select.as_str(), &[]);
        loop {
            let mut rows = Vec::new();
            for row in cursor.fetch(BATCH_ROWS)? {
                let ctid: String = row.get(1)?.unwrap_or_default();
                let key_values: Vec<Option<String>> = row.get(2)?.unwrap_or_default();
                let value: Option<String> = row.get(3)?;
                rows.push((ctid, key_values, value));
            }
            if rows.is_empty() {
                break;
            }
            for (ctid, key_values, value) in rows {
                let Some(value) = value else {
                    counts.nulls += 1;
                    continue;
                };
                let (expected, row) = describe_row(declaration, &key_values);
                let plan = plan(is_json, &value, &expected, &row)?;
                let Plan::Move {
                    path,
                    data,
                    reference,
                } = plan
                else {
                    counts.already += 1;
                    continue;
                };
                store(&path, &data).map_err(|f| f.context(&row))?;
                client.update(update.as_str(), None, &[reference.into(), ctid.into()])?;
                counts.migrated += 1;
            }
        }
        Ok::<_, Failure>(counts)
    })
    .and_then(|counts| {
        Spi::run_with_args(
            "UPDATE vault_redirect.secret_columns SET migrated_at = now()
              WHERE table_schema = $1 AND table_name = $2 AND column_name = $3",
            &[
                declaration.table_schema.as_str().into(),
                declaration.table_name.as_str().into(),
                declaration.column_name.as_str().into(),
            ],
        )?;
        Ok(counts)
    })
}

/// Returns the KV path a row's value belongs at, and how messages name it.
fn describe_row(declaration: &Declaration, key_values: &[Option<String>]) -> (String, String) {
    let table = declaration.display_table();
    match declaration.path_column {
        Some(_) => {
            let path = key_values.first().cloned().flatten().unwrap_or_default();
            let row = format!("row with path \"{path}\" of {table}");
            (path, row)
        }
        None => crate::resolve::row_identity(
            &table,
            &declaration.path_prefix,
            key_values,
            &declaration.column_name,
        ),
    }
}

fn plan(is_json: bool, value: &str, expected: &str, row: &str) -> Result<Plan, Failure> {
    let (data, reference) = if is_json {
        let parsed: Value = serde_json::from_str(value).map_err(|e| {
            Failure::new(
                PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
                format!("{row}: the jsonb value could not be read: {e}"),
            )
        })?;
        if let Some((target, _)) = reference::parse_json(&parsed) {
            return own_reference(&target, expected, row);
        }
        let (data, key) = reference::json_to_kv(parsed);
        (data, reference::json_reference(expected, key).to_string())
    } else {
        if let Some(target) = value.strip_prefix(reference::TEXT_PREFIX) {
            return own_reference(target, expected, row);
        }
        (
            reference::text_to_kv(value),
            reference::text_reference(expected),
        )
    };
    let path = KvPath::parse(expected).map_err(|e| {
        Failure::from(e)
            .context(row)
            .hint("Fix the row's path so that it is a valid KV path, then run vault_redirect.migrate() again.")
    })?;
    Ok(Plan::Move {
        path,
        data,
        reference,
    })
}

fn own_reference(target: &str, expected: &str, row: &str) -> Result<Plan, Failure> {
    if target == expected {
        Ok(Plan::Skip)
    } else {
        Err(foreign_reference(target, expected, row))
    }
}

/// Writes one value, reads it back and checks it came back unchanged.
fn store(path: &KvPath, data: &Map<String, Value>) -> Result<(), Failure> {
    backend::with_client(|client, _| {
        let version = client.kv_write(path, data, None)?;
        let entry = client.kv_read(path)?;
        if entry.version != version || &entry.data != data {
            return Err(Failure::new(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!(
                    "the secret read back from {} differs from what was written",
                    client.data_path(path)
                ),
            )
            .hint("Nothing was changed in the table. Check for another writer to this path."));
        }
        Ok(())
    })
}
