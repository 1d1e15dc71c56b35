//! Write redirection: the triggers that every declared table carries.
//!
//! Once a column is migrated:
//! - a plaintext value written by INSERT, UPDATE or COPY is replaced by the
//!   row's reference before the row is stored, and the plaintext waits in
//!   memory until the transaction commits (see `pending`). An INSERT's
//!   secret is only proposed until the AFTER INSERT trigger confirms that
//!   the row was stored, which `ON CONFLICT` may prevent, and two statement
//!   triggers mark where each INSERT statement begins and ends;
//! - a row deleted, or whose key changes, queues its KV entry for deletion,
//!   which the deletion worker carries out after the commit (see
//!   `deletions`); TRUNCATE queues every row's entry.
//!
//! The triggers are `ENABLE ALWAYS`, so that they also fire under
//! `session_replication_role = replica`, as in logical replication and in
//! `pg_restore --disable-triggers`. PostgreSQL fires BEFORE triggers in
//! name order. The write trigger's name sorts after lower-case names, so it
//! gets the values that the table's own BEFORE triggers wrote.

use std::ffi::{CStr, CString};

use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal};
use pgrx::{PgSqlErrorCode, PgTupleDesc};

use crate::declare::{self, Declaration, Table};
use crate::errors::{Failure, OrRaise};
use crate::migrate::{check_length, plan, Plan};
use crate::pending;
use crate::reference;
use crate::resolve::row_identity;
use crate::rows::ColumnScan;
use crate::vault::KvPath;

pub const WRITE_TRIGGER: &str = "zz_vault_redirect_write";
pub const DELETE_TRIGGER: &str = "zz_vault_redirect_delete";
pub const TRUNCATE_TRIGGER: &str = "zz_vault_redirect_truncate";
pub const CONFIRM_TRIGGER: &str = "zz_vault_redirect_confirm";
pub const BEGIN_TRIGGER: &str = "zz_vault_redirect_begin";
pub const END_TRIGGER: &str = "zz_vault_redirect_end";
const TRIGGERS: [&str; 6] = [
    WRITE_TRIGGER,
    DELETE_TRIGGER,
    TRUNCATE_TRIGGER,
    CONFIRM_TRIGGER,
    BEGIN_TRIGGER,
    END_TRIGGER,
];

/// Creates the triggers on a declared table, or replaces them. Their
/// arguments name the declared table, so that the partitions of a
/// partitioned table, which get clones of the triggers, find the
/// declarations too.
pub fn install_triggers(table: &Table) -> Result<(), Failure> {
    let args = format!(
        "{}, {}",
        quote_literal(&table.schema),
        quote_literal(&table.name)
    );
    let on = table.qualified();
    let triggers = [
        (
            WRITE_TRIGGER,
            "BEFORE INSERT OR UPDATE",
            "ROW",
            "redirect_write",
        ),
        (DELETE_TRIGGER, "AFTER DELETE", "ROW", "redirect_delete"),
        (
            TRUNCATE_TRIGGER,
            "BEFORE TRUNCATE",
            "STATEMENT",
            "redirect_truncate",
        ),
        (CONFIRM_TRIGGER, "AFTER INSERT", "ROW", "redirect_confirm"),
        (
            BEGIN_TRIGGER,
            "BEFORE INSERT",
            "STATEMENT",
            "redirect_begin",
        ),
        (END_TRIGGER, "AFTER INSERT", "STATEMENT", "redirect_end"),
    ];
    for (name, when, level, function) in triggers {
        let name = quote_identifier(name);
        Spi::run(&format!(
            "CREATE OR REPLACE TRIGGER {name} {when} ON {on} FOR EACH {level}
                 EXECUTE FUNCTION vault_redirect.{function}({args})"
        ))?;
        Spi::run(&format!("ALTER TABLE {on} ENABLE ALWAYS TRIGGER {name}"))?;
    }
    Ok(())
}

