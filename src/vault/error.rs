use super::path::PathError;

/// A failed Vault operation. Messages name the address or API path involved
/// and carry Vault's own error text, never a token or secret_id.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("invalid KV path: {0}")]
    InvalidPath(#[from] PathError),

    #[error("could not connect to Vault at {url}: {cause}")]
    Unreachable {
        url: String,
        cause: String,
        /// Whether the request may have reached the server before the
        /// failure; such a request is retried only when it is idempotent.
        request_sent: bool,
    },

    #[error("request to Vault at {url} timed out after {after_ms} ms")]
    Timeout { url: String, after_ms: u64 },

    #[error("request to Vault was interrupted")]
    Interrupted,

    #[error("Vault at {url} is sealed")]
    Sealed { url: String },

    #[error("the wrapping token was already used or has expired")]
    WrappingTokenInvalid { detail: String },

    #[error("the wrapping token was not issued for an AppRole secret_id")]
    NotASecretIdToken { creation_path: String },

    #[error("AppRole login at {api_path} failed")]
    AuthenticationFailed { api_path: String, detail: String },

    #[error("permission denied to {operation} {api_path}")]
    PermissionDenied {
        operation: &'static str,
        api_path: String,
        detail: String,
    },

    #[error("no secret at {api_path}")]
    NotFound { api_path: String, detail: String },

    #[error("Vault rate limit reached on {api_path}")]
    RateLimited { api_path: String, detail: String },

    #[error("Vault at {url} redirected to {location}, which is not followed")]
    Redirect { url: String, location: String },

    #[error("Vault answered {status} to {operation} {api_path}")]
    Status {
        status: u16,
        operation: &'static str,
        api_path: String,
        detail: String,
    },

    #[error("unexpected answer from Vault to {operation} {api_path}: {detail}")]
    InvalidResponse {
        operation: &'static str,
        api_path: String,
        detail: String,
    },
}

impl VaultError {
    /// Returns Vault's own error text, when there is some.
    pub fn vault_detail(&self) -> Option<&str> {
        match self {
            VaultError::WrappingTokenInvalid { detail }
            | VaultError::AuthenticationFailed { detail, .. }
            | VaultError::PermissionDenied { detail, .. }
            | VaultError::NotFound { detail, .. }
            | VaultError::RateLimited { detail, .. }
            | VaultError::Status { detail, .. } => Some(detail.as_str()).filter(|d| !d.is_empty()),
            _ => None,
        }
    }
}
