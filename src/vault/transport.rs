use std::error::Error as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{Method, Url};

use super::error::VaultError;
use super::secret::Secret;

/// How long one wait lasts before the caller's abort check runs again.
const WAIT_SLICE: Duration = Duration::from_millis(20);

/// TLS settings. Files are read when the transport is built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM bundle of the CAs to trust instead of the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and its key, for TLS client authentication.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// Name to verify the server certificate against, and the address the
    /// configured host resolves to, when it differs from the URL's host.
    pub server_name: Option<(String, SocketAddr)>,
    pub skip_verify: bool,
}

/// Connection settings, read from the server's settings at each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub tls: TlsSettings,
}

/// A status, the headers the client needs and the whole body.
pub struct RawResponse {
    pub status: u16,
    pub location: Option<String>,
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

/// One keep-alive HTTP client driven on a current-thread runtime by the
/// calling thread, so that waits happen in short slices between which the
/// caller can abandon the request.
pub struct Transport {
    runtime: tokio::runtime::Runtime,
    http: reqwest::Client,
    settings: TransportSettings,
}

impl Transport {
    pub fn new(settings: TransportSettings) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("could not start the I/O runtime: {e}"))?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            // A redirect would send the token to a host that was not configured.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60));
        let tls = &settings.tls;
        if let Some(path) = &tls.ca_file {
            let pem = read_file(path, "CA file")?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("the CA file \"{}\" is not PEM: {e}", path.display()))?;
            if certificates.is_empty() {
                return Err(format!(
                    "the CA file \"{}\" holds no certificate",
                    path.display()
                ));
            }
            builder = builder.tls_built_in_root_certs(false);
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        match (&tls.client_cert_file, &tls.client_key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = read_file(cert, "client certificate file")?;
                pem.push(b'\n');
                pem.extend(read_file(key, "client key file")?);
                let identity = reqwest::Identity::from_pem(&pem)
                    .map_err(|e| format!("the client certificate or key is not usable: {e}"))?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(
                    "set both vault_redirect.client_cert_file and vault_redirect.client_key_file, or neither"
                        .into(),
                )
            }
        }
        if let Some((name, addr)) = &tls.server_name {
            builder = builder.resolve(name, *addr);
        }
        if tls.skip_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| format!("could not build the HTTP client: {e}"))?;
        Ok(Transport {
            runtime,
            http,
            settings,
        })
    }

    pub fn settings(&self) -> &TransportSettings {
        &self.settings
    }

    /// Sends one request and reads the whole response. `abort` is called
    /// between wait slices; when it returns true the request is dropped.
    pub fn send(
        &self,
        method: Method,
        mut url: Url,
        token: Option<&Secret>,
        body: Option<Vec<u8>>,
        abort: &dyn Fn() -> bool,
    ) -> Result<RawResponse, VaultError> {
        let origin_text = origin(&url);
        if let Some((name, _)) = &self.settings.tls.server_name {
            // The connection goes to the configured address; the name is
            // what the certificate is checked against.
            url.set_host(Some(name))
                .map_err(|e| VaultError::Unreachable {
                    url: origin_text.clone(),
                    cause: format!("invalid TLS server name \"{name}\": {e}"),
                    request_sent: false,
                })?;
        }
        let mut request = self.http.request(method, url.clone());
        if let Some(token) = token {
            let mut value =
                HeaderValue::from_str(token.expose()).map_err(|_| VaultError::InvalidResponse {
                    operation: "send",
                    api_path: url.path().to_owned(),
                    detail: "the token contains characters not allowed in a header".into(),
                })?;
            value.set_sensitive(true);
            request = request.header("X-Vault-Token", value);
        }
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let exchange = async move {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let header = |name| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v: &HeaderValue| v.to_str().ok())
                    .map(str::to_owned)
            };
            let location = header(LOCATION);
            let retry_after = header(RETRY_AFTER)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = response.bytes().await?.to_vec();
            Ok::<_, reqwest::Error>(RawResponse {
                status,
                location,
                retry_after,
                body,
            })
        };
        let limit = self.settings.request_timeout;
        // Timers must be created inside the runtime that drives them.
        let _context = self.runtime.enter();
        match self.wait(tokio::time::timeout(limit, exchange), abort)? {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(classify(&origin_text, &error, &self.settings)),
            Err(_elapsed) => Err(VaultError::Timeout {
                url: origin_text,
                after_ms: limit.as_millis() as u64,
            }),
        }
    }

    /// Sleeps for `duration`, giving up early when `abort` returns true.
    pub fn sleep(&self, duration: Duration, abort: &dyn Fn() -> bool) -> Result<(), VaultError> {
        let until = Instant::now() + duration;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(WAIT_SLICE));
            if abort() {
                return Err(VaultError::Interrupted);
            }
        }
    }

    /// Drives `future` to completion in slices, giving up when `abort` returns true.
    fn wait<F: Future>(
        &self,
        future: F,
        abort: &dyn Fn() -> bool,
    ) -> Result<F::Output, VaultError> {
        let mut future = pin!(future);
        loop {
            let slice = self
                .runtime
                .block_on(async { tokio::time::timeout(WAIT_SLICE, future.as_mut()).await });
            match slice {
                Ok(output) => return Ok(output),
                Err(_) if abort() => return Err(VaultError::Interrupted),
                Err(_) => continue,
            }
        }
    }
}

fn read_file(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path)
        .map_err(|e| format!("could not read the {what} \"{}\": {e}", path.display()))
}

/// Returns scheme, host and port of a URL: what a message may show.
pub fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

fn classify(origin_text: &str, error: &reqwest::Error, settings: &TransportSettings) -> VaultError {
    if error.is_timeout() {
        let limit = if error.is_connect() {
            settings.connect_timeout
        } else {
            settings.request_timeout
        };
        return VaultError::Timeout {
            url: origin_text.to_owned(),
            after_ms: limit.as_millis() as u64,
        };
    }
    VaultError::Unreachable {
        url: origin_text.to_owned(),
        cause: root_cause(error),
        request_sent: !error.is_connect(),
    }
}

/// Returns the innermost error text, which is the OS's or the TLS library's
/// own words ("Connection refused", "invalid peer certificate").
fn root_cause(error: &reqwest::Error) -> String {
    let mut causes = vec![error.to_string()];
    let mut source = error.source();
    while let Some(inner) = source {
        causes.push(inner.to_string());
        source = inner.source();
    }
    // The outermost text repeats the URL, the innermost is the real cause.
    causes.pop().unwrap_or_default()
}
