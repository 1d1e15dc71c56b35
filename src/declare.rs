//! Declaring which columns hold secrets, and the resolved view of each
//! declared table.

use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal};
use pgrx::PgSqlErrorCode;

use crate::errors::{require_superuser, Failure, OrRaise};
use crate::vault::split_segments;

const DEFAULT_VIEW_SCHEMA: &str = "vault_redirect_resolved";

/// Key types whose text form does not depend on session settings, so that
/// a row's KV path is the same in every session.
const STABLE_KEY_TYPES: &[&str] = &[
    "smallint",
    "integer",
    "bigint",
    "numeric",
    "text",
    "character varying",
    "character",
    "uuid",
    "boolean",
];

/// A table named by the caller, resolved to its schema and name.
pub struct Table {
    pub oid: pg_sys::Oid,
    pub schema: String,
    pub name: String,
}

impl Table {
    pub fn qualified(&self) -> String {
        format!(
            "{}.{}",
            quote_identifier(&self.schema),
            quote_identifier(&self.name)
        )
    }

    /// Returns the name messages show, such as `public.maasserver_secret`.
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// One row of `vault_redirect.secret_columns`.
pub struct Declaration {
    pub table_schema: String,
    pub table_name: String,
    pub column_name: String,
    pub shape: String,
    pub path_column: Option<String>,
    pub key_columns: Vec<String>,
    pub path_prefix: String,
    /// The keys of a jsonb column that are secret, when not the whole value.
    pub secret_keys: Option<Vec<String>>,
    pub view_schema: String,
    /// Whether migrate() moved the column's values to Vault; from then on
    /// the write trigger redirects every plaintext written to it.
    pub migrated: bool,
}

impl Declaration {
    pub fn qualified_table(&self) -> String {
        format!(
            "{}.{}",
            quote_identifier(&self.table_schema),
            quote_identifier(&self.table_name)
        )
    }

    pub fn display_table(&self) -> String {
        format!("{}.{}", self.table_schema, self.table_name)
    }
}

/// Declares a key/value table such as MAAS's `maasserver_secret(path, value)`:
/// `path_column` gives each row's KV path under the secrets path and the
/// jsonb `value_column` is the KV data. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn declare_kv_table(
    table_name: &str,
    path_column: &str,
    value_column: &str,
    view_schema: default!(&str, "'vault_redirect_resolved'"),
) {
    require_superuser("vault_redirect.declare_kv_table");
    // Its queries must read the stored references, not resolved values.
    let _suspended = crate::transparent::Suspended::new();
    let table = find_table(table_name).or_raise();
    let path_type = column_type(&table, path_column).or_raise();
    if !matches!(path_type.as_str(), "text" | "character varying") {
        wrong_type(&table, path_column, &path_type, "text or varchar").raise();
    }
    let value_type = column_type(&table, value_column).or_raise();
    if value_type != "jsonb" {
        wrong_type(&table, value_column, &value_type, "jsonb").raise();
    }
    if !has_unique_index(&table, path_column).or_raise() {
        Failure::new(
            PgSqlErrorCode::ERRCODE_INVALID_COLUMN_REFERENCE,
            format!(
                "column \"{path_column}\" of {} is not unique",
                table.display()
            ),
        )
        .detail("Two rows with the same path would share one KV entry.")
        .hint(format!(
            "Add a primary key or unique constraint on \"{path_column}\" alone."
        ))
        .raise();
    }
    let declaration = Declaration {
        table_schema: table.schema.clone(),
        table_name: table.name.clone(),
        column_name: value_column.to_owned(),
        shape: "kv".into(),
        path_column: Some(path_column.to_owned()),
        key_columns: Vec::new(),
        path_prefix: String::new(),
        secret_keys: None,
        view_schema: view_schema.to_owned(),
        migrated: false,
    };
    record(&declaration).or_raise();
    rebuild_view(&table).or_raise();
    crate::redirect::install_triggers(&table).or_raise();
}