/// Drops the triggers of a table that has no declared column left.
pub fn drop_triggers(qualified_table: &str) -> Result<(), Failure> {
    for name in TRIGGERS {
        Spi::run(&format!(
            "DROP TRIGGER IF EXISTS {} ON {qualified_table}",
            quote_identifier(name)
        ))?;
    }
    Ok(())
}

/// Returns the migrated declarations of the table the trigger was made for.
fn migrated_declarations(trigger: &PgTrigger<'_>) -> Vec<Declaration> {
    let (schema, name) = declared_table(trigger);
    declare::load_declarations(Some((&schema, &name)))
        .or_raise()
        .into_iter()
        .filter(|d| d.migrated)
        .collect()
}

/// Returns the schema and name of the declared table, which the trigger's
/// arguments give.
fn declared_table(trigger: &PgTrigger<'_>) -> (String, String) {
    let args = trigger.extra_args().unwrap_or_default();
    let [schema, name] = args.as_slice() else {
        Failure::new(
            PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            format!(
                "trigger \"{}\" must name its declared table in two arguments",
                trigger.name().unwrap_or("?")
            ),
        )
        .hint("Declare the table again to recreate its triggers.")
        .raise()
    };
    (schema.clone(), name.clone())
}

/// A row given to a trigger: a heap tuple and its descriptor.
struct RowImage {
    tuple: *mut pg_sys::HeapTupleData,
    desc: pg_sys::TupleDesc,
}

impl RowImage {
    fn attno(&self, declaration: &Declaration, column: &str) -> Result<i32, Failure> {
        let name = CString::new(column).unwrap_or_default();
        // SAFETY: desc is the trigger relation's descriptor, valid for the
        // whole trigger call, and name is a NUL-terminated string.
        let attno = unsafe { pg_sys::SPI_fnumber(self.desc, name.as_ptr()) };
        if attno <= 0 {
            return Err(Failure::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!(
                    "declared column \"{column}\" of {} does not exist",
                    declaration.display_table()
                ),
            )
            .hint("The column was dropped or renamed: run vault_redirect.undeclare() for it, and declare the new name if there is one."));
        }
        Ok(attno)
    }

    /// Returns a column's value in its text form, or `None` for NULL.
    fn text(&self, attno: i32) -> Option<String> {
        // SAFETY: tuple and desc come from the trigger data and match; attno
        // was checked by attno(). SPI_getvalue works without an SPI
        // connection and returns a palloc'd string or NULL.
        unsafe {
            let text = pg_sys::SPI_getvalue(self.tuple, self.desc, attno);
            if text.is_null() {
                return None;
            }
            let owned = CStr::from_ptr(text).to_string_lossy().into_owned();
            pg_sys::pfree(text.cast());
            Some(owned)
        }
    }

    /// Returns a key column's value as `::text` gives it, which is how the
    /// other paths of the extension make KV paths: without the padding of
    /// a `char(n)` value.
    fn key_text(&self, attno: i32) -> Option<String> {
        let text = self.text(attno)?;
        // SAFETY: desc outlives this call; attno is a valid user column.
        let desc = unsafe { PgTupleDesc::from_pg_unchecked(self.desc) };
        match desc.get(attno as usize - 1) {
            Some(attribute) if attribute.atttypid == pg_sys::BPCHAROID => {
                Some(text.trim_end_matches(' ').to_owned())
            }
            _ => Some(text),
        }
    }

    /// Returns the KV path of a declared column of this row, and how
    /// messages name the row.
    fn identity(&self, declaration: &Declaration) -> Result<(String, String), Failure> {
        let table = declaration.display_table();
        match &declaration.path_column {
            Some(path_column) => {
                let path = self
                    .key_text(self.attno(declaration, path_column)?)
                    .unwrap_or_default();
                let label = format!("row with path \"{path}\" of {table}");
                Ok((path, label))
            }
            None => {
                let mut keys = Vec::new();
                for key in &declaration.key_columns {
                    keys.push(self.key_text(self.attno(declaration, key)?));
                }
                Ok(row_identity(
                    &table,
                    &declaration.path_prefix,
                    &keys,
                    &declaration.column_name,
                ))
            }
        }
    }

    /// Returns whether the column is jsonb, and the length limit of a
    /// varchar(n).
    fn column_shape(&self, attno: i32) -> (bool, Option<usize>) {
        // SAFETY: desc outlives this call; attno is a valid user column.
        let desc = unsafe { PgTupleDesc::from_pg_unchecked(self.desc) };
        let Some(attribute) = desc.get(attno as usize - 1) else {
            return (false, None);
        };
        let is_json = attribute.atttypid == pg_sys::JSONBOID;
        let limited = matches!(attribute.atttypid, pg_sys::VARCHAROID | pg_sys::BPCHAROID);
        let typmod = attribute.atttypmod;
        (
            is_json,
            (limited && typmod > 4).then(|| (typmod - 4) as usize),
        )
    }

    /// Returns the datum of `text` in the column's type and modifier.
    fn datum_from_text(&self, attno: i32, text: &str) -> pg_sys::Datum {
        // SAFETY: desc outlives this call; attno is a valid user column.
        let desc = unsafe { PgTupleDesc::from_pg_unchecked(self.desc) };
        let attribute = desc
            .get(attno as usize - 1)
            .expect("attno was checked against this descriptor");
        let text = CString::new(text).expect("a reference has no NUL byte");
        let mut input = pg_sys::Oid::INVALID;
        let mut ioparam = pg_sys::Oid::INVALID;
        // SAFETY: the type's input function parses a NUL-terminated string;
        // errors are raised as PostgreSQL errors.
        unsafe {
            pg_sys::getTypeInputInfo(attribute.atttypid, &mut input, &mut ioparam);
            pg_sys::OidInputFunctionCall(
                input,
                text.as_ptr() as *mut std::ffi::c_char,
                ioparam,
                attribute.atttypmod,
            )
        }
    }
}

