//! PostgreSQL 15 cluster per test, run by the `postgres` OS user.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::ports::reserve_consecutive_ports;
use crate::scratch::{chown_to_postgres, postgres_command, run_checked, run_dir, tail};

/// Repository folder with the settings shared by all test clusters.
const CONFIG_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../pg_test_config");
/// Copy of `pg_test_config/postgresql.conf` inside each data directory.
const INCLUDED_CONF: &str = "vault_redirect_test.conf";
const START_ATTEMPTS: usize = 3;
/// Seconds that `pg_ctl` waits for a start, stop or restart.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// A PostgreSQL 15 cluster on 127.0.0.1 with trust authentication, its unix
/// socket in the data directory and its server log in a file.
///
/// Dropping it stops the server (`pg_ctl stop -m immediate`) and removes its
/// folder.
pub struct Pg {
    dir: TempDir,
    port: u16,
}

impl Pg {
    /// Starts a cluster copied from the per-process template, with the
    /// settings of `pg_test_config/`.
    pub fn start() -> Pg {
        Self::start_with_conf("")
    }

    /// Like [`Pg::start`], with `extra_conf` (postgresql.conf lines) added
    /// before the first start, e.g. `shared_preload_libraries`.
    pub fn start_with_conf(extra_conf: &str) -> Pg {
        let mut attempt = 1;
        loop {
            let pg = Self::create_cluster(extra_conf);
            let message = match pg.try_start_server() {
                Ok(()) => return pg,
                Err(message) => message,
            };
            // Another process may have taken the port after the bind test.
            if attempt < START_ATTEMPTS && pg.log_contents().contains("Address already in use") {
                attempt += 1;
                continue;
            }
            panic!("{message}");
        }
    }

    /// Copies the template into a new folder and sets its port and socket
    /// directory, without starting it.
    fn create_cluster(extra_conf: &str) -> Pg {
        let template = template_data_dir();
        let dir = tempfile::Builder::new()
            .prefix("pg-")
            .tempdir_in(run_dir())
            .expect("failed to create the PostgreSQL scratch folder");
        chown_to_postgres(dir.path());
        let pg = Pg {
            dir,
            port: reserve_consecutive_ports(1),
        };
        // Running as root, `cp -a` keeps the postgres owner of every file.
        run_checked(
            Command::new("cp")
                .arg("-a")
                .arg(template)
                .arg(pg.data_dir()),
            "cp -a of the template cluster",
        );
        let settings = format!(
            "\n# Set by the test harness for this cluster.\nport = {}\nunix_socket_directories = '{}'\n{extra_conf}\n",
            pg.port,
            pg.data_dir().display()
        );
        pg.append_conf(&settings);
        pg
    }

    /// Starts a hot standby of this cluster: a base backup taken with
    /// `pg_basebackup -R`, streaming from this server under `cluster_name`,
    /// which is also the application_name the primary reports.
    pub fn start_standby(&self, cluster_name: &str) -> Pg {
        let dir = tempfile::Builder::new()
            .prefix("pg-standby-")
            .tempdir_in(run_dir())
            .expect("failed to create the standby scratch folder");
        chown_to_postgres(dir.path());
        let standby = Pg {
            dir,
            port: reserve_consecutive_ports(1),
        };
        run_checked(
            postgres_command("pg_basebackup")
                .args(["-h", "127.0.0.1", "-U", "postgres", "-R", "-X", "stream"])
                .args(["--checkpoint=fast", "--no-sync"])
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-D")
                .arg(standby.data_dir()),
            "pg_basebackup of the primary",
        );
        standby.append_conf(&format!(
            "\n# Set by the test harness for this standby.\nport = {}\nunix_socket_directories = '{}'\ncluster_name = '{cluster_name}'\n",
            standby.port,
            standby.data_dir().display()
        ));
        if let Err(message) = standby.try_start_server() {
            panic!("{message}");
        }
        standby
    }

