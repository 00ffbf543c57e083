#!/usr/bin/env python3
"""The EWS read path alone: what an import asks of EwsSource, for every room of a simulated Exchange, and the CPU
the gateway's process spends on it (the simulator runs in a process of its own, on the other core).

Per room, as an import of a room never imported does: changes(room, None, detailed=False) until the last page
(SyncFolderItems; its first call verifies the room, so no GetFolder), read_window over -7 d .. +365 d (FindItem
CalendarView, GetItem of the meetings).

    .venv/bin/python scripts/bench-ews-read.py --rooms 200 [--profile out.prof] [--top 25] [--inline]

Prints one JSON line: rooms, bookings, ews_calls, wall and CPU seconds, CPU per booking; with --profile, the top
entries of a cProfile of the gateway's process (every thread's work is in the pool, so the profile runs the rooms
one after another in this thread instead). --inline runs them that way unprofiled: at 0 ms latency a room's reads
cost 84-99 µs of CPU a booking in one thread and 71-73 µs with ten in flight, so the thread pool is no tax.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import signal
import sys
import time
from concurrent.futures import Executor, Future
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.bench import BenchArgs, _pin, cpu_seconds, one_at_a_time, start_simulator
from gateway.model import Window
from gateway.sources.ews.source import EwsSettings, EwsSource


class _Inline(Executor):
    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:
            f.set_exception(e)
        return f


async def import_room(source: EwsSource, room: str, window: Window) -> int:
    state: str | None = None
    while True:
        page = await source.changes(room, state, detailed=False)
        state = page.sync_state
        if not page.more:
            break
    return len(await source.read_window(room, window))


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rooms", type=int, default=200)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--profile", help="write a cProfile of the reads (run one room at a time) to this file")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--inline", action="store_true",
                   help="run the rooms one after another in this thread, unprofiled: the CPU the reads cost without "
                        "the thread pool's handoffs and switching (compare with a run at --concurrency N)")
    a = p.parse_args()
    _pin(1)
    proc, info = start_simulator(BenchArgs(rooms=a.rooms, latency_ms=a.latency_ms))
    try:
        rooms = [r["email"] for r in info["rooms"]]
        sa = info["service_account"]
        source = EwsSource(EwsSettings(ews_url=info["ews_url"], username=sa["username"],
                                       default_timezone="Europe/Berlin", max_workers=a.concurrency),
                           sa["password"])
        now = datetime.now(UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        window = Window(day - timedelta(days=7), now + timedelta(days=365))
        await import_room(source, rooms[0], window)  # warm: sessions, NTLM, imports
        slots = asyncio.Semaphore(a.concurrency)

        async def one(room: str) -> int:
            async with slots:
                return await import_room(source, room, window)

        # CPU time, not wall time: on a loaded machine, waits would otherwise look like work.
        profiler = cProfile.Profile(time.process_time) if a.profile else None
        calls0 = source.calls.total()
        t0, cpu0, sim0 = time.monotonic(), cpu_seconds(), cpu_seconds(proc.pid)
        if profiler is not None or a.inline:
            # cProfile sees only its own thread: run the blocking parts here, one room after another.
            source._pool = _Inline()  # type: ignore[assignment]
            source.bind_calls()
            if profiler is not None:
                profiler.enable()
            counts = []
            for room in rooms:
                counts.append(await import_room(source, room, window))
            if profiler is not None:
                profiler.disable()
        else:
            counts = await asyncio.gather(*(one(r) for r in rooms))
        wall, cpu, sim = time.monotonic() - t0, cpu_seconds() - cpu0, cpu_seconds(proc.pid) - sim0
        bookings = sum(counts)
        print(json.dumps({"rooms": len(rooms), "bookings": bookings, "ews_calls": source.calls.total() - calls0,
                          "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                          "simulator_cpu_seconds": round(sim, 2),
                          "cpu_us_per_booking": round(cpu / max(1, bookings) * 1e6, 1),
                          "profiled": profiler is not None, "inline": a.inline or profiler is not None}))
        await source.close()
        if profiler is not None:
            profiler.dump_stats(a.profile)
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(a.top)
            print(out.getvalue())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)


if __name__ == "__main__":
    with one_at_a_time():
        asyncio.run(main())
