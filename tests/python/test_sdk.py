"""The official OpenAI and Anthropic Python SDKs against the Portcullis data plane.

The gateway runs the quickstart (examples/quickstart): the built-in mock provider serving
gpt-4o-mini, text-embedding-3-small and claude-3-5-haiku-latest, and the demo client key.

Also here, because it needs the same running gateway: the benchmark's `nginx-fields` anchor
(bench/harness.py) checked against the response fields this gateway adds.

Binary: $PORTCULLIS_DATAPLANE_BIN, else <repo>/target/debug/portcullis-dataplane.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"
DEMO_KEY = "pcl_demo_NOT_A_SECRET_quickstart_only_0123456789"
BAD_KEY = "pcl_not_a_real_key_0000000000000000000000000000"


def _binary() -> Path:
    env = os.environ.get("PORTCULLIS_DATAPLANE_BIN")
    if env:
        return Path(env)
    for profile in ("debug", "release"):
        candidate = REPO / "target" / profile / "portcullis-dataplane"
        if candidate.is_file():
            return candidate
    pytest.fail("portcullis-dataplane not built; run `cargo build -p portcullis-dataplane` or set PORTCULLIS_DATAPLANE_BIN")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    def __init__(self) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="portcullis-sdk-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin = 0

    def start(self) -> None:
        binary = _binary()
        for _attempt in range(4):
            self.port, self.admin = _free_port(), _free_port()
            self.proc = subprocess.Popen(
                [
                    str(binary),
                    "--manifests", str(QUICKSTART),
                    "--listen", f"127.0.0.1:{self.port}",
                    "--admin-listen", f"127.0.0.1:{self.admin}",
                ],
                stdout=self.log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    if httpx.get(f"http://127.0.0.1:{self.admin}/readyz", timeout=1).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.stop()
                pytest.fail(f"gateway not ready within 30s:\n{self.output()}")
            if "address already in use" not in self.output().lower():
                pytest.fail(f"gateway exited ({self.proc.returncode}):\n{self.output()}")
        pytest.fail(f"gateway could not bind free ports:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    @property
    def openai_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def gateway():
    gw = Gateway()
    gw.start()
    yield gw
    code = gw.stop()
    try:
        assert code == 0, f"gateway exit code {code}:\n{gw.output()}"
    finally:
        os.unlink(gw.log.name)


@pytest.fixture()
def oai(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(api_key=DEMO_KEY, base_url=gateway.openai_base, max_retries=0, timeout=30)


@pytest.fixture()
def ant(gateway: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=DEMO_KEY, base_url=gateway.anthropic_base, max_retries=0, timeout=30)


def test_chat_completion(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hello"}],
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0


def test_chat_completion_request_id_header(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-request-id": "sdk-req-1234abcd"},
    )
    assert raw.headers.get("x-request-id") == "sdk-req-1234abcd"
    assert raw.parse().choices[0].message.content


def test_chat_completion_streaming(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Count to three"}],
        stream=True,
    )
    chunks = list(stream)
    assert chunks, "no chunks"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    # The client did not ask for usage: no usage-only chunk reaches it.
    assert all(chunk.choices for chunk in chunks), "usage-only chunk leaked to a client that did not ask"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text
    assert chunks[-1].choices[0].finish_reason == "stop" or any(c.choices[0].finish_reason == "stop" for c in chunks)


def test_chat_completion_streaming_with_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Count to three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage_chunks = [c for c in chunks if not c.choices]
    assert len(usage_chunks) == 1, chunks
    usage = usage_chunks[0].usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0


def test_embeddings(oai: openai.OpenAI) -> None:
    resp = oai.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
    assert len(resp.data) >= 1
    assert all(isinstance(x, float) for x in resp.data[0].embedding)
    assert len(resp.data[0].embedding) > 0


def test_models_list(oai: openai.OpenAI) -> None:
    ids = {m.id for m in oai.models.list()}
    assert {"gpt-4o-mini", "text-embedding-3-small", "claude-3-5-haiku-latest"} <= ids, ids


def test_anthropic_messages(ant: anthropic.Anthropic) -> None:
    msg = ant.messages.create(
        model="claude-3-5-haiku-latest",
        max_tokens=64,
        messages=[{"role": "user", "content": "Say hello"}],
    )
    assert msg.type == "message"
    assert msg.role == "assistant"
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0


def test_anthropic_messages_streaming(ant: anthropic.Anthropic) -> None:
    with ant.messages.stream(
        model="claude-3-5-haiku-latest",
        max_tokens=64,
        messages=[{"role": "user", "content": "Count to three"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    assert final.content[0].text == text
    assert final.stop_reason is not None
    assert final.usage.output_tokens > 0


def test_anthropic_raw_stream_events(ant: anthropic.Anthropic) -> None:
    events = list(
        ant.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
    )
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-1] == "message_stop", types
    assert "content_block_delta" in types and "message_delta" in types


def test_openai_bad_key_raises_authentication_error(gateway: Gateway) -> None:
    client = openai.OpenAI(api_key=BAD_KEY, base_url=gateway.openai_base, max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"
    assert err.value.response.headers.get("x-portcullis-error-code") == "invalid_api_key"


def test_anthropic_bad_key_raises_authentication_error(gateway: Gateway) -> None:
    client = anthropic.Anthropic(api_key=BAD_KEY, base_url=gateway.anthropic_base, max_retries=0, timeout=30)
    with pytest.raises(anthropic.AuthenticationError) as err:
        client.messages.create(
            model="claude-3-5-haiku-latest", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.status_code == 401
    assert err.value.body["error"]["type"] == "authentication_error"


def test_unknown_model_raises_not_found(oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    with pytest.raises(anthropic.NotFoundError):
        ant.messages.create(model="claude-no-such", max_tokens=16, messages=[{"role": "user", "content": "hi"}])


def test_no_content_in_gateway_output(gateway: Gateway, oai: openai.OpenAI) -> None:
    marker = f"SDKCANARY{os.getpid()}x{time.monotonic_ns()}"
    oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"say {marker}"}])
    list(
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"say {marker}"}], stream=True
        )
    )
    time.sleep(0.2)
    output = gateway.output()
    assert marker not in output
    assert DEMO_KEY not in output
    metrics = httpx.get(f"http://127.0.0.1:{gateway.admin}/metrics", timeout=5).text
    assert marker not in metrics


def _bench_harness():
    """bench/harness.py as a module (it is a script; importing it starts nothing)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_harness", REPO / "bench" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_nginx_fields_adds_what_the_gateway_adds(gateway: Gateway, tmp_path: Path) -> None:
    """The benchmark's `nginx-fields` anchor must add the fields this gateway adds to a limited
    key's response (names, and the request id's length); otherwise the like-for-like ratio
    compares unlike heads."""
    harness = _bench_harness()
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={"Authorization": f"Bearer {DEMO_KEY}"},
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert resp.status_code == 200
    added = {name for name in resp.headers if name.startswith("x-ratelimit-") or name == "x-request-id"}
    anchor = dict(harness.GATEWAY_FIELDS)
    assert added == set(anchor), f"gateway adds {sorted(added)}, nginx-fields adds {sorted(anchor)}"
    # A generated request id has a fixed shape (the other values depend on the key's limits and
    # the window's age; the bench key's were matched by hand and show in the head-size column).
    assert len(resp.headers["x-request-id"]) == len(anchor["x-request-id"]), resp.headers["x-request-id"]

    conf = Path(harness.nginx_conf(str(tmp_path / "fields"), "nginx-fields")).read_text()
    for name, value in harness.GATEWAY_FIELDS:
        assert f"add_header {name} {value} always;" in conf
    assert f"listen 127.0.0.1:{harness.PORT['nginx-fields']} " in conf
    plain = Path(harness.nginx_conf(str(tmp_path / "plain"), "nginx")).read_text()
    assert "add_header" not in plain and f"listen 127.0.0.1:{harness.PORT['nginx']} " in plain


