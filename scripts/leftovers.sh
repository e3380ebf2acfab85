#!/usr/bin/env bash
# Refuses to let the test suite start while a process from an earlier run is still alive: a
# reaper whose DATABASE_URL names the test cluster's port, or a storage emulator of this checkout
# left without its parent. A leaked reaper keeps claiming rows in the test cluster with an
# earlier test's settings and fails later tests in ways that look like product bugs (issue 10).
#
#   scripts/leftovers.sh PORT     exit 1, naming every such pid and how to stop it; 0 if none
set -euo pipefail
PORT="${1:?usage: $0 PORT}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

found=0
for proc in /proc/[0-9]*; do
  pid="${proc#/proc/}"
  exe="$(readlink "$proc/exe" 2>/dev/null)" || continue
  case "$(basename "$exe")" in
    reaper)
      if tr '\0' '\n' <"$proc/environ" 2>/dev/null | grep -qE "^DATABASE_URL=.*:${PORT}(/|\?|$)"; then
        echo "a reaper from an earlier run still uses the test cluster on port $PORT: pid $pid ($exe); stop it with: kill $pid" >&2
        found=1
      fi
      ;;
    storage-emulator)
      # The parent pid is the 4th field of /proc/PID/stat, counted after the ")" that ends the
      # command name (which may contain spaces).
      ppid="$(sed 's/.*) //' "$proc/stat" 2>/dev/null | awk '{print $2}')"
      if [ "$ppid" = 1 ] && [[ "$exe" == "$ROOT"/target/* ]]; then
        echo "a storage emulator from an earlier run is still alive without its test: pid $pid ($exe); stop it with: kill $pid" >&2
        found=1
      fi
      ;;
  esac
done
if [ "$found" = 1 ]; then
  echo "refusing to start the tests: processes from an earlier run would act on this run's cluster" >&2
  exit 1
fi
