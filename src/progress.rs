//! Progress of a running migration, for other sessions and the operator.
//!
//! The migrating backend rewrites `$PGDATA/vault_redirect.progress` (a small
//! JSON file, replaced atomically) every few seconds and sends a NOTICE.
//! A table could not serve: its rows stay invisible to other sessions until
//! the migration's transaction commits. `migration_progress()` reads the file
//! and reports whether the migration still runs by looking for the backend's
//! advisory lock.

use std::fs;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use serde_json::{json, Value};

use crate::backend;
use crate::errors::{Failure, OrRaise};
use crate::query::select_value;

const FILE_NAME: &str = "vault_redirect.progress";
/// How often the file is rewritten and a NOTICE sent.
const REPORT_EVERY: Duration = Duration::from_secs(2);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Counts the rows of one declared column as a migration walks them.
pub struct Progress {
    table: String,
    column: String,
    total: i64,
    done: i64,
    started: Instant,
    started_unix: f64,
    last_report: Instant,
}

impl Progress {
    pub fn start(table: String, column: String, total: i64) -> Progress {
        let now = Instant::now();
        let progress = Progress {
            table,
            column,
            total,
            done: 0,
            started: now,
            started_unix: unix_now(),
            last_report: now,
        };
        progress.write();
        progress
    }

    /// Counts one row, and reports when the last report is old enough.
    pub fn row_done(&mut self) {
        self.done += 1;
        if self.last_report.elapsed() >= REPORT_EVERY {
            self.last_report = Instant::now();
            self.write();
            pgrx::notice!(
                "vault_redirect: migrated {} of {} rows of {}.{} ({:.0} rows/s)",
                self.done,
                self.total,
                self.table,
                self.column,
                self.rate()
            );
        }
    }

    pub fn finish(&self) {
        self.write();
    }

    fn rate(&self) -> f64 {
        let seconds = self.started.elapsed().as_secs_f64();
        if seconds > 0.0 {
            self.done as f64 / seconds
        } else {
            0.0
        }
    }

    /// Replaces the progress file. A failure only costs the report, so it
    /// is logged and not raised.
    fn write(&self) {
        let body = json!({
            "pid": std::process::id(),
            "table": self.table,
            "column": self.column,
            "rows_done": self.done,
            "rows_total": self.total,
            "rows_per_second": self.rate(),
            "started_at": self.started_unix,
            "updated_at": unix_now(),
        });
        let path = backend::data_dir().join(FILE_NAME);
        let temp = path.with_extension(format!("progress.tmp.{}", std::process::id()));
        let written = fs::write(&temp, body.to_string()).and_then(|()| fs::rename(&temp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            pgrx::log!("vault_redirect: could not write the progress file: {e}");
        }
    }
}

/// Shows the progress of the latest migration: the column being migrated,
/// rows done and in total, the rate, and whether it still runs. Returns no
/// row when no migration has run on this server.
#[allow(clippy::type_complexity)] // pgrx needs the row type spelled out here
#[pg_extern(volatile, parallel_unsafe)]
fn migration_progress() -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(running, bool),
        name!(table_name, String),
        name!(column_name, String),
        name!(rows_done, i64),
        name!(rows_total, i64),
        name!(rows_per_second, f64),
        name!(started_at, TimestampWithTimeZone),
        name!(updated_at, TimestampWithTimeZone),
    ),
> {
    let path = backend::data_dir().join(FILE_NAME);
    let Ok(text) = fs::read_to_string(&path) else {
        return TableIterator::new(Vec::new());
    };
    let Ok(value) = serde_json::from_str::<Value>(&text) else {
        return TableIterator::new(Vec::new());
    };
    let pid = value["pid"].as_i64().unwrap_or(0) as i32;
    let running = select_value::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks
                         WHERE locktype = 'advisory' AND pid = $1 AND granted
                           AND classid = $2 AND objid = $3 AND objsubid = 1)",
        &[
            pid.into(),
            pg_sys::Oid::from((crate::migrate::LOCK_KEY >> 32) as u32).into(),
            pg_sys::Oid::from(crate::migrate::LOCK_KEY as u32).into(),
        ],
    )
    .or_raise()
    .unwrap_or(false);
    // PostgreSQL timestamps count microseconds from 2000-01-01 UTC.
    let timestamp = |field: &str| {
        let seconds = value[field].as_f64().unwrap_or(0.0) - 946_684_800.0;
        TimestampWithTimeZone::try_from((seconds * 1_000_000.0) as pg_sys::TimestampTz)
            .map_err(|e| {
                Failure::new(
                    pgrx::PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
                    format!("invalid {field} in the progress file: {e}"),
                )
            })
            .or_raise()
    };
    let text_field = |field: &str| value[field].as_str().unwrap_or_default().to_owned();
    TableIterator::new(vec![(
        pid,
        running,
        text_field("table"),
        text_field("column"),
        value["rows_done"].as_i64().unwrap_or(0),
        value["rows_total"].as_i64().unwrap_or(0),
        value["rows_per_second"].as_f64().unwrap_or(0.0),
        timestamp("started_at"),
        timestamp("updated_at"),
    )])
}
