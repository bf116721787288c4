#!/usr/bin/env python3
"""Two proxies' CPU per request, side by side, split by where it went: from `perf record -e
cpu-clock` of each under the same load (`bench/profile.sh` with PROFILE_TOOLS=vs-nginx).

cpu-clock samples carry their period in nanoseconds, so a symbol's summed period divided by the
requests served while recording is its CPU time per request; no sampling rate is assumed.

usage: perf_vs.py NAME=REQUESTS:DATA[,REQUESTS:DATA...] NAME=... [TOP]
       (the first NAME is the reference the differences are taken against)
"""
import re
import subprocess
import sys
from collections import Counter

# `perf report --stdio --sort dso,symbol -F period,sample,dso,symbol`, one row per symbol:
#   <period ns> <samples> <dso> [k|.] <symbol> [- -]
ROW = re.compile(r"^\s*(\d+)\s+\d+\s+(\S+)\s+\[([k.])\]\s+(.*?)(?:\s+-\s+-)?\s*$")


def where(dso, mark):
    """The part of the machine a sample's DSO stands for."""
    if mark == "k" or dso.startswith("[kernel"):
        return "kernel"
    if dso.startswith("libc") or dso.startswith("libm") or dso.startswith("ld-linux"):
        return "libc"
    if dso == "[vdso]":
        return "vdso"
    return "proxy"


def parse(text):
    """{(part, symbol): nanoseconds} from a perf report."""
    spent = Counter()
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = ROW.match(line)
        if m:
            period, dso, mark, symbol = m.groups()
            spent[(where(dso, mark), symbol.strip())] += int(period)
    return spent


def per_request(runs, report=None):
    """Merges several (requests, perf.data) runs into µs per request for each (part, symbol)."""
    report = report or (lambda data: subprocess.run(
        ["perf", "report", "-i", data, "--stdio", "--sort", "dso,symbol",
         "-F", "period,sample,dso,symbol", "--percent-limit", "0"],
        capture_output=True, text=True, check=True).stdout)
    spent, requests = Counter(), 0
    for served, data in runs:
        spent.update(parse(report(data)))
        requests += served
    if requests == 0:
        raise ValueError("no requests served while recording")
    return {key: ns / 1000 / requests for key, ns in spent.items()}, requests


def parts(us):
    out = Counter()
    for (part, _), value in us.items():
        out[part] += value
    return out


def table(named, top=30):
    """Markdown: each proxy's µs per request by part, then the symbols that differ most from the
    first proxy's."""
    names = list(named)
    ref = names[0]
    lines = ["| µs per request | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    split = {n: parts(named[n][0]) for n in names}
    for part in ("kernel", "proxy", "libc", "vdso"):
        lines.append(f"| {part} | " + " | ".join(f"{split[n][part]:.2f}" for n in names) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(split[n].values()):.2f}**" for n in names) + " |")
    lines.append("| requests recorded | " + " | ".join(f"{named[n][1]:,}" for n in names) + " |")
    for other in names[1:]:
        a, b = named[ref][0], named[other][0]
        keys = sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, 0) - a.get(k, 0)))[:top]
        lines += ["", f"Symbols that differ most, µs per request ({other} − {ref}; a proxy's own "
                  "code has different symbols, so its rows pair with zeros):", "",
                  f"| part | symbol | {ref} | {other} | difference |", "|---|---|---|---|---|"]
        for k in keys:
            lines.append(f"| {k[0]} | `{k[1][:90]}` | {a.get(k, 0):.3f} | {b.get(k, 0):.3f} | "
                         f"{b.get(k, 0) - a.get(k, 0):+.3f} |")
    return "\n".join(lines)


def main(argv):
    top = 30
    if argv and argv[-1].isdigit():
        top = int(argv.pop())
    named = {}
    for spec in argv:
        name, _, runs = spec.partition("=")
        pairs = [run.split(":", 1) for run in runs.split(",") if run]
        named[name] = per_request([(int(served), data) for served, data in pairs])
    if len(named) < 2:
        sys.exit(__doc__)
    print(table(named, top))


if __name__ == "__main__":
    main(sys.argv[1:])
