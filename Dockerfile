# syntax=docker/dockerfile:1
#
# moai in a small image: built with the Rust toolchain, run on Debian slim as a non-root user.
# From the repository root (BuildKit, the default builder since Docker 23):
#
#   docker build -t moai .
#   docker run -p 4201:4201 -v moai-data:/data moai
#
# Configuration is by environment (every flag of `moai serve` has a variable; README.md).
# docs/deploy.md covers Docker, docker compose, fly.io and Caddy.

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Only what the build reads (.dockerignore keeps the rest out of the context).
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
# The cache mounts keep the crates.io downloads and the compiled dependencies between builds; the
# binary is copied out of the target cache in the same step. The release profile keeps line
# tables (debug = 1) for local profiling; the image drops them (24 MB instead of 136 MB), keeping
# the symbols, so a panic's backtrace still names its functions.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p moai \
 && objcopy --strip-debug target/release/moai /usr/local/bin/moai

FROM debian:bookworm-slim AS runtime
# ca-certificates: TLS to S3 (and any https endpoint) verifies against the system's roots. Not
# pinned: the newest root store of the release is the one wanted.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 moai \
 && useradd --uid 10001 --gid 10001 --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin moai \
 && mkdir /data \
 && chown 10001:10001 /data
COPY --from=build /usr/local/bin/moai /usr/local/bin/moai

# Inside a container moai must listen on every interface (its own default is 127.0.0.1).
# Storage defaults to SQLite on the /data volume; set MOAI_STORAGE=postgres://… for a database
# several instances share.
ENV HOST=0.0.0.0 \
    PORT=4201 \
    DB_PATH=/data/local-sync.db
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 4201

# moai drains on SIGTERM: /health turns 503, sessions close with 1001, storage is flushed, exit 0
# within --shutdown-grace (10 s). Give `docker stop` more than that: docker stop -t 20.
STOPSIGNAL SIGTERM

# `moai wait-ready` is the probe (no curl, no shell needed): exit 0 once /health says ready, 1 if
# it is not ready within 3 s (starting, storage failing, draining). It probes port 4201: with
# another PORT, override it (docker run --health-cmd, or healthcheck: in compose).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/moai", "wait-ready", "http://127.0.0.1:4201/health", "--timeout", "3s"]

ENTRYPOINT ["/usr/local/bin/moai"]
CMD ["serve"]
