//! Per-backend state: one HTTP transport, built on first use (never before
//! fork), and one Vault client for the current configuration file. The
//! file is checked at every use, so a reconfiguration done in another
//! session takes effect at this session's next request.

use std::cell::RefCell;
use std::ffi::CStr;
use std::path::PathBuf;
use std::rc::Rc;

use pgrx::pg_sys;
use reqwest::Url;

use crate::config::{self, FileStamp, ServerConfig};
use crate::errors::Failure;
use crate::gucs;
use crate::vault::{AppRole, KvPath, Transport, TransportSettings, VaultClient};

struct Session {
    stamp: FileStamp,
    config: ServerConfig,
    client: VaultClient,
}

#[derive(Default)]
struct Backend {
    transport: Option<Rc<Transport>>,
    session: Option<Session>,
}

thread_local! {
    static BACKEND: RefCell<Backend> = RefCell::new(Backend::default());
}

/// Reports whether PostgreSQL has an interrupt waiting: cancel,
/// statement_timeout or termination. Reads a flag, so it is cheap.
pub fn interrupt_pending() -> bool {
    // SAFETY: a sig_atomic_t flag set by signal handlers of this process;
    // this runs on the backend's own thread.
    unsafe { pg_sys::InterruptPending != 0 }
}

/// Returns the path of this server's configuration file.
pub fn config_path() -> PathBuf {
    // SAFETY: DataDir is set once at startup and never freed.
    let dir = unsafe { CStr::from_ptr(pg_sys::DataDir) };
    config::path_in(std::path::Path::new(&*dir.to_string_lossy()))
}

/// Returns the backend's transport, rebuilt when the timeout settings changed.
pub fn transport() -> Result<Rc<Transport>, Failure> {
    let settings = TransportSettings {
        connect_timeout: gucs::connect_timeout(),
        request_timeout: gucs::request_timeout(),
    };
    BACKEND.with(|cell| {
        let mut backend = cell.borrow_mut();
        if let Some(transport) = &backend.transport {
            if transport.settings() == settings {
                return Ok(Rc::clone(transport));
            }
        }
        let transport = Rc::new(
            Transport::new(settings)
                .map_err(|e| Failure::new(pgrx::PgSqlErrorCode::ERRCODE_SYSTEM_ERROR, e))?,
        );
        backend.transport = Some(Rc::clone(&transport));
        // Clients keep a handle on the old transport; drop them with it.
        backend.session = None;
        Ok(transport)
    })
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
    Ok(VaultClient::new(
        transport()?,
        interrupt_pending,
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
    let path = config_path();
    let stamp = config::stamp(&path)?.ok_or_else(Failure::not_configured)?;
    let current = BACKEND.with(|cell| {
        let backend = cell.borrow();
        backend.session.as_ref().map(|s| s.stamp) == Some(stamp)
    });
    if !current {
        let config = config::load(&path)?.ok_or_else(Failure::not_configured)?;
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

/// Forgets the loaded configuration and token, so that the next request
/// reads the file again.
pub fn forget_session() {
    BACKEND.with(|cell| cell.borrow_mut().session = None);
}

/// Returns the loaded configuration without any request, if there is one.
pub fn current_config() -> Result<Option<ServerConfig>, Failure> {
    Ok(config::load(&config_path())?)
}

/// Returns the time to live of this backend's token, when it has one.
pub fn token_ttl_seconds() -> Option<i64> {
    BACKEND.with(|cell| {
        let backend = cell.borrow();
        let ttl = backend.session.as_ref()?.client.token_ttl()?;
        Some(ttl.as_secs().min(i64::MAX as u64) as i64)
    })
}
