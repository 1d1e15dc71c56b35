//! A configured stack: an OpenBao server (a dev server unless the test passes
//! another) with an AppRole bound to the minimal policy, and a PostgreSQL
//! cluster with the extension created and configured through a wrapped
//! secret_id.

use postgres::error::DbError;
use postgres::Client;

use crate::{Bao, Pg};

/// KV mount and secrets path the tests configure.
pub const MOUNT: &str = "secret";
pub const SECRETS_PATH: &str = "maas";
/// The AppRole every test stack configures with.
pub const ROLE: &str = "pg-primary";

/// The MAAS-shaped fixture tables with plaintext secrets.
pub const MAAS_FIXTURE: &str = include_str!("../fixtures/maas.sql");

pub struct Stack {
    pub bao: Bao,
    pub pg: Pg,
    pub role_id: String,
}

impl Stack {
    /// Starts both servers, creates the AppRole (with `role_args` added to
    /// its parameters) and the extension, and configures it.
    pub fn configured(role_args: &[&str]) -> Stack {
        Stack::configured_on(Bao::start_dev(), role_args)
    }

    /// Like [`Stack::configured`], on the given OpenBao server. A server
    /// that serves HTTPS needs `vault_redirect.ca_file` set first, so use
    /// [`Stack::unconfigured_on`] and [`Stack::install_ca_file`] for it.
    pub fn configured_on(bao: Bao, role_args: &[&str]) -> Stack {
        let stack = Stack::unconfigured_on(bao, role_args);
        let wrapped = stack.bao.wrapped_secret_id(ROLE);
        let mut client = stack.superuser();
        stack
            .configure(&mut client, &stack.role_id, &wrapped)
            .unwrap_or_else(|e| panic!("configure failed: {}", describe(&e)));
        stack
    }

    /// Starts both servers and creates the AppRole and the extension only.
    pub fn unconfigured(role_args: &[&str]) -> Stack {
        Stack::unconfigured_on(Bao::start_dev(), role_args)
    }

    /// Like [`Stack::unconfigured`], on the given OpenBao server.
    pub fn unconfigured_on(bao: Bao, role_args: &[&str]) -> Stack {
        let pg = Pg::start();
        let role_id = bao.setup_approle(ROLE, MOUNT, SECRETS_PATH, role_args);
        pg.psql("CREATE EXTENSION vault_redirect;");
        Stack { bao, pg, role_id }
    }

    pub fn superuser(&self) -> Client {
        self.pg.connect("postgres")
    }

    /// Calls configure() with the tokens as query parameters, so they are
    /// never part of the SQL text.
    pub fn configure(
        &self,
        client: &mut Client,
        role_id: &str,
        wrapped: &str,
    ) -> Result<(), postgres::Error> {
        client
            .execute(
                "SELECT vault_redirect.configure($1, $2, $3, $4, $5)",
                &[&self.bao.addr(), &role_id, &wrapped, &SECRETS_PATH, &MOUNT],
            )
            .map(|_| ())
    }

    /// Creates the fixture tables and declares their secret columns.
    pub fn load_maas_schema(&self) {
        self.pg.psql(MAAS_FIXTURE);
        self.pg.psql(
            "SELECT vault_redirect.declare_kv_table('public.maasserver_secret', 'path', 'value');
             SELECT vault_redirect.declare_column('public.maasserver_bmc', 'power_parameters');",
        );
    }

    /// Returns the data of the KV entry at `path` under the secrets path.
    pub fn kv_get(&self, path: &str) -> Option<serde_json::Value> {
        self.bao.kv_get(MOUNT, &format!("{SECRETS_PATH}/{path}"))
    }

    pub fn kv_put(&self, path: &str, data: &serde_json::Value) {
        self.bao
            .kv_put(MOUNT, &format!("{SECRETS_PATH}/{path}"), data)
    }

    /// Returns the bytes of every file of a table's heap and TOAST relations.
    pub fn table_files(&self, table: &str) -> Vec<u8> {
        let paths = self.pg.psql(&format!(
            "SELECT pg_relation_filepath('{table}'::regclass);
             SELECT pg_relation_filepath(reltoastrelid) FROM pg_class
              WHERE oid = '{table}'::regclass AND reltoastrelid <> 0;"
        ));
        let mut bytes = Vec::new();
        for relative in paths.lines().filter(|l| !l.trim().is_empty()) {
            let base = self.pg.data_dir().join(relative.trim());
            for segment in 0.. {
                let path = match segment {
                    0 => base.clone(),
                    n => base.with_extension(n.to_string()),
                };
                match std::fs::read(&path) {
                    Ok(content) => bytes.extend(content),
                    Err(_) => break,
                }
            }
        }
        bytes
    }

    /// Returns the bytes of every WAL segment.
    pub fn wal_files(&self) -> Vec<u8> {
        let wal = self.pg.data_dir().join("pg_wal");
        let mut bytes = Vec::new();
        let entries = std::fs::read_dir(&wal)
            .unwrap_or_else(|err| panic!("failed to list {}: {err}", wal.display()));
        for entry in entries.flatten() {
            if entry.path().is_file() {
                bytes.extend(std::fs::read(entry.path()).unwrap_or_default());
            }
        }
        bytes
    }

    /// Returns the path of this server's configuration file.
    pub fn config_file(&self) -> std::path::PathBuf {
        self.pg.data_dir().join("vault_redirect.conf")
    }

    /// Returns the secret_id stored in the configuration file. Tests compare
    /// against it and must never print it.
    pub fn stored_secret_id(&self) -> String {
        let path = self.config_file();
        let text = std::fs::read(&path)
            .unwrap_or_else(|err| panic!("failed to read {}: {err}", path.display()));
        let config: serde_json::Value = serde_json::from_slice(&text)
            .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()));
        config["secret_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{} has no secret_id", path.display()))
            .to_owned()
    }

    /// Copies the CA certificate at `source` into the data directory, where
    /// the `postgres` OS user can read it, and returns the copy's path for
    /// `vault_redirect.ca_file`.
    pub fn install_ca_file(&self, source: &std::path::Path, name: &str) -> String {
        let pem = std::fs::read(source)
            .unwrap_or_else(|err| panic!("failed to read {}: {err}", source.display()));
        let path = self.pg.install_file(name, &pem);
        path.to_str().expect("scratch paths are UTF-8").to_owned()
    }
}

/// Returns the database error of a failed statement, or panics.
pub fn db_error(error: &postgres::Error) -> &DbError {
    error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a database error: {error}"))
}

/// Formats a database error with its SQLSTATE, detail and hint.
pub fn describe(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!(
            "{} {} (detail: {:?}, hint: {:?})",
            db.code().code(),
            db.message(),
            db.detail(),
            db.hint()
        ),
        None => error.to_string(),
    }
}

/// Reports whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}
