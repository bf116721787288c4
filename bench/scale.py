#!/usr/bin/env python3
"""Scale figures for Portcullis (started by bench/scale.sh after a release build).

1. Snapshot apply time with SCALE_KEYS ApiKeys (10k) and SCALE_PROVIDERS ProviderCredentials
   (100): in process, per phase (bench-compile time), and end to end: process start → /readyz,
   and a reload (a manifest changes → `portcullis_snapshot_generation` moves on /metrics); the
   latency tail of requests (wrk c=1) while the 10k-key manifests are reloaded, beside a quiet run.
2. RSS idle with it loaded (and with 1 key, for comparison).
3. Auth cost: wrk plain c=32 (and c=1) against the 10k-key gateway and the 1-key gateway, both up
   at once and measured in turn (SCALE_AUTH_ROUNDS rounds, order alternating, after a warm-up of
   each): req/s and the gateway's CPU per request, as per-round ratios.
4. Memory per connection and per open SSE stream (upstream holds streams open): RSS delta / N on
   a fresh gateway, for connections opened and sending nothing, idle keep-alive connections (one
   request each) measured a second after, and a second batch of those opened once the first
   batch has idled 2.5 s (its buffers given back to the allocator, which RSS does not show until
   they are used again). The same again over TLS (ALPN http/1.1; a certificate made by
   `bench-conns cert`), handshakes done. Over HTTP/2 (h2c, prior knowledge): an idle connection
   after one request, a connection holding one SSE stream, and SSE streams 100 to a connection
   (what a stream costs on a shared connection).
5. New connections at the connection limit: SCALE_AT_LIMIT (500) connections, one request each,
   against a gateway whose `--max-connections` slots are all held by idle keep-alive
   connections (which it closes to make room), beside the same against free slots.

Pinning as in the proxy bench: gateway on CPU 1 with one worker; upstream, wrk and the
connection holder on CPU 0.
"""

import http.client
import os
import re
import ssl
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

KEYS = int(os.environ.get("SCALE_KEYS", "10000"))
PROVIDERS = int(os.environ.get("SCALE_PROVIDERS", "100"))
IDLE_CONNS = int(os.environ.get("SCALE_IDLE_CONNS", "2000"))
STREAMS = int(os.environ.get("SCALE_STREAMS", "1000"))
AT_LIMIT = int(os.environ.get("SCALE_AT_LIMIT", "500"))
AUTH_SECONDS = int(os.environ.get("SCALE_AUTH_SECONDS", "5"))
AUTH_ROUNDS = max(1, int(os.environ.get("SCALE_AUTH_ROUNDS", "3")))
# The 1-key gateway's ports while the 10k-key one holds the usual pair (the proxy bench's
# `portcullis-nolimit` pair, unused here).
ONE_PORT, ONE_ADMIN = h.PORT["portcullis-nolimit"], h.PORT["portcullis-nolimit_admin"]
RELOADS = int(os.environ.get("SCALE_RELOADS", "3"))
TAIL_SECONDS = int(os.environ.get("SCALE_TAIL_SECONDS", "8"))
COMPILE = os.path.join(h.BIN, "bench-compile")
CONNS = os.path.join(h.BIN, "bench-conns")
WORK = os.path.join(h.OUT, "scale-" + h.STAMP)
h.WORK = WORK


