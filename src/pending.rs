//! Secrets written to migrated columns in the current transaction.
//!
//! The write trigger puts the row's reference in the row at once, so the
//! plaintext never reaches the heap, and keeps the plaintext here. Just
//! before the transaction commits, each pending secret is written to Vault.
//! A failure there aborts the transaction. A rollback of the transaction or
//! of a savepoint drops the secrets it wrote, so Vault never contains a
//! value whose row was rolled back. Until the commit, the transaction's own
//! reads of those rows return the pending values.
//!
//! A row that INSERT proposes may never be stored: `ON CONFLICT DO NOTHING`
//! skips it, and `ON CONFLICT DO UPDATE` updates the existing row instead.
//! So an INSERT's secret stays a proposal until the row's AFTER INSERT
//! trigger confirms it, and only confirmed secrets reach Vault.

use std::cell::RefCell;

use pgrx::{pg_sys, PgSqlErrorCode};
use serde_json::{Map, Value};

use crate::backend;
use crate::errors::{Failure, OrRaise};
use crate::vault::{KvPath, VaultClient, VaultError};

struct Pending {
    path: KvPath,
    data: Map<String, Value>,
    /// The row's name in messages, such as `row with path "x" of public.t`.
    label: String,
    subxact: pg_sys::SubTransactionId,
    /// Whether the row was stored with this secret; false for an INSERT's
    /// proposal until its AFTER INSERT trigger runs.
    confirmed: bool,
    /// Start of the top-level statement that wrote it. A proposal left by
    /// an earlier statement was never stored.
    statement: pg_sys::TimestampTz,
}

#[derive(Default)]
struct State {
    writes: Vec<Pending>,
    /// Whether this transaction queued KV entries for deletion.
    deletions_queued: bool,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Registers the transaction callbacks. Called once, from `_PG_init`.
pub fn register_callbacks() {
    // SAFETY: both callbacks are pg_guard functions that live as long as the
    // library; registering them is what PostgreSQL expects of extensions.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

/// Keeps a secret that an UPDATE stored, to be written to Vault when the
/// transaction commits. A later write to the same path replaces it.
pub fn add(path: KvPath, data: Map<String, Value>, label: String) {
    push(path, data, label, true);
}

/// Keeps the secret of a row that an INSERT proposes.
pub fn propose(path: KvPath, data: Map<String, Value>, label: String) {
    drop_stale_proposals();
    push(path, data, label, false);
}

/// Drops the proposals of earlier statements: their AFTER INSERT triggers
/// have run, so their rows were not stored.
fn drop_stale_proposals() {
    let now = statement_start();
    STATE.with(|state| {
        state
            .borrow_mut()
            .writes
            .retain(|p| p.confirmed || p.statement == now)
    });
}

fn statement_start() -> pg_sys::TimestampTz {
    // SAFETY: reads the start time of the current top-level statement.
    unsafe { pg_sys::GetCurrentStatementStartTimestamp() }
}

fn push(path: KvPath, data: Map<String, Value>, label: String, confirmed: bool) {
    // SAFETY: reads the current subtransaction's ID; always valid inside a
    // transaction, which a trigger runs in.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let statement = statement_start();
    STATE.with(|state| {
        state.borrow_mut().writes.push(Pending {
            path,
            data,
            label,
            subxact,
            confirmed,
            statement,
        })
    });
}

/// Confirms the earliest proposal for `path`: its row was stored. AFTER
/// INSERT triggers run in the order the rows were stored, and a path is
/// stored once per statement, so a later proposal for the same path is a
/// row that ON CONFLICT skipped.
pub fn confirm(path: &KvPath) {
    drop_stale_proposals();
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        if let Some(pending) = state
            .writes
            .iter_mut()
            .find(|p| !p.confirmed && &p.path == path)
        {
            pending.confirmed = true;
        }
    });
}

/// Removes the proposal for `path` and returns its secret. Called when an
/// INSERT ... ON CONFLICT DO UPDATE updates the existing row instead.
pub fn take_proposal(path: &KvPath) -> Option<Map<String, Value>> {
    drop_stale_proposals();
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let at = state
            .writes
            .iter()
            .rposition(|p| !p.confirmed && &p.path == path)?;
        Some(state.writes.remove(at).data)
    })
}

