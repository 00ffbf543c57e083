"""`gateway bench` in this process, with the CPU each stage of the read path spent: named functions timed by their
thread's CPU time, each net of the named functions it calls, so that the figures add up to the process's CPU. The
garbage collector's share is shown apart (it is inside whichever function allocated). Where bench_threads.py says
which thread, this says which code; the profile that guided issue 13's work.

    .venv/bin/python scripts/bench_functions.py --rooms 1000 --only sync --duration 1 --no-restart --json
    .venv/bin/python scripts/bench_functions.py --functions gateway.sync.engine:plan --rooms 100 --only sync

``--functions`` (before the bench's own options) names others, ``module:qualified.name`` and comma-separated, in
place of the default stages. A function is replaced wherever a gateway module holds it (``from x import f`` too),
not where it was kept otherwise (a default argument, a dict). Wrapping adds about a microsecond a call (two reads
of the thread's clock): the sum comes out above a plain run's CPU, most for functions called per item. With
``--json`` the bench's JSON says how many bookings were imported, and each stage is shown per booking too; the
steady state and the restart are in the figures, so ``--duration 1 --no-restart`` leaves mostly the import.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import io
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

STAGES = (  # (what it is, where): the import's path, from the HTTP exchange to the store's commit
    ("HTTP exchange", "gateway.sources.ews.transport:post"),
    ("request making", "gateway.sources.ews.wire:Wire.request"),
    ("SOAP parse", "gateway.sources.ews.wire:Wire._messages"),
    ("SyncFolderItems reading", "gateway.sources.ews.wire:Wire.sync_items"),
    ("CalendarView reading", "gateway.sources.ews.wire:Wire.calendar_view"),
    ("view pieces", "gateway.sources.ews.source:EwsSource._view"),
    ("GetItem reading", "gateway.sources.ews.wire:Wire.get_items"),
    ("details", "gateway.sources.ews.source:EwsSource._details"),
    ("meeting UID", "gateway.sources.ews.mapping:element_uid"),
    ("mapping", "gateway.sources.ews.mapping:bookings_from_xml"),
    ("privacy", "gateway.sync.coordinator:Coordinator._private"),
    ("plan", "gateway.sync.engine:plan"),
    ("events", "gateway.sync.coordinator:Coordinator.events"),
    ("store commit", "gateway.store.sqlite:SqliteStore.commit_syncs"),
    ("other, EWS threads", "concurrent.futures.thread:_WorkItem.run"),
    ("other, event loop", "asyncio.events:Handle._run"),
)

net: Counter[str] = Counter()  # label -> thread CPU seconds, net of wrapped callees
calls: Counter[str] = Counter()
_stack = threading.local()
_gc = {"seconds": 0.0, "runs": 0, "started": 0.0}


def wrap(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        stack = getattr(_stack, "inner", None)
        if stack is None:
            stack = _stack.inner = []
        t0 = time.thread_time()
        stack.append(0.0)
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.thread_time() - t0
            inner = stack.pop()
            net[label] += spent - inner
            calls[label] += 1
            if stack:
                stack[-1] += spent
    timed.__wrapped__ = fn  # type: ignore[attr-defined]
    return timed


def install(stages: list[tuple[str, str]]) -> None:
    """Replace each function by its timed self: on its owner (module or class) and in every gateway module that
    imported it by name."""
    importlib.import_module("gateway.bench")  # (what the bench imports is what holds references)
    for label, where in stages:
        module_name, _, qualname = where.partition(":")
        owner: Any = importlib.import_module(module_name)
        *path, name = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)
        timed = wrap(label, original)
        setattr(owner, name, timed)
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("gateway") and module is not owner:
                for attr, value in list(vars(module).items()):
                    if value is original:
                        setattr(module, attr, timed)


def on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc["started"] = time.thread_time()
    else:
        _gc["seconds"] += time.thread_time() - _gc["started"]
        _gc["runs"] += 1


class Tee(io.TextIOBase):
    """stdout as it was, and a copy (the bench's JSON says how many bookings there were)."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return int(self.out.write(text))

    def flush(self) -> None:
        self.out.flush()


def bookings(printed: str) -> int | None:
    for line in reversed(printed.strip().splitlines()):
        try:
            out = json.loads(line)
        except ValueError:
            continue
        parts = out.get("scale") or [out]
        found = [p["import"]["bookings"] for p in parts if isinstance(p.get("import"), dict)]
        return sum(found) if found else None
    return None


def report(tee: Tee, started: float) -> None:
    times = os.times()
    process = times.user + times.system - started
    total = sum(net.values())
    n = bookings(tee.copy.getvalue())
    err = sys.stderr
    print("CPU by function (thread CPU, net of the functions below it that are named too):", file=err)
    head = f"  {'stage':24s} {'seconds':>8s} {'calls':>9s} {'µs a call':>10s}"
    print(head + (f" {'µs a booking':>13s}" if n else ""), file=err)
    for label, seconds in net.most_common():
        line = f"  {label:24s} {seconds:8.3f} {calls[label]:9d} {seconds / calls[label] * 1e6:10.1f}"
        print(line + (f" {seconds / n * 1e6:13.1f}" if n else ""), file=err)
    print(f"  {'(sum)':24s} {total:8.3f}" + (f" {'':20s} {total / n * 1e6:13.1f}" if n else ""), file=err)
    print(f"  process CPU {process:.3f} s; garbage collection {_gc['seconds']:.3f} s in {_gc['runs']} runs "
          f"(inside the stages above){f'; {n} bookings imported' if n else ''}", file=err)


def main() -> None:
    args = sys.argv[1:]
    stages = list(STAGES)
    if args[:1] == ["--functions"] and len(args) > 1:
        stages = [(where.rpartition(":")[2], where) for where in args[1].split(",") if where]
        args = args[2:]
    install(stages)
    started = sum(os.times()[:2])  # (after the imports: the bench's own work from here)
    gc.callbacks.append(on_gc)
    tee = Tee(sys.stdout)
    sys.stdout = tee
    atexit.register(report, tee, started)
    from gateway.cli import main as gateway_main
    sys.argv = ["gateway", "bench", *args]
    gateway_main()


if __name__ == "__main__":
    main()