/// Declares a text or jsonb column of a wide table as a secret. Each row's
/// KV path is `path_prefix/<primary key values>/<column>`, the prefix being
/// `<schema>/<table>` unless given. For a jsonb column, `secret_keys` names
/// the keys whose values are secret, and the other keys stay in the row.
/// Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn declare_column(
    table_name: &str,
    column_name: &str,
    path_prefix: default!(Option<&str>, "NULL"),
    view_schema: default!(&str, "'vault_redirect_resolved'"),
    secret_keys: default!(Option<Vec<String>>, "NULL"),
) {
    require_superuser("vault_redirect.declare_column");
    // Its queries must read the stored references, not resolved values.
    let _suspended = crate::transparent::Suspended::new();
    let table = find_table(table_name).or_raise();
    let column_type = column_type(&table, column_name).or_raise();
    if !matches!(column_type.as_str(), "text" | "character varying" | "jsonb") {
        wrong_type(&table, column_name, &column_type, "text, varchar or jsonb").raise();
    }
    let key_columns = primary_key(&table).or_raise();
    if key_columns.is_empty() {
        Failure::new(
            PgSqlErrorCode::ERRCODE_INVALID_TABLE_DEFINITION,
            format!("table {} has no primary key", table.display()),
        )
        .detail("Each row's KV path is made from its primary key.")
        .hint("Add a primary key, or keep secrets in a key/value table and use declare_kv_table().")
        .raise();
    }
    for key in &key_columns {
        let key_type = self::column_type(&table, key).or_raise();
        if !STABLE_KEY_TYPES.contains(&key_type.as_str()) {
            Failure::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "primary key column \"{key}\" of {} has type {key_type}",
                    table.display()
                ),
            )
            .detail("KV paths are made from the key's text, and the text of this type depends on session settings such as TimeZone or DateStyle.")
            .hint(format!("Key the table by one of: {}.", STABLE_KEY_TYPES.join(", ")))
            .raise();
        }
    }
    if let Some(keys) = &secret_keys {
        check_secret_keys(&table, column_name, &column_type, keys);
    }
    if key_columns.iter().any(|k| k == column_name) {
        Failure::invalid_parameter("column_name", column_name, "it is part of the primary key")
            .hint("Declare a column that holds a secret, not one that identifies the row.")
            .raise();
    }
    let prefix = path_prefix
        .map(|p| p.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| format!("{}/{}", table.schema, table.name));
    if prefix == "_vault_redirect" || prefix.starts_with("_vault_redirect/") {
        Failure::new(
            PgSqlErrorCode::ERRCODE_RESERVED_NAME,
            format!("invalid path_prefix \"{prefix}\": \"_vault_redirect/\" is reserved"),
        )
        .hint("Choose a prefix outside \"_vault_redirect/\", which keeps the server markers.")
        .raise();
    }
    if let Err(e) = split_segments(&prefix) {
        Failure::invalid_parameter("path_prefix", &prefix, e.to_string())
            .hint("Give \"/\"-separated segments without a leading \"/\", empty, \".\" or \"..\" segment.")
            .raise();
    }
    let declaration = Declaration {
        table_schema: table.schema.clone(),
        table_name: table.name.clone(),
        column_name: column_name.to_owned(),
        shape: "column".into(),
        path_column: None,
        key_columns,
        path_prefix: prefix,
        secret_keys,
        view_schema: view_schema.to_owned(),
        migrated: false,
    };
    record(&declaration).or_raise();
    rebuild_view(&table).or_raise();
    crate::redirect::install_triggers(&table).or_raise();
}

