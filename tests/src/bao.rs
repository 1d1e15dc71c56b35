//! OpenBao server per test, with admin helpers that act as its root token.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tempfile::TempDir;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

use crate::ports::reserve_consecutive_ports;
use crate::scratch::{random_hex, run_dir, tail, BAO_PID_FILE};

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const START_ATTEMPTS: usize = 3;
const LOG_FILE: &str = "bao.log";
/// Server configuration of a persistent server, in its scratch folder.
const CONFIG_FILE: &str = "config.hcl";
/// Raft storage folder of a persistent server, in its scratch folder.
const STORAGE_DIR: &str = "raft";
/// Folder, in the scratch folder, where `-dev-tls` writes its files:
/// `vault-ca.pem` (the CA certificate, mode 0444), `vault-cert.pem` and
/// `vault-key.pem` (the server's certificate and key, mode 0400), as
/// OpenBao 2.7 names them.
const TLS_DIR: &str = "tls";
const CA_FILE: &str = "vault-ca.pem";

/// How a server is run, which decides its storage, its scheme and how the
/// harness gets it ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerKind {
    /// `bao server -dev`: in-memory storage, initialized and unsealed by
    /// OpenBao itself, KV v2 at `secret/`, plain HTTP.
    Dev,
    /// `bao server -dev -dev-tls`: like `Dev`, over HTTPS with a certificate
    /// signed by a CA that OpenBao creates at startup.
    DevTls,
    /// `bao server -config=...` with raft storage in the scratch folder and
    /// plain HTTP. The harness initializes it with one unseal key, unseals
    /// it and enables KV v2 at `secret/`. Its data survives a restart.
    Persistent,
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ServerKind::Dev => "dev server",
            ServerKind::DevTls => "dev TLS server",
            ServerKind::Persistent => "persistent server",
        };
        f.write_str(name)
    }
}

/// An OpenBao server on a random 127.0.0.1 port, unsealed, with a KV v2
/// engine at `secret/`. See [`Bao::start_dev`], [`Bao::start_dev_tls`] and
/// [`Bao::start_persistent`].
///
/// Dropping it kills the server and removes its folder (home, log, storage,
/// certificates, and the `.vault-token` file that dev mode writes).
pub struct Bao {
    child: Child,
    dir: TempDir,
    port: u16,
    kind: ServerKind,
    root_token: String,
    unseal_key: String,
    http: ureq::Agent,
}

impl Bao {
    /// Starts a dev server and waits until `GET /v1/sys/health` reports it
    /// unsealed, or panics after 20 s with the end of the server log.
    pub fn start_dev() -> Bao {
        Self::start(ServerKind::Dev)
    }

    /// Starts a dev server that serves HTTPS (`-dev-tls`), with its
    /// certificates in its scratch folder. [`Bao::addr`] is
    /// `https://127.0.0.1:PORT`, and the harness's HTTP client and CLI trust
    /// the CA at [`Bao::ca_cert_path`].
    pub fn start_dev_tls() -> Bao {
        Self::start(ServerKind::DevTls)
    }

    /// Starts a non-dev server with raft storage in its scratch folder,
    /// initializes it with a single unseal key, unseals it and enables KV v2
    /// at `secret/`. Unlike a dev server, it can be stopped and started again
    /// with [`Bao::restart`], keeping its data, roles and tokens.
    pub fn start_persistent() -> Bao {
        let mut bao = Self::start(ServerKind::Persistent);
        bao.initialize();
        bao
    }

    fn start(kind: ServerKind) -> Bao {
        for attempt in 1..=START_ATTEMPTS {
            match Self::try_start(kind) {
                Ok(bao) => return bao,
                // Another process took the port after the bind test.
                Err(StartError::AddressInUse) if attempt < START_ATTEMPTS => continue,
                Err(StartError::AddressInUse) => break,
                Err(StartError::Failed(message)) => panic!("{message}"),
            }
        }
        panic!("OpenBao {kind} failed to start {START_ATTEMPTS} times: address already in use");
    }

