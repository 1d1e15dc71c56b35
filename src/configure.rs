//! `vault_redirect.configure()`: unwraps the AppRole secret_id, logs in,
//! probes the policy and only then replaces the configuration file.

use std::time::{SystemTime, UNIX_EPOCH};

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use serde_json::{json, Map, Value};

use crate::backend;
use crate::config::{self, ServerConfig};
use crate::errors::{log_without_statement, require_superuser, Failure, OrRaise};
use crate::servers;
use crate::vault::{split_segments, KvPath, Secret, VaultClient, VaultError};

/// Configures this server's Vault access. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn configure(
    url: &str,
    role_id: &str,
    wrapped_token: &str,
    secrets_path: &str,
    secrets_mount: default!(&str, "'secret'"),
    server_name: default!(Option<&str>, "NULL"),
) {
    require_superuser("vault_redirect.configure");
    let server_name = server_name
        .map(str::to_owned)
        .unwrap_or_else(servers::default_server_name);
    let config = run(
        url,
        role_id,
        wrapped_token,
        secrets_path,
        secrets_mount,
        &server_name,
    )
    .or_raise();
    backend::forget_session();
    log_without_statement(&format!(
        "vault_redirect: server \"{}\" configured for {} with KV mount \"{}\" and secrets path \"{}\"",
        config.server_name, config.url, config.secrets_mount, config.secrets_path
    ));
    servers::mark_reminded();
    match servers::integration() {
        Ok(integration) => {
            if let Some(reminder) = integration.reminder() {
                pgrx::warning!("{reminder}");
            }
        }
        Err(failure) => pgrx::warning!(
            "vault_redirect: could not check the other servers: {}",
            failure.message
        ),
    }
}

fn run(
    url: &str,
    role_id: &str,
    wrapped_token: &str,
    secrets_path: &str,
    secrets_mount: &str,
    server_name: &str,
) -> Result<ServerConfig, Failure> {
    servers::check_server_name(server_name)?;
    let url = backend::parse_url(url)?
        .as_str()
        .trim_end_matches('/')
        .to_owned();
    let secrets_mount = clean_prefix("secrets_mount", secrets_mount)?;
    let secrets_path = clean_prefix("secrets_path", secrets_path)?;
    if role_id.trim().is_empty() {
        return Err(
            Failure::invalid_parameter("role_id", role_id, "it is empty")
                .hint("Read it with: vault read auth/approle/role/ROLE/role-id"),
        );
    }
    let wrapped = Secret::new(wrapped_token.trim());
    if wrapped.is_empty() {
        return Err(Failure::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid wrapped_token: it is empty",
        )
        .hint("Create one with: vault write -wrap-ttl=5m -f auth/approle/role/ROLE/secret-id"));
    }

    let mut config = ServerConfig {
        url,
        auth_mount: String::new(),
        role_id: role_id.trim().to_owned(),
        secret_id: Secret::new(""),
        secrets_mount,
        secrets_path,
        server_name: server_name.to_owned(),
        data_dir_id: config::data_dir_id(&backend::data_dir())?,
        database_oid: backend::database_oid(),
        database_name: backend::database_name(),
        configured_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    backend::check_database_owns_config()?;
    let mut client = backend::client_for(&config, false)?;

    let info = client.wrapping_lookup(&wrapped)?;
    config.auth_mount = approle_mount(&info.creation_path)
        .ok_or(VaultError::NotASecretIdToken {
            creation_path: info.creation_path.clone(),
        })?
        .to_owned();
    config.secret_id = client.unwrap_secret_id(&wrapped)?;
    client.set_approle(crate::vault::AppRole {
        auth_mount: config.auth_mount.clone(),
        role_id: config.role_id.clone(),
        secret_id: config.secret_id.clone(),
    });
    client.login().map_err(|e| {
        Failure::from(e).hint(
            "Check the role_id. The wrapped token is used up: ask for a new wrapped secret_id and run vault_redirect.configure() again.",
        )
    })?;
    probe(&mut client)?;
    servers::register(&mut client, &config)
        .map_err(|f| f.context("registering this server failed"))?;

    config::save(&backend::config_path(), &config)?;
    Ok(config)
}

/// Strips trailing slashes and checks each segment of a mount or prefix.
fn clean_prefix(name: &str, value: &str) -> Result<String, Failure> {
    let trimmed = value.trim_end_matches('/');
    split_segments(trimmed).map_err(|e| {
        Failure::invalid_parameter(name, value, e.to_string())
            .hint("Give \"/\"-separated segments without a leading \"/\", empty, \".\" or \"..\" segment.")
    })?;
    Ok(trimmed.to_owned())
}

/// Returns the AppRole mount from a secret_id creation path such as
/// `auth/approle/role/NAME/secret-id`, or `None` for any other path.
fn approle_mount(creation_path: &str) -> Option<&str> {
    let rest = creation_path.strip_prefix("auth/")?;
    let (mount, role_path) = rest.rsplit_once("/role/")?;
    let (role, tail) = role_path.split_once('/')?;
    let valid_tail = tail == "secret-id" || tail == "custom-secret-id";
    (!mount.is_empty() && !role.is_empty() && valid_tail).then_some(mount)
}

/// Checks every capability the product needs by writing, reading, listing
/// and deleting a probe entry under the prefix. The probe is removed even
/// when a later step fails.
fn probe(client: &mut VaultClient) -> Result<(), Failure> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!("vault_redirect-probe-{}-{stamp}", std::process::id());
    let path = KvPath::parse(&name)?;
    let mut data = Map::new();
    data.insert("probe".into(), json!(name));

    client.kv_write(&path, &data, None).map_err(probe_failure)?;
    let checked = check_probe(client, &path, &name, &data);
    let removed = client.kv_delete_all(&path).map_err(probe_failure);
    checked?;
    removed
}

fn check_probe(
    client: &mut VaultClient,
    path: &KvPath,
    name: &str,
    data: &Map<String, Value>,
) -> Result<(), Failure> {
    let entry = client.kv_read(path).map_err(probe_failure)?;
    if &entry.data != data {
        return Err(Failure::new(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            format!(
                "the probe entry read back from {} differs from what was written",
                client.data_path(path)
            ),
        ));
    }
    let keys = client.kv_list(None).map_err(probe_failure)?;
    if !keys.iter().any(|k| k == name) {
        return Err(Failure::new(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            "the probe entry is missing from the listing of the secrets path",
        )
        .hint("Check that secrets_mount is a KV version 2 engine."));
    }
    Ok(())
}

/// Describes a failed probe step. The policy line in the hint names the
/// whole prefix (`.../*`) rather than the probe entry, and the detail states
/// that the wrapped token is spent, since the probe runs after the unwrap.
fn probe_failure(error: VaultError) -> Failure {
    let mut failure = Failure::from(error).context("policy probe failed");
    if let Some(hint) = failure.hint.take() {
        let generic = hint
            .split('"')
            .map(|part| match part.rsplit_once("/vault_redirect-probe-") {
                Some((prefix, _)) => format!("{prefix}/*"),
                None => part.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\"");
        failure = failure.hint(generic);
    }
    failure.detail("The wrapped token was used: ask for a new wrapped secret_id before you run vault_redirect.configure() again.")
}
