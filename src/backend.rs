//! Per-backend state: one HTTP transport, built on first use (never before
//! fork), and one Vault client for the current configuration file. The
//! file is checked at every use, so a reconfiguration done in another
//! session takes effect at this session's next request.

use std::cell::RefCell;
use std::ffi::CStr;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::rc::Rc;

use pgrx::{pg_sys, PgSqlErrorCode};
use reqwest::Url;

use crate::config::{self, FileStamp, ServerConfig};
use crate::errors::Failure;
use crate::gucs;
use crate::vault::{
    AppRole, Hooks, KvPath, RetryPolicy, TlsSettings, Transport, TransportSettings, VaultClient,
};

struct Session {
    stamp: FileStamp,
    config: ServerConfig,
    client: VaultClient,
}

#[derive(Default)]
struct Backend {
    transport: Option<Rc<Transport>>,
    session: Option<Session>,
    /// The last error a Vault request raised in this backend.
    last_error: Option<String>,
    /// Start of the last statement warned about tls_skip_verify.
    skip_verify_warned: Option<pg_sys::TimestampTz>,
}

thread_local! {
    static BACKEND: RefCell<Backend> = RefCell::new(Backend::default());
}

const HOOKS: Hooks = Hooks {
    abort: process_interrupts,
    on_retry: warn_retry,
    on_response: log_response,
};

/// Lets a pending cancel, statement_timeout or termination take effect
/// between two wait slices. It raises from the backend's own thread, while
/// no request future is being polled.
fn process_interrupts() -> bool {
    // SAFETY: a sig_atomic_t flag set by this process's signal handlers,
    // read on the backend's own thread.
    if unsafe { pg_sys::InterruptPending } != 0 {
        pgrx::check_for_interrupts!();
    }
    false
}

fn warn_retry(message: &str) {
    pgrx::warning!("vault_redirect: {message}");
}

fn log_response(method: &str, path: &str, status: u16, millis: f64) {
    pgrx::debug1!("vault_redirect: {method} /v1/{path} answered {status} in {millis:.1} ms");
}

/// Returns this server's data directory.
pub fn data_dir() -> PathBuf {
    // SAFETY: DataDir is set once at startup and never freed.
    let dir = unsafe { CStr::from_ptr(pg_sys::DataDir) };
    PathBuf::from(&*dir.to_string_lossy())
}

/// Returns the path of this server's configuration file.
pub fn config_path() -> PathBuf {
    config::path_in(&data_dir())
}

/// Loads the configuration file, rejecting one written for another data
/// directory: a standby made with pg_basebackup receives the primary's
/// file, but must log in with its own AppRole.
fn load_own_config() -> Result<Option<ServerConfig>, Failure> {
    let Some(config) = config::load(&config_path())? else {
        return Ok(None);
    };
    if config.data_dir_id != config::data_dir_id(&data_dir())? {
        return Err(Failure::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "vault_redirect is not configured on this server: its configuration file was copied from server \"{}\"",
                config.server_name
            ),
        )
        .detail("A base backup copies the data directory, this file included.")
        .hint("Run vault_redirect.configure() on this server with its own AppRole and wrapped secret_id."));
    }
    if config.database_oid != database_oid() {
        return Err(other_database(&config));
    }
    Ok(Some(config))
}

/// Returns the error for a database of the cluster that the configuration
/// is not for. Its declared tables may be copies of the configured
/// database's, so they would share Vault entries with it.
fn other_database(config: &ServerConfig) -> Failure {
    Failure::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "vault_redirect is configured for database \"{}\" of this server, not for \"{}\"",
            config.database_name,
            database_name()
        ),
    )
    .detail("One database per server uses Vault. A database copied from it, as a template or from a dump, would share its entries, and deleting or replacing them would break the original.")
    .hint(format!(
        "Use the extension in database \"{}\"; to move the configuration, drop that database first, then run vault_redirect.configure() here.",
        config.database_name
    ))
}

/// Raises when the configuration file belongs to another database of the
/// cluster that still exists. Called by configure() before it replaces it.
pub fn check_database_owns_config() -> Result<(), Failure> {
    let Some(config) = config::load(&config_path())? else {
        return Ok(());
    };
    if config.database_oid == database_oid()
        || config.data_dir_id != config::data_dir_id(&data_dir())?
    {
        return Ok(());
    }
    let exists = crate::query::select_value::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE oid = $1)",
        &[pg_sys::Oid::from(config.database_oid).into()],
    )?;
    match exists {
        Some(true) => Err(other_database(&config)),
        _ => Ok(()),
    }
}

