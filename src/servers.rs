//! The registry of PostgreSQL servers that resolve secrets, and whether
//! each has its own Vault configuration.
//!
//! A standby cannot write tables, so each server records itself in Vault:
//! `configure()` writes a marker entry at `_vault_redirect/servers/<name>`
//! under the secrets path. The primary expects the servers that the
//! operator listed in `vault_redirect.servers` plus every standby streaming
//! from it (`pg_stat_replication.application_name`, which is the standby's
//! `cluster_name` unless its `primary_conninfo` sets another). The
//! integration is complete when every expected server has a marker and
//! every declared column is migrated.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use serde_json::json;

use crate::backend;
use crate::config::ServerConfig;
use crate::errors::{require_superuser, Failure, OrRaise};
use crate::vault::{KvPath, VaultClient, VaultError};

/// Folder under the secrets path that contains one marker per server. Rows
/// of a key/value table may not use paths in it.
pub const REGISTRY: &str = "_vault_redirect/servers";

/// Returns the name this server registers under by default: its
/// `cluster_name`, or the host name when that is empty.
pub fn default_server_name() -> String {
    // SAFETY: cluster_name is a GUC string that PostgreSQL keeps valid.
    let cluster = unsafe {
        let name = pg_sys::cluster_name;
        if name.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    };
    if !cluster.is_empty() {
        return cluster;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Checks a server name: one non-empty path segment.
pub fn check_server_name(name: &str) -> Result<KvPath, Failure> {
    let invalid = |reason: &str| {
        Failure::invalid_parameter("server_name", name, reason)
            .hint("Use the server's cluster_name, without \"/\".")
    };
    if name.contains('/') {
        return Err(invalid("it contains \"/\""));
    }
    KvPath::parse(&format!("{REGISTRY}/{name}")).map_err(|e| invalid(&e.to_string()))
}

/// Writes this server's marker.
pub fn register(client: &mut VaultClient, config: &ServerConfig) -> Result<(), Failure> {
    let path = check_server_name(&config.server_name)?;
    // SAFETY: reads a flag of this backend.
    let standby = unsafe { pg_sys::RecoveryInProgress() };
    let marker = json!({
        "server": config.server_name,
        "role": if standby { "standby" } else { "primary" },
        "configured_at": config.configured_at,
        "extension_version": env!("CARGO_PKG_VERSION"),
    });
    let data = marker.as_object().cloned().unwrap_or_default();
    client.kv_write(&path, &data, None)?;
    Ok(())
}

/// Returns the names of the servers that have a marker in Vault.
pub fn configured_servers(client: &mut VaultClient) -> Result<BTreeSet<String>, VaultError> {
    let registry = KvPath::parse(REGISTRY)?;
    Ok(client
        .kv_list(Some(&registry))?
        .into_iter()
        .filter(|name| !name.ends_with('/'))
        .collect())
}

/// Returns the servers this one expects, with where each expectation comes
/// from: `declared` by the operator, `replication` for a streaming standby,
/// `this server` for the server itself.
fn expected_servers(this_server: &str) -> Result<BTreeMap<String, &'static str>, Failure> {
    let mut expected = BTreeMap::new();
    let (declared, standbys) = Spi::connect(|client| {
        let mut declared = Vec::new();
        for row in client.select("SELECT name FROM vault_redirect.servers", None, &[])? {
            declared.extend(row.get::<String>(1)?);
        }
        let mut standbys = Vec::new();
        let query = "SELECT DISTINCT application_name::text FROM pg_catalog.pg_stat_replication
                      WHERE application_name <> ''";
        for row in client.select(query, None, &[])? {
            standbys.extend(row.get::<String>(1)?);
        }
        Ok::<_, pgrx::spi::Error>((declared, standbys))
    })?;
    for name in declared {
        expected.insert(name, "declared");
    }
    for name in standbys {
        expected.entry(name).or_insert("replication");
    }
    expected.insert(this_server.to_owned(), "this server");
    Ok(expected)
}

/// The state of the integration, as the status page shows it.
pub struct Integration {
    /// `complete`, `servers_missing`, `not_migrated` or `not_configured`.
    pub state: &'static str,
    /// Expected servers without a marker, sorted.
    pub missing: Vec<String>,
    pub expected: BTreeMap<String, &'static str>,
    pub configured: BTreeSet<String>,
}

impl Integration {
    /// Returns the reminder an operator should see, or `None` when complete.
    pub fn reminder(&self) -> Option<String> {
        reminder(self.state, &self.missing)
    }
}

/// Returns the reminder for an integration state, or `None` when there is
/// nothing to remind of.
pub fn reminder(state: &str, missing: &[String]) -> Option<String> {
    match state {
        "servers_missing" => Some(format!(
            "vault_redirect integration is incomplete: configure {} other server(s): {}",
            missing.len(),
            missing.join(", ")
        )),
        "not_migrated" => Some(
            "vault_redirect integration is incomplete: every server is configured, but the secrets are not migrated yet; run vault_redirect.migrate()".to_owned(),
        ),
        "not_configured" => Some("vault_redirect is not configured on this server".to_owned()),
        _ => None,
    }
}

/// Reports whether every declared column is migrated.
pub fn all_migrated() -> Result<bool, Failure> {
    let (declared, migrated) = crate::query::declared_columns()?;
    Ok(declared > 0 && migrated == declared)
}

/// Works out the integration state. Needs Vault when this server is
/// configured, to list the markers.
pub fn integration() -> Result<Integration, Failure> {
    let Some(config) = backend::current_config()? else {
        return Ok(Integration {
            state: "not_configured",
            missing: Vec::new(),
            expected: BTreeMap::new(),
            configured: BTreeSet::new(),
        });
    };
    let expected = expected_servers(&config.server_name)?;
    let configured = backend::with_client(|client, _| Ok(configured_servers(client)?))?;
    let missing: Vec<String> = expected
        .keys()
        .filter(|name| !configured.contains(*name))
        .cloned()
        .collect();
    let state = if !missing.is_empty() {
        "servers_missing"
    } else if !all_migrated()? {
        "not_migrated"
    } else {
        "complete"
    };
    Ok(Integration {
        state,
        missing,
        expected,
        configured,
    })
}

thread_local! {
    static REMINDED: Cell<bool> = const { Cell::new(false) };
}

/// Records that this session needs no reminder, because it just saw the
/// state in a WARNING or is completing the integration itself.
pub fn mark_reminded() {
    REMINDED.with(|r| r.set(true));
}

/// Shows a NOTICE the first time a superuser's session uses Vault while the
/// integration is incomplete. Other roles get no NOTICE: they may not read
/// the extension's tables, and the reminder is for administrators. A failure
/// to work out the state is only recorded for status().
pub fn remind_once() {
    if REMINDED.with(|r| r.replace(true)) {
        return;
    }
    // SAFETY: superuser() only reads the current user's catalog entry.
    if !unsafe { pg_sys::superuser() } {
        return;
    }
    match integration() {
        Ok(integration) => {
            if let Some(reminder) = integration.reminder() {
                pgrx::notice!("{reminder}");
            }
        }
        Err(failure) => backend::record_error(&failure.message),
    }
}

/// Adds a server that must be configured before migrate() may run, such as
/// a standby that is not streaming right now. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn add_server(server_name: &str) {
    require_superuser("vault_redirect.add_server");
    check_server_name(server_name).or_raise();
    Spi::run_with_args(
        "INSERT INTO vault_redirect.servers (name) VALUES ($1) ON CONFLICT DO NOTHING",
        &[server_name.into()],
    )
    .map_err(Failure::from)
    .or_raise();
}

