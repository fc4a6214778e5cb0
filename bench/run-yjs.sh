#!/usr/bin/env bash
# Yjs benchmark: the same load against moai, @y/websocket-server, @hocuspocus/server and the bare
# broadcast relay, each scenario RUNS times, medians printed as markdown (bench/README.md).
#
#   bench/run-yjs.sh                       # everything, 5 runs (~12-15 min on 2 cores)
#   RUNS=1 bench/run-yjs.sh                # one quick pass
#   SERVERS="relay hocuspocus" SCENARIOS="fanout-max" bench/run-yjs.sh
#   SERVERS="moai moai-pg" bench/run-yjs.sh   # moai on SQLite beside moai on PostgreSQL storage
#   SERVERS="moai moai-hocuspocus hocuspocus" …  # moai's /hocuspocus (Hocuspocus clients) beside
#                                            # its y-websocket endpoint and @hocuspocus/server
#   SERVERS="moai moai-pg moai-pg-s3" …        # … and on PostgreSQL + snapshots in S3 (moto)
#   SERVERS="moai-pg moai-cluster" SCENARIOS="fanout-paced fanout-max" …
#                                            # one instance beside three sharing PostgreSQL and
#                                            # Redis: writers on instance A, readers on B and C
#   SERVERS="moai-cluster-mixed" SCENARIOS="fanout-paced" …
#                                            # readers on A, B and C: same-instance and
#                                            # cross-instance latency of one run, side by side
#
# Every server is started fresh for every scenario run (clean RSS, CPU and state), on
# 127.0.0.1 only, and the servers are interleaved within each run so machine noise spreads over
# all of them. Raw JSON and logs go to bench/results/<timestamp>/, the table also to summary.md.
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$BENCH")"
RUNS="${RUNS:-5}"
SERVERS="${SERVERS:-moai y-websocket-server hocuspocus relay}"
SCENARIOS="${SCENARIOS:-fanout-paced fanout-max big-doc idle}"
# Load shape (defaults sized for 2 cores shared by server and loadgen).
DOCS="${DOCS:-20}" CLIENTS="${CLIENTS:-10}" WRITERS="${WRITERS:-2}"
UPDATES="${UPDATES:-200}" RATE="${RATE:-25}"          # fanout-paced: 1000 updates/s offered
MAX_UPDATES="${MAX_UPDATES:-500}"                     # fanout-max: unpaced, 20 000 updates
BIG_MB="${BIG_MB:-10}" EDITS="${EDITS:-300}" EDIT_INTERVAL_MS="${EDIT_INTERVAL_MS:-30}"  # 9 s of edits: longer than a 5 s snapshot debounce
IDLE_CONNS="${IDLE_CONNS:-2000}" IDLE_DOCS="${IDLE_DOCS:-100}"
BASE_PORT="${BASE_PORT:-24100}"
SETTLE_MS="${SETTLE_MS:-0}"   # fanout: pause between the last connect and the first write

export CARGO_TARGET_DIR="$BENCH/target"
LOAD="$BENCH/target/release/yjs-load"
MOAI="$ROOT/target/release/moai"
RESULTS="$BENCH/results/$(date +%Y%m%d-%H%M%S)"
TMP="$(mktemp -d)"
mkdir -p "$RESULTS"
SERVER_PID=""
EXTRA_PIDS=()      # further processes of the server under test (moai-cluster's instances B, C)
READER_URLS=()     # where fanout's readers connect when not to $URL (moai-cluster: B, C)

log() { printf '[run-yjs] %s\n' "$*" >&2; }

