"""`gateway bench` in this process, with the CPU each kind of thread spent: the event loop (MainThread), the EWS
request threads (ews_*), the store's writer (store_*), the streams (ews-stream_*). Read from /proc (Linux), every
0.2 s and at the end, by the threads' Python names; user and system time and context switches apart.

Profilers that sample stacks count a thread waiting for work or for a socket as busy; these are the kernel's own
figures. Compare runs by their ratio to the simulator's CPU (in the JSON): the machine's speed drifts.

    .venv/bin/python scripts/bench_threads.py --rooms 1000 --only sync --duration 2 --no-restart --json
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections import defaultdict

from gateway.cli import main

TICK = os.sysconf("SC_CLK_TCK")
seen: dict[int, tuple[str, float, float, int, int]] = {}  # thread id -> name, user s, system s, switches


def sample() -> None:
    names = {t.native_id: t.name for t in threading.enumerate()}
    for tid_text in os.listdir("/proc/self/task"):
        tid = int(tid_text)
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/status") as f:
                status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        except OSError:
            continue  # (ended meanwhile: its last sample stays)
        name = names.get(tid) or (seen[tid][0] if tid in seen else "?")
        seen[tid] = (name, int(fields[11]) / TICK, int(fields[12]) / TICK,
                     int(status["voluntary_ctxt_switches"]), int(status["nonvoluntary_ctxt_switches"]))


def sampler() -> None:
    while True:
        sample()
        time.sleep(0.2)


def report() -> None:
    sample()
    kinds: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for name, user, system, voluntary, forced in seen.values():
        kind = kinds[name.rsplit("_", 1)[0] if name[-1:].isdigit() else name]
        kind[0] += user
        kind[1] += system
        kind[2] += voluntary
        kind[3] += forced
    print("CPU by thread (s): user, system; context switches: voluntary, forced", file=sys.stderr)
    for kind_name, (u, s, v, f) in sorted(kinds.items(), key=lambda kv: -kv[1][0] - kv[1][1]):
        print(f"  {kind_name:16s} {u:8.2f} {s:7.2f} {int(v):9d} {int(f):9d}", file=sys.stderr)


if __name__ == "__main__":
    threading.Thread(target=sampler, daemon=True, name="sampler").start()
    atexit.register(report)
    sys.argv = ["gateway", "bench", *sys.argv[1:]]
    main()
