//! Smoke tests of the test harness itself: both servers start, the AppRole
//! setup grants exactly the policy it should, and everything is removed on
//! drop, also when a test panics.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use serde_json::json;
use vault_redirect_tests::bao::approle_policy;
use vault_redirect_tests::{Bao, Pg};

/// Returns whether `pid` is a live process (zombies count as gone, because a
/// daemonized postmaster may wait for a reaper that never comes).
fn process_running(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => match stat.rsplit_once(") ") {
            Some((_, rest)) => !rest.starts_with('Z'),
            None => true,
        },
        Err(_) => false,
    }
}

fn port_accepts_connections(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn bao_approle_setup_and_kv_helpers() {
    let bao = Bao::start_dev();
    assert!(bao.addr().starts_with("http://127.0.0.1:"));
    assert_eq!(bao.root_token().len(), 32);
    assert!(!bao.unseal_key().is_empty());

    let role_id = bao.setup_approle(
        "smoke",
        "secret",
        "smoke-app",
        &["token_no_default_policy=true"],
    );
    assert!(!role_id.is_empty());

    let policy = bao.cli(&["policy", "read", "smoke-policy"]);
    assert_eq!(policy.trim(), approle_policy("secret", "smoke-app").trim());

    let wrapping_token = bao.wrapped_secret_id("smoke");
    assert!(!wrapping_token.is_empty());
    assert!(!wrapping_token.contains(char::is_whitespace));
    let unwrapped = bao.unwrap(&wrapping_token).expect("first unwrap succeeds");
    let secret_id = unwrapped["secret_id"]
        .as_str()
        .expect("wrapped data has secret_id");
    assert!(
        bao.unwrap(&wrapping_token).is_none(),
        "a wrapping token is single-use"
    );

    let app_token = bao
        .approle_login(&role_id, secret_id)
        .expect("AppRole login succeeds");
    let (status, lookup) = bao.request(
        "POST",
        "/v1/auth/token/lookup",
        Some(&json!({ "token": app_token })),
    );
    assert_eq!(status, 200);
    assert_eq!(lookup["data"]["policies"], json!(["smoke-policy"]));
    assert_eq!(
        lookup["data"]["ttl"].as_u64().map(|ttl| ttl <= 300),
        Some(true)
    );

    let write = json!({ "data": { "secret": "smoke-value" } });
    let (status, _) = bao.request_as(
        Some(&app_token),
        "POST",
        "/v1/secret/data/smoke-app/x",
        Some(&write),
    );
    assert_eq!(status, 200, "the policy allows writes under the prefix");
    let (status, _) = bao.request_as(
        Some(&app_token),
        "LIST",
        "/v1/secret/metadata/smoke-app/",
        None,
    );
    assert_eq!(status, 200, "the policy allows listing the prefix");
    let (status, _) = bao.request_as(
        Some(&app_token),
        "POST",
        "/v1/secret/data/other-app/x",
        Some(&write),
    );
    assert_eq!(status, 403, "the policy denies writes outside the prefix");

    let data = json!({ "user": "maas", "pass": "smoke-pass @ % # ?" });
    bao.kv_put("secret", "smoke-app/db", &data);
    assert_eq!(bao.kv_get("secret", "smoke-app/db"), Some(data));
    let mut keys = bao.kv_list("secret", "smoke-app");
    keys.sort();
    assert_eq!(keys, ["db", "x"]);
    assert!(bao.kv_metadata("secret", "smoke-app/db").is_some());
    bao.kv_delete_all("secret", "smoke-app/db");
    assert_eq!(bao.kv_get("secret", "smoke-app/db"), None);
    assert_eq!(bao.kv_metadata("secret", "smoke-app/db"), None);
    assert_eq!(bao.kv_list("secret", "missing"), Vec::<String>::new());
}

#[test]
fn bao_setup_enables_new_mount_and_overrides() {
    let bao = Bao::start_dev();
    bao.setup_approle("short", "kv-extra", "app", &["token_ttl=5s"]);
    let role = bao.cli(&["read", "-format=json", "auth/approle/role/short"]);
    let role: serde_json::Value = serde_json::from_str(&role).expect("bao prints JSON");
    assert_eq!(role["data"]["token_ttl"], json!(5));
    assert_eq!(role["data"]["token_policies"], json!(["short-policy"]));

    bao.kv_put("kv-extra", "app/a", &json!({ "secret": "ünïcode" }));
    assert_eq!(
        bao.kv_get("kv-extra", "app/a"),
        Some(json!({ "secret": "ünïcode" }))
    );

    // A second role on the same server reuses the enabled auth method and mount.
    bao.setup_approle("second", "kv-extra", "other", &[]);
}

#[test]
fn bao_seal_and_unseal() {
    let bao = Bao::start_dev();
    assert!(!bao.is_sealed());
    bao.seal();
    assert!(bao.is_sealed());
    bao.unseal();
    assert!(!bao.is_sealed());
}

#[test]
fn bao_suspend_resume_and_stop() {
    let mut bao = Bao::start_dev();
    bao.suspend();
    let mut stream = TcpStream::connect(("127.0.0.1", bao.port())).expect("kernel accepts");
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    stream
        .write_all(b"GET /v1/sys/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut buffer = [0u8; 64];
    assert!(
        stream.read(&mut buffer).is_err(),
        "a suspended server sent a response"
    );

    bao.resume();
    assert!(!bao.is_sealed());

    bao.stop();
    assert!(!process_running(bao.pid()));
    assert!(!port_accepts_connections(bao.port()));
}

#[test]
fn bao_dev_tls_trusts_own_ca() {
    let bao = Bao::start_dev_tls();
    assert!(bao.addr().starts_with("https://127.0.0.1:"));
    let ca_path = bao.ca_cert_path().expect("a dev TLS server has a CA");
    let pem = fs::read_to_string(&ca_path).expect("the CA file is readable");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));

    // The HTTP client and the CLI both trust the CA.
    bao.setup_approle("tls", "secret", "tls-app", &[]);
    assert!(!bao.wrapped_secret_id("tls").is_empty());
    bao.kv_put("secret", "tls-app/x", &json!({ "secret": "over-tls" }));
    assert_eq!(
        bao.kv_get("secret", "tls-app/x"),
        Some(json!({ "secret": "over-tls" }))
    );
}

