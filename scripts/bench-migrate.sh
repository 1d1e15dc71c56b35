#!/usr/bin/env bash
# Measures vault_redirect.migrate() on a MAAS-shaped maasserver_secret table,
# as root on a machine where the extension is already installed into the
# system PostgreSQL 15 (scripts/setup.sh). BENCHMARKS.md lists the results.
#
# Starts an OpenBao dev server and a PostgreSQL 15 cluster on free 127.0.0.1
# ports in a temporary folder, fills the table with ROWS plaintext secrets
# and runs `SELECT * FROM vault_redirect.migrate()` in one psql session. It
# prints the wall time, rows per second, the memory of the migrating backend
# (sampled from /proc every 0.5 s), the peak memory of the OpenBao server
# and the CPU time of both. Afterwards it checks that every row contains a
# reference and compares 3 random rows, read through the resolved view,
# with the inserted values. With 100000 rows a run takes several minutes;
# BENCHMARKS.md has measured times.
#
# Usage: scripts/bench-migrate.sh [ROWS]
#   ROWS  rows to create and migrate (default 100000)
# Environment:
#   BENCH_RESULTS  Markdown file to append a table row to (a new file gets
#                  the table header first)
# Both servers are stopped and the folder removed on exit, also on failure.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$repo_root/scripts/common.sh"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 0
fi
rows="$(row_count_argument "${1:-}" 100000)"
require_root "it runs PostgreSQL as the postgres user"

add_tool_paths
for tool in bao curl python3 readelf runuser; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "bench-migrate.sh: $tool not found; run scripts/setup.sh first" >&2
    exit 1
  fi
done

clear_server_environment

secrets_mount=secret
secrets_path=maas
role=pg-primary
policy="$role-policy"
# Seconds between two memory samples of the migrating backend.
sample_interval=0.5
# Seconds between two requests for a memory context dump of that backend.
context_dump_interval=30

work_dir="$(mktemp -d /tmp/vault_redirect_bench.XXXXXX)"
# The postgres user must traverse it. The OpenBao home below stays private.
chmod 755 "$work_dir"
bao_home="$work_dir/bao"
bao_log="$work_dir/bao.log"
pg_dir="$work_dir/pg"
pg_data="$pg_dir/data"
pg_log="$pg_dir/postgresql.log"
# Files through which the migrating psql session and the sampler coordinate.
# Owned by postgres, because psql runs as that user.
measure_dir="$work_dir/measure"
bao_pid=""
sampler_pid=""
pg_started=0

psql_bench() {
  run_as_postgres psql -X -v ON_ERROR_STOP=1 -h "$pg_data" -p "$pg_port" -d postgres "$@"
}