def test_bench_verdict_judges_the_per_round_median() -> None:
    """With three rounds or more the throughput verdict is the median of the per-round ratios
    (runs made side by side), not the ratio of two median runs that may come from different
    stretches of a noisy host; a miss says by how much to a tenth of a per cent."""
    harness = _bench_harness()

    def run(target: str, rps: float) -> dict:
        # The proxy's CPU per request: Portcullis 9 µs for every 10 of nginx's.
        cpu = 90.0 / rps if target == "portcullis" else 100.0 / rps
        return {"target": target, "mode": "plain", "conns": 32, "rps": rps, "cpu_us_per_req": cpu}

    # Rounds of (Portcullis, nginx): the median runs give 1.05×, the rounds 1.05, 0.98, 0.99.
    rounds = [(105.0, 100.0), (98.0, 100.0), (104.0, 105.0)]
    raw = {
        ("portcullis", "plain", 32): [run("portcullis", p) for p, _ in rounds],
        ("nginx", "plain", 32): [run("nginx", n) for _, n in rounds],
    }
    results = [run("portcullis", 104.0), run("nginx", 100.0)]
    line = harness.verdict(results, raw).splitlines()[0]
    assert "1.040× nginx" in line, line
    assert "MISSED by 1.0 % (per-round median 0.990×)" in line, line
    cpu = harness.verdict(results, raw).splitlines()[1]
    assert "proxy CPU per request" in cpu and "(0.865×; lower is better)" in cpu, cpu

    # Two rounds: too few for a median of pairs; the median runs are judged.
    two = {key: runs[:2] for key, runs in raw.items()}
    line = harness.verdict(results, two).splitlines()[0]
    assert "MET (median runs 1.040×)" in line, line

    # Latency at one connection is shown beside what nginx adds in the same run.
    def c1(target: str, p50: int, p99: int) -> dict:
        return {"target": target, "mode": "plain", "conns": 1, "p50": p50, "p99": p99}

    lines = harness.verdict([c1("direct", 20, 60), c1("nginx", 120, 300), c1("portcullis", 110, 280)], {})
    assert lines == ("- latency added plain c=1: p50 +90 µs (target ≤ 60: MISSED by 30 µs), p99 +220 µs "
                     "(target ≤ 250: MET); nginx adds +100 / +240 µs here"), lines

    # A miss smaller than one per cent is not shown as "0%".
    assert harness.throughput_status(0.998, "one run") == "MISSED by 0.2 % (one run 0.998×)"


