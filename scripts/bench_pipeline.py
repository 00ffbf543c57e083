"""The import pipeline's CPU in process, without a simulator on the way: mapping -> privacy -> plan -> events ->
commit, per stage, in microseconds of CPU per booking.

At the start a few rooms' real CalendarView/GetItem answers are read once from the bundled simulator (started
here, latency 0) and kept as the t:CalendarItem elements the EWS source hands to the mapping; the stages then run
for ``--rooms`` rooms (room i replays captured room i mod ``--capture`` under its own address) into a real SQLite
file, twice: the import (an empty snapshot) and a reconciliation (everything known and unchanged).

    .venv/bin/python scripts/bench_pipeline.py --rooms 200
    .venv/bin/python scripts/bench_pipeline.py --rooms 200 --profile import   # cProfile's top entries
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.bench import launch_simulator
from gateway.model import Room, Window
from gateway.sources.ews import source as ews_source
from gateway.sources.ews.mapping import bookings_from_xml
from gateway.sources.ews.source import EwsSettings, EwsSource
from gateway.store.sqlite import SqliteStore
from gateway.sync.coordinator import COMMIT_BATCH, Coordinator, SyncSettings

DEFAULT_TZ = "Europe/Berlin"  # as `gateway bench` configures the source


@dataclass
class Capture:
    """One room's CalendarView instances (meeting UID, t:CalendarItem) and its meetings' GetItem answers by UID."""

    items: list[tuple[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def capture(rooms: int) -> list[Capture]:
    """``rooms`` rooms' CalendarView and GetItem answers, as the EWS source hands them to the mapping."""
    cmd = [sys.executable, "-m", "gateway", "simulator", "--port", "0", "--rooms", str(rooms), "--users", "20",
           "--activity", "0", "--graph-rooms", "0", "--latency-ms", "0", "--no-response-validation",
           "--log-level", "warning", "--log-format", "json"]
    proc, info = launch_simulator(cmd)
    try:
        source = EwsSource(EwsSettings(ews_url=info["ews_url"], username=info["service_account"]["username"],
                                       default_timezone=DEFAULT_TZ, max_workers=2),
                           info["service_account"]["password"])
        out: list[Capture] = []
        real = ews_source.bookings_from_xml

        def record(items: Any, room: str, default_tz: str = "UTC", details: Any = None) -> Any:
            out.append(Capture(list(items), dict(details or {})))
            return real(out[-1].items, room, default_tz, details)

        ews_source.bookings_from_xml = record  # type: ignore[assignment]
        try:
            for room in (r["email"] for r in info["rooms"]):
                asyncio.run(source.read_window(room, window()))
        finally:
            ews_source.bookings_from_xml = real  # type: ignore[assignment]
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def window() -> Window:
    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return Window(day - timedelta(days=7), now + timedelta(days=365))


class Stages:
    """CPU seconds per stage (process time)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.process_time()
        result = fn()
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - t0
        return result


def run_pass(store: SqliteStore, coordinator: Coordinator, captured: list[Capture], rooms: int,
             stages: Stages, batch: int = 1) -> tuple[int, int]:
    """One pass over every room: what the coordinator's reconcile does once the source has read the window, with
    ``batch`` rooms' steps per store transaction. Returns (bookings read, events committed)."""
    from gateway.sync.engine import Scope, plan

    read = events = 0
    steps: list[tuple[str, dict[str, Any]]] = []
    scope = Scope(window())
    now = datetime.now(UTC)
    for i in range(rooms):
        room = f"bench-{i:05d}@contoso.com"
        c = captured[i % len(captured)]

        def mapping(c: Capture = c, room: str = room) -> list[Any]:
            return bookings_from_xml(c.items, room, DEFAULT_TZ, c.details)

        observed = stages.run("mapping", mapping)
        read += len(observed)
        observed = stages.run("privacy", lambda o=observed, r=room: coordinator._private(r, o))
        known = stages.run("known", lambda r=room: store.known(r))
        result = stages.run("plan", lambda k=known, o=observed: plan(k, o, scope, now))
        evs = stages.run("events", lambda r=result: coordinator.events(r, datetime.now(UTC)))
        steps.append((room, {"upserts": result.created + result.updated, "deletes": [b.id for b in result.deleted],
                             "events": evs, "confirmed_at": now, "confirmed_window": scope.window}))
        if len(steps) >= batch or i == rooms - 1:
            # as the coordinator commits: the steps that meet at the store share a transaction
            outcomes = stages.run("commit", lambda s=steps: store.commit_syncs(s))
            problems = [o for o in outcomes if isinstance(o, Exception)]
            if problems:
                raise problems[0]
            steps = []
        events += len(evs)
    return read, events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=200, help="rooms to run through the pipeline (default 200)")
    parser.add_argument("--capture", type=int, default=5, help="rooms read from the simulator (default 5)")
    parser.add_argument("--profile", choices=("import", "reconcile"), help="cProfile one pass and print its top")
    parser.add_argument("--top", type=int, default=30, help="profile entries to print (default 30)")
    parser.add_argument("--batch", type=int, default=1,
                        help="rooms' steps per store transaction (the coordinator batches up to "
                             f"{COMMIT_BATCH} when they meet at the store; default 1)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    t0 = time.monotonic()
    captured = capture(args.capture)
    per_room = [len(c.items) for c in captured]
    print(f"captured {sum(per_room)} instances of {len(captured)} rooms ({per_room}) in "
          f"{time.monotonic() - t0:.1f} s", file=sys.stderr)
    work = tempfile.TemporaryDirectory(prefix="bench-pipeline-", ignore_cleanup_errors=True)
    path = Path(work.name) / "gateway.sqlite"
    store = SqliteStore(path)
    coordinator = Coordinator(source=None, store=store, settings=SyncSettings())  # type: ignore[arg-type]
    for i in range(args.rooms):
        store.upsert_room(Room(f"bench-{i:05d}@contoso.com"))
    figures: dict[str, Any] = {"rooms": args.rooms, "batch": args.batch}
    for phase in ("import", "reconcile"):
        stages = Stages()
        profiler = cProfile.Profile() if args.profile == phase else None
        if profiler:
            profiler.enable()
        read, events = run_pass(store, coordinator, captured, args.rooms, stages, args.batch)
        if profiler:
            profiler.disable()
        total = sum(stages.cpu.values())
        figures[phase] = {"bookings": read, "events": events,
                          "us_per_booking": {k: round(v / read * 1e6, 1) for k, v in stages.cpu.items()}
                          | {"total": round(total / read * 1e6, 1)}}
        if profiler:
            print(f"-- profile of the {phase} pass (cumulative)", file=sys.stderr)
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(args.top)
            print(f"-- profile of the {phase} pass (own time)", file=sys.stderr)
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(args.top)
    store.close()
    work.cleanup()
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for phase in ("import", "reconcile"):
            f = figures[phase]
            stages_text = ", ".join(f"{k} {v}" for k, v in f["us_per_booking"].items())
            print(f"{phase}: {f['bookings']} bookings, {f['events']} events; µs CPU per booking: {stages_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