/// Returns whether `value` is the reference of the row at `path`.
pub fn is_own_reference(is_json: bool, value: &str, path: &str) -> bool {
    if is_json {
        let parsed: serde_json::Value = serde_json::from_str(value).unwrap_or_default();
        reference::marker(&parsed) == Some(path)
    } else {
        value.strip_prefix(reference::TEXT_PREFIX) == Some(path)
    }
}

/// BEFORE INSERT OR UPDATE, for each row: replaces the plaintext of each
/// migrated column by the row's reference and keeps the plaintext for
/// Vault until the commit.
#[pg_trigger]
fn redirect_write<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, PgHeapTupleError> {
    let _suspended = crate::transparent::Suspended::new();
    let data = trigger.trigger_data();
    let is_update = trigger.event().fired_by_update();
    let Some(new) = trigger.new() else {
        return Ok(None);
    };
    let mut new = new.into_owned();
    // One query per row: the table's own declarations, and all of them for
    // the check of which table owns a path.
    let all_declarations = declare::load_declarations(None).or_raise();
    let (schema, name) = declared_table(trigger);
    let declarations: Vec<&Declaration> = all_declarations
        .iter()
        .filter(|d| d.migrated && d.table_schema == schema && d.table_name == name)
        .collect();
    if declarations.is_empty() {
        return Ok(Some(new));
    }

    // SAFETY: tg_relation is open for the whole trigger call.
    let desc = unsafe { (*data.tg_relation).rd_att };
    let new_image = RowImage {
        tuple: match is_update {
            true => data.tg_newtuple,
            false => data.tg_trigtuple,
        },
        desc,
    };
    let old_image = is_update.then_some(RowImage {
        tuple: data.tg_trigtuple,
        desc,
    });
    let write = RowWrite {
        new: &new_image,
        old: old_image.as_ref(),
        updated_columns: data.tg_updatedcols,
        all_declarations: &all_declarations,
    };
    let mut changes = Vec::new();
    for declaration in declarations {
        if let Some(change) = write.column(declaration).or_raise() {
            changes.push(change);
        }
    }

    // The references replace the plaintext in the row that is stored.
    for (attno, reference) in changes {
        let datum = new_image.datum_from_text(attno, &reference);
        let attno = std::num::NonZeroUsize::new(attno as usize).expect("user columns start at 1");
        // SAFETY: the datum has the column's type, made by its input function.
        unsafe { new.set_by_index_unchecked(attno, Some(datum)) };
    }
    Ok(Some(new))
}

