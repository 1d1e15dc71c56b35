//! The one place where failures become PostgreSQL errors: a specific
//! SQLSTATE, a message that names the value, DETAIL with Vault's own words
//! and a HINT with the fix.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode};

use crate::config::ConfigError;
use crate::vault::{PathError, VaultError};

/// An error ready to be raised in SQL.
#[derive(Debug)]
pub struct Failure {
    pub code: PgSqlErrorCode,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl Failure {
    pub fn new(code: PgSqlErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        if !detail.is_empty() {
            self.detail = Some(detail);
        }
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Puts `context` in front of the message, such as the row a value
    /// came from.
    pub fn context(mut self, context: impl AsRef<str>) -> Self {
        self.message = format!("{}: {}", context.as_ref(), self.message);
        self
    }

    pub fn invalid_parameter(name: &str, value: &str, reason: impl AsRef<str>) -> Self {
        Failure::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid {name} \"{value}\": {}", reason.as_ref()),
        )
    }

    pub fn not_configured() -> Self {
        Failure::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "vault_redirect is not configured on this server",
        )
        .hint("Run vault_redirect.configure(url, role_id, wrapped_token, secrets_path) as a superuser.")
    }

    pub fn spi(error: impl std::fmt::Display) -> Self {
        Failure::new(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("internal query failed: {error}"),
        )
    }

    /// Raises the error. Does not return.
    pub fn raise(self) -> ! {
        if self.code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED {
            // A pending cancel or statement_timeout raises its own error.
            pgrx::check_for_interrupts!();
        }
        let mut report = ErrorReport::new(self.code, self.message, "vault_redirect");
        if let Some(detail) = self.detail {
            report = report.set_detail(detail);
        }
        if let Some(hint) = self.hint {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("an ERROR report returns control to PostgreSQL")
    }
}

/// Raises the error of a failed result.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T, E: Into<Failure>> OrRaise<T> for Result<T, E> {
    fn or_raise(self) -> T {
        match self {
            Ok(value) => value,
            Err(error) => error.into().raise(),
        }
    }
}

impl From<pgrx::spi::Error> for Failure {
    fn from(error: pgrx::spi::Error) -> Self {
        Failure::spi(error)
    }
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        let code = match error {
            ConfigError::Io { .. } => PgSqlErrorCode::ERRCODE_IO_ERROR,
            ConfigError::Invalid { .. } => PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR,
        };
        Failure::new(code, error.to_string())
            .hint("Run vault_redirect.configure() again as a superuser to write a new file.")
    }
}

impl From<PathError> for Failure {
    fn from(error: PathError) -> Self {
        Failure::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid KV path: {error}"),
        )
        .hint("A path is made of \"/\"-separated segments relative to the secrets path: no leading \"/\", no empty, \".\" or \"..\" segment.")
    }
}

