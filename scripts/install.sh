#!/usr/bin/env bash
# Builds pg_orphan_cleanup and installs it into the system PostgreSQL (PG_MAJOR, default 15).
# PROFILE=release builds optimized (benchmarks); the default debug build compiles faster.
set -euo pipefail
cd "$(dirname "$0")/../pg_orphan_cleanup"
PG_MAJOR="${PG_MAJOR:-15}"
args=(--pg-config "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config")
[ "${PROFILE:-debug}" = release ] || args+=(--debug)
# Built into a staging directory first, then moved into place file by file with rename(2): a
# server that has the old library loaded keeps its mapping of the old file. Copying over it in
# place (what `cargo pgrx install` does) can crash a running server (SIGSEGV in the worker).
STAGE="$(mktemp -d /tmp/pg_orphan_cleanup-install.XXXXXX)"
trap 'rm -rf "$STAGE"' EXIT
set +e
cargo pgrx package "${args[@]}" --out-dir "$STAGE" 2>&1 | sed -E $'s/\x1b\\[[0-9;]*m//g' \
  | grep -vE '^\s*(Discovered|Writing|Copying|Using|Building|Running|Installing|Finished)'
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "cargo pgrx package failed (exit $status); see the messages above" >&2
  exit "$status"
fi
place() { # place SRC DEST MODE: a new file beside DEST, renamed over it
  local tmp
  tmp="$(dirname "$2")/.$(basename "$2").new.$$"
  install -D -m "$3" "$1" "$tmp"
  mv -f "$tmp" "$2"
}
while IFS= read -r f; do
  case "$f" in *.so) mode=755 ;; *) mode=644 ;; esac
  place "$STAGE/$f" "/$f" "$mode"
done < <(cd "$STAGE" && find . -type f -printf '%P\n')
# The install scripts of released versions, exactly as they shipped (released/), so that a DBA
# and the upgrade tests can install an older version and ALTER EXTENSION ... UPDATE from it.
# pgrx writes the current version's script and copies the upgrade scripts (sql/*--*--*.sql).
extdir="$("/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config" --sharedir)/extension"
for f in released/pg_orphan_cleanup--*.sql; do
  place "$f" "$extdir/$(basename "$f")" 644
done
echo "pg_orphan_cleanup installed for PostgreSQL ${PG_MAJOR}"
