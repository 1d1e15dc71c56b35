#!/usr/bin/env bash
# Measures what write redirection costs, as root on a machine where the
# extension is already installed into the system PostgreSQL 15
# (scripts/setup.sh). BENCHMARKS.md lists the results.
#
# Starts an OpenBao dev server and a PostgreSQL 15 cluster (durability
# settings at their defaults) on free 127.0.0.1 ports in a temporary
# folder, and migrates an empty MAAS-shaped maasserver_secret table. Then it
# times these steps, each also on a plain copy of the table that is not
# declared:
#   1. one transaction that inserts ROWS secrets (INSERT ... SELECT), with
#      the COMMIT, which writes them to OpenBao, timed apart, and the
#      backend's peak RSS (VmHWM) after it;
#   2. single-row INSERTs in autocommit, with pgbench, for 20 seconds;
#   3. an UPDATE of every row that leaves the secret alone;
#   4. reading every secret through the resolved view, and through the
#      table with vault_redirect.transparent_reads on;
#   5. a DELETE of every row, until the deletion worker has emptied the
#      queue.
#
# Usage: scripts/bench-writes.sh [ROWS]
#   ROWS  rows of the bulk insert (default 10000)
# Both servers are stopped and the folder removed on exit, also on failure.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$repo_root/scripts/common.sh"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 0
fi
rows="$(row_count_argument "${1:-}" 10000)"
require_root "it runs PostgreSQL as the postgres user"
add_tool_paths
clear_server_environment

work_dir="$(mktemp -d /tmp/vault_redirect_bench_writes.XXXXXX)"
# The postgres user must traverse it. The OpenBao home below stays private.
chmod 755 "$work_dir"
bao_log="$work_dir/bao.log"
pg_data="$work_dir/pg/data"
pg_log="$work_dir/pg/postgresql.log"
bao_pid=""
pg_started=0

cleanup() {
  local status=$?
  if [[ "$status" -ne 0 && -f "$pg_log" ]]; then
    echo "--- last lines of the PostgreSQL log" >&2
    tail -n 20 "$pg_log" >&2
  fi
  stop_servers_and_remove_work_dir
}
trap cleanup EXIT

psql_bench() {
  run_as_postgres psql -X -q -v ON_ERROR_STOP=1 -h "$pg_data" -p "$pg_port" -d postgres "$@"
}

# Prints the seconds that the SQL in $1 takes, measured in the server with
# clock_timestamp(), as user $2 (default postgres).
seconds_of() {
  psql_bench -U "${2:-postgres}" -At <<SQL | tail -n 1
SELECT clock_timestamp() AS started \gset
$1
SELECT round(extract(epoch FROM clock_timestamp() - :'started'::timestamptz)::numeric, 2);
SQL
}

start_bao_dev "$work_dir/bao" "$bao_log"
setup_approle_role pg-primary pg-primary-policy secret maas
pg_port="$(pick_free_port 1)"
start_pg_cluster "$pg_data" "$pg_log" "$pg_port" bench-primary
pg_started=1

step "creating, declaring and migrating an empty maasserver_secret, and a plain copy"
psql_bench -v url="$BAO_ADDR" -v role_id="$role_id" -v wrapped="$wrapped" <<'SQL'
CREATE EXTENSION vault_redirect;
\set VERBOSITY terse
SELECT vault_redirect.configure(:'url', :'role_id', :'wrapped', 'maas', 'secret') \gset
\set VERBOSITY default
CREATE TABLE maasserver_secret (created timestamptz NOT NULL DEFAULT now(),
    updated timestamptz NOT NULL DEFAULT now(), path text PRIMARY KEY, value jsonb NOT NULL);
CREATE TABLE plain_secret (LIKE maasserver_secret INCLUDING ALL);
SELECT vault_redirect.declare_kv_table('maasserver_secret', 'path', 'value') \gset
SELECT count(*) FROM vault_redirect.migrate() \gset
CREATE ROLE app LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON maasserver_secret, plain_secret TO app;
ALTER ROLE app SET vault_redirect.transparent_reads = on;
ALTER DATABASE postgres SET session_preload_libraries = 'vault_redirect';
SQL
unset role_id wrapped

bulk_insert="INSERT INTO %s (path, value)
  SELECT 'bulk/' || g, jsonb_build_object('secret', md5(g::text)) FROM generate_series(1, $rows) g;"

