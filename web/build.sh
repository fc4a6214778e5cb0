#!/usr/bin/env bash
# Rebuilds crates/moai-server/assets/demo.js (the /demo page's script, embedded in the binary)
# from src/demo.js and the exact packages of package-lock.json. The output is byte-identical on
# every machine: pinned versions, `npm ci`, esbuild's deterministic output, no timestamps.
#
#   web/build.sh           rebuild the committed bundle
#   web/build.sh --check   rebuild into a temporary file and fail if it differs from the committed one
set -euo pipefail
cd "$(dirname "$0")"

out=../crates/moai-server/assets/demo.js
if [ "${1:-}" = "--check" ]; then
  target=$(mktemp)
  trap 'rm -f "$target"' EXIT
else
  target=$out
fi

# Install exactly the lock's packages (quietly; no audit or funding requests).
if ! [ -d node_modules ] || ! npm ls --silent >/dev/null 2>&1; then
  npm ci --no-audit --no-fund --loglevel=error
fi

./node_modules/.bin/esbuild src/demo.js \
  --bundle --minify --format=iife --target=es2020 --charset=utf8 --legal-comments=eof \
  --log-level=warning --outfile="$target"

if [ "${1:-}" = "--check" ]; then
  if ! cmp -s "$target" "$out"; then
    echo "crates/moai-server/assets/demo.js is not what web/build.sh builds from web/: run web/build.sh and commit it" >&2
    exit 1
  fi
  echo "demo.js matches its source"
else
  echo "wrote $out ($(wc -c <"$out") bytes)"
fi
