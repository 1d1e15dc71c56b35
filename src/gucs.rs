//! Settings. Each is `vault_redirect.<name>`; none holds a secret.

use std::time::Duration;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Connect timeout in milliseconds. Default 2000.
pub static CONNECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(2000);

/// Timeout of one whole request in milliseconds, from send to last byte of
/// the answer. Default 10000.
pub static REQUEST_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

pub fn register() {
    GucRegistry::define_int_guc(
        c"vault_redirect.connect_timeout_ms",
        c"Time allowed to open a connection to Vault, in milliseconds.",
        c"A connection that takes longer fails with a timeout error.",
        &CONNECT_TIMEOUT_MS,
        1,
        3_600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"vault_redirect.request_timeout_ms",
        c"Time allowed for one Vault request and its answer, in milliseconds.",
        c"Query cancel and statement_timeout still end a request sooner.",
        &REQUEST_TIMEOUT_MS,
        1,
        3_600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
}

pub fn connect_timeout() -> Duration {
    Duration::from_millis(CONNECT_TIMEOUT_MS.get().max(1) as u64)
}

pub fn request_timeout() -> Duration {
    Duration::from_millis(REQUEST_TIMEOUT_MS.get().max(1) as u64)
}