    fn try_start(kind: ServerKind) -> Result<Bao, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("bao-")
            .tempdir_in(run_dir())
            .expect("failed to create the OpenBao scratch folder");
        // The server listens on the API port and on the next one for
        // cluster traffic.
        let port = reserve_consecutive_ports(2);
        let root_token = match kind {
            ServerKind::Dev | ServerKind::DevTls => random_hex(16),
            // `sys/init` creates the root token of a persistent server.
            ServerKind::Persistent => String::new(),
        };
        match kind {
            ServerKind::Dev => {}
            ServerKind::DevTls => create_dir(&dir.path().join(TLS_DIR)),
            ServerKind::Persistent => write_server_config(dir.path(), port),
        }
        let child =
            spawn_server(kind, dir.path(), port, &root_token).map_err(StartError::Failed)?;
        let mut bao = Bao {
            child,
            dir,
            port,
            kind,
            root_token,
            unseal_key: String::new(),
            http: http_agent(None),
        };
        bao.wait_until_ready()?;
        Ok(bao)
    }

    /// Waits until the server responds to `GET /v1/sys/health`. A dev server
    /// must also report itself unsealed and have printed its unseal key.
    fn wait_until_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = fs::read_to_string(self.log_path()).unwrap_or_default();
                if log.contains("address already in use") {
                    return Err(StartError::AddressInUse);
                }
                return Err(StartError::Failed(format!(
                    "OpenBao {} on {} exited with {status} during startup; last lines of its log:\n{}",
                    self.kind,
                    self.addr(),
                    self.redacted_log_tail()
                )));
            }
            if self.is_ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StartError::Failed(format!(
                    "OpenBao {} on {} was not ready within {} s; last lines of its log:\n{}",
                    self.kind,
                    self.addr(),
                    READY_TIMEOUT.as_secs(),
                    self.redacted_log_tail()
                )));
            }
            sleep(Duration::from_millis(100));
        }
    }

    fn is_ready(&mut self) -> bool {
        match self.kind {
            ServerKind::Persistent => self.health_status().is_some(),
            ServerKind::Dev | ServerKind::DevTls => {
                if self.kind == ServerKind::DevTls && !self.trust_dev_ca() {
                    return false;
                }
                if self.health_status() != Some(200) {
                    return false;
                }
                match self.parse_unseal_key() {
                    Some(key) => {
                        self.unseal_key = key;
                        true
                    }
                    None => false,
                }
            }
        }
    }

    /// Makes the HTTP client trust the CA that `-dev-tls` wrote, once the
    /// file is complete. Returns whether the client trusts it.
    fn trust_dev_ca(&mut self) -> bool {
        let Some(ca_path) = self.ca_cert_path() else {
            return false;
        };
        let Ok(pem) = fs::read(&ca_path) else {
            return false;
        };
        // A file still being written does not parse yet.
        let Ok(certificate) = Certificate::from_pem(&pem) else {
            return false;
        };
        self.http = http_agent(Some(certificate));
        true
    }

    /// Initializes a new persistent server with one unseal key, keeps the
    /// key and the root token in memory only, unseals the server and
    /// enables KV v2 at `secret/`.
    fn initialize(&mut self) {
        let body = json!({ "secret_shares": 1, "secret_threshold": 1 });
        let (status, value) = self.request_as(None, "PUT", "/v1/sys/init", Some(&body));
        if status != 200 {
            panic!(
                "PUT /v1/sys/init on {} returned HTTP {status}; errors: {}",
                self.addr(),
                value.get("errors").unwrap_or(&Value::Null)
            );
        }
        self.unseal_key = value["keys_base64"][0]
            .as_str()
            .expect("sys/init response has keys_base64")
            .to_string();
        self.root_token = value["root_token"]
            .as_str()
            .expect("sys/init response has root_token")
            .to_string();
        self.unseal();
        self.enable_kv2("secret");
    }

    fn health_status(&self) -> Option<u16> {
        let url = format!("{}/v1/sys/health", self.addr());
        let response = self
            .http
            .get(&url)
            .config()
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .call()
            .ok()?;
        Some(response.status().as_u16())
    }

    /// Reads the "Unseal Key: ..." line that dev mode prints after startup.
    fn parse_unseal_key(&self) -> Option<String> {
        let log = fs::read_to_string(self.log_path()).ok()?;
        log.lines()
            .find_map(|line| line.trim().strip_prefix("Unseal Key: "))
            .map(|key| key.trim().to_string())
    }

    /// Returns the end of the server log with the root token and unseal key
    /// removed, for panic messages.
    fn redacted_log_tail(&self) -> String {
        let mut text = tail(&self.log_path(), 30);
        text = text.replace(&self.root_token, "<root token>");
        if !self.unseal_key.is_empty() {
            text = text.replace(&self.unseal_key, "<unseal key>");
        }
        text.lines()
            .map(|line| {
                if line.starts_with("Unseal Key:") {
                    "Unseal Key: <redacted>"
                } else if line.starts_with("Root Token:") {
                    "Root Token: <redacted>"
                } else {
                    line
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Returns the base URL, `http://127.0.0.1:PORT`, or
    /// `https://127.0.0.1:PORT` for a server from [`Bao::start_dev_tls`].
    pub fn addr(&self) -> String {
        let scheme = match self.kind {
            ServerKind::DevTls => "https",
            ServerKind::Dev | ServerKind::Persistent => "http",
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Returns the path of the CA certificate (PEM) that signed the server's
    /// certificate, for a server from [`Bao::start_dev_tls`]. The file is
    /// inside the scratch folder, which only root can enter, so copy it for
    /// the `postgres` OS user.
    pub fn ca_cert_path(&self) -> Option<PathBuf> {
        match self.kind {
            ServerKind::DevTls => Some(self.dir.path().join(TLS_DIR).join(CA_FILE)),
            ServerKind::Dev | ServerKind::Persistent => None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the root token, for admin setup in tests only. Never give it
    /// to the extension.
    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// Returns the single unseal key of the server, for seal/unseal tests.
    pub fn unseal_key(&self) -> &str {
        &self.unseal_key
    }

    /// Returns the process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the server's home and scratch folder, removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns the path of the server log. The log contains the root token
    /// and unseal key, so tests must not print it.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    // ---- CLI -------------------------------------------------------------

    /// Runs the `bao` CLI against this server as the root token and returns
    /// its stdout, or panics with its stderr.
    ///
    /// Callers must not print the stdout of commands that return secrets.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.cli_output(args, None, None);
        self.check_cli(args, &output);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Like [`Bao::cli`], with `input` on the CLI's stdin (for `-` arguments).
    pub fn cli_with_input(&self, args: &[&str], input: &str) -> String {
        let output = self.cli_output(args, Some(input), None);
        self.check_cli(args, &output);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs the `bao` CLI as `token` (the root token if `None`) and returns
    /// the output whatever the exit status.
    pub fn cli_output(&self, args: &[&str], input: Option<&str>, token: Option<&str>) -> Output {
        let mut command = Command::new(bao_binary());
        command.args(args).current_dir(self.dir.path());
        clear_bao_env(&mut command);
        let addr = self.addr();
        command
            .env("BAO_ADDR", &addr)
            .env("VAULT_ADDR", &addr)
            .env("BAO_TOKEN", token.unwrap_or(&self.root_token))
            .env("HOME", self.dir.path());
        if let Some(ca_path) = self.ca_cert_path() {
            command
                .env("BAO_CACERT", &ca_path)
                .env("VAULT_CACERT", &ca_path);
        }
        command
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(err) => panic!("failed to run {}: {err}", bao_binary()),
        };
        if let Some(input) = input {
            let mut stdin = child.stdin.take().expect("stdin is piped");
            stdin
                .write_all(input.as_bytes())
                .expect("failed to write to the stdin of bao");
        }
        child.wait_with_output().expect("failed to wait for bao")
    }

    fn check_cli(&self, args: &[&str], output: &Output) {
        if !output.status.success() {
            panic!(
                "`bao {}` failed with {}:\n{}",
                redact_cli_args(args),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    // ---- HTTP API ----------------------------------------------------------

    /// Sends an HTTP request as the root token and returns the status and
    /// the JSON body (`Null` if empty, a string if not JSON).
    ///
    /// `path` starts with `/v1/`. The method `LIST` is sent as
    /// `GET ...?list=true`.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.request_as(Some(&self.root_token), method, path, body)
    }

    /// Like [`Bao::request`], as `token` (no token header if `None`).
    pub fn request_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        self.send(token, &[], method, path, body)
    }

    pub(crate) fn send(
        &self,
        token: Option<&str>,
        extra_headers: &[(&str, &str)],
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let (method, url) = if method.eq_ignore_ascii_case("LIST") {
            let separator = if path.contains('?') { '&' } else { '?' };
            ("GET", format!("{}{path}{separator}list=true", self.addr()))
        } else {
            (method, format!("{}{path}", self.addr()))
        };
        let mut builder = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(token) = token {
            builder = builder.header("X-Vault-Token", token);
        }
        for (name, value) in extra_headers {
            builder = builder.header(*name, *value);
        }
        let result = match body {
            Some(body) => {
                let request = builder
                    .header("Content-Type", "application/json")
                    .body(body.to_string())
                    .expect("valid HTTP request");
                self.http.run(request)
            }
            None => {
                let request = builder.body(()).expect("valid HTTP request");
                self.http.run(request)
            }
        };
        let mut response = match result {
            Ok(response) => response,
            Err(err) => panic!("{method} {url} failed: {err}"),
        };
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|err| panic!("failed to read the response to {method} {url}: {err}"));
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// Sends a request as the root token and panics unless the status is one
    /// of `expected`. The panic message shows the `errors` field only.
    pub(crate) fn request_expect(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        expected: &[u16],
    ) -> Value {
        let (status, value) = self.request(method, path, body);
        if !expected.contains(&status) {
            panic!(
                "{method} {path} returned HTTP {status}, expected {expected:?}; errors: {}",
                value.get("errors").unwrap_or(&Value::Null)
            );
        }
        value
    }

    // ---- seal state and process control -------------------------------------

    pub fn seal(&self) {
        self.request_expect("PUT", "/v1/sys/seal", None, &[200, 204]);
    }

    /// Submits the unseal key, then waits until the server is active and
    /// every KV v2 engine responds again.
    pub fn unseal(&self) {
        let body = json!({ "key": self.unseal_key });
        let value = self.request_expect("PUT", "/v1/sys/unseal", Some(&body), &[200]);
        assert_eq!(
            value["sealed"],
            Value::Bool(false),
            "OpenBao is still sealed after submitting the unseal key"
        );
        self.wait_until_active();
        let mounts = self.request_expect("GET", "/v1/sys/mounts", None, &[200]);
        let Some(mounts) = mounts["data"].as_object() else {
            return;
        };
        for (mount, info) in mounts {
            if info["type"] == "kv" && info["options"]["version"] == "2" {
                self.wait_for_kv2(mount.trim_end_matches('/'));
            }
        }
    }

    /// Waits until `GET /v1/sys/health` returns 200 (initialized, unsealed
    /// and active), or panics after 20 s.
    fn wait_until_active(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let status = self.health_status();
            if status == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao on {} was not active within {} s after unsealing (last health status: {status:?})",
                self.addr(),
                READY_TIMEOUT.as_secs()
            );
            sleep(Duration::from_millis(50));
        }
    }

    pub fn is_sealed(&self) -> bool {
        let value = self.request_expect("GET", "/v1/sys/seal-status", None, &[200]);
        value["sealed"].as_bool().expect("seal-status has `sealed`")
    }

    /// Stops the server process with SIGSTOP. The kernel still accepts
    /// connections, but requests get no response, as with a hung server.
    pub fn suspend(&self) {
        self.signal(libc::SIGSTOP);
        // kill(2) returns before the process has stopped; wait until the
        // kernel reports it stopped, so that no request slips through.
        let stat = format!("/proc/{}/stat", self.child.id());
        for _ in 0..500 {
            let state = fs::read_to_string(&stat).unwrap_or_default();
            if let Some((_, rest)) = state.rsplit_once(") ") {
                if rest.starts_with('T') {
                    return;
                }
            }
            sleep(Duration::from_millis(2));
        }
        panic!(
            "OpenBao (pid {}) did not stop after SIGSTOP",
            self.child.id()
        );
    }

    /// Continues a server stopped by [`Bao::suspend`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own, not yet reaped, child process.
        let result = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            result, 0,
            "failed to send signal {signal} to OpenBao (pid {pid})"
        );
    }

    /// Kills the server; its folder stays until drop, and its port is
    /// refused until [`Bao::restart`]. Dev mode keeps everything in memory,
    /// so only a persistent server can be started again.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops a server from [`Bao::start_persistent`] if it runs, starts it
    /// again on the same port with the same storage, and unseals it. Its
    /// data, roles and unexpired tokens are kept.
    pub fn restart(&mut self) {
        assert_eq!(
            self.kind,
            ServerKind::Persistent,
            "only a persistent server keeps its data across a restart"
        );
        self.stop();
        self.child = spawn_server(self.kind, self.dir.path(), self.port, "")
            .unwrap_or_else(|message| panic!("{message}"));
        match self.wait_until_ready() {
            Ok(()) => {}
            Err(StartError::AddressInUse) => panic!(
                "OpenBao could not restart on {}: another process took the port",
                self.addr()
            ),
            Err(StartError::Failed(message)) => panic!("{message}"),
        }
        self.unseal();
    }

    // ---- AppRole -----------------------------------------------------------

    /// Sets up AppRole login for `role` with access to `mount/secrets_path`
    /// only, and returns the role_id.
    ///
    /// Enables the `approle` auth method and a KV v2 engine at `mount` if
    /// missing, writes the policy from [`approle_policy`] as `<role>-policy`,
    /// and creates the role with `token_policies=<role>-policy token_ttl=5m`.
    /// `extra_role_args` are `key=value` role parameters
    /// (`token_no_default_policy=true`, `token_ttl=5s`, ...) and override
    /// those defaults.
    pub fn setup_approle(
        &self,
        role: &str,
        mount: &str,
        secrets_path: &str,
        extra_role_args: &[&str],
    ) -> String {
        self.enable_approle();
        self.enable_kv2(mount);

        let policy_name = format!("{role}-policy");
        let policy = json!({ "policy": approle_policy(mount, secrets_path) });
        let policy_path = format!("/v1/sys/policies/acl/{}", encode_path(&policy_name));
        self.request_expect("PUT", &policy_path, Some(&policy), &[200, 204]);

        let mut parameters = Map::new();
        parameters.insert("token_policies".into(), policy_name.into());
        parameters.insert("token_ttl".into(), "5m".into());
        for arg in extra_role_args {
            let Some((key, value)) = arg.split_once('=') else {
                panic!("invalid role argument {arg:?}: expected key=value");
            };
            parameters.insert(key.into(), value.into());
        }
        let role_path = format!("/v1/auth/approle/role/{}", encode_path(role));
        self.request_expect(
            "POST",
            &role_path,
            Some(&Value::Object(parameters)),
            &[200, 204],
        );

        let value = self.request_expect("GET", &format!("{role_path}/role-id"), None, &[200]);
        value["data"]["role_id"]
            .as_str()
            .expect("role-id response has data.role_id")
            .to_string()
    }

    /// Creates a secret_id for `role`, response-wrapped for 5 minutes, with
    /// `bao write -wrap-ttl=5m -field=wrapping_token -f .../secret-id`, and
    /// returns the wrapping token.
    pub fn wrapped_secret_id(&self, role: &str) -> String {
        let path = format!("auth/approle/role/{role}/secret-id");
        self.cli(&[
            "write",
            "-wrap-ttl=5m",
            "-field=wrapping_token",
            "-f",
            &path,
        ])
        .trim()
        .to_string()
    }

    /// Creates a plain (unwrapped) secret_id for `role`.
    pub fn secret_id(&self, role: &str) -> String {
        let path = format!("/v1/auth/approle/role/{}/secret-id", encode_path(role));
        let value = self.request_expect("POST", &path, Some(&json!({})), &[200]);
        value["data"]["secret_id"]
            .as_str()
            .expect("secret-id response has data.secret_id")
            .to_string()
    }

    /// Unwraps a response-wrapping token (as the wrapping token itself) and
    /// returns the wrapped `data`, or `None` if OpenBao rejects the token
    /// (already used, expired, unknown).
    pub fn unwrap(&self, wrapping_token: &str) -> Option<Value> {
        let (status, value) = self.request_as(
            Some(wrapping_token),
            "POST",
            "/v1/sys/wrapping/unwrap",
            None,
        );
        (status == 200).then(|| value["data"].clone())
    }

    /// Logs in with AppRole and returns the client token, or `None` if the
    /// login is rejected.
    pub fn approle_login(&self, role_id: &str, secret_id: &str) -> Option<String> {
        let body = json!({ "role_id": role_id, "secret_id": secret_id });
        let (status, value) = self.request_as(None, "POST", "/v1/auth/approle/login", Some(&body));
        if status != 200 {
            return None;
        }
        value["auth"]["client_token"].as_str().map(str::to_string)
    }

    fn enable_approle(&self) {
        let auth = self.request_expect("GET", "/v1/sys/auth", None, &[200]);
        if auth["data"].get("approle/").is_none() {
            let body = json!({ "type": "approle" });
            self.request_expect("POST", "/v1/sys/auth/approle", Some(&body), &[200, 204]);
        }
    }

    fn enable_kv2(&self, mount: &str) {
        let mount = mount.trim_matches('/');
        let mounts = self.request_expect("GET", "/v1/sys/mounts", None, &[200]);
        if mounts["data"].get(format!("{mount}/")).is_some() {
            return;
        }
        let body = json!({ "type": "kv", "options": { "version": "2" } });
        let path = format!("/v1/sys/mounts/{}", encode_path(mount));
        self.request_expect("POST", &path, Some(&body), &[200, 204]);
        self.wait_for_kv2(mount);
    }

    /// Waits until the KV v2 engine at `mount` responds, or panics after
    /// 10 s. A KV v2 engine rejects requests until its storage upgrade has
    /// run, after it is enabled and after each unseal.
    fn wait_for_kv2(&self, mount: &str) {
        let config_path = format!("/v1/{}/config", encode_path(mount));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.request("GET", &config_path, None).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "KV v2 engine at {mount}/ was not ready within 10 s"
            );
            sleep(Duration::from_millis(50));
        }
    }

    // ---- KV v2 as root -----------------------------------------------------

    /// Writes `data` (a JSON object) as a new version of `mount/path`.
    pub fn kv_put(&self, mount: &str, path: &str, data: &Value) {
        let body = json!({ "data": data });
        self.request_expect(
            "POST",
            &kv_url(mount, "data", path),
            Some(&body),
            &[200, 204],
        );
    }

    /// Returns the current version's data map of `mount/path`, or `None` if
    /// the path is missing or its current version is deleted or destroyed.
    pub fn kv_get(&self, mount: &str, path: &str) -> Option<Value> {
        let value = self.request_expect("GET", &kv_url(mount, "data", path), None, &[200, 404]);
        match &value["data"]["data"] {
            Value::Null => None,
            data => Some(data.clone()),
        }
    }

    /// Returns the metadata of `mount/path` (versions, custom_metadata, ...),
    /// or `None` if missing.
    pub fn kv_metadata(&self, mount: &str, path: &str) -> Option<Value> {
        let url = kv_url(mount, "metadata", path);
        let value = self.request_expect("GET", &url, None, &[200, 404]);
        match &value["data"] {
            Value::Null => None,
            data => Some(data.clone()),
        }
    }

    /// Deletes all versions and the metadata of `mount/path`.
    pub fn kv_delete_all(&self, mount: &str, path: &str) {
        let url = kv_url(mount, "metadata", path);
        self.request_expect("DELETE", &url, None, &[200, 204]);
    }

    /// Lists the keys directly under `mount/path` (folders end with `/`), or
    /// an empty list if there are none.
    pub fn kv_list(&self, mount: &str, path: &str) -> Vec<String> {
        let url = kv_url(mount, "metadata", path);
        let value = self.request_expect("LIST", &url, None, &[200, 404]);
        value["data"]["keys"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .filter_map(|key| key.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        // SIGKILL also ends a suspended process. The folder is removed when
        // the TempDir field drops, after this.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum StartError {
    AddressInUse,
    Failed(String),
}

/// Returns the minimal policy for an application that keeps its secrets under
/// `mount/secrets_path`: list the prefix, manage metadata and data below it.
pub fn approle_policy(mount: &str, secrets_path: &str) -> String {
    let mount = mount.trim_matches('/');
    let path = secrets_path.trim_matches('/');
    format!(
        "path \"{mount}/metadata/{path}/\" {{ capabilities = [\"list\"] }}\n\
         path \"{mount}/metadata/{path}/*\" {{ capabilities = [\"read\", \"update\", \"delete\", \"list\"] }}\n\
         path \"{mount}/data/{path}/*\" {{ capabilities = [\"read\", \"create\", \"update\", \"delete\"] }}\n"
    )
}

/// Returns the `bao` executable: `VAULT_REDIRECT_TEST_BAO` if set, else
/// `bao` from `PATH`.
fn bao_binary() -> String {
    std::env::var("VAULT_REDIRECT_TEST_BAO").unwrap_or_else(|_| "bao".to_string())
}

/// Removes inherited `BAO_*` and `VAULT_*` variables, so that neither the
/// server nor the CLI picks up an address, token or setting meant for
/// another server.
fn clear_bao_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("BAO_") || name_text.starts_with("VAULT_") {
            command.env_remove(name);
        }
    }
}

/// Builds the harness's HTTP client. With `ca`, HTTPS servers are trusted
/// only if that CA signed their certificate.
fn http_agent(ca: Option<Certificate<'static>>) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        // Only servers on 127.0.0.1 are contacted, never through a proxy.
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)));
    if let Some(ca) = ca {
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::new_with_certs(&[ca]))
            .build();
        config = config.tls_config(tls);
    }
    config.build().into()
}