stop_server() {
  # SIGTERM every process of the server at once, then wait for each (KILL after 5 s).
  local pids=() pid
  [ -n "$SERVER_PID" ] && pids+=("$SERVER_PID")
  pids+=("${EXTRA_PIDS[@]}")
  [ "${#pids[@]}" -gt 0 ] || return 0
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  SERVER_PID=""
  EXTRA_PIDS=()
  READER_URLS=()
}
# shellcheck source=bench/lib/pg.sh
source "$BENCH/lib/pg.sh"
# shellcheck source=bench/lib/s3.sh
source "$BENCH/lib/s3.sh"
# shellcheck source=bench/lib/redis.sh
source "$BENCH/lib/redis.sh"
cleanup() { stop_server; pg_cluster_stop; s3_stop; redis_stop; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Setup: peers from npm (exact versions from package-lock.json), loadgen and moai in release.
log "installing peers (npm ci)"
(cd "$BENCH/peers" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >"$RESULTS/npm-ci.log" 2>&1) \
  || { cat "$RESULTS/npm-ci.log" >&2; exit 1; }
log "building yjs-load"
cargo build --release --quiet --manifest-path "$BENCH/yjs-load/Cargo.toml"
if [[ " $SERVERS " == *" moai-pg"* || " $SERVERS " == *" moai-cluster"* ]]; then
  log "starting a PostgreSQL cluster for moai-pg / moai-cluster"
  pg_cluster_start
fi
if [[ " $SERVERS " == *" moai-cluster"* ]]; then
  log "starting a Redis server for moai-cluster"
  redis_start
fi
if [[ " $SERVERS " == *" moai-pg-s3 "* ]]; then
  log "starting an S3-compatible server (moto) for moai-pg-s3"
  s3_start
fi
if [[ " $SERVERS " == *" moai"* ]]; then
  log "building moai"
  if ! (cd "$ROOT" && env -u CARGO_TARGET_DIR cargo build --release --quiet -p moai); then
    log "moai does not build; skipping it"
    SERVERS="${SERVERS//moai-cluster-mixed/}"
    SERVERS="${SERVERS//moai-cluster/}"
    SERVERS="${SERVERS//moai-pg-s3/}"
    SERVERS="${SERVERS//moai-pg/}"
    SERVERS="${SERVERS//moai-hocuspocus/}"
    SERVERS="${SERVERS//moai/}"
  fi
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # thousands of sockets in `idle`

{
  echo "# Yjs benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "- machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; loadgen and server share them"
  echo "- node $(node --version); peers: $(cd "$BENCH/peers" && node -e 'const l=require("./package-lock.json").packages;console.log(["@y/websocket-server","@hocuspocus/server","yjs"].map(n=>n+"@"+l["node_modules/"+n].version).join(", "))')"
  echo "- runs per cell: $RUNS (medians below; raw JSON beside this file)"
} >"$RESULTS/summary.md"

# ---------------------------------------------------------------------------------------------
# Servers. start_server NAME PORT sets SERVER_PID, URL and PROTO (and for a cluster EXTRA_PIDS and
# READER_URLS), or returns 1. PORT, PORT+1 and PORT+2 are its to use.
start_server() {
  local name="$1" port="$2" dir="$TMP/$1-$2"
  mkdir -p "$dir"
  # moai reads REDIS_URL: only moai-cluster's instances get one.
  local moai_env=(env -u SYNC_SHARED_SECRET -u REDIS_URL)
  PROTO=y-websocket
  URL="ws://127.0.0.1:$port/sync/v1"
  case "$name" in
    moai)
      "${moai_env[@]}" "$MOAI" serve --host 127.0.0.1 --port "$port" \
        --db-path "$dir/db.sqlite" --log-format json >"$dir/server.log" 2>&1 &
      SERVER_PID=$!
      "$MOAI" wait-ready "http://127.0.0.1:$port/health" --timeout 30s >/dev/null 2>&1 || return 1
      ;;
    moai-pg)
      # The same binary on PostgreSQL storage: a fresh database per start, in one cluster.
      "${moai_env[@]}" "$MOAI" serve --host 127.0.0.1 --port "$port" \
        --storage "$(pg_fresh_db yjs)" --log-format json >"$dir/server.log" 2>&1 &
      SERVER_PID=$!
      "$MOAI" wait-ready "http://127.0.0.1:$port/health" --timeout 30s >/dev/null 2>&1 || return 1
      ;;
    moai-pg-s3)
      # PostgreSQL storage with Yjs snapshots in S3 (moto): a fresh database and bucket per start.
      "${moai_env[@]}" "$MOAI" serve --host 127.0.0.1 --port "$port" \
        --storage "$(pg_fresh_db yjs)" --s3-url "$(s3_fresh_bucket yjs)" --s3-endpoint "$S3_ENDPOINT" \
        --log-format json >"$dir/server.log" 2>&1 &
      SERVER_PID=$!
      "$MOAI" wait-ready "http://127.0.0.1:$port/health" --timeout 30s >/dev/null 2>&1 || return 1
      ;;
    moai-cluster|moai-cluster-mixed)
      # Three instances (A on PORT, B on PORT+1, C on PORT+2) sharing one fresh PostgreSQL
      # database and one emptied Redis: writers connect to A, fanout's readers to B and C
      # (moai-cluster-mixed: to A, B and C, so one run measures same-instance and cross-instance
      # deliveries under the same machine load).
      local storage redis p i=0 logs=(server server-b server-c)
      storage="$(pg_fresh_db yjs)"
      redis="$(redis_fresh)"
      [ "$name" = moai-cluster-mixed ] && READER_URLS+=("ws://127.0.0.1:$port/sync/v1")
      for p in "$port" $((port + 1)) $((port + 2)); do
        "${moai_env[@]}" "$MOAI" serve --host 127.0.0.1 --port "$p" \
          --storage "$storage" --redis-url "$redis" --log-format json >"$dir/${logs[$i]}.log" 2>&1 &
        if [ "$i" = 0 ]; then SERVER_PID=$!; else EXTRA_PIDS+=($!); READER_URLS+=("ws://127.0.0.1:$p/sync/v1"); fi
        i=$((i + 1))
      done
      for p in "$port" $((port + 1)) $((port + 2)); do
        "$MOAI" wait-ready "http://127.0.0.1:$p/health" --timeout 30s >/dev/null 2>&1 || return 1
      done
      local u
      for u in "${READER_URLS[@]}"; do
        "$LOAD" probe --url "$u" --protocol "$PROTO" --wait-s 15 2>>"$dir/server.log" || return 1
      done
      ;;
    moai-hocuspocus)
      # The same moai, loaded by Hocuspocus clients at /hocuspocus (docs/protocols/hocuspocus.md).
      PROTO=hocuspocus
      URL="ws://127.0.0.1:$port/hocuspocus"
      "${moai_env[@]}" "$MOAI" serve --host 127.0.0.1 --port "$port" \
        --db-path "$dir/db.sqlite" --log-format json >"$dir/server.log" 2>&1 &
      SERVER_PID=$!
      "$MOAI" wait-ready "http://127.0.0.1:$port/health" --timeout 30s >/dev/null 2>&1 || return 1
      ;;
    y-websocket-server)
      node "$BENCH/peers/ywss.mjs" --port "$port" >"$dir/server.log" 2>&1 &
      SERVER_PID=$!
      ;;
    hocuspocus)
      PROTO=hocuspocus
      URL="ws://127.0.0.1:$port"
      node "$BENCH/peers/hocuspocus.mjs" --port "$port" >"$dir/server.log" 2>&1 &
      SERVER_PID=$!
      ;;
    relay)
      "$LOAD" relay --port "$port" >"$dir/server.log" 2>&1 &
      SERVER_PID=$!
      ;;
    *) log "unknown server $name"; return 1 ;;
  esac
  # Ready means: a client can open a document and receive SyncStep2.
  "$LOAD" probe --url "$URL" --protocol "$PROTO" --wait-s 15 2>>"$dir/server.log"
}

