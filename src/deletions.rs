//! Deleting the KV entries of deleted rows, after their transaction
//! commits, and finding entries that no row refers to.
//!
//! The delete trigger adds the row's path to `vault_redirect.deletion_queue`
//! in the deleting transaction, so a rollback takes the path out again.
//! When that transaction commits, a background worker of this database
//! deletes the queued entries. While Vault cannot be reached, it retries
//! with growing pauses for up to `WORKER_PATIENCE`. What it could not delete
//! stays in the queue with the last error, until the next commit that
//! queues a deletion, or `process_deletions()`, tries again.
//!
//! An entry is deleted only when, with writers to the declared tables held
//! off, no row has that path and its own reference in it: a row inserted
//! again with the same key after the delete keeps its secret.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use pgrx::{IntoDatum, PgSqlErrorCode};

use crate::backend;
use crate::declare::{self, Declaration};
use crate::errors::{require_superuser, Failure, OrRaise};
use crate::reference;
use crate::vault::{KvPath, VaultError};

/// Queue entries handled in one transaction.
const BATCH: i64 = 100;
/// How long a worker keeps retrying while Vault fails.
const WORKER_PATIENCE: Duration = Duration::from_secs(15 * 60);
/// Key of the advisory lock that lets one worker per database run at a time.
const WORKER_LOCK: i64 = 0x7661_756c_745f_6463; // "vault_dc"
/// The folder under the secrets path where configure() keeps server markers.
const RESERVED_FOLDER: &str = "_vault_redirect/";

/// Starts the deletion worker for the current database. It runs after a
/// commit, where an error can no longer abort anything, so a full worker
/// table only gives a WARNING, and the entries wait for the next start.
pub fn start_worker() {
    // SAFETY: MyDatabaseId is set for the whole life of a backend.
    let database = unsafe { pg_sys::MyDatabaseId };
    let started = BackgroundWorkerBuilder::new("vault_redirect deletions")
        .set_type("vault_redirect deletions")
        .set_library("vault_redirect")
        .set_function("vault_redirect_deletion_worker")
        .set_argument(database.into_datum())
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .load_dynamic();
    if started.is_err() {
        pgrx::warning!(
            "vault_redirect: no background worker slot is free to delete the KV entries of deleted rows; they stay in vault_redirect.deletion_queue"
        );
    }
}

extern "C-unwind" {
    /// PostgreSQL's SIGTERM handler for backends. pgrx wraps pg_sys::die
    /// as a Rust function, and a signal handler must be the C symbol.
    fn die(signal: std::ffi::c_int);
}

