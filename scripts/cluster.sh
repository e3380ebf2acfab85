#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests and the demo: its own data directory, port and
# socket directory, run as the `postgres` user (PostgreSQL refuses to run as root), with
# pg_orphan_cleanup in shared_preload_libraries.
#
#   scripts/cluster.sh start     create (first time) and start; prints the connection settings
#   scripts/cluster.sh stop      stop it (fast shutdown)
#   scripts/cluster.sh restart
#   scripts/cluster.sh crash     stop like a power cut (pg_ctl -m immediate), then start: crash recovery
#   scripts/cluster.sh destroy   stop and delete the data directory
#   scripts/cluster.sh env       print PG* variables to `eval` in a shell
#
# Settings (environment): PGOC_PORT (25432), PGOC_DIR (/tmp/pg_orphan_cleanup-$PGOC_PORT),
# PG_MAJOR (15), PGOC_WORKER_DB (postgres: the database the background worker works in),
# PGOC_PRELOAD (1; 0 leaves pg_orphan_cleanup out of shared_preload_libraries: no worker),
# PGOC_PLATFORM (unset; `managed` simulates a managed platform for the managed edition: no
# pg_orphan_cleanup preloaded, pg_cron preloaded as platforms do, its jobs in PGOC_CRON_DB, app).
# Ports stay below 32768, outside Linux's ephemeral range, so that no outgoing connection or
# port-0 listener can already hold them. The directory lives under /tmp because the postgres user must be able to reach it, which a
# checkout under /root does not allow.
set -euo pipefail

PG_MAJOR="${PG_MAJOR:-15}"
PG_BIN="/usr/lib/postgresql/${PG_MAJOR}/bin"
PORT="${PGOC_PORT:-25432}"
DIR="${PGOC_DIR:-/tmp/pg_orphan_cleanup-${PORT}}"
DATA="$DIR/data"
SOCK="$DIR/sock"
LOG="$DIR/postgres.log"

as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@"; else runuser -u postgres -- "$@"; fi
}

running() { as_postgres "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

start() {
  if [ ! -x "$PG_BIN/initdb" ]; then
    echo "PostgreSQL $PG_MAJOR is not installed; run scripts/setup.sh first" >&2
    exit 1
  fi
  mkdir -p "$DIR" "$SOCK"
  chown postgres:postgres "$DIR" "$SOCK"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    as_postgres "$PG_BIN/initdb" -D "$DATA" --auth=trust --username=postgres --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$DATA/postgresql.conf" <<CONF

# --- pg_orphan_cleanup throwaway cluster ---
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCK'
$(if [ "${PGOC_PLATFORM:-}" = managed ]; then
  printf '%s\n' "shared_preload_libraries = 'pg_cron'" "cron.database_name = '${PGOC_CRON_DB:-app}'" \
    "cron.use_background_workers = on" "max_worker_processes = 16"
else
  printf '%s\n' "shared_preload_libraries = '$( [ "${PGOC_PRELOAD:-1}" = 1 ] && echo pg_orphan_cleanup )'" \
    "orphan_cleanup.database = '${PGOC_WORKER_DB:-postgres}'"
fi)
max_connections = 100
max_prepared_transactions = 10
log_line_prefix = '%m [%p] %q%u@%d '
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
    # PGOC_EXTRA_CONF: more lines for postgresql.conf (the bench's BENCH_AUTO_EXPLAIN uses it).
    [ -n "${PGOC_EXTRA_CONF:-}" ] && printf '%s\n' "$PGOC_EXTRA_CONF" >>"$DATA/postgresql.conf"
  fi
  if running; then
    echo "cluster already running on port $PORT ($DATA)"
  else
    if ! as_postgres "$PG_BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start >/dev/null; then
      echo "PostgreSQL did not start on port $PORT; the end of its log ($LOG):" >&2
      tail -n 20 "$LOG" >&2 || true
      exit 1
    fi
    echo "cluster started on port $PORT ($DATA, log $LOG)"
  fi
}

stop() {
  if [ -f "$DATA/PG_VERSION" ] && running; then
    as_postgres "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null
    echo "cluster on port $PORT stopped"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  crash)
    if [ -f "$DATA/PG_VERSION" ] && running; then
      as_postgres "$PG_BIN/pg_ctl" -D "$DATA" -m immediate -w -t 60 stop >/dev/null
      echo "cluster on port $PORT crashed (immediate stop)"
    fi
    start ;;
  destroy) stop; rm -rf "$DIR"; echo "cluster on port $PORT destroyed" ;;
  env) printf 'export PGHOST=127.0.0.1 PGPORT=%s PGUSER=postgres PGDATABASE=postgres\n' "$PORT" ;;
  *) echo "usage: $0 start|stop|restart|crash|destroy|env" >&2; exit 2 ;;
esac