/// One row written by INSERT or UPDATE, as the write trigger gets it.
struct RowWrite<'a> {
    new: &'a RowImage,
    /// The row before an UPDATE.
    old: Option<&'a RowImage>,
    /// The columns that the UPDATE assigns.
    updated_columns: *const pg_sys::Bitmapset,
    all_declarations: &'a [Declaration],
}

impl RowWrite<'_> {
    /// Keeps the plaintext of one declared column for Vault and returns the
    /// column's number and the reference to store in its place, or `None`
    /// when the column keeps its value.
    fn column(&self, declaration: &Declaration) -> Result<Option<(i32, String)>, Failure> {
        let new = self.new;
        let attno = new.attno(declaration, &declaration.column_name)?;
        let (is_json, max_chars) = new.column_shape(attno);
        let (path, label) = new.identity(declaration)?;
        let column = format!(
            "{}.{}",
            declaration.display_table(),
            declaration.column_name
        );
        let value = new.text(attno);

        // The path and value of the old row, if it referred to its entry.
        let mut old_reference = None;
        if let Some(old) = self.old {
            let (old_path, _) = old.identity(declaration)?;
            if let Some(old_value) = old.text(attno) {
                if is_own_reference(is_json, &old_value, &old_path) {
                    old_reference = Some((old_path, old_value));
                }
            }
        }
        // An UPDATE of a row that an INSERT ... ON CONFLICT proposed: the
        // INSERT's proposal for this path will not be stored as it is.
        let proposal = match self.old {
            Some(_) => KvPath::parse(&path)
                .ok()
                .and_then(|p| pending::take_proposal(&p)),
            None => None,
        };

        let mut change = None;
        let new_reference = match (&value, &old_reference) {
            (None, _) => None,
            // The key changed and the value is still the old reference: the
            // secret moves to the new path.
            (Some(value), Some((old_path, old_value)))
                if old_path != &path && value == old_value =>
            {
                check_owner(declaration, &path, &label, self.all_declarations)?;
                let entry = crate::read::fetch(old_path).map_err(|f| f.context(&label))?;
                let reference = moved_reference(declaration, is_json, value, &path);
                check_length(&reference, max_chars, &label, &column)?;
                pending::add(checked_path(&path, &label)?, entry.data, label.clone());
                change = Some((attno, reference));
                Some(path.clone())
            }
            (Some(value), _) => {
                let plan = plan(
                    declaration.secret_keys.as_deref(),
                    is_json,
                    value,
                    &path,
                    &label,
                )?;
                match plan {
                    Plan::Move {
                        path: kv_path,
                        data,
                        reference,
                    } => {
                        check_owner(declaration, &path, &label, self.all_declarations)?;
                        check_length(&reference, max_chars, &label, &column)?;
                        match self.old {
                            Some(_) => pending::add(kv_path, data, label),
                            None => pending::propose(kv_path, data, label),
                        }
                        change = Some((attno, reference));
                        Some(path.clone())
                    }
                    Plan::Skip if !is_own_reference(is_json, value, &path) => None,
                    Plan::Skip => {
                        self.keep_reference(attno, &path, &label, proposal, &old_reference)?;
                        Some(path.clone())
                    }
                }
            }
        };

        // An entry that no longer has a row referring to it is deleted
        // after the commit.
        if let Some((old_path, _)) = old_reference {
            if new_reference.as_ref() != Some(&old_path) {
                queue_deletion(&old_path, declaration)?;
            }
        }
        Ok(change)
    }

    /// Handles a written value that is the row's own reference: the
    /// proposed secret of `SET value = EXCLUDED.value`, a reference the row
    /// had already, or one that only a superuser may store.
    fn keep_reference(
        &self,
        attno: i32,
        path: &str,
        label: &str,
        proposal: Option<serde_json::Map<String, serde_json::Value>>,
        old_reference: &Option<(String, String)>,
    ) -> Result<(), Failure> {
        // SAFETY: the set of assigned columns is valid for the trigger
        // call, and its members are offset by FirstLowInvalidHeapAttributeNumber.
        let assigned = self.old.is_none()
            || unsafe {
                pg_sys::bms_is_member(
                    attno - pg_sys::FirstLowInvalidHeapAttributeNumber,
                    self.updated_columns,
                )
            };
        if let (Some(data), true) = (proposal, assigned) {
            pending::add(checked_path(path, label)?, data, label.to_owned());
            return Ok(());
        }
        // The row referred to this entry already; for a column with secret
        // keys, its other keys may have changed.
        let unchanged = !assigned
            || old_reference
                .as_ref()
                .is_some_and(|(old_path, _)| old_path == path);
        if unchanged {
            return Ok(());
        }
        check_reference_write(label)
    }
}

