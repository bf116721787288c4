#!/usr/bin/env python3
"""Self cost per function from `callgrind_annotate --inclusive=no` output, merged across the
source files inlining splits it into, with each function's share and a per-request figure.

usage: cg_top.py ANNOTATE_TXT REQUESTS [N]
"""
import re
import sys
from collections import defaultdict

path, requests = sys.argv[1], int(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 40
total = None
cost = defaultdict(int)
line_re = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*?):(.*?)(?: \[(.*)\])?$")
for line in open(path):
    if "PROGRAM TOTALS" in line:
        total = int(line.split()[0].replace(",", ""))
        continue
    m = line_re.match(line)
    if not m:
        continue
    ir = int(m.group(1).replace(",", ""))
    fn = m.group(3)
    fn = re.sub(r"::\{\{closure\}\}", "", fn)
    cost[fn] += ir
print(f"total {total:,} Ir over {requests} requests = {total / requests:,.0f} Ir/request")
print(f"{'Ir/req':>8} {'%':>6}  function")
for fn, ir in sorted(cost.items(), key=lambda kv: -kv[1])[:n]:
    print(f"{ir / requests:8,.0f} {ir / total * 100:5.1f}%  {fn[:150]}")
