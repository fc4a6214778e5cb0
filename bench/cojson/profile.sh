#!/usr/bin/env bash
# Where moai's CPU goes under the fan-out load of run.sh: starts moai (release binary, copied
# aside), runs one fanout.mjs pass against it and records `perf record -g` (DWARF call graphs)
# of the server during the measured window. Prints the top symbols (self time) and the top
# callers, grouped, and leaves perf.data + the run's JSON in the output directory.
#
#   bench/cojson/profile.sh                     # 50 subscribers, 200 updates at 20/s
#   PERF_SECONDS=6 SUBSCRIBERS=20 bench/cojson/profile.sh
#
# Needs `perf` and perf_event_paranoid <= 2 (profiling one's own process). perf adds overhead:
# use run.sh for the numbers, this for the shape.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$(dirname "$HERE")")"
SUBSCRIBERS="${SUBSCRIBERS:-50}" PROCS="${PROCS:-2}" UPDATES="${UPDATES:-200}" RATE="${RATE:-20}"
PERF_SECONDS="${PERF_SECONDS:-8}"
PORT="${PORT:-24690}"
OUT="$HERE/results/profile-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
command -v perf >/dev/null || { echo "perf not found" >&2; exit 1; }
(cd "$HERE" && node -e 'require("cojson-transport-ws/package.json")' 2>/dev/null) || (cd "$HERE" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)

(cd "$ROOT" && cargo build --release --quiet)
cp "$ROOT/target/release/moai" "$OUT/moai"
"$OUT/moai" serve --host 127.0.0.1 --port "$PORT" --db-path "$OUT/moai.db" --log-format json >"$OUT/server.log" 2>&1 &
PID=$!
LOAD_PID=""
trap 'kill $PID 2>/dev/null || true; [ -n "$LOAD_PID" ] && kill $LOAD_PID 2>/dev/null || true' EXIT
"$OUT/moai" wait-ready "http://127.0.0.1:$PORT/health" --timeout 30s >/dev/null

timeout 300 node "$HERE/fanout.mjs" run --url "ws://127.0.0.1:$PORT/sync" --server-pid "$PID" --label moai \
  --subscribers "$SUBSCRIBERS" --procs "$PROCS" --updates "$UPDATES" --rate "$RATE" >"$OUT/run.json" 2>"$OUT/run.log" &
LOAD_PID=$!
# The measured window starts ~1 s after the warm-up line (5 warm-up writes 100 ms apart + 0.5 s).
for _ in $(seq 600); do grep -q 'warm-up' "$OUT/run.log" 2>/dev/null && break; sleep 0.2; done
sleep 1.5
perf record -F 999 -g --call-graph dwarf,16384 -p "$PID" -o "$OUT/perf.data" -- sleep "$PERF_SECONDS" 2>"$OUT/perf-record.log" >/dev/null
wait "$LOAD_PID" || true
LOAD_PID=""
tail -n 1 "$OUT/run.log"

echo "## self time, top symbols"
perf report -i "$OUT/perf.data" --no-children --sort dso,sym --stdio -g none 2>/dev/null | grep '%' | head -30
echo
echo "## inclusive time (children), moai and library frames"
perf report -i "$OUT/perf.data" --children --sort sym --stdio -g none 2>/dev/null | grep '%' \
  | grep -E 'moai_|tungstenite|serde_json|rusqlite|sqlite3|ed25519|blake3|bs58|tokio::runtime::io|sys_' | head -40
echo
echo "perf data and the run: $OUT"
