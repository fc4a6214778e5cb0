# A throwaway S3-compatible server for benchmarks (moto, `pip install 'moto[server]'`, which
# scripts/test installs), sourced by the bench scripts.
#
#   source bench/lib/s3.sh
#   s3_start                     # sets S3_ENDPOINT and the AWS_* variables moai reads
#   url="$(s3_fresh_bucket name)" # a new, empty bucket; prints its s3:// URL
#   s3_stop                      # also run it from your EXIT trap
#
# moto keeps objects in memory and is a Python server: it stands in for S3 on one machine, so
# figures with it show moai's own cost of object storage (compaction off the live path), not
# S3's latency.

S3_PID=""
S3_ENDPOINT=""

s3_start() {
  local port
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  python3 -m moto.server -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
  S3_PID=$!
  S3_ENDPOINT="http://127.0.0.1:$port"
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
  local i
  for i in $(seq 100); do
    curl -fsS "$S3_ENDPOINT/" >/dev/null 2>&1 && return 0
    kill -0 "$S3_PID" 2>/dev/null || { echo "moto did not start (pip install 'moto[server]')" >&2; return 1; }
    sleep 0.1
  done
  echo "moto did not answer" >&2
  return 1
}

s3_fresh_bucket() {
  local name="bench-$1-$RANDOM$RANDOM"
  curl -fsS -X PUT "$S3_ENDPOINT/$name" >/dev/null
  echo "s3://$name/docs"
}

s3_stop() {
  [ -n "$S3_PID" ] || return 0
  kill "$S3_PID" 2>/dev/null || true
  wait "$S3_PID" 2>/dev/null || true
  S3_PID=""
}
