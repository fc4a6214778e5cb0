#!/usr/bin/env bash
# CoJSON fan-out benchmark: one writer, N subscribers to one CoMap, K updates; fan-out latency
# and server CPU per delivered message, moai side by side with the reference server built from
# the npm cojson packages (bench/peers/cojson-server.mjs), R runs each, medians as markdown.
# See docs/benchmarks-cojson.md.
#
#   bench/cojson/run.sh                          # 5 runs × {moai, reference}, ~5 min on 2 cores
#   RUNS=1 bench/cojson/run.sh                   # one quick pass
#   SUBSCRIBERS=20 UPDATES=100 RATE=10 bench/cojson/run.sh
#   SERVERS=moai RUNS=3 bench/cojson/run.sh
#   SERVERS="moai moai-pg" bench/cojson/run.sh   # moai on SQLite beside moai on PostgreSQL storage
#
# Every server is started fresh for every run (new port, new SQLite file in a temp dir), on
# 127.0.0.1 only; the order of the servers alternates between runs so machine noise spreads over
# both. Raw JSON per run and logs go to bench/cojson/results/<timestamp>/ (gitignored), the
# table also to summary.md there.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH="$(dirname "$HERE")"
ROOT="$(dirname "$BENCH")"
RUNS="${RUNS:-5}"
SERVERS="${SERVERS:-moai reference}"
SUBSCRIBERS="${SUBSCRIBERS:-50}"   # separate LocalNodes, one WebSocket each
PROCS="${PROCS:-2}"                # Node processes hosting them
UPDATES="${UPDATES:-200}"          # K
RATE="${RATE:-20}"                 # writes per second
CRYPTO="${CRYPTO:-napi}"           # clients' crypto: napi costs the clients ~35 % less CPU than wasm
                                   # (same bytes on the wire); the reference server uses wasm, as jazz-run
REF_CRYPTO="${REF_CRYPTO:-wasm}"
BASE_PORT="${BASE_PORT:-24700}"
RUN_TIMEOUT="${RUN_TIMEOUT:-300}"  # seconds, per fanout run

MOAI="$ROOT/target/release/moai"
RESULTS="$HERE/results/$(date +%Y%m%d-%H%M%S)"
TMP="$(mktemp -d)"
mkdir -p "$RESULTS"
SERVER_PID=""

