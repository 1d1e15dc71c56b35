//! Walking the rows of a declared column in batches, for migrate, verify
//! and unmigrate. Memory stays bounded whatever the table size.

use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, SpiClient};

use crate::declare::{self, key_array, Declaration};
use crate::errors::Failure;
use crate::resolve::row_identity;

/// Rows fetched from a declared table at a time.
const BATCH_ROWS: i64 = 100;

/// One row of a declared column.
pub struct Row {
    /// The table the row is stored in: a partition, for a partitioned table.
    /// A ctid is unique only within it.
    pub table_oid: pg_sys::Oid,
    pub ctid: String,
    /// The KV path this row's secret belongs at.
    pub path: String,
    /// Label that messages use for the row, such as `row (16) of public.maasserver_bmc`.
    pub label: String,
    /// The column's value as text, jsonb in its text form.
    pub value: Option<String>,
}

pub struct ColumnScan<'a> {
    declaration: &'a Declaration,
    pub is_json: bool,
    /// The length limit of a `varchar(n)` or `char(n)` column.
    pub max_chars: Option<usize>,
    qualified: String,
    column: String,
}

impl<'a> ColumnScan<'a> {
    /// Checks that the declared table and column still exist as declared.
    pub fn new(declaration: &'a Declaration) -> Result<Self, Failure> {
        let table = declare::find_table(&declaration.qualified_table()).map_err(|f| {
            f.hint("A declared table was dropped or renamed; declare it again under its new name.")
        })?;
        let column_type = declare::column_type(&table, &declaration.column_name)
            .map_err(|f| f.hint("A declared column was dropped or renamed: run vault_redirect.undeclare() for it, and declare the new name if there is one."))?;
        // A length-limited type stores its length plus 4 in atttypmod.
        let typmod = crate::query::select_value::<i32>(
            "SELECT atttypmod FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attname = $2",
            &[table.oid.into(), declaration.column_name.as_str().into()],
        )?
        .unwrap_or(-1);
        let limited = matches!(column_type.as_str(), "character varying" | "character");
        Ok(ColumnScan {
            declaration,
            is_json: column_type == "jsonb",
            max_chars: (limited && typmod > 4).then(|| (typmod - 4) as usize),
            qualified: table.qualified(),
            column: quote_identifier(&declaration.column_name),
        })
    }

    /// Reports whether migrate() moved the column to Vault.
    pub fn is_migrated(&self) -> bool {
        self.declaration.migrated
    }

    /// Returns the keys of a jsonb column that are secret, when not the
    /// whole value.
    pub fn secret_keys(&self) -> Option<&[String]> {
        self.declaration.secret_keys.as_deref()
    }

    /// Holds off writers to the table until the transaction ends; readers
    /// go on.
    pub fn lock(&self) -> Result<(), Failure> {
        Spi::run(&format!(
            "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
            self.qualified
        ))?;
        Ok(())
    }

    /// Returns the number of rows in the table.
    pub fn count_rows(&self) -> Result<i64, Failure> {
        Ok(crate::query::select_value::<i64>(
            &format!("SELECT count(*) FROM {}", self.qualified),
            &[],
        )?
        .unwrap_or(0))
    }