/// Returns the secret this transaction wrote last to `path`, if it has not
/// reached Vault yet. With `proposals`, an INSERT's proposal counts too, as
/// RETURNING of that INSERT needs.
pub fn lookup(path: &KvPath, proposals: bool) -> Option<Map<String, Value>> {
    let now = statement_start();
    STATE.with(|state| {
        state
            .borrow()
            .writes
            .iter()
            .rev()
            .find(|p| &p.path == path && (p.confirmed || (proposals && p.statement == now)))
            .map(|p| p.data.clone())
    })
}

/// Records that this transaction queued deletions, so that the deletion
/// worker starts once it commits.
pub fn note_deletions_queued() {
    STATE.with(|state| state.borrow_mut().deletions_queued = true);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => flush().or_raise(),
        XACT_EVENT_PRE_PREPARE => {
            let pending = STATE.with(|state| state.borrow().writes.iter().any(|p| p.confirmed));
            if pending {
                Failure::new(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "cannot PREPARE a transaction that wrote secrets to a migrated column",
                )
                .detail("The secrets go to Vault when the transaction commits, which a prepared transaction does in another session.")
                .hint("Commit the transaction instead of preparing it.")
                .raise();
            }
        }
        XACT_EVENT_COMMIT => {
            let queued =
                STATE.with(|state| std::mem::take(&mut *state.borrow_mut()).deletions_queued);
            if queued {
                crate::deletions::start_worker();
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PREPARE => {
            STATE.with(|state| *state.borrow_mut() = State::default());
        }
        _ => {}
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    subxact: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        match event {
            SUBXACT_EVENT_ABORT_SUB => state.writes.retain(|p| p.subxact != subxact),
            SUBXACT_EVENT_COMMIT_SUB => {
                for pending in state.writes.iter_mut().filter(|p| p.subxact == subxact) {
                    pending.subxact = parent;
                }
            }
            _ => {}
        }
    });
}

/// What a path held before the commit wrote it, to put back if a later
/// write of the same commit fails.
struct Undo {
    path: KvPath,
    before: Option<Map<String, Value>>,
}

/// Writes every pending secret to Vault, the last value of each path. When
/// one write fails, the ones already made are undone as far as Vault lets
/// us, and the failure aborts the transaction.
fn flush() -> Result<(), Failure> {
    let mut writes = STATE.with(|state| std::mem::take(&mut state.borrow_mut().writes));
    writes.retain(|p| p.confirmed);
    if writes.is_empty() {
        return Ok(());
    }
    let mut last: Vec<&Pending> = Vec::new();
    for pending in writes.iter().rev() {
        if !last.iter().any(|p| p.path == pending.path) {
            last.push(pending);
        }
    }
    last.reverse();
    backend::with_client(|client, _| {
        let mut done: Vec<Undo> = Vec::new();
        for pending in &last {
            if let Err(failure) = write_one(client, pending, &mut done) {
                let left = undo(client, done);
                let failure = failure.context(&pending.label);
                return Err(match left.is_empty() {
                    true => failure.detail("The transaction is rolled back; no secret it wrote stays in Vault."),
                    false => failure.detail(format!(
                        "The transaction is rolled back, but these entries keep the value it wrote, because putting back their earlier value failed too: {}.",
                        left.join(", ")
                    )),
                }
                .hint("Check that Vault is reachable and unsealed, then run the transaction again."));
            }
        }
        Ok(())
    })
}

fn write_one(
    client: &mut VaultClient,
    pending: &Pending,
    done: &mut Vec<Undo>,
) -> Result<(), Failure> {
    let before = match client.kv_read(&pending.path) {
        Ok(entry) => Some(entry.data),
        Err(VaultError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    if before.as_ref() == Some(&pending.data) {
        return Ok(());
    }
    client.kv_write(&pending.path, &pending.data, None)?;
    done.push(Undo {
        path: pending.path.clone(),
        before,
    });
    Ok(())
}

/// Puts back what each written path held before, newest first. Returns
/// the Vault paths that could not be put back.
fn undo(client: &mut VaultClient, done: Vec<Undo>) -> Vec<String> {
    let mut left = Vec::new();
    for undo in done.into_iter().rev() {
        let result = match &undo.before {
            Some(data) => client.kv_write(&undo.path, data, None).map(|_| ()),
            None => client.kv_delete_all(&undo.path),
        };
        if result.is_err() {
            left.push(client.data_path(&undo.path));
        }
    }
    left
}
