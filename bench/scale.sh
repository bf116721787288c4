#!/usr/bin/env bash
# Scale figures: 10k-key / 100-provider snapshot apply time (in process and end to end),
# idle RSS, auth cost at 10k keys vs 1, memory per idle connection and per open stream.
# Results: stdout and bench/out/scale-latest.md.
#
#   bench/scale.sh
#   SCALE_KEYS=50000 SCALE_IDLE_CONNS=5000 bench/scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
    cargo build --release -q -p portcullis-dataplane -p portcullis-bench
fi
command -v wrk >/dev/null || { echo "wrk missing: run bench/run.sh first (it installs it)" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || true
exec timeout --signal=INT 600 python3 bench/scale.py