def test_bench_baseline_section_pairs_the_rounds() -> None:
    """This build against another (`portcullis-baseline`) is judged round by round: ratios of
    runs made side by side, their median and range; at one connection the latency moved."""
    harness = _bench_harness()

    def run(target: str, conns: int, rps: float, cpu: float, p50: int = 0, p99: int = 0) -> dict:
        return {"target": target, "mode": "plain", "conns": conns, "rps": rps, "cpu_us_per_req": cpu,
                "p50": p50, "p99": p99}

    raw = {
        # Rounds of (this build, baseline): req/s 1.10, 0.90, 1.02; CPU 0.9, 1.2, 0.95.
        ("portcullis", "plain", 32): [run("portcullis", 32, r, c) for r, c in ((110, 9.0), (90, 12.0), (102, 9.5))],
        ("portcullis-baseline", "plain", 32): [run("portcullis-baseline", 32, 100, 10.0)] * 3,
        ("portcullis", "plain", 1): [run("portcullis", 1, 10, 50.0, 100, 200)],
        ("portcullis-baseline", "plain", 1): [run("portcullis-baseline", 1, 10, 50.0, 110, 190)],
    }
    lines = harness.baseline_ratios(raw).splitlines()
    assert lines == [
        "- plain c=1: req/s 1.000× the baseline (1.00–1.00 over 1 round(s)), proxy CPU per request 1.000× "
        "(1.00–1.00; lower is better), p50 -10 µs, p99 +10 µs",
        "- plain c=32: req/s 1.020× the baseline (0.90–1.10 over 3 round(s)), proxy CPU per request 0.950× "
        "(0.90–1.20; lower is better)",
    ], lines
    # Without a baseline in the run there is no section.
    assert harness.baseline_ratios({k: v for k, v in raw.items() if k[0] == "portcullis"}) == ""


