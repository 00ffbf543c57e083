"""Helpers of the tests of the simulator's Graph side (tests/test_simulator_graph*.py)."""

from __future__ import annotations

import selectors
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.simulator.control import Control
from tests.conftest import GraphSim, wait_for


def tomorrow(hour: int, minute: int = 0) -> datetime:
    day = (datetime.now(UTC) + timedelta(days=1)).date()
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def meeting(g: GraphSim, organizer: str, rooms: list[str], subject: str, start: datetime, minutes: int = 30,
            **extra: Any) -> str:
    """A meeting created as Outlook would; returns its UID once every room's attendant has answered."""
    def create() -> str:
        item = Control.of(g.sim).create_meeting(organizer=organizer, rooms=rooms, subject=subject,
                                                start=start.isoformat(), end=(start + timedelta(minutes=minutes))
                                                .isoformat(), **extra)
        return item.uid
    uid = g.call(create)
    settle(g)
    return uid


def settle(g: GraphSim) -> None:
    """Wait until every room's booking attendant has answered what it was sent."""
    wait_for(lambda: g.call(lambda: g.sim.attendant.idle.is_set()), what="the booking attendant")


def z(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def view(g: GraphSim, user: str, start: datetime, end: datetime, **headers: str) -> list[dict]:
    status, body, _ = g.request("GET", f"/users/{user}/calendarView?startDateTime={z(start)}"
                                       f"&endDateTime={z(end)}", headers=headers)
    assert status == 200, body
    return body["value"]


def event(subject: str, start: datetime, minutes: int = 30, rooms: tuple[str, ...] | list[str] = (),
          **extra: Any) -> dict[str, Any]:
    return {"subject": subject,
            "start": {"dateTime": start.strftime("%Y-%m-%dT%H:%M:%S.0000000"), "timeZone": "UTC"},
            "end": {"dateTime": (start + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S"),
                    "timeZone": "UTC"},
            "attendees": [{"emailAddress": {"address": r}, "type": "resource"} for r in rooms], **extra}


def room_answer(g: GraphSim, organizer: str, event_id: str, room: str) -> str:
    """The room's answer as the organiser's copy records it, once the attendant has given one."""
    def answered() -> str | None:
        status, body, _ = g.request("GET", f"/users/{organizer}/events/{event_id}")
        assert status == 200, body
        [att] = [a for a in body["attendees"] if a["emailAddress"]["address"] == room]
        return att["status"]["response"] if att["status"]["response"] != "none" else None
    return wait_for(answered, what=f"{room}'s answer")


def first_line(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no line on stdout within {timeout} s")
    return proc.stdout.readline()