# copy_logs DIR OUT: DIR/server.log → OUT.server.log (and a cluster's server-b.log, server-c.log).
copy_logs() {
  local f
  for f in "$1"/server*.log; do
    [ -e "$f" ] && cp "$f" "$2.$(basename "$f")"
  done
  return 0
}

scenario_args() {
  local scenario="$1" server="$2"
  case "$scenario" in
    fanout-paced) echo "fanout --docs $DOCS --clients $CLIENTS --writers $WRITERS --updates $UPDATES --rate $RATE --settle-ms $SETTLE_MS" ;;
    fanout-max) echo "fanout --docs $DOCS --clients $CLIENTS --writers $WRITERS --updates $MAX_UPDATES --rate 0 --settle-ms $SETTLE_MS" ;;
    big-doc)
      local extra=""
      # The relay keeps no state: a late joiner would get nothing.
      [ "$server" = relay ] && extra="--skip-joiner"
      echo "big-doc --size-mb $BIG_MB --edits $EDITS --interval-ms $EDIT_INTERVAL_MS --cache $BENCH/target/bigdoc-${BIG_MB}mib.bin $extra"
      ;;
    idle) echo "idle --connections $IDLE_CONNS --docs $IDLE_DOCS" ;;
    *) log "unknown scenario $scenario"; return 1 ;;
  esac
}

# ---------------------------------------------------------------------------------------------
declare -A UNAVAILABLE=()
port=$BASE_PORT
start_time=$SECONDS
for run in $(seq "$RUNS"); do
  for scenario in $SCENARIOS; do
    for server in $SERVERS; do
      [ -n "${UNAVAILABLE[$server]:-}" ] && continue
      port=$((port + 3))   # moai-cluster uses three
      out="$RESULTS/$scenario--$server--$run"
      if ! start_server "$server" "$port"; then
        log "$server did not come up on $URL (see $out.server.log); skipping it from now on"
        stop_server
        copy_logs "$TMP/$server-$port" "$out"
        UNAVAILABLE[$server]=1
        continue
      fi
      log "run $run/$RUNS $scenario on $server (pid $SERVER_PID${EXTRA_PIDS[*]:+ ${EXTRA_PIDS[*]}})"
      # A cluster's readers go to its other instances (fanout only; other scenarios load A alone).
      cluster_args=()
      if [ "${#READER_URLS[@]}" -gt 0 ] && [[ "$scenario" == fanout-* ]]; then
        for u in "${READER_URLS[@]}"; do cluster_args+=(--reader-url "$u"); done
        for p in "${EXTRA_PIDS[@]}"; do cluster_args+=(--extra-server-pid "$p"); done
      fi
      # shellcheck disable=SC2046
      if ! timeout 300 "$LOAD" --case "$scenario" $(scenario_args "$scenario" "$server") \
          --url "$URL" --protocol "$PROTO" --label "$server" --server-pid "$SERVER_PID" "${cluster_args[@]}" \
          >"$out.json" 2>"$out.log"; then
        log "  failed (see $out.log)"
        : # the empty or partial .json is listed as an anomaly by the report
      fi
      stop_server
      copy_logs "$TMP/$server-$port" "$out"
    done
  done
done
log "done in $((SECONDS - start_time)) s"

for server in "${!UNAVAILABLE[@]}"; do
  echo "- **$server was not available** (no SyncStep2 on its Yjs endpoint); see its *.server.log" >>"$RESULTS/summary.md"
done
"$LOAD" report --dir "$RESULTS" >>"$RESULTS/summary.md"
cat "$RESULTS/summary.md"
log "results: $RESULTS"