/// Raises unless `keys` suits a jsonb column: one or more distinct, non-empty
/// keys, none of them the reference marker.
fn check_secret_keys(table: &Table, column: &str, column_type: &str, keys: &[String]) {
    let keys_text = format!("{{{}}}", keys.join(","));
    if column_type != "jsonb" {
        Failure::invalid_parameter(
            "secret_keys",
            &keys_text,
            format!(
                "column \"{column}\" of {} is {column_type}, not jsonb",
                table.display()
            ),
        )
        .hint("Give secret_keys only for a jsonb column; a text column is secret as a whole.")
        .raise();
    }
    let mut seen = std::collections::BTreeSet::new();
    for key in keys {
        let reason = if key.is_empty() {
            Some("a key is empty")
        } else if key == crate::reference::JSON_KEY {
            Some("the key \"$vault_redirect\" marks references")
        } else if !seen.insert(key) {
            Some("a key is given twice")
        } else {
            None
        };
        if let Some(reason) = reason {
            Failure::invalid_parameter("secret_keys", &keys_text, reason)
                .hint("Give each secret key once, such as ARRAY['power_pass', 'power_key'].")
                .raise();
        }
    }
    if keys.is_empty() {
        Failure::invalid_parameter("secret_keys", &keys_text, "no key is given")
            .hint("Give NULL to keep the whole value in Vault, or name the secret keys.")
            .raise();
    }
}

fn wrong_type(table: &Table, column: &str, found: &str, expected: &str) -> Failure {
    Failure::new(
        PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
        format!(
            "column \"{column}\" of {} has type {found}, not {expected}",
            table.display()
        ),
    )
    .hint("Declare a column of a supported type.")
}

pub fn find_table(table_name: &str) -> Result<Table, Failure> {
    let found = Spi::connect(|client| {
        let rows = client.select(
            "SELECT c.oid, n.nspname::text, c.relname::text
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = $1::regclass AND c.relkind IN ('r', 'p')",
            None,
            &[table_name.into()],
        )?;
        let mut table = None;
        for row in rows {
            if let (Some(oid), Some(schema), Some(name)) = (row.get(1)?, row.get(2)?, row.get(3)?) {
                table = Some(Table { oid, schema, name });
            }
        }
        Ok::<_, pgrx::spi::Error>(table)
    })?;
    found.ok_or_else(|| {
        Failure::new(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("\"{table_name}\" is not a table"),
        )
        .hint("Declare secret columns of ordinary or partitioned tables.")
    })
}

/// Returns the type of a column, without modifiers, or raises when the table
/// has no such column.
pub fn column_type(table: &Table, column: &str) -> Result<String, Failure> {
    // An aggregate returns one row even when the column is missing.
    let found = crate::query::select_value::<String>(
        "SELECT max(a.atttypid::regtype::text)
           FROM pg_catalog.pg_attribute a
          WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        &[table.oid.into(), column.into()],
    )?;
    found.ok_or_else(|| {
        Failure::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{column}\" of {} does not exist", table.display()),
        )
        .hint("Column names are case-sensitive here: give the name as the catalog spells it.")
    })
}

fn has_unique_index(table: &Table, column: &str) -> Result<bool, Failure> {
    let found = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (
             SELECT 1
               FROM pg_catalog.pg_index i
               JOIN pg_catalog.pg_attribute a
                 ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
              WHERE i.indrelid = $1 AND i.indisunique AND i.indnkeyatts = 1
                AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = $2)",
        &[table.oid.into(), column.into()],
    )?;
    Ok(found.unwrap_or(false))
}

/// Returns the primary key columns in key order, or none.
fn primary_key(table: &Table) -> Result<Vec<String>, Failure> {
    let columns = Spi::get_one_with_args::<Vec<String>>(
        "SELECT coalesce(array_agg(a.attname::text ORDER BY k.ord), '{}')
           FROM pg_catalog.pg_index i
           CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_catalog.pg_attribute a
             ON a.attrelid = i.indrelid AND a.attnum = k.attnum
          WHERE i.indrelid = $1 AND i.indisprimary",
        &[table.oid.into()],
    )?;
    Ok(columns.unwrap_or_default())
}

