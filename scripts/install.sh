#!/usr/bin/env bash
# Builds pg_orphan_cleanup and installs it into the system PostgreSQL (PG_MAJOR, default 15).
# PROFILE=release builds optimized (benchmarks); the default debug build compiles faster.
set -euo pipefail
cd "$(dirname "$0")/../pg_orphan_cleanup"
PG_MAJOR="${PG_MAJOR:-15}"
args=(--pg-config "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config")
[ "${PROFILE:-debug}" = release ] && args+=(--release)
cargo pgrx install "${args[@]}" 2>&1 | grep -vE '^\s*(Discovered|Writing|Copying|Using|Building|Running|Installing|Finished)' || true
test -f "/usr/lib/postgresql/${PG_MAJOR}/lib/pg_orphan_cleanup.so"
echo "pg_orphan_cleanup installed for PostgreSQL ${PG_MAJOR}"