    /// Returns the TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the data directory, which is also the unix socket directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Returns the path of the server log (`pg_ctl -l`), kept across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgresql.log")
    }

    /// Reads the whole server log so far.
    pub fn log_contents(&self) -> String {
        match fs::read(self.log_path()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => String::new(),
        }
    }

    /// Process id of the postmaster, from `postmaster.pid`, or `None` if the
    /// server is not running.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Connection settings for `user` on database `postgres` over TCP.
    pub fn config(&self, user: &str) -> postgres::Config {
        let mut config = postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// Connects as `user` to database `postgres` over TCP without TLS, or
    /// panics.
    pub fn connect(&self, user: &str) -> postgres::Client {
        match self.try_connect(user) {
            Ok(client) => client,
            Err(err) => panic!(
                "failed to connect to PostgreSQL on 127.0.0.1:{} as {user}: {err}",
                self.port
            ),
        }
    }

    pub fn try_connect(&self, user: &str) -> Result<postgres::Client, postgres::Error> {
        self.config(user).connect(postgres::NoTls)
    }

    /// Runs `sql` with `psql` as the `postgres` superuser over the unix
    /// socket (unaligned, tuples only, stop on first error) and returns its
    /// stdout, or panics with its stderr.
    ///
    /// psql's error output can quote the failing line of SQL, so pass secrets
    /// as query parameters through [`Pg::connect`] instead.
    pub fn psql(&self, sql: &str) -> String {
        match self.try_psql(sql) {
            Ok(stdout) => stdout,
            Err(stderr) => panic!("psql on PostgreSQL port {} failed:\n{stderr}", self.port),
        }
    }

    /// Like [`Pg::psql`], returning stderr as the error.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let mut child = postgres_command("psql")
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                "postgres",
            ])
            .arg("-h")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to run psql");
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(sql.as_bytes())
            .expect("failed to write to the stdin of psql");
        drop(stdin);
        let output = child.wait_with_output().expect("failed to wait for psql");
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// Writes `contents` to the file `name` in the data directory, owned by
    /// the `postgres` OS user with mode 0600, and returns its path. Use it
    /// for files the server must read, such as a CA certificate, because the
    /// harness's other scratch folders are closed to that user.
    pub fn install_file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.data_dir().join(name);
        if let Err(err) = fs::write(&path, contents) {
            panic!("failed to write {}: {err}", path.display());
        }
        if let Err(err) = fs::set_permissions(&path, fs::Permissions::from_mode(0o600)) {
            panic!("failed to set mode 0600 on {}: {err}", path.display());
        }
        chown_to_postgres(&path);
        path
    }

    /// Appends `lines` to `postgresql.conf`. They take effect at the next
    /// [`Pg::reload`] or [`Pg::restart`].
    pub fn append_conf(&self, lines: &str) {
        let path = self.data_dir().join("postgresql.conf");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|err| panic!("failed to open {}: {err}", path.display()));
        writeln!(file, "{lines}")
            .unwrap_or_else(|err| panic!("failed to write {}: {err}", path.display()));
    }

    /// Makes the server reread its configuration files.
    pub fn reload(&self) {
        self.pg_ctl(&["reload", "-s"], "pg_ctl reload");
    }

    /// Restarts the server (fast shutdown) and waits until it accepts
    /// connections.
    pub fn restart(&self) {
        let log_path = self.log_path();
        let log = log_path.to_str().expect("scratch paths are UTF-8");
        self.pg_ctl(
            &[
                "restart",
                "-m",
                "fast",
                "-w",
                "-t",
                PG_CTL_TIMEOUT_SECS,
                "-s",
                "-l",
                log,
            ],
            "pg_ctl restart",
        );
    }

    /// Stops the server (fast shutdown). The folder stays until drop.
    pub fn stop_server(&self) {
        self.pg_ctl(
            &["stop", "-m", "fast", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-s"],
            "pg_ctl stop",
        );
    }

    /// Starts a server stopped by [`Pg::stop_server`] and waits until it
    /// accepts connections.
    pub fn start_server(&self) {
        if let Err(message) = self.try_start_server() {
            panic!("{message}");
        }
    }

    fn try_start_server(&self) -> Result<(), String> {
        let output = postgres_command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-s"])
            .output();
        match output {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(format!(
                "PostgreSQL on port {} failed to start: {}\nlast lines of the server log:\n{}",
                self.port,
                String::from_utf8_lossy(&output.stderr).trim(),
                tail(&self.log_path(), 30)
            )),
            Err(err) => Err(format!("failed to run pg_ctl: {err}")),
        }
    }

    fn pg_ctl(&self, args: &[&str], action: &str) {
        let mut command = postgres_command("pg_ctl");
        command.arg("-D").arg(self.data_dir()).args(args);
        let output = command.output();
        let failure = match output {
            Ok(output) if output.status.success() => return,
            Ok(output) => String::from_utf8_lossy(&output.stderr).into_owned(),
            Err(err) => err.to_string(),
        };
        panic!(
            "{action} failed on PostgreSQL port {}: {}\nlast lines of the server log:\n{}",
            self.port,
            failure.trim(),
            tail(&self.log_path(), 30)
        );
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.data_dir().join("postmaster.pid").exists() {
            let _ = postgres_command("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-s"])
                .output();
        }
        // The folder is removed when the TempDir field drops, after this.
    }
}

/// Returns the template data directory, running `initdb` on first use in
/// this process.
fn template_data_dir() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(create_template)
}

fn create_template() -> PathBuf {
    let dir = run_dir().join("pg-template");
    if let Err(err) = fs::create_dir(&dir) {
        panic!("failed to create {}: {err}", dir.display());
    }
    chown_to_postgres(&dir);
    let data_dir = dir.join("data");
    run_checked(
        postgres_command("initdb").arg("-D").arg(&data_dir).args([
            "--username=postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
            "--no-instructions",
        ]),
        "initdb of the template cluster",
    );

    let config_dir = Path::new(CONFIG_DIR);
    install_config_file(
        &config_dir.join("postgresql.conf"),
        &data_dir.join(INCLUDED_CONF),
    );
    install_config_file(
        &config_dir.join("pg_hba.conf"),
        &data_dir.join("pg_hba.conf"),
    );
    let conf_path = data_dir.join("postgresql.conf");
    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(&conf_path)
        .unwrap_or_else(|err| panic!("failed to open {}: {err}", conf_path.display()));
    writeln!(conf, "\ninclude '{INCLUDED_CONF}'")
        .unwrap_or_else(|err| panic!("failed to write {}: {err}", conf_path.display()));
    data_dir
}

fn install_config_file(source: &Path, target: &Path) {
    if let Err(err) = fs::copy(source, target) {
        panic!(
            "failed to copy {} to {}: {err}",
            source.display(),
            target.display()
        );
    }
    chown_to_postgres(target);
}
