//! Root-token helpers of [`Bao`] that change what a client may do: ACL
//! policies, rate-limit quotas, token revocation and secret_id management.

use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bao::encode_path;
use crate::Bao;

/// How long [`Bao::disable_rate_limit`] retries while its own request is
/// rate limited.
const QUOTA_REMOVAL_TIMEOUT: Duration = Duration::from_secs(15);

impl Bao {
    /// Writes the ACL policy `name` with the HCL rules `hcl`, replacing any
    /// policy of that name. Tokens that have the policy get the new rules at
    /// their next request.
    pub fn write_policy(&self, name: &str, hcl: &str) {
        let path = format!("/v1/sys/policies/acl/{}", encode_path(name));
        let body = json!({ "policy": hcl });
        self.request_expect("PUT", &path, Some(&body), &[200, 204]);
    }

    /// Adds the rate-limit quota `name` for all paths, `rate_per_second`
    /// requests per second, and makes OpenBao send the `Retry-After` and
    /// `X-Ratelimit-*` headers on its 429 responses.
    ///
    /// All clients here connect from 127.0.0.1, so the harness's own
    /// requests, root token included, count against the quota too. Remove
    /// it with [`Bao::disable_rate_limit`] before further setup.
    pub fn enable_rate_limit(&self, name: &str, rate_per_second: f64) {
        // In OpenBao 2.7, POST sys/quotas/config also resets the fields it is
        // not given. Without the current exempt paths, OpenBao would start
        // rate-limiting sys/health, sys/seal-status and sys/unseal too.
        let config = self.request_expect("GET", "/v1/sys/quotas/config", None, &[200]);
        let exempt_paths = config["data"]["rate_limit_exempt_paths"].clone();
        let body = json!({
            "enable_rate_limit_response_headers": true,
            "rate_limit_exempt_paths": exempt_paths,
        });
        self.request_expect("POST", "/v1/sys/quotas/config", Some(&body), &[200, 204]);

        let path = format!("/v1/sys/quotas/rate-limit/{}", encode_path(name));
        let body = json!({ "rate": rate_per_second });
        self.request_expect("POST", &path, Some(&body), &[200, 204]);
    }

    /// Removes the rate-limit quota `name`, retrying for up to 15 s while
    /// the quota rejects this very request with HTTP 429.
    pub fn disable_rate_limit(&self, name: &str) {
        let path = format!("/v1/sys/quotas/rate-limit/{}", encode_path(name));
        let deadline = Instant::now() + QUOTA_REMOVAL_TIMEOUT;
        loop {
            let (status, value) = self.request("DELETE", &path, None);
            match status {
                200 | 204 => return,
                429 if Instant::now() < deadline => sleep(Duration::from_millis(200)),
                _ => panic!(
                    "DELETE {path} returned HTTP {status}; errors: {}",
                    value.get("errors").unwrap_or(&Value::Null)
                ),
            }
        }
    }

    /// Revokes every token issued by a login at `auth/approle/`, with
    /// `sys/leases/revoke-prefix/auth/approle/login`. The revocation is
    /// done when this returns.
    pub fn revoke_approle_tokens(&self) {
        self.request_expect(
            "PUT",
            "/v1/sys/leases/revoke-prefix/auth/approle/login",
            Some(&json!({ "sync": true })),
            &[200, 204],
        );
    }

    /// Returns the accessors of the live tokens that AppRole logins at
    /// `auth/approle/` issued. An accessor identifies a token without
    /// granting its access, so tests may compare and print it.
    pub fn approle_token_accessors(&self) -> Vec<String> {
        let list = self.request_expect("LIST", "/v1/auth/token/accessors", None, &[200, 404]);
        let accessors: Vec<String> = list["data"]["keys"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .filter_map(|key| key.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        accessors
            .into_iter()
            .filter(|accessor| {
                let body = json!({ "accessor": accessor });
                let (status, lookup) =
                    self.request("POST", "/v1/auth/token/lookup-accessor", Some(&body));
                // A token revoked between the listing and the lookup is gone.
                status == 200 && lookup["data"]["path"] == "auth/approle/login"
            })
            .collect()
    }

    /// Registers `secret_id` as a custom secret_id of `role` and returns a
    /// token that wraps it for 5 minutes, so that a test can compare the
    /// extension's output with the secret_id it unwraps. The secret_id goes
    /// to the CLI on stdin, never in its arguments.
    pub fn wrapped_custom_secret_id(&self, role: &str, secret_id: &str) -> String {
        let path = format!("auth/approle/role/{role}/custom-secret-id");
        self.cli_with_input(
            &[
                "write",
                "-wrap-ttl=5m",
                "-field=wrapping_token",
                &path,
                "secret_id=-",
            ],
            secret_id,
        )
        .trim()
        .to_string()
    }

    /// Destroys `secret_id` of `role`, so that later logins with it fail.
    pub fn destroy_secret_id(&self, role: &str, secret_id: &str) {
        let path = format!(
            "/v1/auth/approle/role/{}/secret-id/destroy",
            encode_path(role)
        );
        let body = json!({ "secret_id": secret_id });
        self.request_expect("POST", &path, Some(&body), &[200, 204]);
    }

    /// Wraps `data` in a response-wrapping token that is not a secret_id
    /// (created at `sys/wrapping/wrap`), for tests of tokens of the wrong
    /// kind.
    pub fn wrap_other_data(&self, data: &Value) -> String {
        let (status, value) = self.send(
            Some(self.root_token()),
            &[("X-Vault-Wrap-TTL", "5m")],
            "POST",
            "/v1/sys/wrapping/wrap",
            Some(data),
        );
        assert_eq!(status, 200, "POST /v1/sys/wrapping/wrap failed");
        value["wrap_info"]["token"]
            .as_str()
            .expect("sys/wrapping/wrap response has wrap_info.token")
            .to_string()
    }
}
