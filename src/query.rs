//! Read-only SPI helpers. pgrx's `Spi::get_*` run in read-write mode and
//! assign a transaction ID, which a hot standby refuses, so every catalog
//! or configuration read that may run on a standby goes through here.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum};

use crate::errors::Failure;

/// Returns the first column of the first row, or `None` when there is no
/// row or the value is NULL.
pub fn select_value<T: FromDatum + IntoDatum>(
    query: &str,
    args: &[DatumWithOid<'_>],
) -> Result<Option<T>, Failure> {
    Spi::connect(|client| {
        let rows = client.select(query, Some(1), args)?;
        match rows.into_iter().next() {
            Some(row) => row.get::<T>(1),
            None => Ok(None),
        }
    })
    .map_err(Failure::from)
}

/// Returns how many columns are declared, and how many of them migrated.
pub fn declared_columns() -> Result<(i64, i64), Failure> {
    let declared = select_value::<i64>("SELECT count(*) FROM vault_redirect.secret_columns", &[])?;
    let migrated = select_value::<i64>(
        "SELECT count(migrated_at) FROM vault_redirect.secret_columns",
        &[],
    )?;
    Ok((declared.unwrap_or(0), migrated.unwrap_or(0)))
}

/// The snapshot of an SPI query that runs inside another statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Snapshot {
    /// The calling statement's own snapshot, as a STABLE function gets it.
    /// Rows written by that statement are not visible, rows it deleted are.
    Statement,
    /// A new snapshot taken after a command counter increment, as a
    /// VOLATILE function gets it. Rows the calling statement inserted or
    /// updated so far are visible, rows it deleted are not.
    Fresh,
}

/// Runs a SELECT with SPI's read_only flag set by `snapshot` and returns up
/// to `limit` rows (0: all). Each row has one entry per column, `None` for
/// NULL.
///
/// pgrx's own `select` picks the flag from whether the transaction has
/// written, so the same call would see different rows before and after the
/// first write of a transaction. Only by-value columns (oid, int2, int4,
/// bool) may be selected: the datums outlive the SPI memory.
pub fn select_by_value(
    query: &str,
    args: &[DatumWithOid<'_>],
    snapshot: Snapshot,
    limit: i64,
) -> Result<Vec<Vec<Option<pg_sys::Datum>>>, Failure> {
    let command = std::ffi::CString::new(query)
        .map_err(|_| Failure::spi("query text contains a NUL byte"))?;
    let mut types: Vec<pg_sys::Oid> = args.iter().map(|arg| arg.oid()).collect();
    let mut values: Vec<pg_sys::Datum> = args
        .iter()
        .map(|arg| match arg.datum() {
            Some(datum) => datum.sans_lifetime(),
            None => pg_sys::Datum::from(0usize),
        })
        .collect();
    let nulls: Vec<std::os::raw::c_char> = args
        .iter()
        .map(|arg| if arg.datum().is_some() { b' ' } else { b'n' } as std::os::raw::c_char)
        .collect();
    Spi::connect(|_client| {
        // SAFETY: the argument arrays have one entry per argument and live
        // until the call returns. The tuple table belongs to this SPI
        // connection and is read before it closes.
        unsafe {
            let status = pg_sys::SPI_execute_with_args(
                command.as_ptr(),
                args.len() as i32,
                types.as_mut_ptr(),
                values.as_mut_ptr(),
                nulls.as_ptr(),
                snapshot == Snapshot::Statement,
                limit,
            );
            if status != pg_sys::SPI_OK_SELECT as i32 {
                return Err(Failure::spi(format!("SPI status {status}")));
            }
            let table = pg_sys::SPI_tuptable;
            let descriptor = (*table).tupdesc;
            let mut rows = Vec::new();
            for i in 0..pg_sys::SPI_processed as usize {
                let tuple = *(*table).vals.add(i);
                let mut row = Vec::new();
                for column in 1..=(*descriptor).natts {
                    let mut is_null = false;
                    let datum = pg_sys::SPI_getbinval(tuple, descriptor, column, &mut is_null);
                    row.push((!is_null).then_some(datum));
                }
                rows.push(row);
            }
            Ok(rows)
        }
    })
}