/// Raises unless the calling role may store a reference as it is. Only a
/// superuser may, as pg_restore and logical replication do: any other role
/// could give its row the reference of an entry it may not read, then read
/// it through the row.
fn check_reference_write(label: &str) -> Result<(), Failure> {
    // SAFETY: superuser() only reads the current user's catalog entry.
    if unsafe { pg_sys::superuser() } {
        return Ok(());
    }
    Err(Failure::new(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("{label}: permission denied to store a reference to Vault in the row"),
    )
    .hint("Write the secret itself: it goes to Vault and the row gets its reference."))
}

/// Raises when a key/value row's path lies in the path prefix of a wide
/// table's declared column, whose entries that row must not replace.
pub fn check_owner(
    declaration: &Declaration,
    path: &str,
    label: &str,
    all: &[Declaration],
) -> Result<(), Failure> {
    if declaration.path_column.is_none() {
        return Ok(());
    }
    let owner = all.iter().find(|other| {
        other.path_column.is_none()
            && (path == other.path_prefix || path.starts_with(&format!("{}/", other.path_prefix)))
    });
    match owner {
        None => Ok(()),
        Some(other) => Err(Failure::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "{label}: the path \"{path}\" belongs to the secrets of {}.{}",
                other.display_table(),
                other.column_name
            ),
        )
        .hint(format!(
            "Keep the key/value paths out of \"{}/\".",
            other.path_prefix
        ))),
    }
}

/// Returns the reference a moved row gets at its new path, of the same
/// shape as its old one.
fn moved_reference(declaration: &Declaration, is_json: bool, value: &str, path: &str) -> String {
    if !is_json {
        return reference::text_reference(path);
    }
    let parsed: serde_json::Value = serde_json::from_str(value).unwrap_or_default();
    match (&declaration.secret_keys, reference::parse_json(&parsed)) {
        (None, Some((_, key))) => reference::json_reference(path, key.as_deref()).to_string(),
        _ => {
            let mut rest = parsed.as_object().cloned().unwrap_or_default();
            rest.remove(reference::JSON_KEY);
            reference::partial_reference(rest, path).to_string()
        }
    }
}

fn checked_path(path: &str, label: &str) -> Result<KvPath, Failure> {
    KvPath::parse(path).map_err(|e| {
        Failure::from(e)
            .context(label)
            .hint("Fix the row's path so that it is a valid KV path.")
    })
}

/// BEFORE INSERT, for each statement: marks where the statement's
/// proposals begin.
#[pg_trigger]
fn redirect_begin<'a>(
    _trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, PgHeapTupleError> {
    pending::begin_statement();
    Ok(None)
}

/// AFTER INSERT, for each statement: drops the proposals whose rows were
/// not stored.
#[pg_trigger]
fn redirect_end<'a>(
    _trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, PgHeapTupleError> {
    pending::end_statement();
    Ok(None)
}