/// Inserts a declaration. Declaring the same thing twice does nothing;
/// declaring the same column differently is an error.
fn record(declaration: &Declaration) -> Result<(), Failure> {
    let existing = load_declarations(Some((&declaration.table_schema, &declaration.table_name)))?;
    if let Some(other) = existing
        .iter()
        .find(|d| d.view_schema != declaration.view_schema)
    {
        return Err(Failure::invalid_parameter(
            "view_schema",
            &declaration.view_schema,
            format!(
                "{} is already declared with view schema \"{}\"",
                declaration.display_table(),
                other.view_schema
            ),
        )
        .hint("All secret columns of one table share one resolved view."));
    }
    let clash = load_declarations(None)?.into_iter().find(|d| {
        d.table_name == declaration.table_name
            && d.view_schema == declaration.view_schema
            && d.table_schema != declaration.table_schema
    });
    if let Some(other) = clash {
        return Err(Failure::new(
            PgSqlErrorCode::ERRCODE_DUPLICATE_TABLE,
            format!(
                "the resolved view {}.{} already shows {}",
                declaration.view_schema,
                declaration.table_name,
                other.display_table()
            ),
        )
        .hint("Pass another view_schema for tables that share a name."));
    }
    check_namespace(declaration, &load_declarations(None)?)?;
    if let Some(same) = existing
        .iter()
        .find(|d| d.column_name == declaration.column_name)
    {
        let identical = same.shape == declaration.shape
            && same.path_column == declaration.path_column
            && same.key_columns == declaration.key_columns
            && same.path_prefix == declaration.path_prefix
            && same.secret_keys == declaration.secret_keys;
        if identical {
            return Ok(());
        }
        return Err(Failure::new(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!(
                "column \"{}\" of {} is already declared differently",
                declaration.column_name,
                declaration.display_table()
            ),
        )
        .hint("See vault_redirect.secret_columns; a declaration cannot change once made."));
    }
    Spi::run_with_args(
        "INSERT INTO vault_redirect.secret_columns
             (table_schema, table_name, column_name, shape, path_column,
              key_columns, path_prefix, view_schema, secret_keys)
         VALUES ($1, $2, $3, $4, $5, $6::name[], $7, $8, $9)",
        &[
            declaration.table_schema.as_str().into(),
            declaration.table_name.as_str().into(),
            declaration.column_name.as_str().into(),
            declaration.shape.as_str().into(),
            declaration.path_column.clone().into(),
            declaration.key_columns.clone().into(),
            declaration.path_prefix.as_str().into(),
            declaration.view_schema.as_str().into(),
            declaration.secret_keys.clone().into(),
        ],
    )?;
    Ok(())
}

/// Raises when a declaration would share KV paths with another table's:
/// a second key/value table, whose paths could be any other table's, or a
/// wide-table prefix equal to or inside another table's prefix.
fn check_namespace(declaration: &Declaration, all: &[Declaration]) -> Result<(), Failure> {
    let others = all.iter().filter(|d| {
        d.table_schema != declaration.table_schema || d.table_name != declaration.table_name
    });
    for other in others {
        if declaration.shape == "kv" && other.shape == "kv" {
            return Err(Failure::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "{} is already declared as the key/value table",
                    other.display_table()
                ),
            )
            .detail("The rows of a key/value table name their KV paths, so two such tables could replace each other's secrets.")
            .hint("Keep the secrets of both in one key/value table, or declare the columns of wide tables with declare_column()."));
        }
        if declaration.shape != "column" || other.shape != "column" {
            continue;
        }
        let (mine, theirs) = (&declaration.path_prefix, &other.path_prefix);
        let nested = mine == theirs
            || mine.starts_with(&format!("{theirs}/"))
            || theirs.starts_with(&format!("{mine}/"));
        if nested {
            return Err(Failure::invalid_parameter(
                "path_prefix",
                mine,
                format!(
                    "it overlaps \"{theirs}\", the prefix of {}.{}",
                    other.display_table(),
                    other.column_name
                ),
            )
            .hint(
                "Give each table a path_prefix of its own, neither equal to nor inside another's.",
            ));
        }
    }
    Ok(())
}

