#!/usr/bin/env bash
# Builds pg_orphan_cleanup and installs it into the system PostgreSQL (PG_MAJOR, default 15).
# PROFILE=release builds optimized (benchmarks); the default debug build compiles faster.
set -euo pipefail
cd "$(dirname "$0")/../pg_orphan_cleanup"
PG_MAJOR="${PG_MAJOR:-15}"
args=(--pg-config "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config")
[ "${PROFILE:-debug}" = release ] && args+=(--release)
set +e
cargo pgrx install "${args[@]}" 2>&1 | sed -E $'s/\x1b\\[[0-9;]*m//g' \
  | grep -vE '^\s*(Discovered|Writing|Copying|Using|Building|Running|Installing|Finished)'
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "cargo pgrx install failed (exit $status); see the messages above" >&2
  exit "$status"
fi
# The install scripts of released versions, exactly as they shipped (released/), so that a DBA
# and the upgrade tests can install an older version and ALTER EXTENSION ... UPDATE from it.
# pgrx writes the current version's script and copies the upgrade scripts (sql/*--*--*.sql).
extdir="$("/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config" --sharedir)/extension"
install -m 644 released/pg_orphan_cleanup--*.sql "$extdir/"
echo "pg_orphan_cleanup installed for PostgreSQL ${PG_MAJOR}"
