//! Integration-test harness for vault_redirect.
//!
//! Each test starts its own servers on 127.0.0.1, so tests can run in
//! parallel in one test binary:
//!
//! - [`Bao`]: an OpenBao server (dev, dev with TLS, or persistent with raft
//!   storage that survives a restart), with helpers for AppRole setup, KV v2
//!   access, policies, quotas and token revocation as the root token.
//! - [`Pg`]: a PostgreSQL 15 cluster run by the `postgres` OS user, copied
//!   from a template cluster that is initialised once per test process.
//!
//! Both stop their server and remove their files when dropped, also while a
//! test panics. Files live under `/tmp/vault_redirect_tests/run-<pid>/`.
//! That folder is removed when the test process exits, and folders left by
//! killed runs are cleaned up (their servers stopped) by the next run.
//!
//! Requirements: running as root (clusters are started with `runuser`), the
//! PostgreSQL 15 binaries in `/usr/lib/postgresql/15/bin` (override with
//! `VAULT_REDIRECT_TEST_PG_BINDIR`), `bao` on `PATH` (override with
//! `VAULT_REDIRECT_TEST_BAO`), and for tests that load the extension, the
//! extension installed into that PostgreSQL (`scripts/setup.sh` does both).

pub mod bao;
mod bao_admin;
pub mod pg;
mod ports;
mod scratch;

pub use bao::Bao;
pub use pg::Pg;
pub mod stack;
