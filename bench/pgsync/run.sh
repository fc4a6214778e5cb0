#!/usr/bin/env bash
# Benchmark of moai's Postgres change feed (/api/sync) on this machine.
#
#   bench/pgsync/run.sh            # from the repository root; RUNS=5 by default
#   RUNS=3 ROWS=100000 bench/pgsync/run.sh
#
# What it does (see docs/benchmarks-pgsync.md for the results and what is compared):
#   1. builds moai (release) and the load tool bench/pgsync (release), both into bench/target;
#   2. starts a throwaway PostgreSQL cluster (initdb, wal_level=logical, fsync on) on a free
#      port under /tmp; as root, PostgreSQL runs as the `postgres` user;
#   3. starts the release moai with --pg-url/--pg-tables public.items;
#   4. runs each scenario RUNS times and prints the medians:
#      (a) latency: one client, single-row INSERT transactions at RATE/s for SECONDS s;
#      (b) catch-up: one client resumes after ROWS rows (transactions of TXN_ROWS) were written
#          while it was away;
#      (c) reference: pg_recvlogical decoding the same WAL as (b) through pgoutput.
# Raw JSON lines go to $OUT/results.jsonl.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
RUNS="${RUNS:-5}"
RATE="${RATE:-200}"
SECONDS_PER_RUN="${SECONDS_PER_RUN:-10}"
ROWS="${ROWS:-100000}"
TXN_ROWS="${TXN_ROWS:-100}"
FSYNC="${FSYNC:-on}"
export CARGO_TARGET_DIR="$ROOT/bench/target"

PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}"
OUT="$(mktemp -d /tmp/moai-pgsync-bench.XXXXXX)"
chmod 755 "$OUT"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
MOAI_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
PGDATA="$OUT/data"

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

MOAI_PID=""
cleanup() {
  [ -n "$MOAI_PID" ] && kill "$MOAI_PID" 2>/dev/null && wait "$MOAI_PID" 2>/dev/null || true
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$PGDATA" "$OUT/moai.db"*   # keep only logs and results
}
trap cleanup EXIT

echo "== build (release) into $CARGO_TARGET_DIR"
(cd "$ROOT" && cargo build --release -p moai --quiet)
(cd "$ROOT/bench/pgsync" && cargo build --release --quiet)
MOAI="$CARGO_TARGET_DIR/release/moai"
TOOL="$CARGO_TARGET_DIR/release/pgsync-bench"

echo "== postgres ($PG_BIN, port $PORT, fsync=$FSYNC) in $OUT"
[ "$(id -u)" = 0 ] && chown postgres "$OUT"
as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --no-locale >/dev/null
cat >> "$PGDATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$OUT'
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
fsync = $FSYNC
synchronous_commit = on
shared_buffers = 256MB
max_wal_size = 4GB
log_min_messages = warning
EOF
as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$OUT/postgres.log" -w start >/dev/null
PG_URL="postgres://postgres@127.0.0.1:$PORT/postgres"
"$PG_BIN/psql" -q "$PG_URL" -c "CREATE TABLE public.items (id bigint PRIMARY KEY, val int NOT NULL, note text)"

echo "== moai (release) on port $MOAI_PORT"
"$MOAI" serve --port "$MOAI_PORT" --db-path "$OUT/moai.db" --log-format json \
  --pg-url "$PG_URL" --pg-tables public.items >"$OUT/moai.log" 2>&1 &
MOAI_PID=$!
"$MOAI" wait-ready "http://127.0.0.1:$MOAI_PORT" --timeout 60s
WS="ws://127.0.0.1:$MOAI_PORT/api/sync"

RESULTS="$OUT/results.jsonl"
for i in $(seq 1 "$RUNS"); do
  echo "== run $i/$RUNS: latency ($RATE tx/s for ${SECONDS_PER_RUN}s)"
  "$TOOL" latency --ws "$WS" --pg "$PG_URL" --rate "$RATE" --seconds "$SECONDS_PER_RUN" \
    --id-base $((1000000000 + i * 10000000)) | tee -a "$RESULTS"
  echo "== run $i/$RUNS: catch-up ($ROWS rows, $TXN_ROWS per transaction) + pg_recvlogical"
  "$TOOL" catchup --ws "$WS" --pg "$PG_URL" --rows "$ROWS" --txn-rows "$TXN_ROWS" \
    --id-base $((2000000000 + i * 10000000)) \
    --recvlogical "$PG_BIN/pg_recvlogical" --conninfo "host=127.0.0.1 port=$PORT user=postgres dbname=postgres" \
    | tee -a "$RESULTS"
done

echo "== medians over $RUNS runs"
python3 - "$RESULTS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
lat = [r for r in rows if r["scenario"] == "latency"]
cat = [r for r in rows if r["scenario"] == "catchup"]
med = lambda xs: statistics.median(xs)
print("| metric | median | runs (min..max) |")
print("|---|---|---|")
for k in ["done_p50_ms", "done_p99_ms", "done_max_ms", "sent_p50_ms", "sent_p99_ms"]:
    xs = [r[k] for r in lat]
    print(f"| latency {k} | {med(xs):.2f} | {min(xs):.2f}..{max(xs):.2f} |")
for k, f in [("catchup_rows_per_s", lambda r: r["catchup_rows_per_s"]),
             ("catchup_secs", lambda r: r["catchup_secs"]),
             ("ingest_secs (write + replicate into history)", lambda r: r["ingest_secs"]),
             ("pg_recvlogical_rows_per_s", lambda r: r["pg_recvlogical_pgoutput"]["rows_per_s"]),
             ("pg_recvlogical_secs", lambda r: r["pg_recvlogical_pgoutput"]["secs"])]:
    xs = [f(r) for r in cat]
    print(f"| {k} | {med(xs):,.2f} | {min(xs):,.2f}..{max(xs):,.2f} |")
EOF
echo "raw results: $RESULTS"
