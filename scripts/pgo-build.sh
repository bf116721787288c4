#!/usr/bin/env bash
# A profile-guided release build of the data plane:
#
#   1. builds it instrumented (`-Cprofile-generate`),
#   2. runs it under the benchmark's loads (bench/run.sh: a chat completion, a stream with usage
#      asked for, the OpenAI SDK's default stream; one and 32 connections; in-memory and Redis
#      limits; the client leg over plain HTTP/1.1, over TLS 1.3 and over HTTP/2), which writes how often each
#      branch and call ran,
#   3. merges those counts with `llvm-profdata`,
#   4. builds it again with `-Cprofile-use`: hot paths laid out and inlined as they ran.
#
#   scripts/pgo-build.sh          # ~25 min on two cores; the binary: target/pgo/bin/portcullis-dataplane
#
# The merged profile goes to pgo/portcullis-dataplane.profdata, and the commit, rustc and data
# plane dependencies it was trained with to pgo/trained-at: commit both to ship it (the
# Dockerfile builds with them, through scripts/release-dataplane.sh).
#
# target/pgo/bin also holds links to the release bench tools, so the build can be benchmarked
# against the plain release build side by side:
#
#   BENCH_SKIP_BUILD=1 BENCH_BIN_DIR=target/pgo/bin \
#   BENCH_BASELINE_BIN=target/release/portcullis-dataplane \
#   BENCH_TARGETS=nginx,portcullis,portcullis-baseline BENCH_CONNS=32 BENCH_ROUNDS=3 bench/run.sh
#
# Knobs: LLVM_PROFDATA (an llvm-profdata whose LLVM is at least 19; found or installed if not
# given), PGO_SECONDS (5: seconds per training scenario).
#
# What a profile matches, and what the shipped build refuses: scripts/release-dataplane.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK="$ROOT/target/pgo"
RAW="$WORK/raw"
PROFILE="$WORK/portcullis-dataplane.profdata"
# Where the shipped build finds it (scripts/release-dataplane.sh), with what it was trained with.
SHIPPED_PROFILE="$ROOT/pgo/portcullis-dataplane.profdata"
TRAINED="$ROOT/pgo/trained-at"

