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
//! trigger confirms it, and only confirmed secrets reach Vault. Statement
//! triggers mark where each INSERT statement begins and ends, and the
//! proposals it left unconfirmed are dropped at its end.
//!
//! PostgreSQL may still abort the transaction after the secrets reached
//! Vault: a serialization failure at commit, or the backend terminated
//! during the commit. The abort then puts back what each written entry
//! contained before, unless another writer changed it since.

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
    /// The INSERT statement that proposed it, 0 for an UPDATE.
    statement: u64,
}

#[derive(Default)]
struct State {
    writes: Vec<Pending>,
    /// INSERT statements on declared tables that have begun and not ended,
    /// innermost last.
    statements: Vec<u64>,
    /// The number given to the last INSERT statement that began.
    last_statement: u64,
    /// The length of `statements` when each open subtransaction began.
    subxact_depths: Vec<(pg_sys::SubTransactionId, usize)>,
    /// The entries the commit wrote to Vault, to put back if the
    /// transaction aborts after all.
    written: Vec<Undo>,
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

/// Marks the beginning of an INSERT statement on a declared table.
pub fn begin_statement() {
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        state.last_statement += 1;
        let number = state.last_statement;
        state.statements.push(number);
    });
}

/// Marks the end of the innermost INSERT statement, and drops the
/// proposals it left unconfirmed: ON CONFLICT did not store their rows.
pub fn end_statement() {
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        if let Some(ended) = state.statements.pop() {
            state.writes.retain(|p| p.confirmed || p.statement != ended);
        }
    });
}

fn current_statement(state: &State) -> u64 {
    state.statements.last().copied().unwrap_or(0)
}

/// Keeps a secret that an UPDATE stored, to be written to Vault when the
/// transaction commits. A later write to the same path replaces it.
pub fn add(path: KvPath, data: Map<String, Value>, label: String) {
    push(path, data, label, true);
}

/// Keeps the secret of a row that an INSERT proposes.
pub fn propose(path: KvPath, data: Map<String, Value>, label: String) {
    push(path, data, label, false);
}

fn push(path: KvPath, data: Map<String, Value>, label: String, confirmed: bool) {
    // SAFETY: reads the current subtransaction's ID; always valid inside a
    // transaction, which a trigger runs in.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let statement = match confirmed {
            true => 0,
            false => current_statement(&state),
        };
        state.writes.push(Pending {
            path,
            data,
            label,
            subxact,
            confirmed,
            statement,
        })
    });
}

/// Confirms the earliest proposal of the current INSERT statement for
/// `path`: its row was stored. AFTER INSERT triggers run in the order the
/// rows were stored, and a statement stores a path once, so a later
/// proposal for the same path is a row that ON CONFLICT skipped.
pub fn confirm(path: &KvPath) {
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let statement = current_statement(&state);
        if let Some(pending) = state
            .writes
            .iter_mut()
            .find(|p| !p.confirmed && p.statement == statement && &p.path == path)
        {
            pending.confirmed = true;
        }
    });
}

/// Removes the current INSERT statement's proposal for `path` and returns
/// its secret. Called when INSERT ... ON CONFLICT DO UPDATE updates the
/// existing row instead.
pub fn take_proposal(path: &KvPath) -> Option<Map<String, Value>> {
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let statement = current_statement(&state);
        let at = state
            .writes
            .iter()
            .rposition(|p| !p.confirmed && p.statement == statement && &p.path == path)?;
        Some(state.writes.remove(at).data)
    })
}

/// Returns the secret this transaction wrote last to `path`, if it has not
/// reached Vault yet. With `proposals`, a proposal of a running INSERT
/// statement counts too, as RETURNING of that INSERT needs.
pub fn lookup(path: &KvPath, proposals: bool) -> Option<Map<String, Value>> {
    STATE.with(|state| {
        let state = state.borrow();
        state
            .writes
            .iter()
            .rev()
            .find(|p| {
                &p.path == path
                    && (p.confirmed || (proposals && state.statements.contains(&p.statement)))
            })
            .map(|p| p.data.clone())
    })
}

