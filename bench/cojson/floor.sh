#!/usr/bin/env bash
# Server-CPU floor of moai's CoJSON fan-out I/O pattern: the bare relay `yjs-load cojson-floor`
# (same stack as moai: tokio + tungstenite, one task per socket, a central relay task) under
# floor.mjs (fanout.mjs's frames, sizes and schedule without cojson). RUNS runs per variant,
# variants interleaved, medians as markdown.
#
#   bench/cojson/floor.sh                          # 5 runs of the multi-thread relay
#   VARIANTS="multi current" bench/cojson/floor.sh # + the current_thread control, interleaved
#   RUNS=1 SUBSCRIBERS=20 bench/cojson/floor.sh
#
# Raw JSON and logs: bench/cojson/results/floor-<timestamp>/ (gitignored).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH="$(dirname "$HERE")"
RUNS="${RUNS:-5}"
VARIANTS="${VARIANTS:-multi}"   # multi: default tokio multi-thread runtime; current: current_thread
SUBSCRIBERS="${SUBSCRIBERS:-50}" PROCS="${PROCS:-2}" UPDATES="${UPDATES:-200}" RATE="${RATE:-20}"
OUT="$HERE/results/floor-$(date +%Y%m%d-%H%M%S)"
TMP="$(mktemp -d)"
mkdir -p "$OUT"
PID=""

log() { printf '[floor] %s\n' "$*" >&2; }
stop() {
  [ -n "$PID" ] || return 0
  kill -TERM "$PID" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  PID=""
}
trap 'stop; rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM

log "building yjs-load (bench/target)"
(cd "$BENCH/yjs-load" && CARGO_TARGET_DIR="$BENCH/target" cargo build --release --quiet)
cp "$BENCH/target/release/yjs-load" "$TMP/yjs-load" # a concurrent rebuild cannot swap it mid-run

free_port() { node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }

for run in $(seq "$RUNS"); do
  for v in $VARIANTS; do
    port="$(free_port)"
    flag=""; [ "$v" = current ] && flag="--current-thread"
    "$TMP/yjs-load" cojson-floor --port "$port" $flag 2>"$OUT/$v--$run.server.log" &
    PID=$!
    for _ in $(seq 100); do grep -q listening "$OUT/$v--$run.server.log" && break; sleep 0.05; done
    sleep 0.5
    log "run $run/$RUNS $v (pid $PID, port $port, load $(cut -d' ' -f1-3 /proc/loadavg))"
    timeout 120 node "$HERE/floor.mjs" run --url "ws://127.0.0.1:$port" --server-pid "$PID" --label "$v" \
      --subscribers "$SUBSCRIBERS" --procs "$PROCS" --updates "$UPDATES" --rate "$RATE" \
      >"$OUT/$v--$run.json" 2>"$OUT/$v--$run.log" || log "  failed (see $OUT/$v--$run.log)"
    tail -n 1 "$OUT/$v--$run.log" | sed 's/^/  /' >&2
    stop
  done
done
node "$HERE/floor.mjs" report --dir "$OUT" | tee "$OUT/summary.md"
log "results: $OUT"
