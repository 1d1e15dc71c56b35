use std::rc::Rc;
use std::time::{Duration, Instant};

use reqwest::{Method, Url};
use serde_json::{json, Map, Value};

use super::error::VaultError;
use super::path::KvPath;
use super::secret::Secret;
use super::transport::{origin, RawResponse, Transport};

/// The longest a token is given back before it expires.
const MAX_RENEW_MARGIN: Duration = Duration::from_secs(10);

/// Backoff before the first retry; it doubles for each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Calls into the embedding program: the only way this module reaches out.
#[derive(Clone, Copy)]
pub struct Hooks {
    /// Called between wait slices; true abandons the request.
    pub abort: fn() -> bool,
    /// Called before each retry with a one-line reason.
    pub on_retry: fn(&str),
    /// Called after each response: method, API path, status, milliseconds.
    pub on_response: fn(&str, &str, u16, f64),
}

/// How often a failed request is tried again, and for how long at most.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_retries: u32,
    /// The total time spent waiting between tries stays below this.
    pub max_wait: Duration,
}

/// AppRole credentials of one server.
#[derive(Clone)]
pub struct AppRole {
    /// The auth mount, `approle` unless the operator mounted it elsewhere.
    pub auth_mount: String,
    pub role_id: String,
    pub secret_id: Secret,
}

/// The latest version of one KV v2 entry.
#[derive(Debug, Clone)]
pub struct KvEntry {
    pub data: Map<String, Value>,
    pub version: u64,
}

/// Wrapping token details returned by `sys/wrapping/lookup`.
#[derive(Debug, Clone)]
pub struct WrapInfo {
    pub creation_path: String,
}

/// Seal state returned by `sys/seal-status`, which needs no token.
#[derive(Debug, Clone)]
pub struct SealStatus {
    pub sealed: bool,
    pub initialized: bool,
    pub version: String,
}

struct Token {
    value: Secret,
    /// When to log in again; `None` for a token that never expires.
    renew_after: Option<Instant>,
}

/// A client for one Vault address, one KV v2 mount and one path prefix.
pub struct VaultClient {
    transport: Rc<Transport>,
    hooks: Hooks,
    retry: RetryPolicy,
    addr: Url,
    mount: KvPath,
    prefix: KvPath,
    approle: Option<AppRole>,
    token: Option<Token>,
}

impl VaultClient {
    pub fn new(
        transport: Rc<Transport>,
        hooks: Hooks,
        retry: RetryPolicy,
        addr: Url,
        mount: KvPath,
        prefix: KvPath,
        approle: Option<AppRole>,
    ) -> Self {
        VaultClient {
            transport,
            hooks,
            retry,
            addr,
            mount,
            prefix,
            approle,
            token: None,
        }
    }

    pub fn set_approle(&mut self, approle: AppRole) {
        self.approle = Some(approle);
        self.token = None;
    }

    /// Seconds left before this backend's token is renewed by a new login.
    pub fn token_ttl(&self) -> Option<Duration> {
        let token = self.token.as_ref()?;
        Some(match token.renew_after {
            Some(at) => at.saturating_duration_since(Instant::now()),
            None => Duration::MAX,
        })
    }

    /// Returns the API path of a KV entry's data, as messages show it.
    pub fn data_path(&self, relative: &KvPath) -> String {
        format!("{}/data/{}", self.mount, self.prefix.join(relative))
    }