/// Starts `bao server` of `kind` in `dir` on `port` (API) and `port + 1`
/// (cluster), appending its output to the log file, and records its
/// process id for the stale-run cleanup.
fn spawn_server(
    kind: ServerKind,
    dir: &Path,
    port: u16,
    root_token: &str,
) -> Result<Child, String> {
    let log_path = dir.join(LOG_FILE);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("failed to open the OpenBao log file");
    let log_for_stderr = log
        .try_clone()
        .expect("failed to clone the log file handle");

    let mut command = Command::new(bao_binary());
    command.arg("server");
    match kind {
        ServerKind::Dev | ServerKind::DevTls => {
            command
                .arg("-dev")
                .arg(format!("-dev-listen-address=127.0.0.1:{port}"));
        }
        ServerKind::Persistent => {
            command.arg(format!("-config={}", dir.join(CONFIG_FILE).display()));
        }
    }
    if kind == ServerKind::DevTls {
        command
            .arg("-dev-tls")
            .arg(format!("-dev-tls-cert-dir={}", dir.join(TLS_DIR).display()));
    }
    command
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_for_stderr);
    clear_bao_env(&mut command);
    command.env("HOME", dir);
    if !root_token.is_empty() {
        // Same as -dev-root-token-id, but keeps the token out of the process
        // list.
        command.env("BAO_DEV_ROOT_TOKEN_ID", root_token);
    }
    let child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            return Err(format!(
                "failed to run {}: {err} (install OpenBao with scripts/setup.sh)",
                bao_binary()
            ))
        }
    };
    fs::write(dir.join(BAO_PID_FILE), child.id().to_string())
        .expect("failed to write the OpenBao pid file");
    Ok(child)
}

