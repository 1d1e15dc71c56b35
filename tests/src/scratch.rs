//! Scratch folders, randomness and small process helpers shared by the
//! server wrappers.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Parent of all per-process scratch folders.
const BASE_DIR: &str = "/tmp/vault_redirect_tests";

/// Name of the file, inside a server's scratch folder, that contains the
/// server's process id. Stale runs are cleaned up with it.
pub const BAO_PID_FILE: &str = "bao.pid";

static RUN_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Returns this process's scratch folder, creating it on first use.
///
/// The first call also removes the folders of earlier runs whose process is
/// gone (stopping the servers they left running) and registers removal of
/// this run's folder at process exit.
pub fn run_dir() -> &'static Path {
    RUN_DIR.get_or_init(|| {
        create_dir_for_all(Path::new(BASE_DIR));
        remove_stale_runs();
        let dir = Path::new(BASE_DIR).join(format!("run-{}", std::process::id()));
        if dir.exists() {
            // A crashed process with the same id, long ago.
            remove_run(&dir);
        }
        create_dir_for_all(&dir);
        // SAFETY: `remove_run_dir_at_exit` is an `extern "C" fn()` that
        // neither unwinds nor calls `exit`.
        unsafe {
            libc::atexit(remove_run_dir_at_exit);
        }
        dir
    })
}

extern "C" fn remove_run_dir_at_exit() {
    if let Some(dir) = RUN_DIR.get() {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Creates `dir` with mode 0755, so that the `postgres` user can traverse it.
fn create_dir_for_all(dir: &Path) {
    if let Err(err) = fs::create_dir_all(dir) {
        panic!("failed to create {}: {err}", dir.display());
    }
    if let Err(err) = fs::set_permissions(dir, fs::Permissions::from_mode(0o755)) {
        panic!("failed to set mode 0755 on {}: {err}", dir.display());
    }
}

fn remove_stale_runs() {
    let Ok(entries) = fs::read_dir(BASE_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("run-")) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_run(&entry.path());
        }
    }
}

/// Stops the servers left in a run folder and removes the folder.
fn remove_run(run: &Path) {
    let Ok(entries) = fs::read_dir(run) else {
        return;
    };
    for entry in entries.flatten() {
        let server_dir = entry.path();
        let data_dir = server_dir.join("data");
        if data_dir.join("postmaster.pid").exists() {
            let _ = postgres_command("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(&data_dir)
                .args(["-m", "immediate", "-w", "-s"])
                .output();
        }
        kill_stale_bao(&server_dir);
    }
    let _ = fs::remove_dir_all(run);
}

/// Kills the `bao` process recorded in `server_dir`, but only if that
/// process still runs with `server_dir` as its home, so that a reused
/// process id never hits an unrelated process.
fn kill_stale_bao(server_dir: &Path) {
    let Ok(pid) = fs::read_to_string(server_dir.join(BAO_PID_FILE)) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
        return;
    };
    let expected_home = format!("HOME={}", server_dir.display());
    let runs_there = environ
        .split(|b| *b == 0)
        .any(|var| var == expected_home.as_bytes());
    if runs_there {
        // SAFETY: plain kill(2) on a process id checked just above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Returns `len` random bytes from the kernel, hex encoded.
pub fn random_hex(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("failed to read /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn random_u64() -> u64 {
    u64::from_str_radix(&random_hex(8), 16).expect("random_hex returns hex")
}

/// Returns the uid and gid of the `postgres` OS user.
pub fn postgres_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let name = CString::new("postgres").expect("no NUL in literal");
        // SAFETY: getpwnam is called once, under the OnceLock, and the
        // fields are copied out before any other passwd call can reuse the
        // static buffer.
        unsafe {
            let entry = libc::getpwnam(name.as_ptr());
            assert!(
                !entry.is_null(),
                "the `postgres` OS user is missing: install postgresql-15 (scripts/setup.sh)"
            );
            ((*entry).pw_uid, (*entry).pw_gid)
        }
    })
}

/// Gives `path` to the `postgres` OS user.
pub fn chown_to_postgres(path: &Path) {
    let (uid, gid) = postgres_ids();
    if let Err(err) = std::os::unix::fs::chown(path, Some(uid), Some(gid)) {
        panic!("failed to chown {} to postgres: {err}", path.display());
    }
}

/// Returns the directory of the PostgreSQL 15 server binaries.
pub fn pg_bindir() -> PathBuf {
    std::env::var_os("VAULT_REDIRECT_TEST_PG_BINDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// Builds a command that runs PostgreSQL's `program` as the `postgres` OS
/// user, with no `PG*` variables inherited, from `/` so that the postgres
/// user never needs access to the test's working directory. Rust backtrace
/// variables are dropped too: with them, pgrx appends a backtrace to the
/// DETAIL of errors it passes on, which a production server does not show.
pub fn postgres_command(program: &str) -> Command {
    let mut command = Command::new("runuser");
    command
        .args(["-u", "postgres", "--"])
        .arg(pg_bindir().join(program))
        .current_dir("/");
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("PG") || name_text.starts_with("RUST_") {
            command.env_remove(name);
        }
    }
    command
}

/// Runs `command` and returns its output, or panics with its stderr.
pub fn run_checked(command: &mut Command, action: &str) -> Output {
    let output = match command.output() {
        Ok(output) => output,
        Err(err) => panic!("failed to run {action}: {err}"),
    };
    if !output.status.success() {
        panic!(
            "{action} failed with {}:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// Returns the last `lines` lines of a text file, or a note if it is
/// unreadable.
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}