impl From<VaultError> for Failure {
    fn from(error: VaultError) -> Self {
        use PgSqlErrorCode::*;
        let message = error.to_string();
        let detail = match &error {
            VaultError::Sealed { .. } => {
                Some("Vault returned 503 and sys/seal-status reports it sealed.".to_owned())
            }
            _ => error.vault_detail().map(|d| format!("Vault said: {d}")),
        };
        let (code, hint) = match &error {
            VaultError::InvalidPath(inner) => return Failure::from(inner.clone()),
            VaultError::Unreachable { url, .. } => (
                ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                format!("Check that Vault is running at {url} and reachable from this server; vault_redirect.status() shows the configured address."),
            ),
            VaultError::Timeout { .. } => (
                ERRCODE_CONNECTION_FAILURE,
                "Check Vault's load and the network, or raise vault_redirect.connect_timeout_ms and vault_redirect.request_timeout_ms.".into(),
            ),
            VaultError::Interrupted => (
                ERRCODE_QUERY_CANCELED,
                "The statement was canceled while it waited for Vault.".into(),
            ),
            VaultError::Sealed { .. } => (
                ERRCODE_CANNOT_CONNECT_NOW,
                "An operator must unseal it: vault operator unseal (or bao operator unseal).".into(),
            ),
            VaultError::WrappingTokenInvalid { .. } => (
                ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
                "Ask the Vault administrator for a new secret_id wrapped with -wrap-ttl and use it once. If this server never used the token, someone else may have unwrapped it.".into(),
            ),
            VaultError::NotASecretIdToken { creation_path } => (
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("The token was created at \"{creation_path}\". Wrap a new secret_id: vault write -wrap-ttl=5m -f auth/approle/role/ROLE/secret-id"),
            ),
            VaultError::AuthenticationFailed { .. } => (
                ERRCODE_INVALID_PASSWORD,
                "Check the role_id, then run vault_redirect.configure() again with a new wrapped secret_id.".into(),
            ),
            VaultError::PermissionDenied {
                operation,
                api_path,
                ..
            } => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!(
                    "The AppRole's policy needs: path \"{api_path}\" {{ capabilities = [\"{}\"] }}",
                    capability(operation)
                ),
            ),
            VaultError::NotFound { .. } => (
                ERRCODE_UNDEFINED_OBJECT,
                "The entry is missing, deleted or destroyed in Vault: restore it (vault kv undelete or kv put), or fix the reference.".into(),
            ),
            VaultError::RateLimited { .. } => (
                ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                "A Vault rate-limit quota was reached: retry later or raise the quota (sys/quotas/rate-limit).".into(),
            ),
            VaultError::Redirect { .. } => (
                ERRCODE_SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION,
                "Configure the address of the active node or of a load balancer; redirects are not followed so that the token never goes to another host.".into(),
            ),
            VaultError::Status { status: 413, .. } => (
                ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                "The value is larger than Vault accepts in one request (max_request_size, 32 MiB by default; Raft storage also limits an entry to about 1 MiB unless max_entry_size is raised).".into(),
            ),
            VaultError::Status { .. } => (
                ERRCODE_SYSTEM_ERROR,
                "Check the Vault server's log for this request.".into(),
            ),
            VaultError::InvalidResponse { .. } => (
                ERRCODE_PROTOCOL_VIOLATION,
                "Check that the configured URL points at a Vault or OpenBao server.".into(),
            ),
        };
        let failure = Failure::new(code, message).hint(hint);
        match detail {
            Some(detail) => failure.detail(detail),
            None => failure,
        }
    }
}

/// Names the policy capability an operation needs.
fn capability(operation: &str) -> &'static str {
    match operation {
        "read" => "read",
        "write" => "create\", \"update",
        "list" => "list",
        "delete" => "delete",
        _ => "read",
    }
}

/// Raises unless the current user is a superuser.
pub fn require_superuser(function: &str) {
    // SAFETY: superuser() only reads the current user's catalog entry.
    if !unsafe { pg_sys::superuser() } {
        Failure::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for function {function}"),
        )
        .hint("Only a superuser may call it.")
        .raise();
    }
}

/// Writes a LOG line to the server log without the statement that caused
/// it. PostgreSQL adds the statement to LOG lines under the default
/// `log_min_error_statement`, and configure()'s statement carries the
/// role_id and the wrapping token.
pub fn log_without_statement(message: &str) {
    extern "C-unwind" {
        fn errstart(elevel: std::os::raw::c_int, domain: *const std::os::raw::c_char) -> bool;
        fn errfinish(
            filename: *const std::os::raw::c_char,
            lineno: std::os::raw::c_int,
            funcname: *const std::os::raw::c_char,
        );
    }
    let Ok(text) = std::ffi::CString::new(message.replace('\0', "")) else {
        return;
    };
    // SAFETY: the errstart/errmsg/errfinish sequence of ereport(LOG, ...);
    // at LOG level errfinish returns, and the format string is a literal.
    unsafe {
        if errstart(pg_sys::LOG as _, std::ptr::null()) {
            pg_sys::errmsg_internal(c"%s".as_ptr(), text.as_ptr());
            pg_sys::errhidestmt(true);
            errfinish(
                c"vault_redirect".as_ptr(),
                0,
                c"log_without_statement".as_ptr(),
            );
        }
    }
}
