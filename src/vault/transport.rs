use std::error::Error as _;
use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use reqwest::header::{HeaderValue, CONTENT_TYPE, LOCATION};
use reqwest::{Method, Url};

use super::error::VaultError;
use super::secret::Secret;

/// How long one wait lasts before the caller's abort check runs again.
const WAIT_SLICE: Duration = Duration::from_millis(20);

/// Connection settings, read from the server's settings at each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

/// A status, the headers the client needs and the whole body.
pub struct RawResponse {
    pub status: u16,
    pub location: Option<String>,
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
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            // A redirect would carry the token to a host nobody configured.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("could not build the HTTP client: {e}"))?;
        Ok(Transport {
            runtime,
            http,
            settings,
        })
    }

    pub fn settings(&self) -> TransportSettings {
        self.settings
    }

    /// Sends one request and reads the whole answer. `abort` is called
    /// between wait slices; when it returns true the request is dropped.
    pub fn send(
        &self,
        method: Method,
        url: Url,
        token: Option<&Secret>,
        body: Option<Vec<u8>>,
        abort: &dyn Fn() -> bool,
    ) -> Result<RawResponse, VaultError> {
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
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response.bytes().await?.to_vec();
            Ok::<_, reqwest::Error>(RawResponse {
                status,
                location,
                body,
            })
        };
        let limit = self.settings.request_timeout;
        // Timers must be created inside the runtime that drives them.
        let _context = self.runtime.enter();
        match self.wait(tokio::time::timeout(limit, exchange), abort)? {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(classify(&url, &error, self.settings)),
            Err(_elapsed) => Err(VaultError::Timeout {
                url: origin(&url),
                after_ms: limit.as_millis() as u64,
            }),
        }
    }

    /// Drives `future` to completion in slices, giving up when `abort` says so.
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

/// Returns scheme, host and port of a URL: what a message may show.
pub fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

fn classify(url: &Url, error: &reqwest::Error, settings: TransportSettings) -> VaultError {
    if error.is_timeout() {
        let limit = if error.is_connect() {
            settings.connect_timeout
        } else {
            settings.request_timeout
        };
        return VaultError::Timeout {
            url: origin(url),
            after_ms: limit.as_millis() as u64,
        };
    }
    VaultError::Unreachable {
        url: origin(url),
        cause: root_cause(error),
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