#[test]
fn bao_persistent_survives_restart() {
    let mut bao = Bao::start_persistent();
    assert!(!bao.root_token().is_empty());
    assert!(!bao.unseal_key().is_empty());
    let role_id = bao.setup_approle("kept", "secret", "kept-app", &[]);
    let secret_id = bao.secret_id("kept");
    let token = bao
        .approle_login(&role_id, &secret_id)
        .expect("AppRole login succeeds");
    bao.kv_put("secret", "kept-app/x", &json!({ "secret": "kept" }));
    let port = bao.port();

    bao.stop();
    assert!(!port_accepts_connections(port));

    bao.restart();
    assert_eq!(bao.port(), port);
    assert!(!bao.is_sealed());
    assert_eq!(
        bao.kv_get("secret", "kept-app/x"),
        Some(json!({ "secret": "kept" }))
    );
    let (status, _) = bao.request_as(Some(&token), "GET", "/v1/secret/data/kept-app/x", None);
    assert_eq!(status, 200, "a token issued before the restart still works");
    assert!(bao.approle_login(&role_id, &secret_id).is_some());
}

#[test]
fn bao_revoke_approle_tokens() {
    let bao = Bao::start_dev();
    let role_id = bao.setup_approle("revoked", "secret", "revoked-app", &[]);
    let secret_id = bao.secret_id("revoked");
    let token = bao
        .approle_login(&role_id, &secret_id)
        .expect("AppRole login succeeds");
    assert_eq!(bao.approle_token_accessors().len(), 1);

    bao.revoke_approle_tokens();
    assert!(bao.approle_token_accessors().is_empty());
    let (status, _) = bao.request_as(Some(&token), "GET", "/v1/secret/data/revoked-app/x", None);
    assert_eq!(status, 403, "a revoked token is rejected");
}

#[test]
fn bao_rate_limit_and_removal() {
    let bao = Bao::start_dev();
    bao.enable_rate_limit("harness", 1.0);
    let statuses: Vec<u16> = (0..5)
        .map(|_| bao.request("GET", "/v1/sys/mounts", None).0)
        .collect();
    assert!(statuses.contains(&429), "statuses: {statuses:?}");

    // The exempt paths are kept, so health and unseal still respond.
    thread::sleep(Duration::from_millis(1100));
    let (status, config) = bao.request("GET", "/v1/sys/quotas/config", None);
    assert_eq!(status, 200);
    assert_eq!(config["data"]["enable_rate_limit_response_headers"], true);
    assert!(config["data"]["rate_limit_exempt_paths"]
        .as_array()
        .is_some_and(|paths| paths.iter().any(|path| path == "sys/health")));

    bao.disable_rate_limit("harness");
    let statuses: Vec<u16> = (0..5)
        .map(|_| bao.request("GET", "/v1/sys/mounts", None).0)
        .collect();
    assert_eq!(statuses, [200; 5]);
}