/// Writes the configuration of a persistent server. OpenBao 2.7 has no
/// `file` storage and no `disable_mlock` setting, so it uses single-node
/// raft storage, which needs a cluster address.
fn write_server_config(dir: &Path, port: u16) {
    let storage = dir.join(STORAGE_DIR);
    create_dir(&storage);
    let cluster_port = port + 1;
    let config = format!(
        r#"storage "raft" {{
  path = "{storage}"
  node_id = "node1"
}}

listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}

api_addr = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster_port}"
"#,
        storage = storage.display()
    );
    let path = dir.join(CONFIG_FILE);
    if let Err(err) = fs::write(&path, config) {
        panic!("failed to write {}: {err}", path.display());
    }
}

fn create_dir(path: &Path) {
    if let Err(err) = fs::create_dir(path) {
        panic!("failed to create {}: {err}", path.display());
    }
}

fn kv_url(mount: &str, kind: &str, path: &str) -> String {
    format!(
        "/v1/{}/{kind}/{}",
        encode_path(mount.trim_matches('/')),
        encode_path(path.trim_start_matches('/'))
    )
}

/// Percent-encodes everything in `path` except unreserved characters and `/`.
pub fn encode_path(path: &str) -> String {
    let mut encoded = String::with_capacity(path.len());
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Formats CLI arguments for an error message, hiding the values of
/// `key=value` arguments, which may be secrets.
fn redact_cli_args(args: &[&str]) -> String {
    args.iter()
        .map(|arg| match arg.split_once('=') {
            Some((key, _)) if !arg.starts_with('-') => format!("{key}=<redacted>"),
            _ => arg.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}
