#!/usr/bin/env bash
# Where a CNI DEL's time goes, weft's and the reference bridge plugin's: runs `weft-lab bench
# cni` under `perf sched record -g` (every context switch, with its kernel stack) and splits
# each DEL process's life (exec to exit) into its sleep in the kernel's
#   rcu_barrier <- netdev_run_todo <- rtnl_dellink
# (unregistering a veth waits for an RCU grace period, whoever deletes it) and the rest.
#
#   bash tests/del-trace.sh [pods]        # as root, after cargo build --release --bins
#
# Needs perf (linux-perf) and python3. README "CNI" quotes its last output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=tests/lib.sh
. tests/lib.sh
pods=${1:-40}
command -v perf >/dev/null || ensure_packages linux-perf
command -v python3 >/dev/null || ensure_packages python3
ensure_packages containernetworking-plugins
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
perf sched record -a -g -o "$work/sched.data" -- env WEFT_LAB_DIR=/run/weft-lab-deltrace \
	target/release/weft-lab --prefix wdt bench cni --pods "$pods" | tail -4
perf sched timehist -i "$work/sched.data" -g --state 2>/dev/null >"$work/timehist.txt"
python3 - "$work/timehist.txt" <<'PY'
import re, statistics, sys
from collections import defaultdict

rows = []
line = re.compile(r'\s*([\d.]+)\s+\[\d+\]\s+(\S+?)\[(\d+)(?:/(\d+))?\]\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+(\S)\s*(.*)')
for l in open(sys.argv[1]):
    m = line.match(l)
    if m:
        t, comm, tid, tgid, run, state, stack = m.groups()
        rows.append((float(t), comm, tid, tgid or tid, float(run) / 1000, state, stack))
# A line is a run slice ending at t (switched out in `stack`). Per plugin process: its exec
# (first slice under the plugin's name), its main thread's exit, the deleting thread's switch
# into rcu_barrier, and the next slice of that thread (weft joins it: any of its threads).
start, end, barrier, resumed, plugin = {}, {}, {}, {}, {}
for t, comm, tid, tgid, run, state, stack in rows:
    if comm in ('weft', 'bridge'):
        plugin.setdefault(tgid, comm)
        start.setdefault(tgid, t - run)
        if tid == tgid and state == 'X':
            end[tgid] = t
        if 'rcu_barrier' in stack and tgid not in barrier:
            barrier[tgid] = (tid, t)
            continue
    if tgid in barrier and tgid not in resumed:
        btid, bt = barrier[tgid]
        if tid == btid or comm == 'weft':
            resumed[tgid] = t - run
dels = defaultdict(list)
for g, (_, bt) in barrier.items():
    if g in end and g in resumed:
        life, wait = (end[g] - start[g]) * 1000, (resumed[g] - bt) * 1000
        dels[plugin[g]].append((life, wait, life - wait))
for p, v in sorted(dels.items()):
    p50 = lambda i: statistics.median(x[i] for x in v)
    print(f"{p}: {len(v)} DELs, exec to exit p50 {p50(0):.2f} ms = asleep in rcu_barrier p50 "
          f"{p50(1):.2f} ms (min {min(x[1] for x in v):.2f}, max {max(x[1] for x in v):.2f}) "
          f"+ the rest p50 {p50(2):.2f} ms")
PY