    /// Calls `visit` for every row, fetching them in batches.
    pub fn for_each(
        &self,
        mut visit: impl FnMut(&mut SpiClient<'_>, Row) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let keys = match &self.declaration.path_column {
            Some(path_column) => key_array("t", std::slice::from_ref(path_column)),
            None => key_array("t", &self.declaration.key_columns),
        };
        let select = format!(
            "SELECT t.ctid::text, {keys}, t.{}::text, t.tableoid FROM {} t",
            self.column, self.qualified
        );
        // Each batch runs in its own SPI connection, so that what SPI
        // allocates while the batch's rows are visited is freed at the end
        // of the batch. The cursor lives on between them, detached.
        let cursor = Spi::connect(|client| {
            client
                .try_open_cursor(select.as_str(), &[])
                .map(|cursor| cursor.detach_into_name())
        })?;
        loop {
            let finished = Spi::connect_mut(|client| {
                let mut open = client.find_cursor(&cursor)?;
                let mut batch = Vec::new();
                for row in open.fetch(BATCH_ROWS)? {
                    let ctid: String = row.get(1)?.unwrap_or_default();
                    let key_values: Vec<Option<String>> = row.get(2)?.unwrap_or_default();
                    let value: Option<String> = row.get(3)?;
                    let table_oid: pg_sys::Oid = row.get(4)?.unwrap_or(pg_sys::Oid::INVALID);
                    batch.push((table_oid, ctid, key_values, value));
                }
                free_last_result();
                if batch.is_empty() {
                    // Dropping the cursor closes it.
                    return Ok(true);
                }
                open.detach_into_name();
                for (table_oid, ctid, key_values, value) in batch {
                    let (path, label) = self.identify(&key_values);
                    visit(
                        client,
                        Row {
                            table_oid,
                            ctid,
                            path,
                            label,
                            value,
                        },
                    )?;
                }
                Ok::<_, Failure>(false)
            })?;
            if finished {
                return Ok(());
            }
        }
    }

    /// Replaces a row's value.
    pub fn update(
        &self,
        client: &mut SpiClient<'_>,
        row: &Row,
        value: &str,
    ) -> Result<(), Failure> {
        let update = format!(
            "UPDATE {} SET {} = $1::{} WHERE ctid = $2::tid AND tableoid = $3",
            self.qualified,
            self.column,
            if self.is_json { "jsonb" } else { "text" },
        );
        client.update(
            update.as_str(),
            None,
            &[value.into(), row.ctid.as_str().into(), row.table_oid.into()],
        )?;
        Ok(())
    }

    /// Replaces a row's value and returns what the row now holds, as text.
    pub fn update_returning(
        &self,
        client: &mut SpiClient<'_>,
        row: &Row,
        value: &str,
    ) -> Result<Option<String>, Failure> {
        let update = format!(
            "UPDATE {} SET {column} = $1::{} WHERE ctid = $2::tid AND tableoid = $3
             RETURNING {column}::text",
            self.qualified,
            if self.is_json { "jsonb" } else { "text" },
            column = self.column,
        );
        let stored = client
            .update(
                update.as_str(),
                None,
                &[value.into(), row.ctid.as_str().into(), row.table_oid.into()],
            )?
            .first()
            .get_one::<String>()?;
        free_last_result();
        Ok(stored)
    }

    /// Records whether the column is migrated.
    pub fn set_migrated(&self, migrated: bool) -> Result<(), Failure> {
        let declaration = self.declaration;
        Spi::run_with_args(
            "UPDATE vault_redirect.secret_columns
                SET migrated_at = CASE WHEN $4 THEN now() END
              WHERE table_schema = $1 AND table_name = $2 AND column_name = $3",
            &[
                declaration.table_schema.as_str().into(),
                declaration.table_name.as_str().into(),
                declaration.column_name.as_str().into(),
                migrated.into(),
            ],
        )?;
        Ok(())
    }

    /// Returns the KV path a row's value belongs at, and how messages name it.
    fn identify(&self, key_values: &[Option<String>]) -> (String, String) {
        let declaration = self.declaration;
        let table = declaration.display_table();
        match declaration.path_column {
            Some(_) => {
                let path = key_values.first().cloned().flatten().unwrap_or_default();
                let label = format!("row with path \"{path}\" of {table}");
                (path, label)
            }
            None => row_identity(
                &table,
                &declaration.path_prefix,
                key_values,
                &declaration.column_name,
            ),
        }
    }
}

/// Frees the result table of the last SPI command. pgrx leaves result
/// tables to SPI_finish, so a scan that runs many commands in one SPI
/// connection would otherwise keep every batch and every RETURNING result
/// until it ends, and memory would grow with the table.
fn free_last_result() {
    // SAFETY: SPI_tuptable is the result of the last command of this SPI
    // connection; its rows were copied out, and no reference to it remains.
    unsafe {
        if !pg_sys::SPI_tuptable.is_null() {
            pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable);
            pg_sys::SPI_tuptable = std::ptr::null_mut();
        }
    }
}