def test_bench_refuses_ports_something_else_holds() -> None:
    """A bench target that cannot bind its port would have its readiness check answered by
    whatever holds it, and the run would measure that; the bench names the port and stops."""
    harness = _bench_harness()
    with socket.socket() as held, socket.socket() as probe:
        held.bind(("127.0.0.1", 0))
        held.listen()
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        probe.close()
        ports = {"nginx": held.getsockname()[1], "upstream": free}
        assert harness.busy_ports(ports) == [("nginx", ports["nginx"])]
        with pytest.raises(SystemExit, match=f"{ports['nginx']} \\(nginx\\)"):
            harness.require_free_ports(ports)
    assert harness.busy_ports(ports) == []
    harness.require_free_ports(ports)


def test_bench_perf_vs_counts_each_proxy_per_request_by_part() -> None:
    """`bench/tools/perf_vs.py` (profile.sh vs-nginx) turns perf's per-symbol periods (ns) into
    CPU µs per request, merged across rounds, split into kernel / proxy code / libc / vDSO; the
    differences are taken symbol by symbol against the first proxy."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("perf_vs", REPO / "bench" / "tools" / "perf_vs.py")
    perf_vs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(perf_vs)

    report = {
        "nginx.data": "# header\n#\n"
        "      4000000   20  [kernel.kallsyms]  [k] _copy_from_iter        -      -  \n"
        "      1500000    8  nginx              [.] ngx_http_parse_header_line  -      -  \n"
        "      1000000    5  libc.so.6          [.] __memmove_avx512_unaligned_erms  -      -  \n",
        "pc-1.data": "      3000000   15  [kernel.kallsyms]  [k] _copy_from_iter        -      -  \n"
        "      1000000    5  portcullis-dataplane [.] <core::pin::Pin<P> as core::future::future::Future>::poll  -  -\n",
        "pc-2.data": "      3000000   15  [kernel.kallsyms]  [k] _copy_from_iter        -      -  \n"
        "       400000    2  [vdso]             [.] __vdso_clock_gettime   -      -  \n"
        "not a row\n",
    }
    nginx, served = perf_vs.per_request([(1000, "nginx.data")], report.__getitem__)
    assert served == 1000
    assert nginx[("kernel", "_copy_from_iter")] == 4.0  # 4 ms over 1000 requests
    assert perf_vs.parts(nginx) == {"kernel": 4.0, "proxy": 1.5, "libc": 1.0}

    ours, served = perf_vs.per_request([(1000, "pc-1.data"), (2000, "pc-2.data")], report.__getitem__)
    assert served == 3000
    assert ours[("kernel", "_copy_from_iter")] == 2.0  # 6 ms over both rounds' 3000 requests
    assert ours[("proxy", "<core::pin::Pin<P> as core::future::future::Future>::poll")] == 1000 / 3000
    assert round(ours[("vdso", "__vdso_clock_gettime")], 6) == round(400 / 3000, 6)

    table = perf_vs.table({"nginx": (nginx, 1000), "portcullis": (ours, 3000)})
    assert "| **total** | **6.50** | **2.47** |" in table, table
    assert "| kernel | `_copy_from_iter` | 4.000 | 2.000 | -2.000 |" in table, table
    # Sorted by the size of the difference: the kernel copy first.
    rows = [line for line in table.splitlines() if line.startswith("| kernel |") or line.startswith("| proxy |")]
    assert rows[2].startswith("| kernel | `_copy_from_iter`"), rows


def test_bench_scale_reads_the_images_environment_from_the_dockerfile() -> None:
    """`bench/scale.sh` measures RSS after reloads also under the data-plane image's `ENV` (the
    malloc setting the figure in the Dockerfile's comment comes from), read from the Dockerfile
    itself so the two cannot drift apart."""
    import importlib.util
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("scale", REPO / "bench" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    env = scale.image_env()
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=262144:glibc.malloc.trim_threshold=8388608"}, env