step "1. one transaction inserting $rows rows"
plain_bulk="$(seconds_of "$(printf "$bulk_insert" plain_secret)")"
# The backend's pid comes first, so that its peak RSS can be read after the
# commit while the session still exists.
psql_bench -At >"$work_dir/bulk.out" <<SQL
SELECT pg_backend_pid();
BEGIN;
SELECT clock_timestamp() AS started \gset
$(printf "$bulk_insert" maasserver_secret)
SELECT clock_timestamp() AS inserted \gset
COMMIT;
SELECT round(extract(epoch FROM :'inserted'::timestamptz - :'started'::timestamptz)::numeric, 2),
       round(extract(epoch FROM clock_timestamp() - :'inserted'::timestamptz)::numeric, 2);
SELECT pg_sleep(0.2);
SELECT split_part(line, ':', 2) FROM (SELECT unnest(string_to_array(
    pg_read_file('/proc/' || pg_backend_pid() || '/status'), E'\n')) AS line) s
 WHERE line LIKE 'VmHWM:%';
SQL
IFS='|' read -r bulk_insert_s bulk_commit_s < <(sed -n 2p "$work_dir/bulk.out")
bulk_hwm_kb="$(sed -n 4p "$work_dir/bulk.out" | tr -dc '0-9')"
in_vault="$(bao kv list -mount=secret maas/bulk | grep -c . || true)"

step "2. single-row INSERTs in autocommit for 20 s (pgbench, 1 client)"
printf '%s\n' '\set n random(1, 1000000000)' \
  "INSERT INTO TABLE_NAME (path, value) VALUES ('one/' || :n || '/' || random(), '{\"secret\": \"pgbench\"}');" \
  >"$work_dir/one.sql"
pgbench_tps() {
  sed "s/TABLE_NAME/$1/" "$work_dir/one.sql" >"$work_dir/one-$1.sql"
  chmod 644 "$work_dir/one-$1.sql"
  run_as_postgres pgbench -n -h "$pg_data" -p "$pg_port" -U app -T 20 -c 1 \
    -f "$work_dir/one-$1.sql" postgres | awk '/^tps/ { printf "%.0f", $3 }'
}
plain_tps="$(pgbench_tps plain_secret)"
redirected_tps="$(pgbench_tps maasserver_secret)"

step "3. UPDATE of every bulk row, leaving the secret alone"
plain_update="$(seconds_of "UPDATE plain_secret SET updated = now() WHERE path LIKE 'bulk/%';")"
redirected_update="$(seconds_of "UPDATE maasserver_secret SET updated = now() WHERE path LIKE 'bulk/%';")"

step "4. reading every bulk secret"
plain_read="$(seconds_of "SELECT count(value->>'secret') FROM plain_secret WHERE path LIKE 'bulk/%';")"
view_read="$(seconds_of "SELECT count(value->>'secret') FROM vault_redirect_resolved.maasserver_secret WHERE path LIKE 'bulk/%';")"
transparent_read="$(seconds_of "SELECT count(value->>'secret') FROM maasserver_secret WHERE path LIKE 'bulk/%';" app)"

step "5. DELETE of every bulk row, until the deletion worker is done"
plain_delete="$(seconds_of "DELETE FROM plain_secret WHERE path LIKE 'bulk/%';")"
redirected_delete="$(seconds_of "DELETE FROM maasserver_secret WHERE path LIKE 'bulk/%';
DO \$\$ BEGIN
  WHILE EXISTS (SELECT 1 FROM vault_redirect.deletion_queue) LOOP PERFORM pg_sleep(0.05); END LOOP;
END \$\$;")"
left_in_vault="$(bao kv list -mount=secret maas/bulk 2>/dev/null | grep -c . || true)"

cat <<EOF

Results ($rows rows; OpenBao dev server and PostgreSQL on loopback; seconds)

| step | plain table | declared and migrated |
|---|---:|---:|
| 1. INSERT ... SELECT of $rows rows, statement | $plain_bulk (with commit) | $bulk_insert_s |
| 1. its COMMIT, which writes to OpenBao | | $bulk_commit_s |
| 2. single-row INSERT in autocommit, per second | $plain_tps | $redirected_tps |
| 3. UPDATE of $rows rows, secret unchanged | $plain_update | $redirected_update |
| 4. read $rows secrets through the view | $plain_read | $view_read |
| 4. read them from the table, transparent reads | | $transparent_read |
| 5. DELETE of $rows rows, until the queue is empty | $plain_delete | $redirected_delete |

Backend peak RSS (VmHWM) after the bulk commit: $(awk -v kb="$bulk_hwm_kb" 'BEGIN { printf "%.1f", kb / 1024 }') MiB.
KV entries under maas/bulk after the commit: $((in_vault > 2 ? in_vault - 2 : 0)); after the deletions: $((left_in_vault > 2 ? left_in_vault - 2 : 0)).
EOF