say() { printf 'pgo-build: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# llvm-profdata reads the raw profiles of its own LLVM and older ones; 19 (Debian 12's newest)
# reads this toolchain's (rustc 1.95, LLVM 22). An older one stops at the merge, saying so.
find_profdata() {
    if [ -n "${LLVM_PROFDATA:-}" ]; then
        printf '%s\n' "$LLVM_PROFDATA"
        return
    fi
    local sysroot candidate version
    sysroot=$(rustc --print sysroot)
    for candidate in "$sysroot"/lib/rustlib/*/bin/llvm-profdata; do
        if [ -x "$candidate" ]; then
            printf '%s\n' "$candidate"
            return
        fi
    done
    for version in 22 21 20 19; do
        for candidate in "llvm-profdata-$version" "/usr/lib/llvm-$version/bin/llvm-profdata"; do
            if command -v "$candidate" >/dev/null; then
                command -v "$candidate"
                return
            fi
        done
    done
    say "installing llvm-19 from Debian (llvm-profdata)"
    # Called in `$(…)`, where `set -e` does not reach: each step returns its failure itself.
    $SUDO apt-get update -qq >&2 || return 1
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq llvm-19 >/dev/null || return 1
    printf '%s\n' /usr/lib/llvm-19/bin/llvm-profdata
}

# A directory the bench scripts take as BENCH_BIN_DIR: the release bench tools, linked.
link_bench_tools() {
    local tool
    for tool in bench-upstream bench-conns bench-compile; do
        ln -sfn "$ROOT/target/release/$tool" "$1/$tool"
    done
}

PROFDATA=$(find_profdata) || {
    say "no llvm-profdata found, and llvm-19 could not be installed; set LLVM_PROFDATA"
    exit 1
}
if ! "$PROFDATA" --version >/dev/null 2>&1; then
    say "$PROFDATA does not run; set LLVM_PROFDATA"
    exit 1
fi
say "llvm-profdata: $PROFDATA ($("$PROFDATA" --version | grep -o 'version [0-9.]*' | head -1))"

# The same flags for every crate, so dependencies are built once per step; the instrumented build
# has a target directory of its own, so target/release (the plain build) is left as it is.
# `--target` keeps the flags off build scripts and proc macros: instrumented, they would write
# profiles of the build.
BASE_FLAGS="${RUSTFLAGS:-}"
HOST=$(rustc -vV | sed -n 's/^host: //p')

say "1/4 the plain release build (the bench tools, and a baseline), then the instrumented data plane"
# As bench/run.sh builds them: one invocation, one feature set for the dependencies they share.
cargo build --release -q -p portcullis-dataplane -p portcullis-bench
rm -rf "$RAW"
mkdir -p "$RAW" "$WORK/bin"
RUSTFLAGS="$BASE_FLAGS -Cprofile-generate=$RAW" \
    cargo build --release -q -p portcullis-dataplane --target "$HOST" --target-dir "$WORK/generate"

say "2/4 training under the benchmark's loads"
TRAIN_BIN="$WORK/train-bin"
# portcullis-tls: the same gateway serving HTTPS, so rustls's record layer has counts too;
# portcullis-h2: HTTP/2 (h2c, loaded by h2load), so hyper's and h2's server paths do.
TRAIN_TARGETS=portcullis,portcullis-redis,portcullis-tls,portcullis-h2
TRAIN_MODES=plain,sse,sse-sdk
TRAIN_CONNS=1,32
rm -rf "$TRAIN_BIN"
mkdir -p "$TRAIN_BIN"
link_bench_tools "$TRAIN_BIN"
ln -s "$WORK/generate/$HOST/release/portcullis-dataplane" "$TRAIN_BIN/portcullis-dataplane"
rm -rf "$WORK/train"
BENCH_SKIP_BUILD=1 BENCH_BIN_DIR="$TRAIN_BIN" BENCH_OUT="$WORK/train" \
    BENCH_TARGETS="$TRAIN_TARGETS" BENCH_MODES="$TRAIN_MODES" BENCH_CONNS="$TRAIN_CONNS" \
    BENCH_SECONDS="${PGO_SECONDS:-5}" BENCH_WARMUP=1 BENCH_ROUNDS=1 \
    bench/run.sh >"$WORK/train.log" 2>&1 || {
    say "the training run failed; its output: $WORK/train.log"
    exit 1
}
# The harness goes on past a target that did not start or failed its check (a note in the
# results), and such a target still writes a profile of its start-up: every scenario must have
# run, without errors, for the profile to be one of the loads.
TRAIN_TARGETS="$TRAIN_TARGETS" TRAIN_MODES="$TRAIN_MODES" TRAIN_CONNS="$TRAIN_CONNS" \
    python3 - "$WORK/train" <<'PY' || { say "see $WORK/train.log"; exit 1; }
import glob, json, os, sys
runs = sorted(glob.glob(os.path.join(sys.argv[1], "results-*.json")))
rows = json.load(open(runs[-1])) if runs else []
ran = {(r["target"], r["mode"], r["conns"]) for r in rows if r.get("requests") and not r.get("errors")}
want = {(t, m, int(c)) for t in os.environ["TRAIN_TARGETS"].split(",")
        for m in os.environ["TRAIN_MODES"].split(",") for c in os.environ["TRAIN_CONNS"].split(",")}
missing = sorted(want - ran)
if missing:
    sys.exit(f"pgo-build: the training run did not serve every load without errors: missing {missing}")
PY
shopt -s nullglob
raw_files=("$RAW"/*.profraw)
if [ ${#raw_files[@]} -eq 0 ]; then
    say "the training run wrote no profile (did the data plane exit cleanly?): $WORK/train.log"
    exit 1
fi

say "3/4 merging ${#raw_files[@]} raw profile(s)"
# Sparse: functions that never ran are left out (a tenth of the size, ~1 MB); they are optimised
# as without a profile instead of for size.
"$PROFDATA" merge --sparse -o "$PROFILE" "${raw_files[@]}" || {
    say "$PROFDATA could not merge them: an llvm-profdata older than rustc's LLVM ($(rustc -vV | sed -n 's/^LLVM version: //p')) may not read its raw profiles; set LLVM_PROFDATA"
    exit 1
}
"$PROFDATA" show "$PROFILE" | grep -E 'Total functions|Maximum function count' >&2 || true
mkdir -p "$(dirname "$SHIPPED_PROFILE")"
cp "$PROFILE" "$SHIPPED_PROFILE"
# The commit the counts belong to (`+` when the data plane's sources differed from it), then what
# the symbols they name were built with (the compiler, the dependencies), which the shipped build
# checks.
dirty=$(git status --porcelain -- dataplane crds operator apiclient Cargo.toml Cargo.lock 2>/dev/null | head -1)
{
    printf '%s%s %s\n' "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "${dirty:++}" "$(date -u +%Y-%m-%d)"
    scripts/release-dataplane.sh --fingerprint
} >"$TRAINED.new"
mv "$TRAINED.new" "$TRAINED"

say "4/4 the data plane built with the profile (as it ships: scripts/release-dataplane.sh)"
scripts/release-dataplane.sh "$WORK/bin/portcullis-dataplane"
link_bench_tools "$WORK/bin"
say "done: $WORK/bin/portcullis-dataplane (profile: $SHIPPED_PROFILE, $(head -1 "$TRAINED"))"
