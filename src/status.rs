//! `vault_redirect.status()`: the first check an operator runs. Vault being
//! down or sealed is reported in its row, never raised as an error.

use std::time::Instant;

use pgrx::prelude::*;

use crate::backend;
use crate::errors::{Failure, OrRaise};
use crate::servers;

/// Result of the health probe.
#[derive(Default)]
struct Health {
    reachable: bool,
    sealed: Option<bool>,
    initialized: Option<bool>,
    version: Option<String>,
    round_trip_ms: Option<f64>,
    error: Option<String>,
}

/// Reports the configuration of this server and the state of Vault.
#[allow(clippy::type_complexity)] // pgrx needs the row type spelled out here
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn status() -> TableIterator<
    'static,
    (
        name!(configured, bool),
        name!(server_name, Option<String>),
        name!(integration, String),
        name!(missing_servers, Vec<String>),
        name!(url, Option<String>),
        name!(secrets_mount, Option<String>),
        name!(secrets_path, Option<String>),
        name!(declared_columns, i64),
        name!(migrated, bool),
        name!(reachable, bool),
        name!(sealed, Option<bool>),
        name!(initialized, Option<bool>),
        name!(server_version, Option<String>),
        name!(round_trip_ms, Option<f64>),
        name!(token_ttl_seconds, Option<i64>),
        name!(last_error, Option<String>),
        name!(error, Option<String>),
    ),
> {
    let (declared, migrated) = crate::query::declared_columns().or_raise();
    let migrated = declared > 0 && migrated == declared;

    let (config, health) = match backend::current_config() {
        Ok(Some(config)) => {
            let health = probe(&config);
            (Some(config), health)
        }
        Ok(None) => (None, Health::default()),
        Err(failure) => (
            None,
            Health {
                error: Some(failure.message),
                ..Health::default()
            },
        ),
    };
    let configured = config.is_some();
    let (integration, missing) = match (configured, health.reachable) {
        (false, _) => ("not_configured".to_owned(), Vec::new()),
        (true, false) => ("unknown".to_owned(), Vec::new()),
        (true, true) => match servers::integration() {
            Ok(found) => (found.state.to_owned(), found.missing.clone()),
            Err(failure) => {
                backend::record_error(&failure.message);
                ("unknown".to_owned(), Vec::new())
            }
        },
    };
    if let Some(reminder) = servers::reminder(&integration, &missing) {
        pgrx::warning!("{reminder}");
    }
    servers::mark_reminded();
    let (server_name, url, mount, path) = match config {
        Some(c) => (
            Some(c.server_name),
            Some(c.url),
            Some(c.secrets_mount),
            Some(c.secrets_path),
        ),
        None => (None, None, None, None),
    };
    TableIterator::new(vec![(
        configured,
        server_name,
        integration,
        missing,
        url,
        mount,
        path,
        declared,
        migrated,
        health.reachable,
        health.sealed,
        health.initialized,
        health.version,
        health.round_trip_ms,
        backend::token_ttl_seconds(),
        backend::last_error(),
        health.error,
    )])
}

/// Asks `sys/seal-status`, which needs no token, and times the response.
fn probe(config: &crate::config::ServerConfig) -> Health {
    let started = Instant::now();
    let answer = backend::client_for(config, false)
        .and_then(|client| client.seal_status().map_err(Failure::from));
    match answer {
        Ok(seal) => Health {
            reachable: true,
            sealed: Some(seal.sealed),
            initialized: Some(seal.initialized),
            version: Some(seal.version),
            round_trip_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
            error: None,
        },
        Err(failure) => {
            backend::record_error(&failure.message);
            Health {
                error: Some(failure.message),
                ..Health::default()
            }
        }
    }
}
