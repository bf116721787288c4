#!/usr/bin/env bash
# Profiles Portcullis (one worker, CPU 1) under the bench's plain and SSE loads (wrk c=32 and the
# loopback upstream on CPU 0), three ways:
#   perf      — flat cpu-clock sampling, user + kernel (syscall cost shows);
#   callgrind — exact instruction counts of the user-space code (noise-free on a busy machine);
#   vs-nginx  — (not by default) perf of nginx proxy_pass and of Portcullis under the same load,
#               taken in turn for PROFILE_ROUNDS rounds, as CPU µs per request side by side: by
#               kernel / proxy code / libc / vDSO, and the symbols that differ most
#               (bench/tools/perf_vs.py). What the throughput target's gap is made of.
# Output: bench/out/profile-<stamp>/{perf,callgrind,vs-nginx}-{plain,sse}*.txt; summarised in
# bench/PROFILE.md.
#
#   bench/profile.sh                   # perf and callgrind, both loads, ~3 minutes
#   PROFILE_TOOLS=perf PROFILE_SECONDS=5 bench/profile.sh
#   PROFILE_TOOLS=vs-nginx PROFILE_MODES=plain PROFILE_ROUNDS=3 bench/profile.sh   # ~1.5 minutes
#   PROFILE_BIN_DIR=/other/target/release BENCH_SKIP_BUILD=1 bench/profile.sh   # another build
#   PROFILE_CLIENT=h2 bench/profile.sh  # the client leg over HTTP/2 (h2c, h2load -c32 -m1), and
#                                       # vs-nginx against nginx's `listen … http2`
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STAMP=$(date +%Y%m%d-%H%M%S)
OUT="$ROOT/bench/out/profile-$STAMP"
mkdir -p "$OUT"
SECONDS_RUN=${PROFILE_SECONDS:-10}
TOOLS=${PROFILE_TOOLS:-perf,callgrind}
MODES=${PROFILE_MODES:-plain,sse}
ROUNDS=${PROFILE_ROUNDS:-2}
CLIENT=${PROFILE_CLIENT:-http1}
case $CLIENT in http1 | h2) ;; *) echo "PROFILE_CLIENT is http1 or h2, not $CLIENT" >&2; exit 2 ;; esac
BASE=${BENCH_PORT_BASE:-28100}
UP=$((BASE + 1)); GW=$((BASE + 3)); ADMIN=$((BASE + 4))
KEY=pcl_bench_client_key_0123456789_abcdefghijklmnop
BIN="${PROFILE_BIN_DIR:-$ROOT/target/release}"

if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
    cargo build --release -q -p portcullis-dataplane -p portcullis-bench
fi
need=()
command -v perf >/dev/null || need+=(linux-perf)
command -v valgrind >/dev/null || need+=(valgrind)
command -v wrk >/dev/null || need+=(wrk)
if [ "$CLIENT" = h2 ]; then command -v h2load >/dev/null || need+=(nghttp2-client); fi
if [[ $TOOLS == *vs-nginx* ]]; then command -v nginx >/dev/null || need+=(nginx); fi
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Manifests and wrk scripts: the same as the proxy bench.
# nginx: the HTTP/1.1 one, or with PROFILE_CLIENT=h2 `nginx-h2` (h2c), written as nginx/nginx.conf.
python3 - "$OUT" "$CLIENT" <<'EOF'
import os, sys
sys.path.insert(0, "bench")
import harness as h
h.require_free_ports(h.PORT)
h.WORK = sys.argv[1]
h.write_manifests(os.path.join(sys.argv[1], "manifests"))
h.nginx_conf(os.path.join(sys.argv[1], "nginx"), "nginx-h2" if sys.argv[2] == "h2" else "nginx")
for mode in ("plain", "sse"):
    with open(os.path.join(sys.argv[1], f"wrk-{mode}.lua"), "w") as f:
        f.write(h.LUA % {"key": h.CLIENT_KEY, "body": h.BODY[mode]})
    with open(os.path.join(sys.argv[1], f"body-{mode}.json"), "w") as f:
        f.write(h.BODY[mode])
