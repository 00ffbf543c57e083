"""`gateway demo` as a newcomer meets it: the booking it proposes is accepted, its output stays readable, and it
leaves no process or folder behind, even when killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.demo import MARGIN, describe, free_slot, group
from gateway.model import EVENT_TYPES, Booking, Event
from gateway.ports import OutboxEntry
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
TZ = ZoneInfo("Europe/Berlin")


# -- what it prints --------------------------------------------------------------------------------------------
def entry(seq: int, kind: str, start: datetime, series: str | None = None, room: str = "room1@contoso.com",
          subject_is_organizer_name: bool = True) -> OutboxEntry:
    data = {"start": start.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "end": (start + timedelta(hours=1)).astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "subject": "Ivan Anders", "subject_is_organizer_name": subject_is_organizer_name,
            "organizer": {"email": "ivan@contoso.com"}, "series_id": series}
    event = Event(id=f"e{seq}", type=EVENT_TYPES[kind], room=room, subject=f"b{seq}", time=start, data=data,
                  sequence=seq)
    return OutboxEntry(seq=seq, room_seq=seq, event=event, created_at=start)


def test_a_series_prints_one_line_and_times_carry_their_zone() -> None:
    monday = datetime(2030, 1, 7, 12, 0, tzinfo=TZ)
    moved = [entry(n, "deleted", monday + timedelta(weeks=n), "s1") for n in range(12)]
    moved += [entry(12 + n, "created", monday + timedelta(weeks=n, hours=2), "s1") for n in range(12)]
    single = entry(30, "created", datetime(2030, 7, 1, 9, 0, tzinfo=TZ), subject_is_organizer_name=False)
    lines = [describe(members[0], TZ, members) for members in group([*moved, single])]
    assert len(lines) == 3, lines
    assert "deleted" in lines[0] and "Mon 07 Jan 12:00-13:00 CET" in lines[0]
    assert "(weekly series, 12 occurrences, the last on Mon 25 Mar)" in lines[0]
    assert "created" in lines[1] and "Mon 07 Jan 14:00-15:00 CET" in lines[1] and "Ivan Anders*" in lines[1]
    assert "Mon 01 Jul 09:00-10:00 CEST" in lines[2] and "Ivan Anders*" not in lines[2]  # summer time, named


def test_the_proposed_slot_is_free_with_a_margin_on_a_working_day() -> None:
    friday = datetime(2030, 1, 4, 15, 0, tzinfo=TZ)  # tomorrow is Saturday: the slot goes to Monday
    monday = datetime(2030, 1, 7, tzinfo=TZ)
    taken = Booking(room="room1@contoso.com", uid="u1", start=(monday + timedelta(hours=8, minutes=45)).astimezone(UTC),
                    end=(monday + timedelta(hours=10)).astimezone(UTC))
    slot = free_slot(["room1@contoso.com"], lambda room, start, end: [taken], friday.astimezone(UTC), TZ)
    assert slot is not None
    assert slot.start.astimezone(TZ) == monday + timedelta(hours=10, minutes=30)  # 10:00 is within the margin
    assert slot.start >= taken.end + MARGIN and slot.end - slot.start == timedelta(minutes=30)


# -- the demo in a subprocess ----------------------------------------------------------------------------------
class Demo:
    def __init__(self, tmp: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.lines: list[str] = []
        self.errors: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.errors), daemon=True).start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        with stream:  # closed at the end of the output, not left to the garbage collector
            for line in stream:
                into.append(line.rstrip("\n"))

    def line(self, starting: str, timeout: float = 90) -> str:
        def found() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"the demo exited: {self.lines} {self.errors[-20:]}")
            return next((ln for ln in list(self.lines) if ln.strip().startswith(starting)), None)
        return str(wait_for(found, timeout, what=f"a line starting with {starting!r}"))

    def children(self) -> dict[int, str]:
        """The demo's child processes: pid -> command line."""
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    if ppid == self.proc.pid:
                        found[int(entry.name)] = (entry / "cmdline").read_text().replace("\0", " ")
                except (OSError, IndexError, ValueError):
                    continue
        return found


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # dead, waiting for whoever adopted it to reap it


@pytest.fixture
def demo_tmp(tmp_path: Path) -> Iterator[Path]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    yield tmp


def test_the_booking_the_demo_proposes_is_accepted(demo_tmp: Path) -> None:
    demo = Demo(demo_tmp)
    try:
        book = demo.line("book a room")
        command = book.split("book a room", 1)[1].strip()
        assert command.startswith("curl ") and "/v1/commands" in command
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
        assert json.loads(result.stdout)["status"] == "accepted", result.stdout + result.stderr
        # ... and one in Exchange Online, through Microsoft Graph, in the same stream.
        online = demo.line("book online").split("book online", 1)[1].strip()
        result = subprocess.run(["bash", "-c", online], capture_output=True, text=True, timeout=120)
        assert json.loads(result.stdout)["status"] == "accepted", result.stdout + result.stderr
        demo.line("Times are Europe/Berlin time.")  # the zone is named, and why subjects are people's names
        assert any("AddOrganizerToSubject" in ln for ln in demo.lines)
        assert not [ln for ln in demo.lines if ln.split()[2:3] == ["room"] and "syncing" in ln]
    finally:
        demo.proc.send_signal(signal.SIGINT)
        demo.proc.wait(timeout=60)
    assert demo.proc.returncode == 0, demo.errors[-20:]
    assert wait_for(lambda: not list(demo_tmp.iterdir()), 10, what="the demo's folder removed")


def test_kill_9_of_the_demo_leaves_no_process_and_no_folder_behind(demo_tmp: Path) -> None:
    demo = Demo(demo_tmp, "--rooms", "2", "--users", "4", "--activity", "0")
    try:
        demo.line("Gateway listening")
        children = demo.children()
        simulator = [pid for pid, cmd in children.items() if " simulator " in cmd]
        assert len(simulator) == 1, children
        assert [p.name for p in demo_tmp.iterdir() if p.name.startswith("gateway-demo-")]
    finally:
        demo.proc.kill()
        demo.proc.wait(timeout=10)
    wait_for(lambda: all(gone(pid) for pid in children), 20, what="the simulator and the watcher to end")
    wait_for(lambda: not list(demo_tmp.iterdir()), 20, what="the demo's temporary folder removed")
