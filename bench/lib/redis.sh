# A throwaway Redis server for benchmarks (Debian's `redis-server`), sourced by the bench scripts.
#
#   source bench/lib/redis.sh
#   redis_start                   # sets REDIS_BENCH_PORT, REDIS_BENCH_URL
#   url="$(redis_fresh)"          # empties it (FLUSHALL); prints its redis:// URL
#   redis_stop                    # also run it from your EXIT trap
#
# It listens on 127.0.0.1 on a free port, persists nothing (`--save "" --appendonly no`: a
# cluster bus keeps nothing that is not already in moai's storage) and keeps its log and working
# directory in a temp dir under /tmp. The URL is deliberately not in REDIS_URL, which moai reads:
# only the servers given it explicitly join a cluster.

REDIS_BENCH_PID=""
REDIS_BENCH_DIR=""
REDIS_BENCH_PORT=""
REDIS_BENCH_URL=""

redis_start() {
  command -v redis-server >/dev/null || { echo "redis-server not found (apt-get install redis-server)" >&2; return 1; }
  REDIS_BENCH_DIR="$(mktemp -d /tmp/moai-bench-redis.XXXXXX)"
  REDIS_BENCH_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  redis-server --port "$REDIS_BENCH_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$REDIS_BENCH_DIR" --logfile "$REDIS_BENCH_DIR/redis.log" --daemonize no &
  REDIS_BENCH_PID=$!
  REDIS_BENCH_URL="redis://127.0.0.1:$REDIS_BENCH_PORT"
  local i
  for i in $(seq 100); do
    [ "$(redis-cli -p "$REDIS_BENCH_PORT" ping 2>/dev/null)" = PONG ] && return 0
    kill -0 "$REDIS_BENCH_PID" 2>/dev/null || { echo "redis-server did not start (see $REDIS_BENCH_DIR/redis.log)" >&2; return 1; }
    sleep 0.1
  done
  echo "redis-server did not answer" >&2
  return 1
}

redis_fresh() {
  redis-cli -p "$REDIS_BENCH_PORT" flushall >/dev/null
  echo "$REDIS_BENCH_URL"
}

redis_stop() {
  [ -n "$REDIS_BENCH_PID" ] || return 0
  kill -TERM "$REDIS_BENCH_PID" 2>/dev/null || true
  wait "$REDIS_BENCH_PID" 2>/dev/null || true
  rm -rf "$REDIS_BENCH_DIR"
  REDIS_BENCH_PID=""
}
