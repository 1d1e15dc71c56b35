#!/usr/bin/env bash
# End-to-end demo of vault_redirect on MAAS-shaped tables, as root on a
# Debian 12 machine.
#
# Runs setup.sh, then starts an OpenBao dev server and a PostgreSQL 15
# cluster on free 127.0.0.1 ports in a temporary folder. It sets up AppRole
# login for the extension and runs scripts/demo.sql, which moves the secrets
# from the tables to OpenBao and reads them back through the resolved views.
# Then it changes a secret directly in OpenBao and shows the view again, lets
# an application role run MAAS's statements on the tables with transparent
# reads on, and shows the extension's status.
#
# Usage: scripts/demo.sh [--release]
#   --release  build the extension with the release profile (passed to setup.sh)
# Both servers are stopped and the folder removed on exit, unless KEEP=1:
# then the script prints how to connect to them and how to stop them.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$repo_root/scripts/common.sh"

bash "$repo_root/scripts/setup.sh" "$@"
add_tool_paths

clear_server_environment

secrets_mount=secret
secrets_path=maas
role=pg-primary
policy="$role-policy"

work_dir="$(mktemp -d /tmp/vault_redirect_demo.XXXXXX)"
# The postgres user must traverse it. The OpenBao home below stays private.
chmod 755 "$work_dir"
bao_home="$work_dir/bao"
bao_log="$work_dir/bao.log"
pg_dir="$work_dir/pg"
pg_data="$pg_dir/data"
pg_log="$pg_dir/postgresql.log"
bao_pid=""
pg_started=0

psql_demo() {
  run_as_postgres psql -X -v ON_ERROR_STOP=1 -h "$pg_data" -p "$pg_port" -d postgres "$@"
}

# Prints the end of the PostgreSQL log without lines that contain the
# role_id or the wrapping token: PostgreSQL logs the text of a failing
# statement (log_min_error_statement), which includes the configure() call.
pg_log_tail() {
  local credentials=()
  if [[ -n "${role_id:-}" ]]; then
    credentials+=(-e "$role_id")
  fi
  if [[ -n "${wrapped:-}" ]]; then
    credentials+=(-e "$wrapped")
  fi
  if ((${#credentials[@]} > 0)); then
    tail -n 20 "$pg_log" | grep -vF "${credentials[@]}" || true
  else
    tail -n 20 "$pg_log" || true
  fi
}

print_keep_instructions() {
  cat <<EOF

Servers kept running (KEEP=1):
  PostgreSQL: runuser -u postgres -- $PG_BINDIR/psql -h $pg_data -p $pg_port -d postgres
  OpenBao:    export BAO_ADDR=http://127.0.0.1:$bao_port
              export BAO_TOKEN="\$(cat $bao_home/.vault-token)"   # root token
  Stop both:  kill $bao_pid; runuser -u postgres -- $PG_BINDIR/pg_ctl stop -D $pg_data; rm -rf $work_dir
EOF
}

cleanup() {
  local status=$?
  if [[ "$status" -ne 0 ]]; then
    echo "demo.sh: failed with exit status $status" >&2
    if [[ -f "$pg_log" ]]; then
      echo "--- last lines of the PostgreSQL log ($pg_log)" >&2
      pg_log_tail >&2
    fi
    if [[ -f "$bao_log" ]]; then
      echo "--- last lines of the OpenBao log ($bao_log)" >&2
      bao_log_tail >&2
    fi
  fi
  if [[ "${KEEP:-0}" == 1 && -n "$bao_pid" ]]; then
    print_keep_instructions
    return
  fi
  stop_servers_and_remove_work_dir
}
trap cleanup EXIT

# ---- OpenBao dev server --------------------------------------------------------

start_bao_dev "$bao_home" "$bao_log"

# ---- AppRole login for the extension, as the OpenBao admin ---------------------

setup_approle_role "$role" "$policy" "$secrets_mount" "$secrets_path"

# ---- PostgreSQL 15 cluster -------------------------------------------------------

pg_port="$(pick_free_port 1)"
start_pg_cluster "$pg_data" "$pg_log" "$pg_port" demo-primary
pg_started=1

# ---- the demo ----------------------------------------------------------------

step "running scripts/demo.sql"
# demo.sql comes on stdin because the repository may not be readable by the
# postgres user.
psql_demo -v url="$BAO_ADDR" -v role_id="$role_id" -v wrapped="$wrapped" -f - \
  <"$repo_root/scripts/demo.sql"
unset role_id wrapped

step "keys under $secrets_mount/$secrets_path in OpenBao (names only)"
bao kv list -mount="$secrets_mount" "$secrets_path"

# Same value as global/vcenter-password in demo.sql.
old_password='Demo p@ss %41 #7? not-real'
step "searching the table files (base/) for the old vcenter password"
if grep -rqaF -- "$old_password" "$pg_data/base"; then
  echo "WARNING: the plaintext password is still in a table file under $pg_data/base"
else
  echo "not found. Old WAL segments (pg_wal/) may still contain it until they are recycled."
fi

step "changing global/vcenter-password directly in OpenBao"
bao kv patch -mount="$secrets_mount" "$secrets_path/global/vcenter-password" \
  secret='Rotated demo p@ss %52 #9? not-real' >/dev/null

psql_demo -f - <<'SQL'
\echo
\echo '== The resolved view shows the value changed in OpenBao'
SELECT path, value FROM vault_redirect_resolved.maasserver_secret
WHERE path = 'global/vcenter-password';
\echo
\echo '== The application role maas uses the tables with the SQL of its ORM, unchanged'
\set QUIET on
CREATE ROLE maas LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.maasserver_secret, public.maasserver_bmc TO maas;
ALTER ROLE maas SET vault_redirect.transparent_reads = on;
ALTER DATABASE postgres SET session_preload_libraries = 'vault_redirect';
\connect - maas
\set QUIET off
SELECT value FROM maasserver_secret WHERE path = 'global/vcenter-password';
INSERT INTO maasserver_secret (created, updated, path, value)
VALUES (now(), now(), 'bmc/3/power-parameters', '{"power_pass": "redfish-demo-new-3c1a"}')
ON CONFLICT (path) DO UPDATE SET value = EXCLUDED.value, updated = EXCLUDED.updated
RETURNING path, value;
UPDATE maasserver_secret SET value = '{"power_pass": "redfish-demo-rotated-77aa"}'
 WHERE path = 'bmc/3/power-parameters';
SELECT value FROM maasserver_secret WHERE path = 'bmc/3/power-parameters';
UPDATE maasserver_bmc SET power_parameters = power_parameters || '{"power_user": "ops"}'
 WHERE id = 16
RETURNING id, power_parameters;
DELETE FROM maasserver_secret WHERE path LIKE 'bmc/3/%';
\set QUIET on
\connect - postgres
\set QUIET off
\echo
\echo '== What the tables contain: references, and the BMC settings that are not secret'
SELECT path, value FROM public.maasserver_secret WHERE path LIKE 'bmc/%' ORDER BY path;
SELECT id, power_parameters FROM public.maasserver_bmc WHERE id = 16;
\echo
\echo '== Entries of deleted rows still waiting for the deletion worker'
SELECT pg_sleep(2);
SELECT path, attempts, last_error FROM vault_redirect.deletion_queue;
\echo
\echo '== Extension status'
\x on
SELECT * FROM vault_redirect.status();
SQL

step "KV entries under $secrets_mount/$secrets_path/bmc in OpenBao (names only; bmc/3 is gone)"
bao kv list -mount="$secrets_mount" "$secrets_path/bmc"

step "demo finished"
