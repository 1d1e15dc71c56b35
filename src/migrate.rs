//! `vault_redirect.migrate()`: moves each plaintext secret of the declared
//! columns into KV v2 and leaves the row's reference in its place, inside
//! the calling transaction.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use serde_json::{Map, Value};

use crate::backend;
use crate::declare::{self, Declaration};
use crate::errors::{require_superuser, Failure, OrRaise};
use crate::progress::Progress;
use crate::reference;
use crate::rows::ColumnScan;
use crate::servers;
use crate::vault::{KvPath, VaultError};

/// Key of the advisory lock that lets one migration run at a time.
pub const LOCK_KEY: i64 = 0x7661_756c_745f_7264; // "vault_rd"

/// Moves every plaintext value of every declared column into Vault, and
/// returns one row of counts per column. With `dry_run`, only counts what
/// would move and changes nothing. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn migrate(
    dry_run: default!(bool, false),
) -> TableIterator<
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
    // Its queries must read the stored references, not resolved values.
    let _suspended = crate::transparent::Suspended::new();
    servers::mark_reminded();
    lock_migration();
    let declarations = declare::load_declarations(None).or_raise();
    if !dry_run {
        check_preconditions(&declarations).or_raise();
    }
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
        let counts = migrate_column(declaration, dry_run).or_raise();
        if !dry_run {
            pgrx::log!(
                "vault_redirect: migrated {} values of {}.{} ({} already migrated, {} NULL)",
                counts.migrated,
                declaration.display_table(),
                declaration.column_name,
                counts.already,
                counts.nulls
            );
        }
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

/// Checks what migrate() and unmigrate() need before they start: a
/// superuser, a configured server, no other migration running (an advisory
/// lock held to the end of the transaction), and declared columns.
pub fn begin_bulk(function: &str) -> Vec<Declaration> {
    require_superuser(function);
    crate::servers::mark_reminded();
    backend::current_config()
        .and_then(|c| c.ok_or_else(Failure::not_configured))
        .or_raise();
    lock_migration();
    declare::load_declarations(None).or_raise()
}

fn lock_migration() {
    Spi::run_with_args("SELECT pg_advisory_xact_lock($1)", &[LOCK_KEY.into()])
        .map_err(Failure::from)
        .or_raise();
}

/// Checks, in this order, that the secrets are not migrated yet, that this
/// server and every other expected server are configured, and that this
/// server can log in to Vault. Each failure has its own SQLSTATE.
fn check_preconditions(declarations: &[Declaration]) -> Result<(), Failure> {
    if !declarations.is_empty() && servers::all_migrated()? && !plaintext_left(declarations)? {
        return Err(Failure::new(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            "the secrets are already migrated to Vault",
        )
        .hint("vault_redirect.verify() checks every reference; vault_redirect.unmigrate() moves the secrets back."));
    }
    servers::check_all_configured()?;
    backend::with_client(|client, _| Ok(client.login()?))
}

