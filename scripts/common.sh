# shellcheck shell=bash
# Helpers shared by setup.sh, test.sh and demo.sh. Source it, do not run it.

# Used by the scripts that source this file.
# shellcheck disable=SC2034
PG_BINDIR=/usr/lib/postgresql/15/bin
# shellcheck disable=SC2034
PG_CONFIG="$PG_BINDIR/pg_config"

# CI and `runuser` environments may lack HOME.
: "${HOME:=$(getent passwd "$(id -u)" | cut -d: -f6)}"
export HOME

# Prints a progress line.
step() {
  printf '==> %s\n' "$*"
}

# Puts cargo and the pip-installed `bao` on PATH when a non-login shell
# lacks them.
add_tool_paths() {
  if [[ -d "$HOME/.cargo/bin" && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
    PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v bao >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1; then
    local scripts_dir
    scripts_dir="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    if [[ -x "$scripts_dir/bao" ]]; then
      PATH="$PATH:$scripts_dir"
    fi
  fi
  export PATH
}

# Prints N random bytes from the kernel as hex.
random_hex() {
  od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'
}

# Prints the first of COUNT (default 1) consecutive TCP ports that are free
# on 127.0.0.1. Ports come from 20000-31999, below Linux's default ephemeral
# range, so that outgoing connections do not take them.
pick_free_port() {
  local count="${1:-1}" port
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % (12000 - count)))
    if python3 - "$port" "$count" 2>/dev/null <<'PY'
import socket
import sys

first, count = int(sys.argv[1]), int(sys.argv[2])
for port in range(first, first + count):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
PY
    then
      echo "$port"
      return 0
    fi
  done
  echo "no $count free consecutive ports found on 127.0.0.1 in 20000-31999" >&2
  return 1
}