EOF

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

taskset -c 0 "$BIN/bench-upstream" "127.0.0.1:$UP" >"$OUT/upstream.log" 2>&1 &
pids+=($!)

wait_ready() {
    for _ in $(seq 1 600); do
        if curl -fs -o /dev/null "http://127.0.0.1:$ADMIN/readyz"; then return 0; fi
        sleep 0.1
    done
    echo "gateway did not become ready" >&2; return 1
}
load() { # mode seconds [port]: a BENCHRESULT line whose second field is the requests done
    if [ "$CLIENT" = h2 ]; then
        taskset -c 0 h2load -t1 -c32 -m1 -D "$2" -N 10 -d "$OUT/body-$1.json" \
            -H "authorization: Bearer $KEY" -H 'content-type: application/json' \
            "http://127.0.0.1:${3:-$GW}/v1/chat/completions" \
            | awk '$1 == "requests:" { print "BENCHRESULT", $6, "(h2load: " $0 ")" }'
        return
    fi
    taskset -c 0 wrk -t1 -c32 -d"$2"s --timeout 10s -s "$OUT/wrk-$1.lua" \
        "http://127.0.0.1:${3:-$GW}/v1/chat/completions" | grep BENCHRESULT
}
# Flat cpu-clock sampling of PID (no call graphs: cheap, many samples; inclusive costs come from
# callgrind) while load runs on PORT after a warm-up. Keeps wrk's line beside DATA (DATA.wrk) and
# prints "<requests>:<perf.data>" for perf_vs.py.
record() { # mode pid port data
    load "$1" 2 "$3" >/dev/null
    perf record -e cpu-clock -F 4999 -p "$2" -o "$4" -- sleep "$SECONDS_RUN" 2>"$4.log" &
    local rec=$!
    sleep 0.3
    load "$1" $((SECONDS_RUN - 1)) "$3" >"$4.wrk"
    wait $rec || true
    echo "$(awk '{print $2}' "$4.wrk"):$4"
}
gw_args=(--manifests "$OUT/manifests" --listen "127.0.0.1:$GW" --admin-listen "127.0.0.1:$ADMIN" --log-level warn)
# One worker: the single-threaded runtime where the data plane offers it, else TOKIO_WORKER_THREADS.
if "$BIN/portcullis-dataplane" --help 2>/dev/null | grep -q -- --worker-threads; then
    gw_args+=(--worker-threads 1)
fi

