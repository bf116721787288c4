#!/usr/bin/env bash
# The data plane as it ships: a release build with the committed profile
# (pgo/portcullis-dataplane.profdata, made by scripts/pgo-build.sh), so the compiler lays out and
# inlines the request path by the counts of a real run. The Dockerfile builds the image's binary
# with this script; bench/run.sh measures the same build.
#
#   scripts/release-dataplane.sh [OUT]     # OUT: target/shipped/bin/portcullis-dataplane
#   PORTCULLIS_PGO=0 scripts/release-dataplane.sh   # the plain release build instead
#
# The profile belongs to the commit it was trained on (pgo/trained-at): a function changed
# since has no counts and is optimised as without a profile (rustc's LLVM warns, naming it);
# the rest keep theirs. Retrain with scripts/pgo-build.sh after changes to the request path.
# `--target` keeps the profile's flags off build scripts and proc macros, and gives the build a
# directory of its own, so target/release (the plain build) is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT="${1:-$ROOT/target/shipped/bin/portcullis-dataplane}"
PROFILE="$ROOT/pgo/portcullis-dataplane.profdata"
HOST=$(rustc -vV | sed -n 's/^host: //p')
FLAGS="${RUSTFLAGS:-}"
if [ "${PORTCULLIS_PGO:-1}" != 0 ]; then
    [ -s "$PROFILE" ] || { echo "release-dataplane: $PROFILE is missing; PORTCULLIS_PGO=0 builds without it" >&2; exit 1; }
    FLAGS="$FLAGS -Cprofile-use=$PROFILE"
fi
RUSTFLAGS="$FLAGS" cargo build --release --locked -q -p portcullis-dataplane --target "$HOST" \
    --target-dir "$ROOT/target/shipped"
install -D -m 0755 "$ROOT/target/shipped/$HOST/release/portcullis-dataplane" "$OUT"
printf 'release-dataplane: %s (%s)\n' "$OUT" \
    "$([ "${PORTCULLIS_PGO:-1}" != 0 ] && echo "profile trained at $(cat "$ROOT/pgo/trained-at" 2>/dev/null || echo '?')" || echo 'no profile')" >&2