log() { printf '[cojson-bench] %s\n' "$*" >&2; }

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}
# shellcheck source=bench/lib/pg.sh
source "$BENCH/lib/pg.sh"
cleanup() { stop_server; pg_cluster_stop; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Setup: this directory's npm packages (exact pins from package-lock.json: cojson,
# cojson-transport-ws, ws for the clients and, through reference-server.mjs, for the reference
# server, plus better-sqlite3, whose native binding `npm ci --ignore-scripts` leaves unbuilt);
# moai in release, copied aside so a concurrent rebuild cannot swap it mid-run.
deps_ok() {
  (cd "$HERE" && node -e '
    const v = JSON.parse(require("fs").readFileSync("node_modules/cojson/package.json", "utf8")).version
    if (v !== "0.20.19") throw new Error("cojson " + v)
    new (require("better-sqlite3"))(":memory:").close()' ) >/dev/null 2>&1
}
if ! deps_ok; then
  log "installing bench/cojson (npm ci --ignore-scripts, then npm rebuild better-sqlite3: ~2 min)"
  (cd "$HERE" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error \
      && npm rebuild better-sqlite3 --loglevel=error) >"$RESULTS/npm.log" 2>&1 \
    || { cat "$RESULTS/npm.log" >&2; exit 1; }
  deps_ok || { log "better-sqlite3 still unusable (see $RESULTS/npm.log)"; exit 1; }
fi
if [[ " $SERVERS " == *" moai-pg "* ]]; then
  log "starting a PostgreSQL cluster for moai-pg"
  pg_cluster_start
fi
if [[ " $SERVERS " == *" moai"* ]]; then
  log "building moai (cargo build --release)"
  (cd "$ROOT" && cargo build --release --quiet)
  cp "$ROOT/target/release/moai" "$TMP/moai"
  MOAI="$TMP/moai"
fi

{
  echo "# CoJSON fan-out benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "- load: $SUBSCRIBERS subscribers (separate LocalNodes, one WebSocket each, in $PROCS Node processes) to one private CoMap; one writer sets one key $UPDATES times at $RATE/s; clients' crypto $CRYPTO"
  echo "- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/Mem:/{print $2}') GiB; clients and server share them; load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
  [ -x "$MOAI" ] && echo "- moai: target/release/moai built $(date -u -r "$ROOT/target/release/moai" +%Y-%m-%dT%H:%M:%SZ), sha256 $(sha256sum "$MOAI" | cut -c1-16)"
  echo "- node $(node --version); $(cd "$HERE" && node -e 'const l=require("./package-lock.json").packages;console.log(["cojson","cojson-transport-ws","ws","better-sqlite3"].map(n=>n+"@"+l["node_modules/"+n].version).join(", "))'); reference server crypto $REF_CRYPTO"
  echo "- runs per server: $RUNS (medians of the per-run values below; raw JSON beside this file)"
  echo
} >"$RESULTS/summary.md"

# ---------------------------------------------------------------------------------------------
# start_server NAME PORT: sets SERVER_PID and URL, or returns 1.
start_server() {
  local name="$1" port="$2" dir="$TMP/$1-$2"
  mkdir -p "$dir"
  URL="ws://127.0.0.1:$port/sync"
  case "$name" in
    moai)
      env -u SYNC_SHARED_SECRET "$MOAI" serve --host 127.0.0.1 --port "$port" \
        --db-path "$dir/moai.db" --log-format json >"$dir/server.log" 2>&1 &
      SERVER_PID=$!
      "$MOAI" wait-ready "http://127.0.0.1:$port/health" --timeout 30s >/dev/null 2>&1 || return 1
      ;;
    moai-pg)
      # The same binary on PostgreSQL storage: a fresh database per start, in one cluster.
      env -u SYNC_SHARED_SECRET "$MOAI" serve --host 127.0.0.1 --port "$port" \
        --storage "$(pg_fresh_db cojson)" --log-format json >"$dir/server.log" 2>&1 &
      SERVER_PID=$!
      "$MOAI" wait-ready "http://127.0.0.1:$port/health" --timeout 30s >/dev/null 2>&1 || return 1
      ;;
    reference)
      node "$HERE/reference-server.mjs" --host 127.0.0.1 --port "$port" --db "$dir/storage.db" \
        --crypto "$REF_CRYPTO" >"$dir/server.out" 2>"$dir/server.log" &
      SERVER_PID=$!
      local i
      for i in $(seq 150); do
        grep -q '^listening ' "$dir/server.out" 2>/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || return 1
        sleep 0.1
      done
      return 1
      ;;
    *) log "unknown server $name"; return 1 ;;
  esac
}

port=$BASE_PORT
start_time=$SECONDS
failed=0
for run in $(seq "$RUNS"); do
  order="$SERVERS"
  # Alternate the order between runs (moai first in odd runs, last in even runs).
  if (( run % 2 == 0 )); then order="$(echo "$SERVERS" | tr ' ' '\n' | tac | tr '\n' ' ')"; fi
  for server in $order; do
    port=$((port + 1))
    out="$RESULTS/fanout--$server--$run"
    if ! start_server "$server" "$port"; then
      log "$server did not come up on $URL"
      cp "$TMP/$server-$port/server.log" "$out.server.log" 2>/dev/null || true
      stop_server
      failed=$((failed + 1))
      continue
    fi
    sleep 1 # let the server settle (reference: JIT warm-up starts with the first client anyway)
    log "run $run/$RUNS on $server (pid $SERVER_PID, $URL)"
    if ! timeout "$RUN_TIMEOUT" node "$HERE/fanout.mjs" run --url "$URL" --server-pid "$SERVER_PID" --label "$server" \
        --subscribers "$SUBSCRIBERS" --procs "$PROCS" --updates "$UPDATES" --rate "$RATE" --crypto "$CRYPTO" \
        >"$out.json" 2>"$out.log"; then
      log "  failed (see $out.log)"
      failed=$((failed + 1))
    fi
    tail -n 1 "$out.log" | sed 's/^/  /' >&2
    stop_server
    cp "$TMP/$server-$port/server.log" "$out.server.log" 2>/dev/null || true
  done
done
log "done in $((SECONDS - start_time)) s"

node "$HERE/fanout.mjs" report --dir "$RESULTS" >>"$RESULTS/summary.md"
cat "$RESULTS/summary.md"
log "results: $RESULTS"
exit $(( failed > 0 ? 1 : 0 ))
