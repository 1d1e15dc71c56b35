//! Settings. Each is `vault_redirect.<name>`; none contains a secret. Those that
//! decide which server is trusted can be set by superusers only.

use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::time::Duration;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Connect timeout in milliseconds. Default 2000.
pub static CONNECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(2000);

/// Timeout of one request in milliseconds, from send to the last byte of
/// the response. Default 10000.
pub static REQUEST_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// Retries of a failed request that is safe to retry. Default 2.
pub static MAX_RETRIES: GucSetting<i32> = GucSetting::<i32>::new(2);

/// PEM file of the CAs that sign Vault's certificate. Default: none, so
/// the built-in public roots are trusted.
pub static CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// PEM client certificate and key for TLS client authentication.
pub static CLIENT_CERT_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static CLIENT_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Name to check Vault's certificate against when it differs from the host
/// of the configured URL. Default: none.
pub static TLS_SERVER_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Skip certificate verification. Default off; a WARNING each statement.
pub static TLS_SKIP_VERIFY: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Resolve secrets in queries on declared tables themselves, through the
/// post_parse_analyze hook of `crate::transparent`. Default off.
pub static TRANSPARENT_READS: GucSetting<bool> = GucSetting::<bool>::new(false);

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
        c"Time allowed for one Vault request and its response, in milliseconds.",
        c"Query cancel and statement_timeout still end a request sooner.",
        &REQUEST_TIMEOUT_MS,
        1,
        3_600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"vault_redirect.max_retries",
        c"How many times a failed Vault request that is safe to repeat is retried.",
        c"Connection failures, rate limits (429) and server errors of reads are retried with backoff.",
        &MAX_RETRIES,
        0,
        10,
        GucContext::Userset,
        GucFlags::default(),
    );
    let files = [
        (
            c"vault_redirect.ca_file",
            c"PEM file of the certificate authorities that Vault's certificate must chain to.",
            &CA_FILE,
        ),
        (
            c"vault_redirect.client_cert_file",
            c"PEM client certificate presented to Vault.",
            &CLIENT_CERT_FILE,
        ),
        (
            c"vault_redirect.client_key_file",
            c"PEM private key of the client certificate.",
            &CLIENT_KEY_FILE,
        ),
        (
            c"vault_redirect.tls_server_name",
            c"Name Vault's certificate is checked against, when not the URL's host.",
            &TLS_SERVER_NAME,
        ),
    ];
    for (name, description, setting) in files {
        GucRegistry::define_string_guc(
            name,
            description,
            c"Only a superuser can change it.",
            setting,
            GucContext::Suset,
            GucFlags::default(),
        );
    }
    GucRegistry::define_bool_guc(
        c"vault_redirect.tls_skip_verify",
        c"Accept any certificate from Vault. For tests only.",
        c"Each statement that uses it logs a WARNING. Only a superuser can change it.",
        &TLS_SKIP_VERIFY,
        GucContext::Suset,
        GucFlags::default(),
    );
    // SAFETY: the assign hook is a #[pg_guard] function, as pgrx requires.
    unsafe {
        GucRegistry::define_bool_guc_with_hooks(
            c"vault_redirect.transparent_reads",
            c"Return secrets in plaintext from queries on the declared tables themselves.",
            c"Takes effect for statements parsed after it is set; needs vault_redirect in session_preload_libraries or shared_preload_libraries.",
            &TRANSPARENT_READS,
            GucContext::Userset,
            GucFlags::default(),
            None,
            Some(assign_transparent_reads),
            None,
        );
    }
}

/// Invalidates every cached plan when the setting changes, so that prepared
/// statements and PL/pgSQL plans are parsed again under the new value.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn assign_transparent_reads(new_value: bool, _extra: *mut c_void) {
    if new_value != TRANSPARENT_READS.get() {
        // SAFETY: ResetPlanCache only marks the backend's cached plans
        // invalid; it reads no catalog and cannot fail.
        unsafe { pgrx::pg_sys::ResetPlanCache() };
    }
}

pub fn connect_timeout() -> Duration {
    Duration::from_millis(CONNECT_TIMEOUT_MS.get().max(1) as u64)
}

pub fn request_timeout() -> Duration {
    Duration::from_millis(REQUEST_TIMEOUT_MS.get().max(1) as u64)
}

pub fn max_retries() -> u32 {
    MAX_RETRIES.get().max(0) as u32
}

/// Returns a string setting, or `None` when it is unset or empty.
pub fn text(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .map(|value| value.to_string_lossy().into_owned())
        .filter(|value| !value.is_empty())
}

pub fn path(setting: &GucSetting<Option<CString>>) -> Option<PathBuf> {
    text(setting).map(PathBuf::from)
}