/// Loads the declarations, all of them or those of one table, in a stable
/// order.
pub fn load_declarations(table: Option<(&str, &str)>) -> Result<Vec<Declaration>, Failure> {
    let (schema, name) = table.unwrap_or(("", ""));
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT table_schema::text, table_name::text, column_name::text, shape,
                    path_column::text, key_columns::text[], path_prefix, view_schema::text,
                    migrated_at IS NOT NULL, secret_keys
               FROM vault_redirect.secret_columns
              WHERE $1 = '' OR (table_schema = $1 AND table_name = $2)
              ORDER BY table_schema, table_name, column_name",
            None,
            &[schema.into(), name.into()],
        )?;
        let mut declarations = Vec::new();
        for row in rows {
            declarations.push(Declaration {
                table_schema: row.get(1)?.unwrap_or_default(),
                table_name: row.get(2)?.unwrap_or_default(),
                column_name: row.get(3)?.unwrap_or_default(),
                shape: row.get(4)?.unwrap_or_default(),
                path_column: row.get(5)?,
                key_columns: row.get(6)?.unwrap_or_default(),
                path_prefix: row.get(7)?.unwrap_or_default(),
                view_schema: row.get(8)?.unwrap_or_default(),
                migrated: row.get(9)?.unwrap_or(false),
                secret_keys: row.get(10)?,
            });
        }
        Ok::<_, pgrx::spi::Error>(declarations)
    })
    .map_err(Failure::from)
}

/// Returns the SQL expression that yields the key values of a row as text[].
pub fn key_array(alias: &str, key_columns: &[String]) -> String {
    let items: Vec<String> = key_columns
        .iter()
        .map(|k| format!("{alias}.{}::text", quote_identifier(k)))
        .collect();
    format!("ARRAY[{}]", items.join(", "))
}

/// Creates or replaces the view that shows a declared table with its
/// secrets resolved: the same columns, names and types. It is a
/// security_invoker view, so the reader needs SELECT on the table itself,
/// and row-level security and column privileges apply as on the table.
fn rebuild_view(table: &Table) -> Result<(), Failure> {
    let declarations = load_declarations(Some((&table.schema, &table.name)))?;
    let Some(first) = declarations.first() else {
        return Ok(());
    };
    let view_schema = if first.view_schema.is_empty() {
        DEFAULT_VIEW_SCHEMA
    } else {
        first.view_schema.as_str()
    };
    let columns = Spi::connect(|client| {
        let rows = client.select(
            "SELECT attname::text, format_type(atttypid, atttypmod)
               FROM pg_catalog.pg_attribute
              WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
              ORDER BY attnum",
            None,
            &[table.oid.into()],
        )?;
        let mut columns = Vec::new();
        for row in rows {
            let name: String = row.get(1)?.unwrap_or_default();
            let type_name: String = row.get(2)?.unwrap_or_default();
            columns.push((name, type_name));
        }
        Ok::<_, pgrx::spi::Error>(columns)
    })?;
    let table_oid = format!("{}::regclass::oid", quote_literal(table.qualified()));
    let select_list: Vec<String> = columns
        .iter()
        .map(|(name, type_name)| {
            let column = format!("t.{}", quote_identifier(name));
            let Some(declaration) = declarations.iter().find(|d| &d.column_name == name) else {
                return column;
            };
            let expression = match declaration.path_column.as_deref() {
                Some(path_column) => format!(
                    "vault_redirect.resolve_kv({table_oid}, {}, t.{}::text, {column})",
                    quote_literal(name),
                    quote_identifier(path_column)
                ),
                None => {
                    let (function, cast) = if type_name == "jsonb" {
                        ("resolve_column_jsonb", "")
                    } else {
                        ("resolve_column_text", "::text")
                    };
                    format!(
                        "vault_redirect.{function}({table_oid}, {}, {}, {column}{cast})",
                        quote_literal(name),
                        key_array("t", &declaration.key_columns),
                    )
                }
            };
            format!("{expression}::{type_name} AS {}", quote_identifier(name))
        })
        .collect();
    let view = format!(
        "{}.{}",
        quote_identifier(view_schema),
        quote_identifier(&table.name)
    );
    let schema_exists = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
        &[view_schema.into()],
    )?;
    if schema_exists != Some(true) {
        Spi::run(&format!("CREATE SCHEMA {}", quote_identifier(view_schema)))?;
    }
    // CREATE OR REPLACE keeps the view's grants but cannot rename or drop
    // its columns, so a view whose columns no longer match is recreated.
    let existing = crate::query::select_value::<Vec<String>>(
        "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_catalog.pg_attribute
          WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
        &[view.as_str().into()],
    )?;
    let wanted: Vec<String> = columns.iter().map(|(name, _)| name.clone()).collect();
    if existing.is_some_and(|names| names != wanted) {
        Spi::run(&format!("DROP VIEW {view}"))?;
    }
    Spi::run(&format!(
        "CREATE OR REPLACE VIEW {view} WITH (security_invoker = true) AS\n SELECT {}\n   FROM {} t",
        select_list.join(",\n        "),
        table.qualified()
    ))?;
    Spi::run(&format!(
        "COMMENT ON VIEW {view} IS {}",
        quote_literal(format!(
            "{} with its secrets resolved from Vault at query time (vault_redirect)",
            table.display()
        ))
    ))?;
    Ok(())
}

