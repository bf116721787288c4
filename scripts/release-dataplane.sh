#!/usr/bin/env bash
# The data plane as it ships: a release build with the committed profile
# (pgo/portcullis-dataplane.profdata, made by scripts/pgo-build.sh), so the compiler lays out and
# inlines the request path by the counts of a real run. The Dockerfile builds the image's binary
# with this script; bench/run.sh measures the same build.
#
#   scripts/release-dataplane.sh [OUT]     # OUT: target/shipped/bin/portcullis-dataplane
#   PORTCULLIS_PGO=0 scripts/release-dataplane.sh OUT   # the plain release build, the same way
#   scripts/release-dataplane.sh --check   # is the committed profile current? (no build)
#   scripts/release-dataplane.sh --fingerprint   # what pgo/trained-at records after its first line
#
# Beside OUT goes OUT.build, one line naming what was built (the harness reports it).
#
# A profile names functions by their symbols, whose hashes cargo derives from the compiler's
# version and from every dependency's version and features: with another rustc or another
# dependency of the data plane, almost nothing would match, and LLVM says nothing of functions it
# has no counts for. So this refuses a profile trained with another rustc or dependency set
# (pgo/trained-at records both; dev-dependencies and other crates' dependencies do not count):
# retrain it with scripts/pgo-build.sh, or build without it. A function whose body changed since
# training loses only its own counts. `--target` keeps the profile's flags off build scripts and
# proc macros.
set -euo pipefail
ARG="${1:-}"
case "$ARG" in "" | /* | --*) ;; *) ARG="$(pwd)/$ARG" ;; esac
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PROFILE="$ROOT/pgo/portcullis-dataplane.profdata"
TRAINED="$ROOT/pgo/trained-at"
HOST=$(rustc -vV | sed -n 's/^host: //p')
say() { printf 'release-dataplane: %s\n' "$*" >&2; }

# The compiler, and the data plane's dependency graph with features (paths left out: the image
# builds in /src).
fingerprint() {
    local tree
    tree=$(cargo tree --locked -q -p portcullis-dataplane --target "$HOST" -e normal,build \
        -f '{p} {f}' --prefix none) || return 1
    printf 'rustc: %s\n' "$(rustc -V)"
    printf 'dependencies: %s\n' "$(printf '%s\n' "$tree" | sed 's| (/[^)]*)||' | LC_ALL=C sort -u \
        | sha256sum | cut -d' ' -f1)"
}

# Fails, saying what differs, unless the profile was trained with this compiler and these
# dependencies.
check() {
    [ -s "$PROFILE" ] && [ -s "$TRAINED" ] || { say "$PROFILE or $TRAINED is missing"; return 1; }
    local have want
    have=$(fingerprint) || { say "cargo tree failed"; return 1; }
    want=$(sed 1d "$TRAINED")
    if [ "$have" != "$want" ]; then
        say "the profile was trained with:"
        printf '  %s\n' "$want" >&2
        say "this build has:"
        printf '  %s\n' "$have" >&2
        say "its symbols would not match. Retrain it (scripts/pgo-build.sh, then commit pgo/), or build without it: PORTCULLIS_PGO=0"
        return 1
    fi
}

case "$ARG" in
    --fingerprint) fingerprint; exit ;;
    --check) check; exit ;;
    --*) say "unknown option $ARG (--check, --fingerprint, or an output path)"; exit 2 ;;
esac
OUT="${ARG:-$ROOT/target/shipped/bin/portcullis-dataplane}"
FLAGS="${RUSTFLAGS:-}"
if [ "${PORTCULLIS_PGO:-1}" != 0 ]; then
    check
    # Under a name of its contents: a new profile is a new flag, so cargo rebuilds every crate
    # with it instead of keeping dependencies built with the old one.
    sum=$(sha256sum "$PROFILE" | cut -c1-16)
    mkdir -p "$ROOT/target/shipped/profiles"
    cp "$PROFILE" "$ROOT/target/shipped/profiles/$sum.profdata"
    FLAGS="$FLAGS -Cprofile-use=$ROOT/target/shipped/profiles/$sum.profdata"
    built="the committed profile, trained at $(head -1 "$TRAINED")"
else
    built="the plain release build, no profile"
fi
RUSTFLAGS="$FLAGS" cargo build --release --locked -q -p portcullis-dataplane --target "$HOST" \
    --target-dir "$ROOT/target/shipped"
install -D -m 0755 "$ROOT/target/shipped/$HOST/release/portcullis-dataplane" "$OUT"
printf '%s\n' "$built" >"$OUT.build"
say "$OUT: $built"
