#!/usr/bin/env bash
# A flood of one key against a Redis-backed gateway under the `open` failure policy: does the
# gateway keep the store shared (the key's limit holds), or take its own late reads for an outage
# and let the flood through? Prints, per run: requests admitted (the limit is 300 a minute), the
# limiter mode at the end, and how often the store was marked down.
#
#   FLOOD_BINS="path/to/portcullis-dataplane [another build]" FLOOD_CONNS=6000 FLOOD_SECONDS=15 \
#   FLOOD_RUNS=2 FLOOD_THREADS=1 bench/flood.sh
#
# FLOOD_THREADS=1 pins the gateway to CPU 1 with --worker-threads 1 (wrk and Redis on CPU 0);
# FLOOD_THREADS=2 pins it to CPU 1 with two worker threads. FLOOD_ARGS adds gateway flags (for
# example "--busy-poll-us 500", with FLOOD_THREADS=1). Needs redis-server, wrk, curl,
# taskset (bench/run.sh installs them) and a release build (cargo build --release -p
# portcullis-dataplane).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bins=${FLOOD_BINS:-$root/target/release/portcullis-dataplane}
conns=${FLOOD_CONNS:-6000}
seconds=${FLOOD_SECONDS:-15}
runs=${FLOOD_RUNS:-2}
threads=${FLOOD_THREADS:-1}
read -r -a extra <<<"${FLOOD_ARGS:-}"
work=$(mktemp -d /tmp/portcullis-flood.XXXXXX)
trap 'kill ${gw:-} 2>/dev/null || true; [ -n "${redis_pid:-}" ] && kill "$redis_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir "$work/m"
cp "$root"/examples/quickstart/*.yaml "$work/m/"
sed -i 's/    requestsPerMinute: 600/    requestsPerMinute: 300/; /tokensPerMinute: 200000/d' "$work/m/20-demo-api-key.yaml"
cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer pcl_demo_NOT_A_SECRET_quickstart_only_0123456789"
LUA
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
for run in $(seq "$runs"); do
  for bin in $bins; do
    rport=$(free_port); port=$(free_port); admin=$(free_port)
    taskset -c 0 redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no > "$work/redis.log" 2>&1 &
    redis_pid=$!
    sleep 0.5
    taskset -c 1 "$bin" --manifests "$work/m" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
      --worker-threads "$threads" --redis-url "redis://127.0.0.1:$rport/" --limiter-failure-policy open \
      ${extra[@]+"${extra[@]}"} > "$work/gw.log" 2>&1 &
    gw=$!
    for _ in $(seq 50); do
      curl -s "127.0.0.1:$admin/metrics" | grep -q 'portcullis_limiter_mode{mode="shared"} 1' && break
      sleep 0.2
    done
    taskset -c 0 wrk -t 2 -c "$conns" -d "${seconds}s" -s "$work/post.lua" "http://127.0.0.1:$port/v1/chat/completions" > "$work/wrk.txt" 2>&1 || true
    metrics=$(curl -s "127.0.0.1:$admin/metrics")
    ok=$(grep -E '^portcullis_requests_total\{outcome="ok",route="chat_completions"\}' <<<"$metrics" | awk '{print $2}')
    mode=$(grep -E '^portcullis_limiter_mode\{mode="[a-z]+"\} 1' <<<"$metrics" | sed 's/.*mode="\([a-z]*\)".*/\1/')
    downs=$(grep -c "shared limit store unavailable" "$work/gw.log" || true)
    rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
    echo "run $run  $bin  threads $threads ${FLOOD_ARGS:-} conns $conns: admitted ${ok:-?} (limit 300/min), mode at end ${mode:-?}, store marked down ${downs} times, ${rps:-?} req/s"
    kill "$gw"; wait "$gw" 2>/dev/null || true
    kill "$redis_pid"; wait "$redis_pid" 2>/dev/null || true
    gw=""; redis_pid=""
  done
done
