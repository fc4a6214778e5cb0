# A throwaway PostgreSQL cluster for benchmarks, sourced by the bench scripts.
#
#   source bench/lib/pg.sh
#   pg_cluster_start [extra postgresql.conf lines…]   # sets PG_BIN, PG_PORT, PG_DIR, PG_URL
#   url="$(pg_fresh_db name)"                          # a new, empty database; prints its URL
#   pg_cluster_stop                                    # also run it from your EXIT trap
#
# The cluster lives in a temp dir under /tmp, listens on 127.0.0.1 on a free port, trusts local
# connections, keeps fsync and synchronous_commit on (the figures include real durability), and
# runs as the `postgres` user when the script runs as root (PostgreSQL refuses root).
# Binaries: $PG_BIN, else the newest /usr/lib/postgresql/*/bin (Debian's `postgresql` package).

PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
PG_DIR=""
PG_PORT=""
PG_URL=""

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_cluster_start() {
  [ -x "$PG_BIN/initdb" ] || { echo "PostgreSQL not found (apt-get install postgresql, or set PG_BIN)" >&2; return 1; }
  PG_DIR="$(mktemp -d /tmp/moai-bench-pg.XXXXXX)"
  chmod 755 "$PG_DIR"
  [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR"
  PG_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --no-locale >/dev/null
  {
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $PG_PORT"
    echo "unix_socket_directories = '$PG_DIR'"
    echo "fsync = on"
    echo "synchronous_commit = on"
    echo "shared_buffers = 256MB"
    echo "max_wal_size = 4GB"
    echo "max_connections = 300"
    echo "log_min_messages = warning"
    local line
    for line in "$@"; do echo "$line"; done
  } >>"$PG_DIR/data/postgresql.conf"
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w start >/dev/null
  PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
}

pg_fresh_db() {
  local name="bench_$1_$RANDOM$RANDOM"
  "$PG_BIN/psql" -q "$PG_URL" -c "CREATE DATABASE $name" >/dev/null
  echo "postgres://postgres@127.0.0.1:$PG_PORT/$name"
}

pg_cluster_stop() {
  [ -n "$PG_DIR" ] || return 0
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
  PG_DIR=""
}