/// Reports whether a migrated column contains plaintext again, written
/// after the migration, so that migrate() runs again to move it.
fn plaintext_left(declarations: &[Declaration]) -> Result<bool, Failure> {
    for declaration in declarations {
        if migrate_column(declaration, true)?.migrated > 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

#[derive(Default)]
struct Counts {
    migrated: i64,
    already: i64,
    nulls: i64,
}

/// The action for one row.
pub enum Plan {
    Skip,
    Move {
        path: KvPath,
        data: Map<String, Value>,
        reference: String,
    },
}

fn migrate_column(declaration: &Declaration, dry_run: bool) -> Result<Counts, Failure> {
    let scan = ColumnScan::new(declaration)?;
    if !dry_run {
        scan.lock()?;
    }
    let all = declare::load_declarations(None)?;
    let mut counts = Counts::default();
    let mut progress = match dry_run {
        true => None,
        false => Some(Progress::start(
            declaration.display_table(),
            declaration.column_name.clone(),
            scan.count_rows()?,
        )),
    };
    scan.for_each(|client, row| {
        if let Some(progress) = progress.as_mut() {
            progress.row_done();
        }
        let Some(value) = &row.value else {
            counts.nulls += 1;
            return Ok(());
        };
        let plan = plan(
            declaration.secret_keys.as_deref(),
            scan.is_json,
            value,
            &row.path,
            &row.label,
        )?;
        let Plan::Move {
            path,
            data,
            reference,
        } = plan
        else {
            counts.already += 1;
            return Ok(());
        };
        crate::redirect::check_owner(declaration, &row.path, &row.label, &all)?;
        check_length(
            &reference,
            scan.max_chars,
            &row.label,
            &format!(
                "{}.{}",
                declaration.display_table(),
                declaration.column_name
            ),
        )?;
        if !dry_run {
            store(&path, &data).map_err(|f| f.context(&row.label))?;
            scan.update(client, &row, &reference)?;
        }
        counts.migrated += 1;
        Ok(())
    })?;
    if let Some(progress) = progress {
        progress.finish();
        scan.set_migrated(true)?;
    }
    Ok(counts)
}

/// Returns what to do with a row's value: nothing when it is the row's own
/// reference, else the KV data to write at `expected` and the reference
/// that replaces it. Any other value, a reference to another path
/// included, is plaintext.
/// With `secret_keys`, only those keys of a jsonb object go to Vault.
pub fn plan(
    secret_keys: Option<&[String]>,
    is_json: bool,
    value: &str,
    expected: &str,
    row: &str,
) -> Result<Plan, Failure> {
    let (data, reference) = if is_json {
        let parsed: Value = serde_json::from_str(value).map_err(|e| {
            Failure::new(
                PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
                format!("{row}: the jsonb value could not be read: {e}"),
            )
        })?;
        if let Some(keys) = secret_keys {
            match plan_secret_keys(keys, &parsed, expected, row)? {
                Some(split) => split,
                None => return Ok(Plan::Skip),
            }
        } else {
            // A value shaped like a reference to another path is plaintext.
            if matches!(reference::parse_json(&parsed), Some((target, _)) if target == expected) {
                return Ok(Plan::Skip);
            }
            let (data, key) = reference::json_to_kv(parsed);
            (data, reference::json_reference(expected, key).to_string())
        }
    } else {
        if value.strip_prefix(reference::TEXT_PREFIX) == Some(expected) {
            return Ok(Plan::Skip);
        }
        (
            reference::text_to_kv(value),
            reference::text_reference(expected),
        )
    };
    if expected.starts_with("_vault_redirect/") {
        return Err(Failure::new(
            PgSqlErrorCode::ERRCODE_RESERVED_NAME,
            format!("{row}: the path \"{expected}\" is in the folder vault_redirect keeps its server markers in"),
        )
        .hint("Rename the row's path; \"_vault_redirect/\" under the secrets path is reserved."));
    }
    let path = KvPath::parse(expected).map_err(|e| {
        Failure::from(e)
            .context(row)
            .hint("Fix the row's path so that it is a valid KV path: no empty, \".\" or \"..\" segment and no leading \"/\".")
    })?;
    Ok(Plan::Move {
        path,
        data,
        reference,
    })
}

/// The KV data of a row and the reference that replaces it in the row.
type Split = (Map<String, Value>, String);

/// Splits a jsonb object of a column declared with secret keys. Returns
/// `None` when there is nothing to write: no secret key in the value, or
/// the row's own marker without secret keys next to it. Secret keys next
/// to the row's own marker are new values for those keys, merged into the
/// entry's other keys.
fn plan_secret_keys(
    keys: &[String],
    parsed: &Value,
    expected: &str,
    row: &str,
) -> Result<Option<Split>, Failure> {
    let own = match reference::marker(parsed) {
        Some(target) if target == expected => true,
        Some(other) => return Err(Failure::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "{row}: the key \"{}\" is reserved, and the value names \"{other}\"",
                reference::JSON_KEY
            ),
        )
        .hint(
            "Remove that key from the value: it marks where the secret keys of the row are kept.",
        )),
        None => false,
    };
    let Some((secret, rest)) = reference::split_secret_keys(parsed, keys) else {
        return Ok(None);
    };
    let data = match own {
        true => {
            let mut current = match crate::read::fetch(expected) {
                Ok(entry) => entry.data,
                Err(f) if f.code == PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT => Map::new(),
                Err(f) => return Err(f.context(row)),
            };
            current.extend(secret);
            current
        }
        false => secret,
    };
    let mut rest = rest;
    rest.remove(reference::JSON_KEY);
    let reference = reference::partial_reference(rest, expected).to_string();
    Ok(Some((data, reference)))
}

/// Raises when a reference does not fit a length-limited column.
pub fn check_length(
    reference: &str,
    max_chars: Option<usize>,
    row: &str,
    column: &str,
) -> Result<(), Failure> {
    let Some(max) = max_chars else {
        return Ok(());
    };
    let length = reference.chars().count();
    if length <= max {
        return Ok(());
    }
    Err(Failure::new(
        PgSqlErrorCode::ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
        format!("{row}: the reference \"{reference}\" has {length} characters, but {column} takes at most {max}"),
    )
    .hint("Widen the column (ALTER TABLE ... ALTER COLUMN ... TYPE varchar(N) or text), or declare it with a shorter path_prefix."))
}

/// Writes one value with check-and-set, reads it back and checks it came
/// back unchanged. An entry that already contains the same data, left by an
/// interrupted earlier run, is kept, and one that contains other data is never
/// overwritten.
fn store(path: &KvPath, data: &Map<String, Value>) -> Result<(), Failure> {
    backend::with_client(|client, _| {
        let existing = match client.kv_read(path) {
            Ok(entry) => Some(entry),
            Err(VaultError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(entry) = existing {
            if &entry.data == data {
                return Ok(());
            }
            return Err(Failure::new(
                PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
                format!(
                    "{} already holds a different secret (version {})",
                    client.data_path(path),
                    entry.version
                ),
            )
            .detail("The row still holds its plaintext, so the Vault entry was written by someone else.")
            .hint("Compare the two values and delete the one that is wrong, then run vault_redirect.migrate() again."));
        }
        let version = client.kv_write(path, data, Some(0)).map_err(|e| match e {
            VaultError::Status { status: 400, .. } => Failure::from(e).hint(
                "Another writer created the entry at the same moment; run vault_redirect.migrate() again.",
            ),
            other => other.into(),
        })?;
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