/// AFTER INSERT, for each row: confirms the secrets that the row's INSERT
/// proposed, since the row was stored.
#[pg_trigger]
fn redirect_confirm<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, PgHeapTupleError> {
    let _suspended = crate::transparent::Suspended::new();
    let data = trigger.trigger_data();
    // SAFETY: tg_relation is open for the whole trigger call.
    let desc = unsafe { (*data.tg_relation).rd_att };
    let new = RowImage {
        tuple: data.tg_trigtuple,
        desc,
    };
    for declaration in migrated_declarations(trigger) {
        let (path, _) = new.identity(&declaration).or_raise();
        if let Ok(path) = KvPath::parse(&path) {
            pending::confirm(&path);
        }
    }
    Ok(None)
}

/// AFTER DELETE, for each row: queues the KV entry of each migrated column
/// that holds the row's own reference.
#[pg_trigger]
fn redirect_delete<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, PgHeapTupleError> {
    let _suspended = crate::transparent::Suspended::new();
    let data = trigger.trigger_data();
    let declarations = migrated_declarations(trigger);
    // SAFETY: tg_relation is open for the whole trigger call.
    let desc = unsafe { (*data.tg_relation).rd_att };
    let old = RowImage {
        tuple: data.tg_trigtuple,
        desc,
    };
    for declaration in &declarations {
        let attno = old.attno(declaration, &declaration.column_name).or_raise();
        let (is_json, _) = old.column_shape(attno);
        let (path, _) = old.identity(declaration).or_raise();
        if old
            .text(attno)
            .is_some_and(|value| is_own_reference(is_json, &value, &path))
        {
            queue_deletion(&path, declaration).or_raise();
        }
    }
    Ok(None)
}

/// BEFORE TRUNCATE: queues the KV entry of every row's own reference.
#[pg_trigger]
fn redirect_truncate<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, PgHeapTupleError> {
    let _suspended = crate::transparent::Suspended::new();
    for declaration in migrated_declarations(trigger) {
        let scan = ColumnScan::new(&declaration).or_raise();
        scan.for_each(|_, row| {
            let Some(value) = &row.value else {
                return Ok(());
            };
            if is_own_reference(scan.is_json, value, &row.path) {
                queue_deletion(&row.path, &declaration)?;
            }
            Ok(())
        })
        .or_raise();
    }
    Ok(None)
}

/// Adds a path to `vault_redirect.deletion_queue`, as the owner of the
/// queue: the role whose statement deleted the row need not be able to
/// write the queue itself.
fn queue_deletion(path: &str, declaration: &Declaration) -> Result<(), Failure> {
    let owner = crate::query::select_value::<pg_sys::Oid>(
        "SELECT relowner FROM pg_catalog.pg_class
          WHERE oid = 'vault_redirect.deletion_queue'::regclass",
        &[],
    )?
    .unwrap_or(pg_sys::BOOTSTRAP_SUPERUSERID.into());
    let _owner = AsUser::switch(owner);
    Spi::run_with_args(
        "INSERT INTO vault_redirect.deletion_queue (path, table_schema, table_name)
         VALUES ($1, $2, $3)
         ON CONFLICT (path) DO UPDATE SET queued_at = now()",
        &[
            path.into(),
            declaration.table_schema.as_str().into(),
            declaration.table_name.as_str().into(),
        ],
    )?;
    pending::note_deletions_queued();
    Ok(())
}

/// Runs as another role until dropped, the way PostgreSQL's own foreign key
/// triggers do. An error that unwinds past it restores the role too, and
/// PostgreSQL restores it at abort in any case.
struct AsUser {
    user: pg_sys::Oid,
    context: i32,
}

impl AsUser {
    fn switch(to: pg_sys::Oid) -> AsUser {
        let mut user = pg_sys::Oid::INVALID;
        let mut context = 0;
        // SAFETY: plain reads and writes of the backend's current user.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
            pg_sys::SetUserIdAndSecContext(
                to,
                context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
            );
        }
        AsUser { user, context }
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        // SAFETY: restores the values read in switch().
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) };
    }
}
