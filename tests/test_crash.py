"""The gateway killed with SIGKILL in the middle of a sync, and started again: every change exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.model import EVENT_TYPES
from gateway.simulator.server import SimulatorConfig
from gateway.store.sqlite import SqliteStore

ROOMS = ["room1@contoso.com", "room2@contoso.com", "room3@contoso.com"]
ROOT = Path(__file__).resolve().parents[1]


def seed(ews, per_room: int) -> None:  # type: ignore[no-untyped-def]
    def run() -> None:
        cal = ews.sim.calendars
        base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=1)
        for r in ROOMS:
            mb = ews.sim.directory.get(r)
            for i in range(per_room):
                start = base + timedelta(hours=3 * i)
                cal.create(mb, {"start": start, "end": start + timedelta(minutes=45), "subject": f"Slot {i}"})
    ews.call(run)


def start_gateway(url: str, store: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.gateway_proc", url, str(store), *ROOMS], env=env,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)


def events(store: Path) -> list:  # type: ignore[type-arg]
    s = SqliteStore(store)
    try:
        return [e.event for e in s.outbox_after(0, 1_000_000)]
    finally:
        s.close()


def wait_for(check, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_sigkill_mid_import_then_restart_yields_every_booking_exactly_once(sim_factory, tmp_path):
    ews = sim_factory(SimulatorConfig(rba_delay=0.05))
    per_room = 150
    seed(ews, per_room)
    ews.call(lambda: ews.sim.faults.latency.update({"GetItem": 0.25}))  # a slow Exchange: kills land mid-import
    store = tmp_path / "gateway.sqlite"
    rng = random.Random(7)
    for _round in range(4):  # killed four times at random moments during the import
        proc = start_gateway(ews.url, store)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
            time.sleep(rng.uniform(0.2, 1.2))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        print("killed with", len(events(store)), "events in the outbox")
    proc = start_gateway(ews.url, store)
    try:
        created = EVENT_TYPES["created"]
        wait_for(lambda: sum(1 for e in events(store) if e.type == created) >= per_room * len(ROOMS), 120)
        # Change something while it runs, to see a live update arrive too.
        ews.call(lambda: ews.sim.calendars.create(ews.sim.directory.get(ROOMS[0]), {
            "start": datetime.now(UTC) + timedelta(days=2, minutes=10),
            "end": datetime.now(UTC) + timedelta(days=2, minutes=40), "subject": "Late"}))
        wait_for(lambda: sum(1 for e in events(store) if e.type == created) == per_room * len(ROOMS) + 1, 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    evs = events(store)
    counts = Counter((e.data["id"], e.type) for e in evs if "booking" in e.type)
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
    assert sum(1 for (_, t) in counts if t == EVENT_TYPES["created"]) == per_room * len(ROOMS) + 1
    assert not [k for k in counts if k[1] == EVENT_TYPES["deleted"]]
    per_room_seq: dict[str, list[int]] = {}
    for e in evs:
        per_room_seq.setdefault(e.room, []).append(e.sequence)
    assert all(seq == sorted(seq) and len(set(seq)) == len(seq) for seq in per_room_seq.values())