/// Reports whether this transaction queued deletions.
pub fn deletions_queued() -> bool {
    STATE.with(|state| state.borrow().deletions_queued)
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
        XACT_EVENT_ABORT => {
            let written = STATE.with(|state| std::mem::take(&mut *state.borrow_mut()).written);
            if !written.is_empty() {
                undo_after_abort(written);
            }
        }
        XACT_EVENT_PREPARE => {
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
            SUBXACT_EVENT_START_SUB => {
                let depth = state.statements.len();
                state.subxact_depths.push((subxact, depth));
            }
            SUBXACT_EVENT_ABORT_SUB => {
                state.writes.retain(|p| p.subxact != subxact);
                // The statements that the error interrupted never reach
                // their AFTER statement trigger.
                if let Some(at) = state
                    .subxact_depths
                    .iter()
                    .rposition(|(s, _)| *s == subxact)
                {
                    let (_, depth) = state.subxact_depths[at];
                    state.subxact_depths.truncate(at);
                    state.statements.truncate(depth);
                }
            }
            SUBXACT_EVENT_COMMIT_SUB => {
                for pending in state.writes.iter_mut().filter(|p| p.subxact == subxact) {
                    pending.subxact = parent;
                }
                if let Some(at) = state
                    .subxact_depths
                    .iter()
                    .rposition(|(s, _)| *s == subxact)
                {
                    state.subxact_depths.truncate(at);
                }
            }
            _ => {}
        }
    });
}

/// The data a path contained before the commit wrote it, and the version
/// the commit wrote, to put the entry back if the transaction fails after
/// all.
struct Undo {
    path: KvPath,
    before: Option<Map<String, Value>>,
    version: u64,
}

/// Writes every confirmed secret to Vault, the last value of each path.
/// When one write fails, the ones already made are undone as far as Vault
/// lets us, and the failure aborts the transaction.
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
    let done = backend::with_client(|client, _| {
        let mut done: Vec<Undo> = Vec::new();
        for pending in &last {
            if let Err(failure) = write_one(client, pending, &mut done) {
                let left = undo(client, done);
                let failure = failure.context(&pending.label);
                let hint = failure.hint.clone().unwrap_or_else(|| {
                    "Check that Vault is reachable and unsealed, then run the transaction again."
                        .to_owned()
                });
                return Err(match left.is_empty() {
                    true => failure.detail("The transaction is rolled back, and no secret it wrote stays in Vault."),
                    false => failure.detail(format!(
                        "The transaction is rolled back, but these entries keep the value it wrote, because putting back their earlier value failed too: {}.",
                        left.join(", ")
                    )),
                }
                .hint(hint));
            }
        }
        Ok(done)
    })?;
    STATE.with(|state| state.borrow_mut().written = done);
    Ok(())
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
    let version = client.kv_write(&pending.path, &pending.data, None)?;
    done.push(Undo {
        path: pending.path.clone(),
        before,
        version,
    });
    Ok(())
}

/// Puts back what each written path contained before, newest first, unless
/// the entry changed since this transaction wrote it. Returns the Vault
/// paths that could not be put back.
fn undo(client: &mut VaultClient, done: Vec<Undo>) -> Vec<String> {
    let mut left = Vec::new();
    for undo in done.into_iter().rev() {
        let result = match &undo.before {
            // Check-and-set: only over the version this transaction wrote.
            Some(data) => client
                .kv_write(&undo.path, data, Some(undo.version))
                .map(|_| ()),
            None => match client.kv_read(&undo.path) {
                Ok(entry) if entry.version == undo.version => client.kv_delete_all(&undo.path),
                Ok(_) | Err(VaultError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            },
        };
        if result.is_err() {
            left.push(client.data_path(&undo.path));
        }
    }
    left
}

/// Puts back the entries of a commit that wrote to Vault and then failed.
/// Runs while the transaction aborts, so it raises nothing, and logs what
/// it could not put back.
fn undo_after_abort(written: Vec<Undo>) {
    let count = written.len();
    let left = backend::with_client(|client, _| Ok(undo(client, written)));
    match left {
        Ok(left) if left.is_empty() => pgrx::log!(
            "vault_redirect: the transaction aborted after its commit wrote {count} secrets to Vault; their earlier values were put back"
        ),
        Ok(left) => pgrx::warning!(
            "vault_redirect: the transaction aborted after its commit wrote secrets to Vault, and these entries keep the aborted value: {}",
            left.join(", ")
        ),
        Err(failure) => pgrx::warning!(
            "vault_redirect: the transaction aborted after its commit wrote {count} secrets to Vault, and putting back their earlier values failed: {}",
            failure.message
        ),
    }
}