#[test]
fn pg_connect_psql_and_restart() {
    let pg = Pg::start();
    let mut client = pg.connect("postgres");
    let selected: i32 = client.query_one("SELECT 1", &[]).unwrap().get(0);
    assert_eq!(selected, 1);

    let fsync: String = client.query_one("SHOW fsync", &[]).unwrap().get(0);
    assert_eq!(fsync, "off", "pg_test_config/postgresql.conf is applied");
    let sockets: String = client
        .query_one("SHOW unix_socket_directories", &[])
        .unwrap()
        .get(0);
    assert_eq!(PathBuf::from(sockets), pg.data_dir());

    assert_eq!(pg.psql("SELECT 2").trim(), "2");
    pg.psql("CREATE TABLE t (v text); INSERT INTO t VALUES ('x'); VACUUM FULL t; CHECKPOINT;");
    let error = pg.try_psql("SELECT * FROM missing_table").unwrap_err();
    assert!(
        error.contains("does not exist"),
        "unexpected psql error: {error}"
    );

    let pid_before = pg.postmaster_pid().expect("server is running");
    drop(client);
    pg.restart();
    let pid_after = pg.postmaster_pid().expect("server is running");
    assert_ne!(pid_before, pid_after);
    let mut client = pg.connect("postgres");
    let count: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, 1);

    assert!(pg
        .log_contents()
        .contains("database system is ready to accept connections"));
}

#[test]
fn servers_removed_on_drop() {
    let bao = Bao::start_dev();
    let pg = Pg::start();
    let bao_dir = bao.dir().to_path_buf();
    let bao_pid = bao.pid();
    let bao_port = bao.port();
    let pg_dir = pg.data_dir();
    let pg_pid = pg.postmaster_pid().expect("server is running");
    let pg_port = pg.port();
    assert!(bao_dir.exists());
    assert!(pg_dir.exists());

    drop(bao);
    drop(pg);

    assert!(!bao_dir.exists(), "OpenBao folder left behind");
    assert!(!pg_dir.exists(), "PostgreSQL folder left behind");
    assert!(!process_running(bao_pid), "OpenBao still running");
    assert!(!process_running(pg_pid), "PostgreSQL still running");
    assert!(!port_accepts_connections(bao_port));
    assert!(!port_accepts_connections(pg_port));
}

#[test]
fn servers_removed_when_test_panics() {
    let (sender, receiver) = mpsc::channel();
    let result = thread::spawn(move || {
        let bao = Bao::start_dev();
        let pg = Pg::start();
        let pg_pid = pg.postmaster_pid().expect("server is running");
        sender
            .send((bao.dir().to_path_buf(), bao.pid(), pg.data_dir(), pg_pid))
            .unwrap();
        panic!("deliberate panic to check cleanup during unwinding");
    })
    .join();
    assert!(result.is_err());

    let (bao_dir, bao_pid, pg_dir, pg_pid) = receiver.recv().unwrap();
    assert!(!bao_dir.exists(), "OpenBao folder left behind");
    assert!(!pg_dir.exists(), "PostgreSQL folder left behind");
    assert!(!process_running(bao_pid), "OpenBao still running");
    assert!(!process_running(pg_pid), "PostgreSQL still running");
}

#[test]
fn parallel_servers_get_own_ports() {
    let handles: Vec<_> = (0..2)
        .map(|_| {
            thread::spawn(|| {
                let bao = Bao::start_dev();
                let pg = Pg::start();
                let selected: i32 = pg
                    .connect("postgres")
                    .query_one("SELECT 1", &[])
                    .unwrap()
                    .get(0);
                assert_eq!(selected, 1);
                assert!(!bao.is_sealed());
                (bao, pg)
            })
        })
        .collect();
    let servers: Vec<(Bao, Pg)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut ports: Vec<u16> = servers
        .iter()
        .flat_map(|(bao, pg)| [bao.port(), bao.port() + 1, pg.port()])
        .collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 6, "servers share a port: {ports:?}");
}
