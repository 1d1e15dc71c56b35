//! A small Vault/OpenBao HTTP client: AppRole login, response unwrapping and
//! KV v2. It does not depend on PostgreSQL, so the SQL layer decides how its
//! errors surface and how a wait gives way to an interrupt.

mod client;
mod error;
mod path;
mod secret;
mod transport;

pub use client::{AppRole, Hooks, KvEntry, RetryPolicy, VaultClient};
pub use error::VaultError;
pub use path::{split_segments, KvPath, PathError};
pub use secret::Secret;
pub use transport::{TlsSettings, Transport, TransportSettings};
