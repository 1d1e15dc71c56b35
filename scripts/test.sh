#!/usr/bin/env bash
# Installs everything (setup.sh), then checks formatting and lints and runs
# the integration tests, which start their own OpenBao and PostgreSQL
# servers on 127.0.0.1. Exits non-zero on the first failure.
#
# TEST_THREADS sets how many tests run at once (default 2). Every running
# test has its own OpenBao and PostgreSQL servers.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$repo_root/scripts/common.sh"

bash "$repo_root/scripts/setup.sh"
add_tool_paths
cd "$repo_root"

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "integration tests"
cargo test -p vault_redirect_tests -- --test-threads="${TEST_THREADS:-2}"