    /// Logs in with the AppRole, replacing any token this client holds.
    pub fn login(&mut self) -> Result<(), VaultError> {
        let approle = self
            .approle
            .clone()
            .ok_or_else(|| VaultError::AuthenticationFailed {
                api_path: "auth/approle/login".into(),
                detail: "no AppRole credentials are configured".into(),
            })?;
        let api_path = format!("auth/{}/login", approle.auth_mount);
        let body = json!({
            "role_id": approle.role_id,
            "secret_id": approle.secret_id.expose(),
        });
        let response = self.send(Method::POST, &api_path, None, Some(body))?;
        let redact = [approle.secret_id.expose()];
        let value = match response.status {
            400 | 401 | 403 => {
                return Err(VaultError::AuthenticationFailed {
                    api_path,
                    detail: vault_errors(&response.body, &redact),
                })
            }
            _ => self.check("log in at", &api_path, response, &redact)?,
        };
        let auth = &value["auth"];
        let token = auth["client_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| VaultError::InvalidResponse {
                operation: "log in at",
                api_path: api_path.clone(),
                detail: "no auth.client_token in the answer".into(),
            })?;
        let ttl = auth["lease_duration"].as_u64().unwrap_or(0);
        let renew_after = (ttl > 0).then(|| {
            let ttl = Duration::from_secs(ttl);
            Instant::now() + ttl - (ttl / 5).min(MAX_RENEW_MARGIN)
        });
        self.token = Some(Token {
            value: Secret::new(token),
            renew_after,
        });
        Ok(())
    }

    /// Reads the latest version of the entry at `relative` under the prefix.
    pub fn kv_read(&mut self, relative: &KvPath) -> Result<KvEntry, VaultError> {
        let path = self.prefix.join(relative);
        let api_path = format!("{}/data/{}", self.mount, path);
        let encoded = format!("{}/data/{}", self.mount.encoded(), path.encoded());
        let value = self.authed("read", Method::GET, &api_path, &encoded, None)?;
        let data = &value["data"];
        let version = data["metadata"]["version"].as_u64().unwrap_or(0);
        match &data["data"] {
            Value::Object(map) => Ok(KvEntry {
                data: map.clone(),
                version,
            }),
            _ => Err(VaultError::NotFound {
                api_path,
                detail: format!("version {version} has no data"),
            }),
        }
    }

    /// Writes a new version of the entry at `relative` and returns its number.
    /// With `cas`, Vault writes only if the current version is that number.
    pub fn kv_write(
        &mut self,
        relative: &KvPath,
        data: &Map<String, Value>,
        cas: Option<u64>,
    ) -> Result<u64, VaultError> {
        let path = self.prefix.join(relative);
        let api_path = format!("{}/data/{}", self.mount, path);
        let encoded = format!("{}/data/{}", self.mount.encoded(), path.encoded());
        let mut body = json!({ "data": data });
        if let Some(cas) = cas {
            body["options"] = json!({ "cas": cas });
        }
        let value = self.authed("write", Method::POST, &api_path, &encoded, Some(body))?;
        value["data"]["version"]
            .as_u64()
            .ok_or_else(|| VaultError::InvalidResponse {
                operation: "write",
                api_path,
                detail: "no data.version in the answer".into(),
            })
    }

    /// Deletes every version and the metadata of the entry at `relative`.
    pub fn kv_delete_all(&mut self, relative: &KvPath) -> Result<(), VaultError> {
        let path = self.prefix.join(relative);
        let api_path = format!("{}/metadata/{}", self.mount, path);
        let encoded = format!("{}/metadata/{}", self.mount.encoded(), path.encoded());
        self.authed("delete", Method::DELETE, &api_path, &encoded, None)
            .map(|_| ())
    }

    /// Lists the keys directly under the prefix, or under `relative` below it.
    /// Folders end in `/`. A folder with nothing in it lists as empty.
    pub fn kv_list(&mut self, relative: Option<&KvPath>) -> Result<Vec<String>, VaultError> {
        let path = match relative {
            Some(relative) => self.prefix.join(relative),
            None => self.prefix.clone(),
        };
        let api_path = format!("{}/metadata/{}/", self.mount, path);
        let encoded = format!(
            "{}/metadata/{}/?list=true",
            self.mount.encoded(),
            path.encoded()
        );
        let value = match self.authed("list", Method::GET, &api_path, &encoded, None) {
            Err(VaultError::NotFound { .. }) => return Ok(Vec::new()),
            other => other?,
        };
        Ok(value["data"]["keys"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Looks a wrapping token up without using it.
    pub fn wrapping_lookup(&self, wrapped: &Secret) -> Result<WrapInfo, VaultError> {
        let api_path = "sys/wrapping/lookup";
        let body = json!({ "token": wrapped.expose() });
        let response = self.send(Method::POST, api_path, None, Some(body))?;
        let redact = [wrapped.expose()];
        if response.status == 400 || response.status == 403 {
            return Err(VaultError::WrappingTokenInvalid {
                detail: vault_errors(&response.body, &redact),
            });
        }
        let value = self.check("look up", api_path, response, &redact)?;
        Ok(WrapInfo {
            creation_path: value["data"]["creation_path"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        })
    }

    /// Unwraps a response-wrapping token that contains an AppRole secret_id.
    /// This uses the token up: a second call fails.
    pub fn unwrap_secret_id(&self, wrapped: &Secret) -> Result<Secret, VaultError> {
        let api_path = "sys/wrapping/unwrap";
        let response = self.send(Method::POST, api_path, Some(wrapped), None)?;
        let redact = [wrapped.expose()];
        if response.status == 400 || response.status == 403 {
            return Err(VaultError::WrappingTokenInvalid {
                detail: vault_errors(&response.body, &redact),
            });
        }
        let value = self.check("unwrap at", api_path, response, &redact)?;
        value["data"]["secret_id"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .ok_or_else(|| VaultError::InvalidResponse {
                operation: "unwrap at",
                api_path: api_path.into(),
                detail: "the wrapped answer holds no data.secret_id".into(),
            })
    }

    /// Reads `sys/seal-status`, which needs no token.
    pub fn seal_status(&self) -> Result<SealStatus, VaultError> {
        let api_path = "sys/seal-status";
        let response = self.send(Method::GET, api_path, None, None)?;
        let value = self.check("read", api_path, response, &[])?;
        Ok(SealStatus {
            sealed: value["sealed"].as_bool().unwrap_or(true),
            initialized: value["initialized"].as_bool().unwrap_or(false),
            version: value["version"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// Sends a request with this client's token, logging in first when it
    /// has none or it is about to expire. A 403 on a token that was not
    /// fresh leads to one new login and one more try, because Vault returns
    /// 403 both for an expired or revoked token and for a policy denial.
    fn authed(
        &mut self,
        operation: &'static str,
        method: Method,
        api_path: &str,
        encoded: &str,
        body: Option<Value>,
    ) -> Result<Value, VaultError> {
        let mut fresh = false;
        if self.token_expired() {
            self.login()?;
            fresh = true;
        }
        loop {
            let token = self.token.as_ref().map(|t| t.value.clone());
            let response = self.send(method.clone(), encoded, token.as_ref(), body.clone())?;
            if response.status == 403 && !fresh {
                self.login()?;
                fresh = true;
                continue;
            }
            let redact: Vec<&str> = token.iter().map(Secret::expose).collect();
            return self.check(operation, api_path, response, &redact);
        }
    }

    fn token_expired(&self) -> bool {
        match &self.token {
            None => true,
            Some(Token {
                renew_after: Some(at),
                ..
            }) => Instant::now() >= *at,
            Some(_) => false,
        }
    }

    /// Sends a request, retrying what is safe to retry: a request that never
    /// reached the server, a rate-limited one, and an idempotent one that
    /// failed with a server error other than 501 or a sealed Vault. A login
    /// or write that may have reached the server is never sent twice.
    fn send(
        &self,
        method: Method,
        encoded_api_path: &str,
        token: Option<&Secret>,
        body: Option<Value>,
    ) -> Result<RawResponse, VaultError> {
        let url = self.url(encoded_api_path)?;
        let body = body.map(|b| b.to_string().into_bytes());
        let idempotent = matches!(method, Method::GET | Method::DELETE | Method::HEAD);
        let shown_path = encoded_api_path.split('?').next().unwrap_or_default();
        let mut waited = Duration::ZERO;
        for attempt in 0.. {
            let started = Instant::now();
            let result = self.transport.send(
                method.clone(),
                url.clone(),
                token,
                body.clone(),
                &self.hooks.abort,
            );
            let reason = match &result {
                Ok(response) => {
                    let millis = started.elapsed().as_secs_f64() * 1000.0;
                    (self.hooks.on_response)(method.as_str(), shown_path, response.status, millis);
                    retry_reason(response, idempotent)
                }
                Err(VaultError::Unreachable {
                    cause,
                    request_sent,
                    ..
                }) if idempotent || !request_sent => Some((cause.clone(), None)),
                Err(_) => None,
            };
            let Some((why, retry_after)) = reason else {
                return result;
            };
            // OpenBao sends `Retry-After: 0` with every 429, so the backoff is
            // a floor under the delay the server requests.
            let backoff = (FIRST_BACKOFF * 2u32.saturating_pow(attempt)).min(MAX_BACKOFF);
            let delay = retry_after.map_or(backoff, |asked| asked.max(backoff));
            if attempt >= self.retry.max_retries || waited + delay > self.retry.max_wait {
                return result;
            }
            (self.hooks.on_retry)(&format!(
                "retrying {method} {shown_path} in {} ms ({why})",
                delay.as_millis()
            ));
            self.transport.sleep(delay, &self.hooks.abort)?;
            waited += delay;
        }
        unreachable!("the retry loop returns")
    }

    fn url(&self, encoded_api_path: &str) -> Result<Url, VaultError> {
        let base = self.addr.as_str().trim_end_matches('/');
        Url::parse(&format!("{base}/v1/{encoded_api_path}")).map_err(|e| {
            VaultError::InvalidResponse {
                operation: "build a URL for",
                api_path: encoded_api_path.to_owned(),
                detail: e.to_string(),
            }
        })
    }

    /// Turns a response into its JSON body or the error its status means.
    fn check(
        &self,
        operation: &'static str,
        api_path: &str,
        response: RawResponse,
        redact: &[&str],
    ) -> Result<Value, VaultError> {
        let api_path = api_path.to_owned();
        match response.status {
            200..=299 if response.body.is_empty() => Ok(Value::Null),
            200..=299 => {
                serde_json::from_slice(&response.body).map_err(|e| VaultError::InvalidResponse {
                    operation,
                    api_path,
                    detail: format!("the body is not JSON: {e}"),
                })
            }
            300..=399 => Err(VaultError::Redirect {
                url: origin(&self.addr),
                location: response
                    .location
                    .unwrap_or_else(|| "no Location header".into()),
            }),
            403 => Err(VaultError::PermissionDenied {
                operation,
                api_path,
                detail: vault_errors(&response.body, redact),
            }),
            404 => Err(VaultError::NotFound {
                detail: not_found_detail(&response.body, redact),
                api_path,
            }),
            429 => Err(VaultError::RateLimited {
                api_path,
                detail: vault_errors(&response.body, redact),
            }),
            503 if self.confirm_sealed(&response) => Err(VaultError::Sealed {
                url: origin(&self.addr),
            }),
            status => Err(VaultError::Status {
                status,
                operation,
                api_path,
                detail: vault_errors(&response.body, redact),
            }),
        }
    }
}

impl VaultClient {
    /// Confirms with `sys/seal-status` that a 503 means a sealed Vault, and
    /// not an overloaded or standby node.
    fn confirm_sealed(&self, response: &RawResponse) -> bool {
        if !is_sealed_answer(response) {
            return false;
        }
        self.seal_status().map(|s| s.sealed).unwrap_or(true)
    }
}

fn is_sealed_answer(response: &RawResponse) -> bool {
    response.status == 503 && vault_errors(&response.body, &[]).contains("sealed")
}

/// Returns why a response is worth another try, and how long the server
/// asked to wait, or `None` when it is final.
fn retry_reason(response: &RawResponse, idempotent: bool) -> Option<(String, Option<Duration>)> {
    match response.status {
        429 => Some(("rate limited".into(), response.retry_after)),
        501 => None,
        503 if is_sealed_answer(response) => None,
        500..=599 if idempotent => Some((format!("status {}", response.status), None)),
        _ => None,
    }
}

/// Joins the `errors` array of a Vault error body, with any secret the
/// request carried cut out in case Vault echoes it.
fn vault_errors(body: &[u8], redact: &[&str]) -> String {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(value) => match value["errors"].as_array() {
            Some(errors) => errors
                .iter()
                .map(|e| {
                    e.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| e.to_string())
                })
                .collect::<Vec<_>>()
                .join("; "),
            None => String::new(),
        },
        Err(_) => String::from_utf8_lossy(body).chars().take(200).collect(),
    };
    redact_text(text, redact)
}

/// Explains a 404 on a KV read. Vault returns the metadata of a deleted or
/// destroyed version with its 404, and nothing for a path that never existed.
fn not_found_detail(body: &[u8], redact: &[&str]) -> String {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    let metadata = &value["data"]["metadata"];
    let version = metadata["version"].as_u64().unwrap_or(0);
    if metadata["destroyed"].as_bool() == Some(true) {
        return format!("version {version} was destroyed");
    }
    if let Some(at) = metadata["deletion_time"].as_str().filter(|t| !t.is_empty()) {
        return format!("version {version} was deleted at {at}");
    }
    vault_errors(body, redact)
}

fn redact_text(mut text: String, redact: &[&str]) -> String {
    for secret in redact.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret, "<redacted>");
    }
    text
}
