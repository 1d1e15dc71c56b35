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