if [[ $TOOLS == *vs-nginx* ]]; then
    NGINX_PORT=$(python3 -c 'import sys; sys.path.insert(0, "bench"); import harness as h; print(h.PORT[sys.argv[1]])' \
        "$([ "$CLIENT" = h2 ] && echo nginx-h2 || echo nginx)")
    TOKIO_WORKER_THREADS=1 taskset -c 1 "$BIN/portcullis-dataplane" "${gw_args[@]}" >"$OUT/gw-vs.log" 2>&1 &
    gw=$!; pids+=($gw)
    taskset -c 1 nginx -c "$OUT/nginx/nginx.conf" >"$OUT/nginx.log" 2>&1 &
    ng=$!; pids+=($ng)
    wait_ready
    worker=""
    for _ in $(seq 1 100); do
        worker=$(pgrep -P "$ng" | head -1 || true)   # worker_processes 1
        [ -n "$worker" ] && curl -fs -o /dev/null $([ "$CLIENT" = h2 ] && echo --http2-prior-knowledge) \
            -X POST -H "Authorization: Bearer $KEY" \
            -H 'Content-Type: application/json' --data '{"model":"bench-model","messages":[]}' \
            "http://127.0.0.1:$NGINX_PORT/v1/chat/completions" && break
        sleep 0.1
    done
    [ -n "$worker" ] || { echo "nginx did not start; log:" >&2; tail "$OUT/nginx.log" >&2; exit 1; }
    for mode in ${MODES//,/ }; do
        ng_runs=(); pc_runs=()
        for round in $(seq 1 "$ROUNDS"); do
            # Taken in turn, nginx first in odd rounds, so drift on the host falls on both.
            if (( round % 2 )); then
                ng_runs+=("$(record "$mode" "$worker" "$NGINX_PORT" "$OUT/vs-nginx-$mode-nginx-$round.data")")
                pc_runs+=("$(record "$mode" "$gw" "$GW" "$OUT/vs-nginx-$mode-portcullis-$round.data")")
            else
                pc_runs+=("$(record "$mode" "$gw" "$GW" "$OUT/vs-nginx-$mode-portcullis-$round.data")")
                ng_runs+=("$(record "$mode" "$worker" "$NGINX_PORT" "$OUT/vs-nginx-$mode-nginx-$round.data")")
            fi
        done
        python3 "$ROOT/bench/tools/perf_vs.py" "nginx=$(IFS=,; echo "${ng_runs[*]}")" \
            "portcullis=$(IFS=,; echo "${pc_runs[*]}")" 40 >"$OUT/vs-nginx-$mode.md"
        echo "vs-nginx $mode: $OUT/vs-nginx-$mode.md" >&2
    done
    kill "$gw" "$ng"; wait "$gw" "$ng" 2>/dev/null || true
fi

if [[ $TOOLS == *perf* ]]; then
    TOKIO_WORKER_THREADS=1 taskset -c 1 "$BIN/portcullis-dataplane" "${gw_args[@]}" >"$OUT/gw-perf.log" 2>&1 &
    gw=$!; pids+=($gw)
    wait_ready
    for mode in ${MODES//,/ }; do
        record "$mode" "$gw" "$GW" "$OUT/perf-$mode.data" >/dev/null
        cat "$OUT/perf-$mode.data.wrk"
        perf report -i "$OUT/perf-$mode.data" --percent-limit 0.4 --stdio --sort dso,symbol \
            2>/dev/null | sed 's/  */ /g' >"$OUT/perf-$mode-self.txt" || true
        perf report -i "$OUT/perf-$mode.data" --sort dso --stdio 2>/dev/null \
            | sed 's/  */ /g' >"$OUT/perf-$mode-dso.txt" || true
        echo "perf $mode: $OUT/perf-$mode-self.txt" >&2
        kill -0 "$gw" 2>/dev/null || { echo "gateway exited; log:" >&2; tail "$OUT/gw-perf.log" >&2; }
    done
    kill "$gw"; wait "$gw" 2>/dev/null || true
fi

if [[ $TOOLS == *callgrind* ]]; then
    for mode in ${MODES//,/ }; do
        TOKIO_WORKER_THREADS=1 taskset -c 1 valgrind --tool=callgrind --instr-atstart=no \
            --callgrind-out-file="$OUT/callgrind-$mode.out" \
            "$BIN/portcullis-dataplane" "${gw_args[@]}" >"$OUT/gw-callgrind-$mode.log" 2>&1 &
        gw=$!; pids+=($gw)
        wait_ready
        load "$mode" 2 >/dev/null   # warm: upstream pool, allocator
        callgrind_control -i on "$gw" >/dev/null
        load "$mode" "$SECONDS_RUN" | tee "$OUT/callgrind-$mode.wrk"
        callgrind_control -i off "$gw" >/dev/null
        kill -INT "$gw"; wait "$gw" 2>/dev/null || true
        callgrind_annotate --auto=no --inclusive=no --threshold=100 "$OUT/callgrind-$mode.out" \
            2>/dev/null >"$OUT/callgrind-$mode-self-all.txt" || true
        callgrind_annotate --auto=no --inclusive=yes "$OUT/callgrind-$mode.out" 2>/dev/null \
            | head -150 >"$OUT/callgrind-$mode-inclusive.txt" || true
        python3 "$ROOT/bench/tools/cg_top.py" "$OUT/callgrind-$mode-self-all.txt" \
            "$(awk '{print $2}' "$OUT/callgrind-$mode.wrk")" 50 >"$OUT/callgrind-$mode-self.txt"
        echo "callgrind $mode: $OUT/callgrind-$mode-self.txt" >&2
    done
fi
echo "$OUT"