def gen(d, keys, providers):
    out = subprocess.run([COMPILE, "gen", d, str(keys), str(providers),
                          f"http://127.0.0.1:{h.PORT['upstream']}/v1"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def start_gateway(d, name, extra=(), env=None, port=None, admin=None):
    port, admin = port or h.PORT["portcullis"], admin or h.PORT["portcullis_admin"]
    argv = [os.path.join(h.BIN, "portcullis-dataplane"), "--manifests", d,
            "--listen", f"127.0.0.1:{port}",
            "--admin-listen", f"127.0.0.1:{admin}", "--log-level", "warn"]
    argv += list(extra)
    argv += h.one_worker_args()
    t0 = time.perf_counter()
    p = h.start(name, argv, env={"TOKIO_WORKER_THREADS": "1", **(env or {})}, cpu=1)
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", admin, timeout=1)
            c.request("GET", "/readyz")
            r = c.getresponse()
            r.read()
            c.close()
            if r.status == 200:
                break
        except OSError:
            pass
        if p.poll() is not None or time.perf_counter() - t0 > 120:
            raise SystemExit(f"gateway {name} did not become ready; see {WORK}/{name}.log")
        time.sleep(0.002)
    return p, (time.perf_counter() - t0) * 1000


def metric(name):
    c = http.client.HTTPConnection("127.0.0.1", h.PORT["portcullis_admin"], timeout=2)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def generation():
    value = metric("portcullis_snapshot_generation")
    return int(value) if value is not None else None


def rss_mb(pid, field="VmRSS"):
    return h.status_kb([pid], field) / 1024


def settle(pid, seconds=1.0):
    time.sleep(seconds)
    return rss_mb(pid)


def image_env():
    """The environment the Dockerfile's data-plane image sets (its `ENV` lines)."""
    env = {}
    with open(os.path.join(h.ROOT, "Dockerfile")) as f:
        stage = None
        for line in f:
            words = line.split()
            if words[:1] == ["FROM"]:
                stage = words[-1]
            elif words[:1] == ["ENV"] and stage == "dataplane":
                name, _, value = line.strip()[4:].partition("=")
                env[name.strip()] = value.strip()
    return env


def reloads(p, big):
    """RELOADS manifest changes, each waited for: their times (ms), then RSS and VmHWM (MB)."""
    reload_ms = []
    for i in range(RELOADS):
        g = generation()
        t0 = time.perf_counter()
        subprocess.run([COMPILE, "reload", big, str(i)], check=True)
        while generation() == g:
            if time.perf_counter() - t0 > 60:
                raise SystemExit("reload not seen within 60 s")
            time.sleep(0.002)
        reload_ms.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.6)
    return reload_ms, settle(p.pid), rss_mb(p.pid, "VmHWM")


def key_request(key, mode="plain", ca=None):
    if ca:
        tls = ssl.create_default_context(cafile=ca)
        c = http.client.HTTPSConnection("127.0.0.1", h.PORT["portcullis"], timeout=5, context=tls)
    else:
        c = http.client.HTTPConnection("127.0.0.1", h.PORT["portcullis"], timeout=5)
    c.request("POST", "/v1/chat/completions", body=h.BODY[mode],
              headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


def wrk_key(key, conns, seconds, meanwhile=None, port=None):
    """wrk with `key` against the gateway (on `port`, else the usual one); `meanwhile()` runs
    while it does."""
    script = os.path.join(WORK, f"wrk-{key[:16]}.lua")
    with open(script, "w") as f:
        f.write(h.LUA.replace("%(key)s", key).replace("%(body)s", h.BODY["plain"])
                .replace("%%", "%"))
    argv = ["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s",
            "-s", script, f"http://127.0.0.1:{port or h.PORT['portcullis']}/v1/chat/completions"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if meanwhile:
        meanwhile()
    r = h.wrk_result(p)
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def tail_latency(key, seconds, reloads=None):
    """wrk -c1 for `seconds`; with `reloads` (a directory), a manifest changes every 1.3 s
    meanwhile (each waited for on /metrics). The wrk result, with `reloads` seen."""
    seen = 0

    def reload_meanwhile():
        nonlocal seen
        time.sleep(0.5)
        end = time.perf_counter() + seconds - 2.0
        while time.perf_counter() < end:
            g = generation()
            subprocess.run(["taskset", "-c", "0", COMPILE, "reload", reloads, str(100 + seen)], check=True)
            t0 = time.perf_counter()
            while generation() == g and time.perf_counter() - t0 < 10:
                time.sleep(0.01)
            seen += 1
            time.sleep(1.3)

    r = wrk_key(key, 1, seconds, reload_meanwhile if reloads else None)
    r["reloads"] = seen
    return r


def hold(mode, n, key, pid, wait=0.5, hold_secs=8, ca=None):
    """After `wait` s, opens n connections (or streams; over TLS trusting `ca` when given) held
    `hold_secs` s: (RSS delta MB a second after all are open, RSS before, after, ok, failed,
    error)."""
    before = settle(pid, wait)
    p = subprocess.Popen(["taskset", "-c", "0", CONNS, f"127.0.0.1:{h.PORT['portcullis']}",
                          str(n), mode, key, str(hold_secs)] + ([ca] if ca else []), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    time.sleep(1.0)
    after = rss_mb(pid)
    p.wait()
    err = p.stderr.read().strip()
    ok, failed = (int(line[1]), int(line[2])) if len(line) == 3 else (0, n)
    return after - before, before, after, ok, failed, err


def hold_second_batch(n, key, pid, ca=None):
    """n idle keep-alive connections held 2.5 s, then n more: (RSS delta MB of the second batch,
    RSS before it, after it, ok, failed, error)."""
    first = subprocess.Popen(["taskset", "-c", "0", CONNS, f"127.0.0.1:{h.PORT['portcullis']}",
                              str(n), "idle", key, "9"] + ([ca] if ca else []), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    first_ok = first.stdout.readline().split()
    delta, before, after, ok, failed, err = hold("idle", n, key, pid, wait=2.5, hold_secs=4, ca=ca)
    first.wait()
    if len(first_ok) != 3 or int(first_ok[2]) != 0:
        err = f"first batch: {' '.join(first_ok)} {first.stderr.read().strip()} {err}".strip()
    return delta, before, after, ok, failed, err


def section_four_row(small, key, mode, n, ca, tls_args):
    """One row of section 4 on a fresh gateway (TLS when `ca` is given): its table line, and a
    line for the holder's first error, if any."""
    p, _ = start_gateway(small, f"gw-{mode}{'-tls' if ca else ''}", tls_args if ca else ())
    for _ in range(20):
        key_request(key, "plain", ca)
        key_request(key, "sse", ca)
    if mode == "idle-second":
        delta, before, after, ok, failed, err = hold_second_batch(n, key, p.pid, ca)
    else:
        delta, before, after, ok, failed, err = hold(mode, n, key, p.pid, ca=ca)
    h.stop(p)
    what = {"open": "connection opened, no request sent yet",
            "idle": "idle keep-alive connection (after one request)",
            "idle-second": f"idle keep-alive connection, a second batch (the first {n} idle 2.5 s)",
            "stream": "open SSE stream (client conn + upstream conn, one event sent)",
            "h2-idle": "HTTP/2: idle connection (after one request)",
            "h2-stream": "HTTP/2: connection with one open SSE stream (+ its upstream conn)",
            "h2-streams": "HTTP/2: open SSE stream, 100 to a connection (+ its upstream conn)"}[mode]
    if ca:
        what = "TLS: " + what.replace("opened,", "opened, handshake done,")
    row = f"| {what} | {ok} | {before:.1f} | {after:.1f} | {delta * 1024 / max(ok, 1):.1f} | {failed} |"
    return row + (f"\n\n(bench-conns: {err})\n" if err else "")


def new_connections(n, key):
    """n connections, one request each (200 at a time), then closed: (ms, ok, failed, error)."""
    t0 = time.perf_counter()
    out = subprocess.run(["taskset", "-c", "0", CONNS, f"127.0.0.1:{h.PORT['portcullis']}",
                          str(n), "idle", key, "0"], capture_output=True, text=True)
    ms = (time.perf_counter() - t0) * 1000
    line = out.stdout.split()
    ok, failed = (int(line[1]), int(line[2])) if len(line) == 3 else (0, n)
    return ms, ok, failed, out.stderr.strip()


def at_the_limit(small, key):
    """Section 5: new connections served at the connection limit, and with slots free."""
    lines = ["", f"## New connections at the connection limit ({AT_LIMIT} connections, one request "
             f"each, 200 at a time; `--max-connections {IDLE_CONNS}`)", "",
             "| slots | time ms | per connection µs | served | failed | idle connections closed |",
             "|---|---|---|---|---|---|"]
    limit = ("--max-connections", str(IDLE_CONNS))
    for held in (False, True):
        p, _ = start_gateway(small, "gw-limit-held" if held else "gw-limit-free", limit)
        holder = None
        if held:
            holder = subprocess.Popen(["taskset", "-c", "0", CONNS, f"127.0.0.1:{h.PORT['portcullis']}",
                                       str(IDLE_CONNS), "idle", key, "60"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            holder.stdout.readline()
        ms, ok, failed, err = new_connections(AT_LIMIT, key)
        closed = metric("portcullis_idle_connections_reclaimed_total")
        what = f"all {IDLE_CONNS} held by idle keep-alive connections" if held else "free"
        lines.append(f"| {what} | {ms:.0f} | {ms * 1000 / max(AT_LIMIT, 1):.0f} | {ok} | {failed} | "
                     f"{closed:.0f} |" if closed is not None else f"| {what} | {ms:.0f} | | {ok} | {failed} | ? |")
        if err:
            lines.append(f"\n(bench-conns: {err.splitlines()[-1]})\n")
        if holder:
            holder.kill()
            holder.wait()
        h.stop(p)
    return lines


def main():
    h.require_free_ports(h.PORT)
    os.makedirs(WORK, exist_ok=True)
    h.wait_quiet()
    load0 = h.loadavg()
    busy0 = h.foreign_processes()
    lines = [f"# Scale figures {h.STAMP}", "",
             f"{KEYS} ApiKeys (each with its own Secret) and {PROVIDERS} ProviderCredentials; "
             "gateway pinned to CPU 1 with one worker (`--worker-threads 1` where available, else TOKIO_WORKER_THREADS=1).", ""]
    up = h.start("upstream", [os.path.join(h.BIN, "bench-upstream"),
                              f"127.0.0.1:{h.PORT['upstream']}"], cpu=0)
    if not h.wait_ready(h.PORT["upstream"]):
        raise SystemExit("upstream did not start")
    big, small = os.path.join(WORK, "m-big"), os.path.join(WORK, "m-one")
    key_big = gen(big, KEYS, PROVIDERS)
    key_one = gen(small, 1, 1)
    files = sum(os.path.getsize(os.path.join(big, f)) for f in os.listdir(big))
    lines.append(f"Manifests: {files / 1e6:.1f} MB of YAML in {len(os.listdir(big))} files.")
    lines.append("")

    # 1. in-process phases
    h.log("timing compile phases in process")
    t = subprocess.run(["taskset", "-c", "1", COMPILE, "time", big, "5"],
                       capture_output=True, text=True, check=True).stdout
    t1 = subprocess.run(["taskset", "-c", "1", COMPILE, "time", small, "5"],
                        capture_output=True, text=True, check=True).stdout
    lines += ["## Snapshot apply, in process (median and best of 5, one core)", "",
              f"`bench-compile time`: {t.splitlines()[0]}; {t.splitlines()[1]}", "",
              "| phase | median ms | best ms | 1-key median ms |", "|---|---|---|---|"]
    small_rows = {r.split("\t")[0]: r.split("\t") for r in t1.splitlines()[3:]}
    for row in t.splitlines()[3:]:
        name, med, best = row.split("\t")
        lines.append(f"| {name} | {med} | {best} | {small_rows.get(name, ['', '?'])[1]} |")
    lines.append("")

    # 1b/2. end to end and RSS
    h.log("starting gateway with 1 key")
    p1, ready1 = start_gateway(small, "gw-one")
    assert key_request(key_one) == 200
    rss1 = settle(p1.pid)
    h.stop(p1)
    h.log(f"starting gateway with {KEYS} keys")
    p, ready = start_gateway(big, "gw-big")
    assert key_request(key_big) == 200, "10k-key gateway refused key 0"
    rss_idle = settle(p.pid)
    hwm_start = rss_mb(p.pid, "VmHWM")
    gen0 = generation()
    reload_ms, rss_after_reload, hwm = reloads(p, big)
    h.log("requests while reloading: wrk c=1, quiet and with a manifest change every 1.3 s")
    quiet = tail_latency(key_big, TAIL_SECONDS)
    busy = tail_latency(key_big, TAIL_SECONDS, reloads=big)
    lines += ["## Snapshot apply, end to end (data plane process)", "",
              "| measure | value |", "|---|---|",
              f"| start → /readyz, {KEYS} keys / {PROVIDERS} providers | {ready:.0f} ms |",
              f"| start → /readyz, 1 key / 1 provider | {ready1:.0f} ms |",
              f"| reload (write a manifest → generation moves), {RELOADS} runs | "
              + ", ".join(f"{x:.0f}" for x in reload_ms) + " ms "
              "(includes the 250 ms poll interval and the 50 ms settle delay of local mode) |",
              f"| generation before → after | {gen0} → {generation()} |",
              "", f"Requests while reloading (wrk c=1, {TAIL_SECONDS} s each; the gateway alone on its "
              "core, so the reload's compile shares it with the worker):", "",
              "| | requests | p50 µs | p99 µs | p99.9 µs | max µs | errors |", "|---|---|---|---|---|---|---|",
              *(f"| {what} | {r['requests']} | {r['p50']} | {r['p99']} | {r['p999']} | {r['max']} | {r['errors']} |"
                for what, r in (("quiet", quiet), (f"{busy['reloads']} reloads of {KEYS} keys", busy))),
              "", "## Memory", "", "| measure | value |", "|---|---|",
              f"| RSS idle, {KEYS} keys loaded | {rss_idle:.1f} MB |",
              f"| RSS idle, 1 key | {rss1:.1f} MB |",
              f"| peak RSS (VmHWM) during start-up | {hwm_start:.1f} MB |",
              f"| RSS after {RELOADS} reloads / peak (VmHWM) | {rss_after_reload:.1f} MB / "
              f"{hwm:.1f} MB |"]
    # The same under the image's malloc settings (the Dockerfile's ENV).
    env = image_env()
    if env:
        h.stop(p)
        p, _ = start_gateway(big, "gw-big-image-env", env=env)
        rss_idle_env = settle(p.pid)
        _, rss_env, hwm_env = reloads(p, big)
        what = " ".join(f"{k}={v}" for k, v in env.items())
        lines += [f"| RSS idle, {KEYS} keys, with the image's `{what}` | {rss_idle_env:.1f} MB |",
                  f"| RSS after {RELOADS} reloads / peak (VmHWM), with it | {rss_env:.1f} MB / {hwm_env:.1f} MB |"]
        h.stop(p)
        p, _ = start_gateway(big, "gw-big-again")

    # 3. auth cost: both gateways up at once, each measured in turn on CPU 1, so the host's
    # drift falls on both alike
    p1, _ = start_gateway(small, "gw-one-auth", port=ONE_PORT, admin=ONE_ADMIN)
    gateways = {"big": (p, h.PORT["portcullis"], key_big), "one": (p1, ONE_PORT, key_one)}
    for _, port, key in gateways.values():
        wrk_key(key, 32, 2, port=port)
    runs = {(name, conns): [] for name in gateways for conns in (32, 1)}
    for r in range(AUTH_ROUNDS):
        order = list(gateways) if r % 2 == 0 else list(reversed(gateways))
        for name in order:
            proc, port, key = gateways[name]
            h.log(f"auth cost: round {r + 1}, the {KEYS if name == 'big' else 1}-key gateway")
            for conns in (32, 1):
                before = h.cpu_ticks([proc.pid])
                res = wrk_key(key, conns, AUTH_SECONDS, port=port)
                res["cpu_us"] = (h.cpu_ticks([proc.pid]) - before) / h.CLK_TCK * 1e6 / max(res["requests"], 1)
                runs[(name, conns)].append(res)
    h.stop(p)
    h.stop(p1)

    def ratios(conns, what):
        return [b[what] / o[what] for b, o in zip(runs[("big", conns)], runs[("one", conns)])
                if o[what]]

    def ratio_cell(conns, what):
        rs = ratios(conns, what)
        return f"**{statistics.median_low(rs):.2f}** ({min(rs):.2f}–{max(rs):.2f})" if rs else "—"

    def row(name, label):
        mid = {(conns, what): statistics.median_low([r[what] for r in runs[(name, conns)]])
               for conns in (32, 1) for what in ("rps", "cpu_us", "p50", "p99")}
        return (f"| {label} | {mid[(32, 'rps')]:,.0f} | {mid[(32, 'cpu_us')]:.1f} | "
                f"{mid[(1, 'rps')]:,.0f} | {mid[(1, 'p50')]} | {mid[(1, 'p99')]} |")

    lines += ["", f"## Auth cost (both gateways up at once; {AUTH_ROUNDS} rounds of {AUTH_SECONDS} s wrk "
              "runs each, in turn, order alternating; plain; medians)", "",
              "| snapshot | c=32 req/s | c=32 CPU µs/req | c=1 req/s | c=1 p50 µs | c=1 p99 µs |",
              "|---|---|---|---|---|---|",
              row("big", f"{KEYS} keys, {PROVIDERS} providers"),
              row("one", "1 key, 1 provider"),
              f"| {KEYS} keys / 1, per-round median (range) | {ratio_cell(32, 'rps')} | {ratio_cell(32, 'cpu_us')} | "
              f"{ratio_cell(1, 'rps')} | | |"]

    # 4. per connection / per stream, each on a fresh gateway
    lines += ["", "## Per connection and per stream (fresh 1-key gateway each, so freed "
              "snapshot-loading memory is not reused and hidden)", "",
              "| what | N | RSS before MB | RSS with N open MB | per item KB | failed |",
              "|---|---|---|---|---|---|"]
    ca, cert, cert_key = h.tls_files()  # made in WORK (h.WORK), as the proxy bench makes them
    tls_args = ("--tls-cert", cert, "--tls-key", cert_key)
    for tls in (False, True):
        for mode, n in (("open", IDLE_CONNS), ("idle", IDLE_CONNS), ("idle-second", IDLE_CONNS),
                        ("stream", STREAMS)):
            lines.append(section_four_row(small, key_one, mode, n, ca if tls else None, tls_args))
    for mode, n in (("h2-idle", IDLE_CONNS), ("h2-stream", STREAMS), ("h2-streams", STREAMS)):
        lines.append(section_four_row(small, key_one, mode, n, None, tls_args))
    lines += at_the_limit(small, key_one)
    h.stop(up)
    lines += ["", "## Host", "",
              f"load average {load0} at start, {h.loadavg()} at end; other busy processes at "
              f"start: {', '.join(busy0) or 'none'}, at end: "
              f"{', '.join(h.foreign_processes()) or 'none'}", ""]
    text = "\n".join(lines)
    with open(os.path.join(h.OUT, f"scale-{h.STAMP}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(h.OUT, "scale-latest.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    try:
        main()
    finally:
        for proc in list(h.procs):
            h.stop(proc)
