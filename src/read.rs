//! Raw reads of a KV entry under the secrets path, for roles granted them.

use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};

use crate::backend;
use crate::errors::{Failure, OrRaise};
use crate::reference;
use crate::vault::{KvEntry, KvPath};

/// Reads the latest version of the entry at `path` under the secrets path.
/// A secret this transaction wrote and has not committed yet is returned
/// as it will be written, with version 0.
pub fn fetch(path: &str) -> Result<KvEntry, Failure> {
    fetch_with(path, false)
}

/// Like fetch(), and with `proposals`, also returns what an INSERT of the
/// running statement proposes for the path.
pub fn fetch_with(path: &str, proposals: bool) -> Result<KvEntry, Failure> {
    crate::servers::remind_once();
    let path = KvPath::parse(path)?;
    if let Some(data) = crate::pending::lookup(&path, proposals) {
        return Ok(KvEntry { data, version: 0 });
    }
    backend::with_client(|client, _| Ok(client.kv_read(&path)?))
}

/// Returns one key of the entry at `path`, as text. Not executable by PUBLIC.
#[pg_extern(volatile, parallel_unsafe)]
fn read(path: &str, key: default!(&str, "'secret'")) -> Option<String> {
    let entry = fetch(path).or_raise();
    reference::kv_to_text(&entry.data, key)
        .map_err(|reason| {
            Failure::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("no key \"{key}\" in the secret at \"{path}\""),
            )
            .detail(reason)
            .hint("Use vault_redirect.read_json(path) to see the whole entry.")
        })
        .or_raise()
}

/// Returns the whole entry at `path` as a JSON object. Not executable by PUBLIC.
#[pg_extern(volatile, parallel_unsafe)]
fn read_json(path: &str) -> JsonB {
    JsonB(serde_json::Value::Object(fetch(path).or_raise().data))
}
