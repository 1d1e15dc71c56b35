//! The per-server configuration file: Vault address, AppRole credentials,
//! KV mount and path prefix. It lives in the data directory, readable only by
//! the server's OS user, and never in a table, so that the secret_id stays
//! out of WAL, replicas and dumps.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::vault::Secret;

/// File name inside the data directory.
pub const FILE_NAME: &str = "vault_redirect.conf";

/// One server's Vault configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub url: String,
    pub auth_mount: String,
    pub role_id: String,
    pub secret_id: Secret,
    pub secrets_mount: String,
    pub secrets_path: String,
    /// The name this server registered under in Vault.
    pub server_name: String,
    /// Device and inode of the data directory the file was written for. A
    /// base backup copies the file to a standby, where they differ.
    pub data_dir_id: String,
    /// OID and name of the database that configure() ran in. Only that
    /// database uses the file: a copy of it, made from it as a template or
    /// restored from a dump, has another OID.
    pub database_oid: u32,
    pub database_name: String,
    /// Seconds since the Unix epoch.
    pub configured_at: u64,
}

/// Returns the identity of a data directory: its device and inode numbers.
pub fn data_dir_id(dir: &Path) -> Result<String, ConfigError> {
    let meta = fs::metadata(dir).map_err(|source| ConfigError::Io {
        action: "inspect",
        path: dir.to_owned(),
        source,
    })?;
    Ok(format!("{}:{}", meta.dev(), meta.ino()))
}

/// Identifies one version of the file, to notice a reconfiguration made by
/// another backend without reading the file again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    inode: u64,
    modified_ns: i64,
    len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not {action} the configuration file \"{path}\": {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the configuration file \"{path}\" is invalid: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Returns the file's stamp, or `None` when there is no file.
pub fn stamp(path: &Path) -> Result<Option<FileStamp>, ConfigError> {
    match fs::metadata(path) {
        Ok(meta) => Ok(Some(FileStamp {
            inode: meta.ino(),
            modified_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            len: meta.len(),
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Io {
            action: "inspect",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads the configuration, or `None` when this server is not configured.
pub fn load(path: &Path) -> Result<Option<ServerConfig>, ConfigError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ConfigError::Io {
                action: "read",
                path: path.to_owned(),
                source,
            })
        }
    };
    let invalid = |detail: String| ConfigError::Invalid {
        path: path.to_owned(),
        detail,
    };
    let value: Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let field = |name: &str| -> Result<String, ConfigError> {
        value[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| invalid(format!("missing the string field \"{name}\"")))
    };
    Ok(Some(ServerConfig {
        url: field("url")?,
        auth_mount: field("auth_mount")?,
        role_id: field("role_id")?,
        secret_id: Secret::new(field("secret_id")?),
        secrets_mount: field("secrets_mount")?,
        secrets_path: field("secrets_path")?,
        server_name: field("server_name")?,
        data_dir_id: field("data_dir_id")?,
        database_oid: value["database_oid"]
            .as_u64()
            .and_then(|oid| u32::try_from(oid).ok())
            .ok_or_else(|| invalid("missing the number field \"database_oid\"".into()))?,
        database_name: field("database_name")?,
        configured_at: value["configured_at"].as_u64().unwrap_or(0),
    }))
}

/// Replaces the file atomically: a reader sees the old file or the new one,
/// never a mix, and a crash leaves the old one in place. The file is created
/// with mode 0600 before anything is written to it.
pub fn save(path: &Path, config: &ServerConfig) -> Result<(), ConfigError> {
    let io_error = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| ConfigError::Io {
            action,
            path,
            source,
        }
    };
    let body = json!({
        "url": config.url,
        "auth_mount": config.auth_mount,
        "role_id": config.role_id,
        "secret_id": config.secret_id.expose(),
        "secrets_mount": config.secrets_mount,
        "secrets_path": config.secrets_path,
        "server_name": config.server_name,
        "data_dir_id": config.data_dir_id,
        "database_oid": config.database_oid,
        "database_name": config.database_name,
        "configured_at": config.configured_at,
    });
    let temp = path.with_extension(format!("conf.tmp.{}", std::process::id()));
    let _ = fs::remove_file(&temp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io_error("create", &temp))?;
    let written = file
        .write_all(format!("{body:#}\n").as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(source) = written {
        let _ = fs::remove_file(&temp);
        return Err(ConfigError::Io {
            action: "write",
            path: temp,
            source,
        });
    }
    drop(file);
    if let Err(source) = fs::rename(&temp, path) {
        let _ = fs::remove_file(&temp);
        return Err(ConfigError::Io {
            action: "replace",
            path: path.to_owned(),
            source,
        });
    }
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("sync the folder of", path))?;
    }
    Ok(())
}