/// Removes a server from the expected ones. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn remove_server(server_name: &str) -> bool {
    require_superuser("vault_redirect.remove_server");
    Spi::get_one_with_args::<bool>(
        "WITH gone AS (DELETE FROM vault_redirect.servers WHERE name = $1 RETURNING 1)
         SELECT count(*) > 0 FROM gone",
        &[server_name.into()],
    )
    .map_err(Failure::from)
    .or_raise()
    .unwrap_or(false)
}

/// Lists every server that is expected or has a marker in Vault, and
/// whether it is configured. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn servers() -> TableIterator<
    'static,
    (
        name!(server_name, String),
        name!(expected_as, Option<String>),
        name!(configured, bool),
        name!(this_server, bool),
    ),
> {
    require_superuser("vault_redirect.servers");
    let integration = integration().or_raise();
    let this_server = backend::current_config()
        .or_raise()
        .map(|c| c.server_name)
        .unwrap_or_else(default_server_name);
    let names: BTreeSet<String> = integration
        .expected
        .keys()
        .chain(integration.configured.iter())
        .cloned()
        .collect();
    let rows: Vec<_> = names
        .into_iter()
        .map(|name| {
            let expected_as = integration.expected.get(&name).map(|s| (*s).to_owned());
            let configured = integration.configured.contains(&name);
            let this = name == this_server;
            (name, expected_as, configured, this)
        })
        .collect();
    TableIterator::new(rows)
}

/// Raises when the integration is not ready for migrate(): this server not
/// configured, or other expected servers missing their configuration.
pub fn check_all_configured() -> Result<(), Failure> {
    if backend::current_config()?.is_none() {
        return Err(Failure::not_configured());
    }
    let integration = integration()?;
    if !integration.missing.is_empty() {
        return Err(Failure::new(
            PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
            format!(
                "vault_redirect is not configured on: {}",
                integration.missing.join(", ")
            ),
        )
        .detail("Every server that resolves secrets needs its own Vault configuration before the secrets move.")
        .hint("Run vault_redirect.configure() on each of them; vault_redirect.servers() lists them all."));
    }
    Ok(())
}