/// Entry point of the deletion worker.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn vault_redirect_deletion_worker(argument: pg_sys::Datum) {
    // SAFETY: a worker sets its own signal handling before unblocking
    // signals; `die` turns SIGTERM into a FATAL at the next interrupt check.
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(die));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
    // SAFETY: start_worker() passes the database OID as the argument.
    let database = unsafe { pg_sys::Oid::from_datum(argument, false) };
    BackgroundWorker::connect_worker_to_spi_by_oid(database, None);
    BackgroundWorker::transaction(|| {
        // Each check of the rows must see what committed while the worker
        // waited for its locks, whatever the database's default is.
        Spi::run("SET default_transaction_isolation = 'read committed'")?;
        Spi::run_with_args("SELECT pg_advisory_lock($1)", &[WORKER_LOCK.into()])
    })
    .unwrap_or_else(|e| Failure::from(e).raise());
    let started = Instant::now();
    let mut pause = Duration::from_secs(1);
    loop {
        let run = BackgroundWorker::transaction(|| process_batch().or_raise());
        if run.deleted > 0 {
            pgrx::log!(
                "vault_redirect: deleted {} KV entries of deleted rows",
                run.deleted
            );
        }
        match run.error {
            None if run.handled == 0 => return,
            None => pause = Duration::from_secs(1),
            Some(error) => {
                if started.elapsed() >= WORKER_PATIENCE {
                    pgrx::log!(
                        "vault_redirect: gave up deleting queued KV entries for now: {error}; they stay in vault_redirect.deletion_queue"
                    );
                    return;
                }
                pgrx::log!(
                    "vault_redirect: could not delete a queued KV entry, retrying in {} s: {error}",
                    pause.as_secs()
                );
                sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Waits on the process latch; SIGTERM ends the worker.
fn sleep(duration: Duration) {
    // SAFETY: waiting on the process's own latch, then checking interrupts,
    // is how a background worker sleeps.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            duration.as_millis() as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}

#[derive(Default)]
struct Run {
    /// Queue entries taken out of the queue.
    handled: i64,
    deleted: i64,
    /// Entries not deleted because a row uses the path again.
    still_used: i64,
    error: Option<String>,
}

/// Handles up to `BATCH` queue entries in the current transaction. Stops at
/// the first Vault failure, which it records on the entry.
fn process_batch() -> Result<Run, Failure> {
    let _suspended = crate::transparent::Suspended::new();
    let queued = Spi::connect(|client| {
        let rows = client.select(
            "SELECT path FROM vault_redirect.deletion_queue
              ORDER BY queued_at, path LIMIT $1",
            None,
            &[BATCH.into()],
        )?;
        let mut paths = Vec::new();
        for row in rows {
            paths.push(row.get::<String>(1)?.unwrap_or_default());
        }
        Ok::<_, pgrx::spi::Error>(paths)
    })?;
    let mut run = Run::default();
    if queued.is_empty() {
        return Ok(run);
    }
    let declarations = declare::load_declarations(None)?;
    hold_off_writers(&declarations)?;
    for path in queued {
        if is_referenced(&declarations, &path)? {
            run.still_used += 1;
        } else {
            match delete_entry(&path) {
                Ok(()) => run.deleted += 1,
                Err(failure) => {
                    Spi::run_with_args(
                        "UPDATE vault_redirect.deletion_queue
                            SET attempts = attempts + 1, last_attempt_at = now(), last_error = $2
                          WHERE path = $1",
                        &[path.as_str().into(), failure.message.as_str().into()],
                    )?;
                    run.error = Some(failure.message);
                    return Ok(run);
                }
            }
        }
        Spi::run_with_args(
            "DELETE FROM vault_redirect.deletion_queue WHERE path = $1",
            &[path.as_str().into()],
        )?;
        run.handled += 1;
    }
    Ok(run)
}

/// Waits for the transactions writing to declared tables to end, and keeps
/// new ones waiting until this transaction ends, in a fixed order.
fn hold_off_writers(declarations: &[Declaration]) -> Result<(), Failure> {
    let tables: BTreeSet<String> = declarations
        .iter()
        .filter(|d| declare::find_table(&d.qualified_table()).is_ok())
        .map(Declaration::qualified_table)
        .collect();
    for table in tables {
        Spi::run(&format!("LOCK TABLE {table} IN SHARE MODE"))?;
    }
    Ok(())
}

/// Reports whether a row of a declared column has `path` as its own path
/// and its own reference in the column.
fn is_referenced(declarations: &[Declaration], path: &str) -> Result<bool, Failure> {
    for declaration in declarations {
        let column = quote_identifier(&declaration.column_name);
        let (keys, key_values) = match &declaration.path_column {
            Some(path_column) => (vec![path_column.clone()], vec![path.to_owned()]),
            None => match reference::row_keys(
                &declaration.path_prefix,
                declaration.key_columns.len(),
                &declaration.column_name,
                path,
            ) {
                Some(values) => (declaration.key_columns.clone(), values),
                None => continue,
            },
        };
        let Ok(scan) = crate::rows::ColumnScan::new(declaration) else {
            continue;
        };
        let mut conditions: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("t.{}::text = ${}", quote_identifier(k), i + 1))
            .collect();
        let n = keys.len() + 1;
        conditions.push(match scan.is_json {
            true => format!("t.{column} ->> '{}' = ${n}", reference::JSON_KEY),
            false => format!("t.{column}::text = '{}' || ${n}", reference::TEXT_PREFIX),
        });
        let query = format!(
            "SELECT EXISTS (SELECT 1 FROM {} t WHERE {})",
            declaration.qualified_table(),
            conditions.join(" AND ")
        );
        let mut args: Vec<DatumWithOid<'_>> =
            key_values.iter().map(|k| k.as_str().into()).collect();
        args.push(path.into());
        if crate::query::select_value::<bool>(&query, &args)? == Some(true) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn delete_entry(path: &str) -> Result<(), Failure> {
    let kv_path = KvPath::parse(path)?;
    backend::with_client(|client, _| Ok(client.kv_delete_all(&kv_path)?))
}

/// Deletes the queued KV entries now, in this transaction, instead of
/// waiting for the worker. Returns the number of entries deleted, of those
/// not deleted because a row uses the path again and of those left in the
/// queue, and the error that stopped it, if any. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn process_deletions() -> TableIterator<
    'static,
    (
        name!(deleted, i64),
        name!(still_used, i64),
        name!(remaining, i64),
        name!(last_error, Option<String>),
    ),
> {
    require_superuser("vault_redirect.process_deletions");
    check_fresh_snapshots("vault_redirect.process_deletions").or_raise();
    if crate::pending::deletions_queued() {
        Failure::new(
            PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
            "vault_redirect.process_deletions() cannot run in the transaction that deleted the rows",
        )
        .detail("A rollback would bring the rows back after their KV entries were deleted.")
        .hint("Commit the transaction first; the deletion worker then deletes the entries, or run process_deletions() after the commit.")
        .raise();
    }
    let mut total = Run::default();
    loop {
        let run = process_batch().or_raise();
        total.deleted += run.deleted;
        total.still_used += run.still_used;
        if run.error.is_some() || run.handled == 0 {
            total.error = run.error;
            break;
        }
    }
    let remaining = crate::query::select_value::<i64>(
        "SELECT count(*) FROM vault_redirect.deletion_queue",
        &[],
    )
    .or_raise()
    .unwrap_or(0);
    TableIterator::once((total.deleted, total.still_used, remaining, total.error))
}

/// Lists the KV entries under the secrets path that no row refers to, such
/// as those of rows whose transaction failed after their secret reached
/// Vault, or those left by unmigrate(). With `dry_run => false`, deletes
/// them. Entries queued for deletion and the server markers are left to
/// their owners. Every entry under the secrets path is taken to belong to
/// the declared columns. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn gc(
    dry_run: default!(bool, true),
) -> TableIterator<'static, (name!(path, String), name!(action, String))> {
    require_superuser("vault_redirect.gc");
    check_fresh_snapshots("vault_redirect.gc").or_raise();
    let _suspended = crate::transparent::Suspended::new();
    let declarations = declare::load_declarations(None).or_raise();
    hold_off_writers(&declarations).or_raise();
    let mut used: BTreeSet<String> = queued_paths().or_raise();
    for declaration in &declarations {
        let scan = crate::rows::ColumnScan::new(declaration).or_raise();
        scan.for_each(|_, row| {
            if let Some(value) = &row.value {
                if crate::redirect::is_own_reference(scan.is_json, value, &row.path) {
                    used.insert(row.path);
                }
            }
            Ok(())
        })
        .or_raise();
    }
    let entries = list_all().or_raise();
    let mut result = Vec::new();
    for path in entries {
        if used.contains(&path) {
            continue;
        }
        if !dry_run {
            delete_entry(&path)
                .map_err(|f| f.context(format!("deleting orphan \"{path}\"")))
                .or_raise();
        }
        let action = if dry_run { "orphan" } else { "deleted" };
        result.push((path, action.to_owned()));
    }
    TableIterator::new(result)
}

/// Raises under REPEATABLE READ or SERIALIZABLE. The transaction's snapshot
/// would predate the locks that hold writers off, so a row committed while
/// they were awaited would look absent and its entry be deleted.
fn check_fresh_snapshots(function: &str) -> Result<(), Failure> {
    // SAFETY: reads the current transaction's isolation level.
    let level = unsafe { pg_sys::XactIsoLevel };
    if level < pg_sys::XACT_REPEATABLE_READ as i32 {
        return Ok(());
    }
    Err(Failure::new(
        PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
        format!("{function}() must run at the READ COMMITTED isolation level"),
    )
    .detail("A transaction snapshot taken before its locks were granted would miss rows committed meanwhile, and their entries would be deleted.")
    .hint("Run it in its own transaction at READ COMMITTED, for example after SET default_transaction_isolation = 'read committed'."))
}

fn queued_paths() -> Result<BTreeSet<String>, Failure> {
    let paths = crate::query::select_value::<Vec<String>>(
        "SELECT coalesce(array_agg(path), '{}') FROM vault_redirect.deletion_queue",
        &[],
    )?;
    Ok(paths.unwrap_or_default().into_iter().collect())
}

/// Lists every entry under the secrets path, as relative paths, except
/// the server markers.
fn list_all() -> Result<Vec<String>, Failure> {
    backend::with_client(|client, _| {
        let mut entries = Vec::new();
        let mut folders: Vec<Option<String>> = vec![None];
        while let Some(folder) = folders.pop() {
            let kv_folder = folder.as_deref().map(KvPath::parse).transpose()?;
            let keys = match client.kv_list(kv_folder.as_ref()) {
                Ok(keys) => keys,
                Err(VaultError::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            for key in keys {
                let full = match &folder {
                    Some(folder) => format!("{folder}/{key}"),
                    None => key,
                };
                if full == RESERVED_FOLDER {
                    continue;
                }
                match full.strip_suffix('/') {
                    Some(sub) => folders.push(Some(sub.to_owned())),
                    None => entries.push(full),
                }
            }
        }
        entries.sort();
        Ok(entries)
    })
    .map_err(|f: Failure| match f.code {
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE => {
            f.hint("The policy must grant list on the metadata of the secrets path.")
        }
        _ => f,
    })
}
