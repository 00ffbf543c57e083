"""The command service with the real EwsWriter, over HTTP + NTLM against the EWS simulator.

The resync hook is the real read path in miniature: the room's window read through EwsSource and committed to
the store, so update / cancel / decline find the booking the way they do in the gateway.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.commands import CommandService
from gateway.config import CommandsConfig
from gateway.model import Command, CommandResult, Room, Window
from gateway.relay.protocol import parse_command
from gateway.simulator.control import Control, ControlError
from gateway.simulator.seed import ORGANIZER_ACCOUNT, SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.sources.ews.source import EwsSettings, EwsSource
from gateway.sources.ews.writer import EwsWriter
from gateway.store.journal import CommandJournal
from gateway.store.sqlite import SqliteStore
from tests.conftest import eventually

ROOM1, ROOM2 = "room1@contoso.com", "room2@contoso.com"
ALICE, BOB = "alice@contoso.com", "bob@contoso.com"
T0 = (datetime.now(UTC) + timedelta(days=3)).replace(hour=8, minute=0, second=0, microsecond=0)
WINDOW = Window(T0 - timedelta(days=1), T0 + timedelta(days=7))
_keys = itertools.count(1)


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def command(type_: str = "create", **fields: Any) -> Command:
    doc: dict[str, Any] = {"key": f"ews-{next(_keys)}", "type": type_, "room": ROOM1}
    if type_ == "create":
        doc["start"], doc["end"] = iso(at(0)), iso(at(1))
    doc.update(fields)
    return parse_command(doc)


def organizer(email: str = ALICE, **kw: Any) -> dict[str, Any]:
    return {"organizer": {"email": email, "name": email.split("@")[0].title()}, "subject": "Planning", **kw}


def booker(**kw: Any) -> dict[str, Any]:
    return {"booker": {"name": "Lobby display"}, **kw}


@dataclass
class Gateway:
    ews: Any
    source: EwsSource
    store: SqliteStore
    journal: CommandJournal
    service: CommandService

    async def resync(self, room: str) -> None:
        bookings = await self.source.read_window(room, WINDOW)
        gone = set(self.store.known(room)) - {b.id for b in bookings}
        await asyncio.to_thread(self.store.commit_sync, room, upserts=bookings, deletes=sorted(gone), events=())

    def meeting(self, uid: str) -> dict[str, Any]:
        return self.ews.call(lambda: Control.of(self.ews.sim).meeting_state(uid))

    def room_copy(self, uid: str, room: str = ROOM1) -> dict[str, Any] | None:
        copies = [c for c in self.meeting(uid)["copies"] if c["mailbox"] == room and c["present"]]
        return copies[0] if copies else None

    def in_room(self, room: str = ROOM1) -> list[Any]:
        return [b for b in self.store.bookings(room) if not b.cancelled]


async def start_gateway(ews: Any, path: Any, account: str = ORGANIZER_ACCOUNT, **settings: Any) -> Gateway:
    source = EwsSource(EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{account}", default_timezone="Europe/Berlin",
                                   max_workers=6), SERVICE_PASSWORD)
    store = SqliteStore(path / "gateway.sqlite")
    for room in (ROOM1, ROOM2):
        store.upsert_room(Room(room))
    journal = CommandJournal(store)
    holder: dict[str, Gateway] = {}

    async def resync(room: str, uids: frozenset[str] = frozenset()) -> None:
        await holder["g"].resync(room)  # the whole window, so the meetings the command changed too

    service = CommandService(EwsWriter(source), store, journal,
                             CommandsConfig(**{"attendant_timeout_seconds": 15.0, **settings}),
                             rooms=lambda: (ROOM1, ROOM2), resync=resync)
    g = holder["g"] = Gateway(ews, source, store, journal, service)
    return g


@pytest.fixture
async def gw(ews, tmp_path) -> AsyncIterator[Gateway]:
    g = await start_gateway(ews, tmp_path)
    yield g
    await g.source.close()
    g.store.close()


def accepted_ok(result: CommandResult) -> CommandResult:
    assert result.status == "accepted", result
    assert result.uid and result.booking_id
    return result


async def test_an_organizer_create_waits_for_the_room_and_is_accepted(gw):
    result = accepted_ok(await gw.service.execute(command(**organizer())))
    state = gw.meeting(result.uid)
    assert state["organizer"]["email"] == ALICE
    assert gw.room_copy(result.uid)["response"] == "Accept"  # type: ignore[index]
    # The booking the sync reads back is the one the result named.
    assert [b.id for b in gw.in_room()] == [result.booking_id]


async def test_a_meeting_over_a_booked_slot_is_declined_as_a_conflict_and_withdrawn(gw):
    first = accepted_ok(await gw.service.execute(command(**organizer(BOB))))
    result = await gw.service.execute(command(**organizer(ALICE, start=iso(at(0.5)), end=iso(at(1.5)))))
    assert (result.status, result.reason) == ("declined", "conflict"), result
    assert [b.id for b in gw.in_room()] == [first.booking_id]


async def test_a_booker_gets_an_appointment_in_the_room_calendar_and_a_clash_is_declined(gw):
    cmd = command(**booker())
    result = accepted_ok(await gw.service.execute(cmd))
    state = gw.meeting(result.uid)
    assert state.get("appointment_in") == ROOM1
    assert await gw.service.execute(cmd) == result  # the retried key: the stored answer, nothing new
    clash = await gw.service.execute(command(**booker(start=iso(at(0.75)), end=iso(at(2)))))
    assert (clash.status, clash.reason) == ("declined", "conflict")
    assert [b.id for b in gw.in_room()] == [result.booking_id]


async def test_concurrent_creates_for_one_slot_give_exactly_one_acceptance(gw):
    cmds = [command(**booker()) for _ in range(3)] + [command(**organizer(email)) for email in (ALICE, BOB)]
    results = await asyncio.gather(*(gw.service.execute(c) for c in cmds))
    assert [r.status for r in results].count("accepted") == 1, results
    assert {r.reason for r in results if r.status != "accepted"} == {"conflict"}
    await gw.resync(ROOM1)
    assert len(gw.in_room()) == 1


async def test_a_create_retried_after_a_crash_mid_write_books_once(gw):
    cmd = command(**booker())
    gw.journal.begin(cmd)  # the previous process wrote into Exchange and died before journaling the write
    written = await gw.service._writer.create_appointment(ROOM1, cmd)  # type: ignore[attr-defined]
    result = accepted_ok(await gw.service.execute(cmd))
    assert result.uid == written.uid
    assert [b.uid for b in gw.in_room()] == [written.uid]


async def test_cancel_removes_what_the_gateway_created(gw):
    appt = accepted_ok(await gw.service.execute(command(**booker())))
    meeting = accepted_ok(await gw.service.execute(command(**organizer(start=iso(at(3)), end=iso(at(4))))))
    assert {b.id for b in gw.in_room()} == {appt.booking_id, meeting.booking_id}
    for done in (appt, meeting):
        result = await gw.service.execute(command("cancel", booking_id=done.booking_id))
        assert result.status == "accepted", result
    for done in (appt, meeting):
        with pytest.raises(ControlError, match="no meeting"):  # the organizer's item is gone, cancellations sent
            gw.meeting(done.uid)  # type: ignore[arg-type]

    async def room_free() -> bool:  # the room's attendant processes the cancellation a moment later
        await gw.resync(ROOM1)
        return gw.in_room() == []

    await eventually(room_free, what="the room to drop the cancelled meeting")


async def test_decline_as_the_room_frees_it_and_leaves_the_organizers_meeting(gw):
    item = gw.ews.call(lambda: Control.of(gw.ews.sim).create_meeting(
        organizer=BOB, rooms=[ROOM1], start=iso(at(5)), end=iso(at(6)), subject="Bob's review"))
    uid = item.uid
    await eventually(lambda: (gw.room_copy(uid) or {}).get("response") == "Accept", what="the room to accept")
    await gw.resync(ROOM1)
    (booking,) = gw.in_room()
    cancel = await gw.service.execute(command("cancel", booking_id=booking.id))
    assert (cancel.status, cancel.reason) == ("failed", "not_created_by_gateway")
    result = await gw.service.execute(command("decline", booking_id=booking.id, message="Closed for cleaning"))
    assert result.status == "accepted", result
    state = gw.meeting(uid)
    assert not state["cancelled"]  # Bob's meeting stays ...
    await eventually(lambda: any(a["email"] == ROOM1 and a["response"] == "Decline"
                                 for a in gw.meeting(uid)["attendees"]), what="the room's decline at the organizer")
    await gw.resync(ROOM1)
    assert gw.in_room() == []  # ... and the room is free


async def test_an_organizer_outside_the_impersonation_scope_is_booked_in_the_room_calendar(ews, tmp_path):
    g = await start_gateway(ews, tmp_path, account=SERVICE_ACCOUNT)  # impersonation over rooms only
    try:
        result = accepted_ok(await g.service.execute(command(**organizer())))
        assert "organizer as booker" in result.message
        assert g.meeting(result.uid).get("appointment_in") == ROOM1
    finally:
        await g.source.close()
        g.store.close()


@pytest.mark.parametrize(("setting", "reason"), [
    ({"MaximumDurationInMinutes": 30}, "too_long"),
    ({"BookingWindowInDays": 1}, "outside_booking_window"),
    ({"AllBookInPolicy": False}, "not_permitted"),
])
async def test_the_room_settings_decline_reason_reaches_the_result(gw, setting, reason):
    gw.ews.call(lambda: Control.of(gw.ews.sim).set_room_settings(ROOM1, setting))
    cmd = command(**organizer())
    result = await gw.service.execute(cmd)
    assert (result.status, result.reason) == ("declined", reason), result
    await gw.resync(ROOM1)
    assert gw.in_room() == []


async def test_update_moves_what_the_gateway_created_and_the_room_decides_again(gw):
    meeting = accepted_ok(await gw.service.execute(command(**organizer())))
    appt = accepted_ok(await gw.service.execute(command(**booker(start=iso(at(2)), end=iso(at(3))))))
    # The appointment is extended over its own time: no conflict with itself.
    longer = await gw.service.execute(command("update", booking_id=appt.booking_id, start=iso(at(2)),
                                              end=iso(at(3.5))))
    assert longer.status == "accepted", longer
    # The meeting moved onto the appointment: the room's attendant declines the new time.
    clash = await gw.service.execute(command("update", booking_id=meeting.booking_id, start=iso(at(3)),
                                             end=iso(at(4))))
    assert (clash.status, clash.reason) == ("declined", "conflict"), clash
    # ... and the meeting goes back to the hour the room had accepted.
    async def back() -> bool:  # as the next sync sees it
        await gw.resync(ROOM1)
        return [(b.start, b.end) for b in gw.in_room() if b.uid == meeting.uid] == [(at(0), at(1))]

    await eventually(back, what="the meeting back at its old time, accepted by the room")
    # Moved to a free hour, the room accepts again.
    moved = await gw.service.execute(command("update", booking_id=meeting.booking_id, start=iso(at(5)),
                                             end=iso(at(6))))
    assert moved.status == "accepted", moved
    await gw.resync(ROOM1)
    times = sorted((b.start, b.end) for b in gw.in_room())
    assert times == [(at(2), at(3.5)), (at(5), at(6))]


@pytest.mark.parametrize("quirks", [{"room_as_required": True}, {"no_response_type": True},
                                    {"room_as_required": True, "no_response_type": True}])
async def test_the_rooms_answer_is_found_on_servers_that_list_it_elsewhere_or_not_at_all(gw, quirks):
    """A server that lists the room among the required attendees, or records no ResponseType, must not turn every
    organizer booking into attendant_timeout although the room answered at once."""
    def apply() -> None:
        for name, value in quirks.items():
            setattr(gw.ews.sim.faults, name, value)
    gw.ews.call(apply)
    first = accepted_ok(await gw.service.execute(command(**organizer())))
    assert gw.room_copy(first.uid)["response"] == "Accept"  # type: ignore[index]
    clash = await gw.service.execute(command(**organizer(BOB, start=iso(at(0.5)), end=iso(at(1.5)))))
    assert (clash.status, clash.reason) == ("declined", "conflict"), clash
    assert [b.id for b in gw.in_room()] == [first.booking_id]