# Prints the end of the PostgreSQL log without the memory context dumps and
# without lines that contain the role_id or the wrapping token, because
# PostgreSQL logs the text of a failing statement (log_min_error_statement),
# which includes the configure() call.
pg_log_tail() {
  local credentials=()
  if [[ -n "${role_id:-}" ]]; then
    credentials+=(-e "$role_id")
  fi
  if [[ -n "${wrapped:-}" ]]; then
    credentials+=(-e "$wrapped")
  fi
  grep -vE 'LOG:  (level: [0-9]+;|Grand total:|logging memory contexts)' "$pg_log" | tail -n 20 |
    if ((${#credentials[@]} > 0)); then
      grep -vF "${credentials[@]}" || true
    else
      cat
    fi
}

cleanup() {
  local status=$?
  if [[ "$status" -ne 0 ]]; then
    echo "bench-migrate.sh: failed with exit status $status" >&2
    if [[ -f "$pg_log" ]]; then
      echo "--- last lines of the PostgreSQL log" >&2
      pg_log_tail >&2
    fi
    if [[ -f "$bao_log" ]]; then
      echo "--- last lines of the OpenBao log" >&2
      bao_log_tail >&2
    fi
  fi
  if [[ -n "$sampler_pid" ]]; then
    kill "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
  fi
  stop_servers_and_remove_work_dir
}
trap cleanup EXIT

# Prints the value in kB of FIELD (such as VmHWM) from a copy of
# /proc/<pid>/status, or nothing when the field is missing.
status_kb() {
  awk -v field="$2:" '$1 == field { print $2 }' "$1"
}

# Prints a kB count in MiB with one decimal.
mib() {
  awk -v kb="$1" 'BEGIN { printf "%.1f", kb / 1024 }'
}

# Prints the CPU time (user plus system, in seconds) that process PID has
# used so far, from fields 14 and 15 of /proc/<pid>/stat.
cpu_seconds() {
  local stat
  stat="$(cat "/proc/$1/stat")"
  # Fields after the command name, which is in parentheses, start at field 3.
  awk -v ticks="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($12 + $13) / ticks }' <<<"${stat##*) }"
}

# Prints the sha256 of the vault_redirect library that process PID has
# mapped, read through /proc/<pid>/map_files, so that a library replaced on
# disk since the process loaded it still gives the checksum of what it runs.
library_checksum() {
  local range
  range="$(awk '/\/vault_redirect\.so/ { print $1; exit }' "/proc/$1/maps")"
  if [[ -z "$range" ]]; then
    echo "bench-migrate.sh: backend $1 has not loaded vault_redirect.so" >&2
    return 1
  fi
  sha256sum "/proc/$1/map_files/$range" | cut -d' ' -f1
}

# Prints the build profile of the installed extension library, inferred
# from its DWARF debug info: the repository's dev profile keeps it and its
# release profile leaves it out.
library_profile() {
  local library="$1"
  if [[ ! -f "$library" ]]; then
    echo "bench-migrate.sh: $library not found; install the extension first" >&2
    return 1
  fi
  if readelf -S "$library" | grep -q '\.debug_info'; then
    echo "dev"
  else
    echo "release"
  fi
}

# Prints the 6 largest memory contexts of backend PID as "bytes contexts
# name", from the second-to-last dump in the log, which is the last one
# taken while migrate() ran. PostgreSQL logs the children of a context
# beyond the first 100 as one summary line, counted here as "unlisted
# children of <parent>".
largest_memory_contexts() {
  { grep -F "[$1]" "$pg_log" || true; } | awk '
    /logging memory contexts of PID/ { dump++; next }
    / level: [0-9]+; / {
      line = $0
      sub(/.* level: /, "", line)
      level = line + 0
      sub(/^[0-9]+; /, "", line)
      total = line
      sub(/ total in .*/, "", total)
      sub(/.* /, "", total)
      if (line ~ /^[0-9]+ more child contexts containing /) {
        # Printed at the level of the parent, after the listed children.
        name = "unlisted children of " parent[level]
        count = line + 0
      } else {
        name = line
        sub(/: [0-9]+ total in .*/, "", name)
        count = 1
        parent[level] = name
      }
      bytes[dump, name] += total
      contexts[dump, name] += count
    }
    END {
      if (dump < 2) exit
      for (key in bytes) {
        split(key, part, SUBSEP)
        if (part[1] == dump - 1) printf "%d %d %s\n", bytes[key], contexts[key], part[2]
      }
    }' | sort -nr | head -n 6
}

# Samples the memory of the migrating backend until migrate() returns, as a
# background job. Waits for psql to write the backend's pid, saves the
# backend's /proc status as before.status and the checksum of the library
# it loaded, and lets psql start migrate(). Then every $sample_interval s it
# appends the time (seconds since the epoch), VmRSS, RssAnon, RssFile and
# RssShmem to samples.kb and keeps the maxima in max.kb, and every
# $context_dump_interval s it calls pg_log_backend_memory_contexts() on it.
# When psql signals that migrate() returned, it saves the status as
# after.status, whose VmHWM is the backend's peak RSS.
sample_backend() {
  local pid="" now next_dump max_rss=0 max_anon=0 max_shmem=0

  # Appends a copy of /proc/<pid>/status to samples.kb and raises the
  # maxima to its values.
  record_sample() {
    local rss anon file shmem
    rss="$(status_kb "$1" VmRSS)"
    anon="$(status_kb "$1" RssAnon)"
    file="$(status_kb "$1" RssFile)"
    shmem="$(status_kb "$1" RssShmem)"
    echo "$EPOCHREALTIME $rss $anon $file $shmem" >>"$measure_dir/samples.kb"
    if ((rss > max_rss)); then max_rss=$rss; fi
    if ((anon > max_anon)); then max_anon=$anon; fi
    if ((shmem > max_shmem)); then max_shmem=$shmem; fi
  }

  for _ in $(seq 1 600); do
    if [[ -s "$measure_dir/backend.pid" ]]; then
      pid="$(tr -dc '0-9' <"$measure_dir/backend.pid")"
      break
    fi
    sleep 0.1
  done
  if [[ -z "$pid" ]]; then
    echo "bench-migrate.sh: psql did not report its backend pid within 60 s" >&2
    return 1
  fi
  cp "/proc/$pid/status" "$measure_dir/before.status"
  library_checksum "$pid" >"$measure_dir/backend.library.sha256"
  cpu_seconds "$pid" >"$measure_dir/before.backend.cpu"
  cpu_seconds "$bao_pid" >"$measure_dir/before.bao.cpu"
  touch "$measure_dir/sampler.ready"
  next_dump=$((SECONDS + context_dump_interval))
  while [[ ! -e "$measure_dir/migrate.done" ]]; do
    if ! cp "/proc/$pid/status" "$measure_dir/sample.status" 2>/dev/null; then
      echo "bench-migrate.sh: backend $pid exited before migrate() returned" >&2
      return 1
    fi
    record_sample "$measure_dir/sample.status"
    now=$SECONDS
    if ((now >= next_dump)); then
      psql_bench -Atq -c "SELECT pg_log_backend_memory_contexts($pid)" >/dev/null || true
      next_dump=$((now + context_dump_interval))
    fi
    sleep "$sample_interval"
  done
  cp "/proc/$pid/status" "$measure_dir/after.status"
  cpu_seconds "$pid" >"$measure_dir/after.backend.cpu"
  cpu_seconds "$bao_pid" >"$measure_dir/after.bao.cpu"
  record_sample "$measure_dir/after.status"
  echo "$max_rss $max_anon $max_shmem" >"$measure_dir/max.kb"
  touch "$measure_dir/sampler.done"
}

# ---- the machine -------------------------------------------------------------

library="$("$PG_CONFIG" --pkglibdir)/vault_redirect.so"
profile="$(library_profile "$library")"
cpu_model="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
memory_total="$(free -h | awk '/^Mem:/ { print $2 }')"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
step "machine: $(nproc) CPUs ($cpu_model), $memory_total memory, load average $load_before"
step "extension library: $library, $profile profile, modified $(date -u -r "$library" '+%Y-%m-%d %H:%M UTC')"

# ---- OpenBao dev server --------------------------------------------------------

start_bao_dev "$bao_home" "$bao_log"

# ---- AppRole login for the extension, as the OpenBao admin ---------------------

setup_approle_role "$role" "$policy" "$secrets_mount" "$secrets_path"

# ---- PostgreSQL 15 cluster -------------------------------------------------------

pg_port="$(pick_free_port 1)"
step "starting PostgreSQL 15 on 127.0.0.1:$pg_port (durability settings left at their defaults)"
install -d -o postgres -g postgres -m 700 "$pg_dir"
install -d -o postgres -g postgres -m 755 "$measure_dir"
# --no-sync only skips flushing the new cluster's files at the end of initdb.
# The server keeps fsync, synchronous_commit, full_page_writes and
# shared_buffers at their defaults.
run_as_postgres initdb -D "$pg_data" --username=postgres --auth=trust --encoding=UTF8 \
  --locale=C.UTF-8 --no-sync --no-instructions >"$work_dir/initdb.log"
cat >>"$pg_data/postgresql.conf" <<EOF

listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$pg_data'
logging_collector = off
log_destination = 'stderr'
log_line_prefix = '%m [%p] %q%u@%d '
lc_messages = 'C'
timezone = 'UTC'
EOF
run_as_postgres pg_ctl start -D "$pg_data" -l "$pg_log" -w -t 60 -s
pg_started=1

# ---- the table -----------------------------------------------------------------

step "creating maasserver_secret with $rows plaintext rows and configuring the extension"
# One row in ten is a root key with {"secret": ...} and the rest are BMC
# power parameters. bench_expected keeps a copy for the spot check.
psql_bench -q -v rows="$rows" -v url="$BAO_ADDR" -v role_id="$role_id" -v wrapped="$wrapped" \
  -f - >"$work_dir/setup.out" <<'SQL'
CREATE TABLE public.maasserver_secret (
    created timestamptz NOT NULL,
    updated timestamptz NOT NULL,
    path text NOT NULL,
    value jsonb NOT NULL,
    CONSTRAINT maasserver_secret_pkey PRIMARY KEY (path)
);
INSERT INTO public.maasserver_secret (created, updated, path, value)
SELECT now(), now(),
       CASE WHEN n % 10 = 0 THEN format('rootkey/%s/material', n)
            ELSE format('bmc/%s/power-parameters', n) END,
       CASE WHEN n % 10 = 0
            THEN jsonb_build_object('secret', md5(random()::text) || substr(md5(random()::text), 1, 16))
            ELSE jsonb_build_object('power_pass', substr(md5(random()::text), 1, 24),
                                    'power_user', 'admin') END
  FROM generate_series(1, :rows) AS n;
CREATE TABLE public.bench_expected AS SELECT path, value FROM public.maasserver_secret;
VACUUM (ANALYZE) public.maasserver_secret;
VACUUM (ANALYZE) public.bench_expected;
CHECKPOINT;

CREATE EXTENSION vault_redirect;
-- Terse errors leave out the statement text, which would show the
-- credentials if configure() failed.
\set VERBOSITY terse
SELECT vault_redirect.configure(:'url', :'role_id', :'wrapped', 'maas', 'secret');
\set VERBOSITY default
SELECT vault_redirect.declare_kv_table('public.maasserver_secret', 'path', 'value');
SQL
unset role_id wrapped

# ---- the measured migration --------------------------------------------------

step "running vault_redirect.migrate() on $rows rows"
sample_backend &
sampler_pid=$!
# LOAD maps the library before the baseline sample, so the baseline counts
# its pages. The \! loops wait for the sampler, for at most 60 s.
if ! psql_bench -f - >"$work_dir/migrate.out" <<SQL
LOAD 'vault_redirect';
SELECT pg_backend_pid() AS backend_pid \\gset
\\o $measure_dir/backend.pid
\\qecho :backend_pid
\\o
\\! for i in \$(seq 600); do [ -e $measure_dir/sampler.ready ] && break; sleep 0.1; done
SELECT extract(epoch FROM clock_timestamp()) AS started \\gset
SELECT * FROM vault_redirect.migrate();
SELECT extract(epoch FROM clock_timestamp()) - :started AS seconds \\gset
\\o $measure_dir/seconds
\\qecho :seconds
\\o
\\! touch $measure_dir/migrate.done; for i in \$(seq 600); do [ -e $measure_dir/sampler.done ] && break; sleep 0.1; done
SELECT pg_log_backend_memory_contexts(pg_backend_pid());
SQL
then
  cat "$work_dir/migrate.out"
  exit 1
fi
wait "$sampler_pid"
sampler_pid=""
cat "$work_dir/migrate.out"

seconds="$(tr -d ' \n' <"$measure_dir/seconds")"
backend_pid="$(tr -dc '0-9' <"$measure_dir/backend.pid")"
read -r max_rss_kb max_anon_kb max_shmem_kb <"$measure_dir/max.kb"
before_rss_kb="$(status_kb "$measure_dir/before.status" VmRSS)"
before_anon_kb="$(status_kb "$measure_dir/before.status" RssAnon)"
before_file_kb="$(status_kb "$measure_dir/before.status" RssFile)"
before_shmem_kb="$(status_kb "$measure_dir/before.status" RssShmem)"
after_hwm_kb="$(status_kb "$measure_dir/after.status" VmHWM)"
after_rss_kb="$(status_kb "$measure_dir/after.status" VmRSS)"
after_anon_kb="$(status_kb "$measure_dir/after.status" RssAnon)"
cp "/proc/$bao_pid/status" "$work_dir/bao.status"
bao_hwm_kb="$(status_kb "$work_dir/bao.status" VmHWM)"
backend_cpu="$(awk 'NR == FNR { before = $1; next } { printf "%.1f", $1 - before }' \
  "$measure_dir/before.backend.cpu" "$measure_dir/after.backend.cpu")"
bao_cpu="$(awk 'NR == FNR { before = $1; next } { printf "%.1f", $1 - before }' \
  "$measure_dir/before.bao.cpu" "$measure_dir/after.bao.cpu")"
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
library_sha256="$(cat "$measure_dir/backend.library.sha256")"
# The checksum is of the file the backend mapped before migrate(). cargo
# pgrx install deletes the old file before it copies the new one, so the
# backend kept running that build.
if [[ "$(sha256sum "$library" | cut -d' ' -f1)" != "$library_sha256" ]]; then
  echo "WARNING: $library was replaced during the run. migrate() ran the build with" \
    "sha256 ${library_sha256:0:16}, but the checks below use the new one." >&2
fi

# ---- checks --------------------------------------------------------------------

step "checking that every row contains a reference"
unmigrated="$(psql_bench -Atq -c \
  "SELECT count(*) FROM public.maasserver_secret WHERE NOT value ? '\$vault_redirect'")"
if [[ "$unmigrated" != 0 ]]; then
  echo "bench-migrate.sh: $unmigrated rows still contain plaintext after migrate()" >&2
  exit 1
fi

step "comparing 3 random rows of vault_redirect_resolved.maasserver_secret with the inserted values"
# Prints path and match only, never the secret.
psql_bench -Atq -F ' ' -f - >"$work_dir/spot.out" <<'SQL'
SELECT e.path, r.value = e.value
  FROM (SELECT path, value FROM public.bench_expected ORDER BY random() LIMIT 3) e
  LEFT JOIN vault_redirect_resolved.maasserver_secret r USING (path)
 ORDER BY e.path;
SQL
sed 's/ t$/ matches/; s/ f$/ DIFFERS/; s/ $/ MISSING/; s/^/    /' "$work_dir/spot.out"
if [[ "$(grep -c ' t$' "$work_dir/spot.out")" != 3 ]]; then
  echo "bench-migrate.sh: a resolved row differs from the inserted value" >&2
  exit 1
fi

# ---- summary -------------------------------------------------------------------

rows_per_second="$(awk -v r="$rows" -v s="$seconds" 'BEGIN { printf "%.0f", r / s }')"
seconds="$(awk -v s="$seconds" 'BEGIN { printf "%.1f", s }')"

step "memory of backend $backend_pid while migrate() ran (MiB, at most 12 of the samples)"
# Consecutive samples are sample_interval seconds apart, and the last one
# was taken after migrate() returned.
awk -v count=12 '
  { time[NR] = $1; rss[NR] = $2; anon[NR] = $3; file[NR] = $4; shmem[NR] = $5 }
  END {
    printf "    %9s %8s %8s %8s %8s\n", "seconds", "VmRSS", "RssAnon", "RssFile", "RssShmem"
    last = 0
    for (i = 0; i < count; i++) {
      n = (NR <= count) ? i + 1 : 1 + int(i * (NR - 1) / (count - 1) + 0.5)
      if (n > NR || n == last) continue
      last = n
      printf "    %9.1f %8.1f %8.1f %8.1f %8.1f\n", time[n] - time[1],
        rss[n] / 1024, anon[n] / 1024, file[n] / 1024, shmem[n] / 1024
    }
  }' "$measure_dir/samples.kb"

step "memory contexts of backend $backend_pid (Grand total of each dump, palloc memory only)"
grep -F "[$backend_pid]" "$pg_log" | grep -F 'Grand total' |
  sed -E 's/^([0-9-]+ [0-9:.]+) UTC .*Grand total: ([0-9]+) bytes.*/    \1  \2 bytes/' || true

step "largest memory contexts of backend $backend_pid in its last dump while migrate() ran"
largest_contexts="$(largest_memory_contexts "$backend_pid")"
if [[ -n "$largest_contexts" ]]; then
  awk '{
    bytes = $1; count = $2; $1 = ""; $2 = ""; sub(/^ +/, "")
    printf "    %8.1f MiB in %6d contexts  %s\n", bytes / 1048576, count, $0
  }' <<<"$largest_contexts"
else
  echo "    none: migrate() returned before the first dump, $context_dump_interval s after it started"
fi

cat <<EOF

Summary
  rows migrated                 $rows
  wall time of migrate()        $seconds s
  rows per second               $rows_per_second
  backend VmRSS before migrate  $(mib "$before_rss_kb") MiB (RssAnon $(mib "$before_anon_kb") MiB, RssFile $(mib "$before_file_kb") MiB, RssShmem $(mib "$before_shmem_kb") MiB)
  backend VmHWM after migrate   $(mib "$after_hwm_kb") MiB (peak RSS)
  backend VmRSS after migrate   $(mib "$after_rss_kb") MiB (RssAnon $(mib "$after_anon_kb") MiB)
  backend sampled maxima        VmRSS $(mib "$max_rss_kb") MiB, RssAnon $(mib "$max_anon_kb") MiB, RssShmem $(mib "$max_shmem_kb") MiB
  OpenBao VmHWM                 $(mib "$bao_hwm_kb") MiB
  CPU time during migrate()     backend $backend_cpu s, OpenBao $bao_cpu s
  build profile                 $profile (library sha256 ${library_sha256:0:16})
  load average before / after   $load_before / $load_after
EOF

if [[ -n "${BENCH_RESULTS:-}" ]]; then
  if [[ ! -s "$BENCH_RESULTS" ]]; then
    cat >"$BENCH_RESULTS" <<'EOF'
| date (UTC) | rows | seconds | rows/s | backend VmRSS before (MiB) | backend VmHWM (MiB) | backend max RssAnon (MiB) | OpenBao VmHWM (MiB) | backend / OpenBao CPU (s) | profile | library sha256 | load before / after |
|---|---|---|---|---|---|---|---|---|---|---|---|
EOF
  fi
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %s | %s | %s / %s |\n' \
    "$(date -u '+%Y-%m-%d %H:%M')" "$rows" "$seconds" "$rows_per_second" \
    "$(mib "$before_rss_kb")" "$(mib "$after_hwm_kb")" "$(mib "$max_anon_kb")" \
    "$(mib "$bao_hwm_kb")" "$backend_cpu" "$bao_cpu" "$profile" "${library_sha256:0:12}" \
    "$load_before" "$load_after" >>"$BENCH_RESULTS"
  step "appended a row to $BENCH_RESULTS"
fi