/// Returns the OID of the database this backend is connected to.
pub fn database_oid() -> u32 {
    // SAFETY: MyDatabaseId is set for the whole life of a backend.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// Returns the name of the database this backend is connected to.
pub fn database_name() -> String {
    // SAFETY: get_database_name returns a palloc'd copy, or NULL for a
    // database that no longer exists.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            return String::new();
        }
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

/// Reads the transport settings for a Vault at `url`.
fn settings_for(url: &Url) -> Result<TransportSettings, Failure> {
    let server_name = match gucs::text(&gucs::TLS_SERVER_NAME) {
        None => None,
        Some(name) => {
            let host = url.host_str().unwrap_or_default();
            let port = url.port_or_known_default().unwrap_or(8200);
            let addr = (host.trim_matches(|c| c == '[' || c == ']'), port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| {
                    Failure::new(
                        PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                        format!("could not resolve the Vault host \"{host}\""),
                    )
                    .hint("Check the host of the configured URL.")
                })?;
            Some((name, addr))
        }
    };
    Ok(TransportSettings {
        connect_timeout: gucs::connect_timeout(),
        request_timeout: gucs::request_timeout(),
        tls: TlsSettings {
            ca_file: gucs::path(&gucs::CA_FILE),
            client_cert_file: gucs::path(&gucs::CLIENT_CERT_FILE),
            client_key_file: gucs::path(&gucs::CLIENT_KEY_FILE),
            server_name,
            skip_verify: gucs::TLS_SKIP_VERIFY.get(),
        },
    })
}

/// Returns the backend's transport, rebuilt when the settings changed.
fn transport(url: &Url) -> Result<Rc<Transport>, Failure> {
    let settings = settings_for(url)?;
    if settings.tls.skip_verify {
        warn_skip_verify();
    }
    BACKEND.with(|cell| {
        let mut backend = cell.borrow_mut();
        if let Some(transport) = &backend.transport {
            if transport.settings() == &settings {
                return Ok(Rc::clone(transport));
            }
        }
        let transport = Rc::new(Transport::new(settings).map_err(|e| {
            Failure::new(PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR, e)
                .hint("Check the vault_redirect TLS settings.")
        })?);
        backend.transport = Some(Rc::clone(&transport));
        // Clients keep a handle on the old transport; drop them with it.
        backend.session = None;
        Ok(transport)
    })
}

/// Warns once per statement that certificates are not verified.
fn warn_skip_verify() {
    // SAFETY: reads the start time of the current statement.
    let statement = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
    let warned = BACKEND.with(|cell| {
        let mut backend = cell.borrow_mut();
        let warned = backend.skip_verify_warned == Some(statement);
        backend.skip_verify_warned = Some(statement);
        warned
    });
    if !warned {
        pgrx::warning!(
            "vault_redirect: vault_redirect.tls_skip_verify is on, so Vault's certificate is not verified"
        );
    }
}

/// Builds a client for `config`, with or without its AppRole credentials.
pub fn client_for(config: &ServerConfig, with_approle: bool) -> Result<VaultClient, Failure> {
    let url = parse_url(&config.url)?;
    let mount = KvPath::parse(&config.secrets_mount)?;
    let prefix = KvPath::parse(&config.secrets_path)?;
    let approle = with_approle.then(|| AppRole {
        auth_mount: config.auth_mount.clone(),
        role_id: config.role_id.clone(),
        secret_id: config.secret_id.clone(),
    });
    let retry = RetryPolicy {
        max_retries: gucs::max_retries(),
        max_wait: gucs::request_timeout(),
    };
    Ok(VaultClient::new(
        transport(&url)?,
        HOOKS,
        retry,
        url,
        mount,
        prefix,
        approle,
    ))
}

/// Checks a Vault address: http or https, a host, nothing after the port.
pub fn parse_url(url: &str) -> Result<Url, Failure> {
    let invalid = |reason: &str| {
        Failure::invalid_parameter("url", url, reason)
            .hint("Give the Vault address as scheme://host:port, for example https://vault.example.com:8200.")
    };
    let parsed = Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("there is no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid("credentials do not belong in the URL"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() || parsed.path() != "/" {
        return Err(invalid("nothing may follow the host and port"));
    }
    Ok(parsed)
}

/// Runs `f` with the client of the current configuration, reloading the
/// configuration file when it changed. Raises when there is none.
pub fn with_client<R>(
    f: impl FnOnce(&mut VaultClient, &ServerConfig) -> Result<R, Failure>,
) -> Result<R, Failure> {
    let result = with_session(f);
    if let Err(failure) = &result {
        record_error(&failure.message);
    }
    result
}

fn with_session<R>(
    f: impl FnOnce(&mut VaultClient, &ServerConfig) -> Result<R, Failure>,
) -> Result<R, Failure> {
    let path = config_path();
    let stamp = config::stamp(&path)?.ok_or_else(Failure::not_configured)?;
    let loaded = BACKEND.with(|cell| {
        let backend = cell.borrow();
        let session = backend.session.as_ref()?;
        (session.stamp == stamp).then(|| session.config.url.clone())
    });
    // The settings may have changed since the session was made; checking
    // them drops a session whose transport is out of date.
    let current = match loaded {
        Some(url) => {
            transport(&parse_url(&url)?)?;
            BACKEND.with(|cell| cell.borrow().session.is_some())
        }
        None => false,
    };
    if !current {
        let config = load_own_config()?.ok_or_else(Failure::not_configured)?;
        let client = client_for(&config, true)?;
        BACKEND.with(|cell| {
            cell.borrow_mut().session = Some(Session {
                stamp,
                config,
                client,
            })
        });
    }
    BACKEND.with(|cell| {
        let mut backend = cell.borrow_mut();
        let session = backend
            .session
            .as_mut()
            .ok_or_else(Failure::not_configured)?;
        f(&mut session.client, &session.config)
    })
}

/// Remembers an error for status().
pub fn record_error(message: &str) {
    BACKEND.with(|cell| cell.borrow_mut().last_error = Some(message.to_owned()));
}

pub fn last_error() -> Option<String> {
    BACKEND.with(|cell| cell.borrow().last_error.clone())
}

/// Forgets the loaded configuration and token, so that the next request
/// reads the file again.
pub fn forget_session() {
    BACKEND.with(|cell| cell.borrow_mut().session = None);
}

/// Returns this server's configuration without any request, if there is one.
pub fn current_config() -> Result<Option<ServerConfig>, Failure> {
    load_own_config()
}

/// Returns the time to live of this backend's token, when it has one.
pub fn token_ttl_seconds() -> Option<i64> {
    BACKEND.with(|cell| {
        let backend = cell.borrow();
        let ttl = backend.session.as_ref()?.client.token_ttl()?;
        Some(ttl.as_secs().min(i64::MAX as u64) as i64)
    })
}