/// Removes a declaration, for a column that was dropped or renamed, or one
/// that should no longer be treated as secret. A column that still holds
/// references is refused: run unmigrate() first. Rebuilds the table's view,
/// or drops it when no declared column is left. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn undeclare(table_schema: &str, table_name: &str, column_name: &str) {
    require_superuser("vault_redirect.undeclare");
    // Its queries must read the stored references, not resolved values.
    let _suspended = crate::transparent::Suspended::new();
    let declaration = load_declarations(Some((table_schema, table_name)))
        .or_raise()
        .into_iter()
        .find(|d| d.column_name == column_name)
        .unwrap_or_else(|| {
            Failure::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("column \"{column_name}\" of {table_schema}.{table_name} is not declared"),
            )
            .hint("See vault_redirect.secret_columns for what is declared.")
            .raise()
        });
    let table = find_table(&declaration.qualified_table()).ok();
    let column_exists = table
        .as_ref()
        .is_some_and(|t| column_type(t, column_name).is_ok());
    if column_exists {
        let references = crate::query::select_value::<bool>(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM {} t WHERE t.{col}::text LIKE '%$vault_redirect%')",
                declaration.qualified_table(),
                col = quote_identifier(column_name)
            ),
            &[],
        )
        .or_raise()
        .unwrap_or(false);
        if references {
            Failure::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "column \"{column_name}\" of {} still holds references to Vault",
                    declaration.display_table()
                ),
            )
            .hint("Run vault_redirect.unmigrate() first, so that the secrets are back in the rows.")
            .raise();
        }
    }
    Spi::run_with_args(
        "DELETE FROM vault_redirect.secret_columns
          WHERE table_schema = $1 AND table_name = $2 AND column_name = $3",
        &[table_schema.into(), table_name.into(), column_name.into()],
    )
    .map_err(Failure::from)
    .or_raise();
    let remaining = load_declarations(Some((table_schema, table_name))).or_raise();
    if let (Some(table), true) = (&table, remaining.is_empty()) {
        crate::redirect::drop_triggers(&table.qualified()).or_raise();
    }
    match (&table, remaining.is_empty()) {
        (Some(table), false) => rebuild_view(table).or_raise(),
        _ => Spi::run(&format!(
            "DROP VIEW IF EXISTS {}.{}",
            quote_identifier(&declaration.view_schema),
            quote_identifier(table_name)
        ))
        .map_err(Failure::from)
        .or_raise(),
    }
}
