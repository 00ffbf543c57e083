"""The gateway killed with SIGKILL in the middle of a sync, and started again: every change exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.model import EVENT_TYPES
from gateway.simulator.server import SimulatorConfig
from gateway.store.sqlite import SqliteStore
from tests.conftest import wait_for

ROOMS = ["room1@contoso.com", "room2@contoso.com", "room3@contoso.com"]
ROOT = Path(__file__).resolve().parents[1]


def seed(ews, sizes: list[int]) -> None:  # type: ignore[no-untyped-def]
    def run() -> None:
        cal = ews.sim.calendars
        base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=1)
        for r, size in zip(ROOMS, sizes, strict=True):
            mb = ews.sim.directory.get(r)
            for i in range(size):
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


def test_sigkill_mid_import_then_restart_yields_every_booking_exactly_once(sim_factory, tmp_path):
    ews = sim_factory(SimulatorConfig(rba_delay=0.05))
    sizes = [40, 140, 240]  # read with one, two and three GetItem calls: the rooms' imports end one after another
    seed(ews, sizes)
    ews.call(lambda: ews.sim.faults.latency.update({"GetItem": 0.15}))  # a slow Exchange: kills land mid-import
    store = tmp_path / "gateway.sqlite"
    rng = random.Random(7)
    created, total = EVENT_TYPES["created"], sum(sizes)
    imported = lambda: sum(1 for e in events(store) if e.type == created)  # noqa: E731
    read = lambda: ews.call(lambda: ews.sim.calls[("GetItem", "NoError")])  # noqa: E731
    kills = []
    for n in range(4):  # killed four times during the import: in the middle of its reads, or just after a commit
        proc = start_gateway(ews.url, store)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
            if n % 2 == 0:
                reads = read() + rng.randint(1, 3)
                wait_for(lambda: read() >= reads or imported() == total, 60)  # noqa: B023 (this round's)
            else:
                before = imported()
                wait_for(lambda: imported() > before, 60)  # noqa: B023 (this round's)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            proc.stdout.close()  # type: ignore[union-attr]
        kills.append(imported())
        print("killed with", kills[-1], "bookings in the outbox")
    # By the second kill at most two rooms had ended their import: the restart found a partial one.
    assert 0 < kills[1] < total, kills
    proc = start_gateway(ews.url, store)
    try:
        wait_for(lambda: imported() >= total, 120, what="the import after the last restart")
        # Change something while it runs, to see a live update arrive too.
        ews.call(lambda: ews.sim.calendars.create(ews.sim.directory.get(ROOMS[0]), {
            "start": datetime.now(UTC) + timedelta(days=2, minutes=10),
            "end": datetime.now(UTC) + timedelta(days=2, minutes=40), "subject": "Late"}))
        wait_for(lambda: imported() == total + 1, 60, what="the live change")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        proc.stdout.close()  # type: ignore[union-attr]
    evs = events(store)
    counts = Counter((e.data["id"], e.type) for e in evs if "booking" in e.type)
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
    assert sum(1 for (_, t) in counts if t == created) == total + 1
    assert not [k for k in counts if k[1] == EVENT_TYPES["deleted"]]
    per_room_seq: dict[str, list[int]] = {}
    for e in evs:
        per_room_seq.setdefault(e.room, []).append(e.sequence)
    assert all(seq == sorted(seq) and len(set(seq)) == len(seq) for seq in per_room_seq.values())
