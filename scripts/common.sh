# shellcheck shell=bash
# Helpers shared by setup.sh, test.sh, demo.sh and bench-migrate.sh. Source
# it, do not run it.

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

# Starts an OpenBao dev server on a free port of 127.0.0.1, with HOME set to
# folder $1 (created here) and its output in file $2, and waits until it is
# ready. Sets bao_port and bao_pid, and exports BAO_ADDR, VAULT_ADDR and
# BAO_TOKEN, the random root token, for the admin setup only.
start_bao_dev() {
  local home="$1" log="$2" ready=0
  # Dev mode also listens on the next port, for cluster traffic.
  bao_port="$(pick_free_port 2)"
  step "starting an OpenBao dev server on 127.0.0.1:$bao_port"
  mkdir -m 700 "$home"
  # BAO_DEV_ROOT_TOKEN_ID sets the root token like -dev-root-token-id but
  # keeps it out of the process list. Dev mode also writes it to
  # $home/.vault-token. The pip wrapper execs the real binary, so $! is the
  # server's pid.
  HOME="$home" BAO_DEV_ROOT_TOKEN_ID="$(random_hex 16)" \
    bao server -dev -dev-listen-address="127.0.0.1:$bao_port" >"$log" 2>&1 &
  bao_pid=$!
  export BAO_ADDR="http://127.0.0.1:$bao_port"
  export VAULT_ADDR="$BAO_ADDR"
  for _ in $(seq 1 200); do
    # Dev mode writes the token file after the health endpoint comes up.
    if curl -fsS -o /dev/null "$BAO_ADDR/v1/sys/health" 2>/dev/null &&
      [[ -s "$home/.vault-token" ]]; then
      ready=1
      break
    fi
    if ! kill -0 "$bao_pid" 2>/dev/null; then
      echo "${0##*/}: the OpenBao dev server exited during startup" >&2
      return 1
    fi
    sleep 0.1
  done
  if ((!ready)); then
    echo "${0##*/}: the OpenBao dev server at $BAO_ADDR was not ready within 20 s" >&2
    return 1
  fi
  BAO_TOKEN="$(cat "$home/.vault-token")"
  export BAO_TOKEN
}

# Enables AppRole on the server at BAO_ADDR, writes the minimal policy $2
# for mount $3 and secrets path $4, and creates role $1 bound to it, with
# token_ttl=5m and token_no_default_policy=true. Sets role_id, and wrapped:
# a secret_id wrapped for 5 minutes. Neither is printed.
setup_approle_role() {
  local role="$1" policy="$2" mount="$3" path="$4"
  step "enabling AppRole and writing the policy $policy for $mount/$path"
  bao auth enable approle >/dev/null
  bao policy write "$policy" - >/dev/null <<EOF
path "$mount/metadata/$path/" { capabilities = ["list"] }
path "$mount/metadata/$path/*" { capabilities = ["read", "update", "delete", "list"] }
path "$mount/data/$path/*" { capabilities = ["read", "create", "update", "delete"] }
EOF
  step "creating the role $role and a secret_id wrapped for 5 minutes"
  bao write "auth/approle/role/$role" token_ttl=5m token_no_default_policy=true \
    token_policies="$policy" >/dev/null
  role_id="$(bao read -field=role_id "auth/approle/role/$role/role-id")"
  wrapped="$(bao write -wrap-ttl=5m -field=wrapping_token -f "auth/approle/role/$role/secret-id")"
}

# Unsets the inherited variables that could point the CLI or psql at
# another server, and the Rust backtrace variables, with which the server
# would append backtraces to errors.
clear_server_environment() {
  local name
  while read -r name; do
    unset "$name"
  done < <(compgen -e | grep -E '^(BAO_|VAULT_|PG|RUST_BACKTRACE|RUST_LIB_BACKTRACE)' | grep -v '^PGRX_' || true)
}

# Prints the end of the OpenBao log $bao_log without the root token and
# unseal key, which a dev server writes there.
bao_log_tail() {
  tail -n 20 "$bao_log" | grep -vE '^(Root Token|Unseal Key):' || true
}

# Runs PostgreSQL program $1 with the other arguments as the postgres OS
# user, from /, which that user can always enter.
run_as_postgres() {
  local program="$1"
  shift
  (cd / && runuser -u postgres -- "$PG_BINDIR/$program" "$@")
}

# Creates a PostgreSQL 15 cluster in folder $1 with trust authentication
# and the settings of pg_test_config/, and starts it on 127.0.0.1:$3 with
# cluster_name $4, its unix socket in $1 and its log in file $2.
start_pg_cluster() {
  local data="$1" log="$2" port="$3" name="$4"
  step "starting PostgreSQL 15 on 127.0.0.1:$port"
  install -d -o postgres -g postgres -m 700 "$(dirname "$data")"
  run_as_postgres initdb -D "$data" --username=postgres --auth=trust --encoding=UTF8 \
    --locale=C.UTF-8 --no-sync --no-instructions >"$(dirname "$data")/initdb.log"
  install -o postgres -g postgres -m 600 "$repo_root/pg_test_config/postgresql.conf" \
    "$data/vault_redirect_test.conf"
  install -o postgres -g postgres -m 600 "$repo_root/pg_test_config/pg_hba.conf" \
    "$data/pg_hba.conf"
  cat >>"$data/postgresql.conf" <<EOF

include 'vault_redirect_test.conf'
port = $port
unix_socket_directories = '$data'
cluster_name = '$name'
EOF
  run_as_postgres pg_ctl start -D "$data" -l "$log" -w -t 60 -s
}

# Stops the PostgreSQL cluster in $pg_data if pg_started is 1 and the
# OpenBao server $bao_pid if set, then removes $work_dir. For the cleanup
# traps of the scripts, so every failure is ignored.
stop_servers_and_remove_work_dir() {
  if ((pg_started)); then
    run_as_postgres pg_ctl stop -D "$pg_data" -m fast -w -s || true
  fi
  if [[ -n "$bao_pid" ]]; then
    kill "$bao_pid" 2>/dev/null || true
    wait "$bao_pid" 2>/dev/null || true
  fi
  rm -rf "$work_dir"
}

# Exits unless the script runs as root. $1 is the reason it must.
require_root() {
  if [[ "$(id -u)" -ne 0 ]]; then
    echo "${0##*/}: must run as root ($1)" >&2
    exit 1
  fi
}

# Prints $1, or $2 when $1 is empty, after checking that it is a positive
# integer. Exits with status 2 otherwise.
row_count_argument() {
  local rows="${1:-$2}"
  if ! [[ "$rows" =~ ^[1-9][0-9]*$ ]]; then
    echo "${0##*/}: ROWS must be a positive integer, got '$rows'" >&2
    exit 2
  fi
  echo "$rows"
}
