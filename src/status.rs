//! `vault_redirect.status()`: what an operator runs first. It never raises
//! because Vault is down; it reports what it found.

use pgrx::prelude::*;

use crate::backend;
use crate::errors::{Failure, OrRaise};

/// Reports the configuration of this server and the state of Vault.
#[allow(clippy::type_complexity)] // pgrx needs the row type spelled out here
#[pg_extern(volatile, parallel_unsafe)]
fn status() -> TableIterator<
    'static,
    (
        name!(configured, bool),
        name!(url, Option<String>),
        name!(secrets_mount, Option<String>),
        name!(secrets_path, Option<String>),
        name!(declared_columns, i64),
        name!(migrated, bool),
        name!(reachable, bool),
        name!(sealed, Option<bool>),
        name!(initialized, Option<bool>),
        name!(server_version, Option<String>),
        name!(token_ttl_seconds, Option<i64>),
        name!(error, Option<String>),
    ),
> {
    let (declared, migrated) = Spi::get_two::<i64, i64>(
        "SELECT count(*), count(migrated_at) FROM vault_redirect.secret_columns",
    )
    .map_err(Failure::from)
    .or_raise();
    let declared = declared.unwrap_or(0);
    let migrated = declared > 0 && migrated.unwrap_or(0) == declared;

    let config = match backend::current_config() {
        Ok(config) => config,
        Err(failure) => {
            let row = (
                false,
                None,
                None,
                None,
                declared,
                migrated,
                false,
                None,
                None,
                None,
                None,
                Some(failure.message),
            );
            return TableIterator::new(vec![row]);
        }
    };
    let Some(config) = config else {
        let row = (
            false, None, None, None, declared, migrated, false, None, None, None, None, None,
        );
        return TableIterator::new(vec![row]);
    };

    let health = backend::client_for(&config, false)
        .and_then(|client| client.seal_status().map_err(Failure::from));
    let (reachable, sealed, initialized, version, error) = match health {
        Ok(seal) => (
            true,
            Some(seal.sealed),
            Some(seal.initialized),
            Some(seal.version),
            None,
        ),
        Err(failure) => (false, None, None, None, Some(failure.message)),
    };
    TableIterator::new(vec![(
        true,
        Some(config.url),
        Some(config.secrets_mount),
        Some(config.secrets_path),
        declared,
        migrated,
        reachable,
        sealed,
        initialized,
        version,
        backend::token_ttl_seconds(),
        error,
    )])
}
