"""The EWS writer against the simulated Exchange over HTTP + NTLM: meetings through the organizer (and the booking
attendant's answer, with its reason), appointments in the room, moves, cancels, declines as the room, busy times
and availability; every write findable by its command key and carrying the uid the sync path reads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from exchangelib import CalendarItem as XCalendarItem
from exchangelib import EWSDateTime
from exchangelib.items import SEND_TO_ALL_AND_SAVE_COPY
from exchangelib.properties import Attendee, Mailbox
from exchangelib.recurrence import DailyPattern, Recurrence

from gateway.errors import ImpersonationDenied, NotFound, PreconditionFailed
from gateway.model import Command, Person, Window, booking_id_for
from gateway.ports import RoomAnswer, Written
from gateway.simulator import ids
from gateway.simulator.control import Control
from gateway.simulator.messages import DECLINE_REASON_TEXT, RESPONSE_TEXT
from gateway.simulator.seed import ORGANIZER_ACCOUNT, SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from gateway.sources.ews import responses
from gateway.sources.ews.source import EwsSettings, EwsSource
from gateway.sources.ews.writer import EwsWriter, booker_text
from tests.conftest import TZ, SimFixture, eventually

ALICE, BOB, CAROL = "alice@contoso.com", "bob@contoso.com", "carol@contoso.com"
ROOM1, ROOM2 = "room1@contoso.com", "room2@contoso.com"
KEY = 'walk-in "A&B" <1>'  # a key needing XML escaping in the restriction


def _slot(days: int = 1, hour: int = 9, minutes: int = 60) -> tuple[datetime, datetime]:
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=days)
    start = day + timedelta(hours=hour)
    return start, start + timedelta(minutes=minutes)


def _command(key: str, room: str, start: datetime, end: datetime, **kw: Any) -> Command:
    return Command(key=key, type="create", room=room, start=start, end=end, **kw)


class Env:
    def __init__(self, ews: SimFixture, source: EwsSource) -> None:
        self.ews = ews
        self.source = source
        self.writer = EwsWriter(source, room_names=lambda room: {ROOM1: "HQ Room 1"}.get(room))

    async def control(self, fn: Callable[[Control], Any]) -> Any:
        """Act on the simulated organisation (on its loop, off ours)."""
        return await asyncio.to_thread(self.ews.call, lambda: fn(Control.of(self.ews.sim)))

    async def settle(self) -> None:
        assert await asyncio.to_thread(self.ews.call, lambda: Control.of(self.ews.sim).settle())

    async def answer(self, written: Written, room: str) -> RoomAnswer:
        async def decided() -> RoomAnswer | None:
            a = await self.writer.room_answer(written, room)
            return a if a.outcome != "pending" else None
        return await eventually(decided, what=f"{room} answering {written.uid}")

    async def room_bookings(self, room: str, start: datetime, end: datetime) -> list[Any]:
        return await self.source.read_window(room, Window(start - timedelta(hours=12), end + timedelta(hours=12)))


def _source(ews: SimFixture, account: str) -> EwsSource:
    return EwsSource(EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{account}", default_timezone="Europe/Berlin",
                                 max_workers=4), SERVICE_PASSWORD)


@pytest.fixture
async def env(sim_factory: Callable[..., SimFixture]) -> Any:
    ews = sim_factory(SimulatorConfig(rba_delay=0.05), rooms=7)
    source = _source(ews, ORGANIZER_ACCOUNT)  # impersonation over people and rooms: write path (a)
    yield Env(ews, source)
    await source.close()


@contextmanager
def counted(source: EwsSource) -> Iterator[dict[tuple[str, str], int]]:
    """The EWS requests the source made inside the block, by (operation, answer)."""
    delta: dict[tuple[str, str], int] = {}
    before = dict(source.calls.counts)
    yield delta
    delta.update({k: v - before.get(k, 0) for k, v in source.calls.counts.items() if v != before.get(k, 0)})


# -- the decline text ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reason", sorted(DECLINE_REASON_TEXT))
def test_each_attendant_sentence_maps_to_its_reason(reason: str) -> None:
    text = DECLINE_REASON_TEXT[reason]
    assert responses.reason_for(text) == reason
    assert responses.reason_for(text.upper()) == reason
    assert responses.reason_for(f"<html><body><p>{text.replace(' ', '&nbsp;', 3)}</p></body></html>") == reason


@pytest.mark.parametrize("text, reason", [
    ("The resource is not available at the requested time.", "conflict"),
    ("Recurring meetings aren\u2019t allowed.", "recurring_not_allowed"),
    ("Sorry, you don't have permission to book this room.", "not_permitted"),
    ("This meeting exceeds the maximum duration.", "too_long"),
    ("The request is beyond the booking window.", "outside_booking_window"),
])
def test_decline_text_variants(text: str, reason: str) -> None:
    assert responses.reason_for(text) == reason


@pytest.mark.parametrize("text", [None, "", RESPONSE_TEXT["Decline"], "Closed for maintenance", "<p></p>"])
def test_unknown_or_missing_text_has_no_reason(text: str | None) -> None:
    assert responses.reason_for(text) is None


# -- meetings through the organizer -------------------------------------------------------------------------------
async def test_a_meeting_is_created_for_the_organizer_and_the_room_accepts(env: Env) -> None:
    start, end = _slot()
    cmd = _command("create-1", ROOM1, start, end, subject="Design review", organizer=Person(ALICE, "Alice Anders"),
                   attendees=(Person(BOB, "Bob Berg"), Person(ALICE, "Alice Anders")))
    with counted(env.source) as calls:
        written = await env.writer.create_meeting(ALICE, ROOM1, cmd)
    assert calls == {("CreateItem", "NoError"): 1}
    assert written.mailbox == ALICE and written.item_id and written.change_key and written.uid

    state = await env.control(lambda c: c.meeting_state(written.uid))
    assert state["organizer"]["email"] == ALICE and state["subject"] == "Design review"
    assert (state["start"], state["end"]) == (f"{start:%Y-%m-%dT%H:%M:%SZ}", f"{end:%Y-%m-%dT%H:%M:%SZ}")
    assert {(a["email"], a["type"]) for a in state["attendees"]} == {(BOB, "required"), (ROOM1, "resource")}
    item = await env.control(lambda c: c.organizer_item(written.uid))
    assert item.location == "HQ Room 1" and item.free_busy == "Busy"

    polls: list[dict[tuple[str, str], int]] = []

    async def poll() -> RoomAnswer | None:
        with counted(env.source) as calls:
            answer = await env.writer.room_answer(written, ROOM1)
        polls.append(calls)
        return answer if answer.outcome != "pending" else None
    assert await eventually(poll, what="the attendant's answer") == RoomAnswer("accepted")
    # Until the organizer's copy has the answer a poll also looks for the room's MeetingResponse in the Inbox and
    # at the room's own copy ...
    ops = {("GetItem", "NoError"), ("FindItem", "NoError"), ("GetFolder", "NoError")}
    assert all(set(p) <= ops and p[("GetItem", "NoError")] == 1 and p.get(("FindItem", "NoError"), 0) <= 2
               for p in polls), polls
    # ... once it has, a poll is exactly one GetItem.
    with counted(env.source) as calls:
        assert await env.writer.room_answer(written, ROOM1) == RoomAnswer("accepted")
    assert calls == {("GetItem", "NoError"): 1}

    # The sync path reads the room's copy with the same uid, so the booking ids agree.
    (booking,) = await env.room_bookings(ROOM1, start, end)
    assert booking.uid == written.uid and booking.start == start and booking.end == end
    assert booking.id == booking_id_for(ROOM1, written.uid, None)
    assert booking.organizer is not None and booking.organizer.email == ALICE

    found = await env.writer.find_by_key(ALICE, "create-1", start, end)
    assert found is not None and (found.mailbox, found.item_id, found.uid) == (ALICE, written.item_id, written.uid)
    assert await env.writer.find_by_key(ALICE, "create-2", start, end) is None
    assert await env.writer.find_by_key(BOB, "create-1", start, end) is None  # Bob's copy is not the written item


async def test_rooms_scoped_account_may_not_book_for_an_organizer(env: Env) -> None:
    rooms_only = _source(env.ews, SERVICE_ACCOUNT)
    try:
        writer = EwsWriter(rooms_only)
        start, end = _slot()
        cmd = _command("create-denied", ROOM1, start, end, organizer=Person(ALICE, "Alice"))
        with pytest.raises(ImpersonationDenied) as caught:
            await writer.create_meeting(ALICE, ROOM1, cmd)
        assert ALICE in str(caught.value)
        # ... the fallback the command service takes: an appointment in the room, which that account may write.
        written = await writer.create_appointment(ROOM1, cmd)
        assert written.mailbox == ROOM1
        assert await env.writer.find_by_key(ALICE, "create-denied", start, end) is None
    finally:
        await rooms_only.close()


async def _recurring_meeting(env: Env, room: str, start: datetime, end: datetime, count: int = 3) -> Written:
    """A daily series from Alice, made with exchangelib as Outlook would (the writer itself books single meetings)."""
    def create() -> Written:
        acct = env.ews.organizer(ALICE)
        item = XCalendarItem(
            account=acct, folder=acct.calendar, subject="Daily", start=EWSDateTime.from_datetime(start).astimezone(TZ),
            end=EWSDateTime.from_datetime(end).astimezone(TZ),
            resources=[Attendee(mailbox=Mailbox(email_address=room))],
            recurrence=Recurrence(pattern=DailyPattern(interval=1), start=start.astimezone(TZ).date(), number=count))
        item.save(send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
        item.refresh()
        return Written(ALICE, item.id, item.uid, item.changekey)
    return await asyncio.to_thread(create)


async def test_the_attendants_decline_reasons(env: Env) -> None:
    rooms = [f"room{n}@contoso.com" for n in range(1, 8)]
    settings = {
        "room2@contoso.com": {"BookingWindowInDays": 2},
        "room3@contoso.com": {"MaximumDurationInMinutes": 30},
        "room4@contoso.com": {"AllowRecurringMeetings": False},
        "room5@contoso.com": {"AllBookInPolicy": False},
        "room6@contoso.com": {"AllBookInPolicy": False, "AllRequestInPolicy": True},
        "room7@contoso.com": {"MaximumDurationInMinutes": 30, "EnableResponseDetails": False},
    }
    for room, values in settings.items():
        await env.control(lambda c, r=room, v=values: c.set_room_settings(r, v))
    start, end = _slot()
    # Carol holds room1 at that time already.
    await env.control(lambda c: c.create_meeting(organizer=CAROL, start=start, end=end, rooms=[ROOM1], subject="x"))
    await env.settle()

    async def book(room: str) -> RoomAnswer:
        s, e = _slot(days=5) if room == "room2@contoso.com" else (start, end)
        if room == "room4@contoso.com":
            written = await _recurring_meeting(env, room, s, e)
        else:
            written = await env.writer.create_meeting(ALICE, room, _command(f"k-{room}", room, s, e))
        return await env.answer(written, room)

    answers = dict(zip(rooms, await asyncio.gather(*(book(r) for r in rooms))))
    assert answers["room1@contoso.com"] == RoomAnswer("declined", "conflict", DECLINE_REASON_TEXT["conflict"])
    assert answers["room2@contoso.com"].reason == "outside_booking_window"
    assert answers["room3@contoso.com"].reason == "too_long"
    assert answers["room4@contoso.com"].reason == "recurring_not_allowed"
    assert answers["room5@contoso.com"].reason == "not_permitted"
    assert answers["room6@contoso.com"] == RoomAnswer("tentative")  # waiting for a delegate
    assert answers["room7@contoso.com"] == RoomAnswer("declined", None, RESPONSE_TEXT["Decline"])  # no details
    assert all(answers[r].outcome == "declined" for r in rooms[:5])


async def test_a_decline_costs_two_inbox_reads_once(env: Env) -> None:
    await env.control(lambda c: c.set_room_settings(ROOM2, {"MaximumDurationInMinutes": 30}))
    start, end = _slot()
    written = await env.writer.create_meeting(ALICE, ROOM2, _command("long", ROOM2, start, end))
    await env.settle()
    with counted(env.source) as calls:
        answer = await env.writer.room_answer(written, ROOM2)
    assert answer.reason == "too_long"
    assert calls == {("GetItem", "NoError"): 2, ("FindItem", "NoError"): 1}


async def test_an_unanswered_request_stays_pending(env: Env) -> None:
    await env.control(lambda c: c.set_room_settings(ROOM2, {"AutomateProcessing": "AutoUpdate"}))
    start, end = _slot()
    written = await env.writer.create_meeting(ALICE, ROOM2, _command("auto-update", ROOM2, start, end))
    await env.settle()  # the attendant ran: it placed the request tentatively and answered nothing
    assert (await env.control(lambda c: c.decisions(room=ROOM2)))[-1]["outcome"] == "tentative"
    assert await env.writer.room_answer(written, ROOM2) == RoomAnswer("pending")


# -- the room's answer wherever the server puts it (servers that are not quite Exchange) ------------------------------
def _quirk(env: Env, **values: Any) -> None:
    def apply() -> None:
        for name, value in values.items():
            setattr(env.ews.sim.faults, name, value)
    env.ews.call(apply)


async def _clear_inbox(env: Env, mailbox: str = ALICE) -> int:
    """Delete the MeetingResponses in the organizer's Inbox (as a person tidying up would)."""
    def clear() -> int:
        items = list(env.ews.organizer(mailbox).inbox.all())
        for item in items:
            item.delete()
        return len(items)
    return await asyncio.to_thread(clear)


async def test_a_room_listed_among_the_required_attendees_answers_there(env: Env) -> None:
    _quirk(env, room_as_required=True)
    start, end = _slot()
    written = await env.writer.create_meeting(ALICE, ROOM1, _command("req-1", ROOM1, start, end))
    state = await env.control(lambda c: c.meeting_state(written.uid))
    assert {(a["email"], a["type"]) for a in state["attendees"]} == {(ROOM1, "required")}
    assert await env.answer(written, ROOM1) == RoomAnswer("accepted")
    # And a decline found there still brings the attendant's reason.
    clash = await env.writer.create_meeting(ALICE, ROOM1, _command("req-2", ROOM1, start, end))
    assert await env.answer(clash, ROOM1) == RoomAnswer("declined", "conflict", DECLINE_REASON_TEXT["conflict"])


async def test_without_a_response_type_the_answer_is_the_meeting_response_in_the_inbox(env: Env) -> None:
    _quirk(env, no_response_type=True)
    await env.control(lambda c: c.set_room_settings(ROOM2, {"MaximumDurationInMinutes": 30}))
    start, end = _slot()
    written = await env.writer.create_meeting(ALICE, ROOM1, _command("nrt-1", ROOM1, start, end))
    assert await env.answer(written, ROOM1) == RoomAnswer("accepted")
    item = await env.control(lambda c: c.organizer_item(written.uid))
    assert [a.response for a in item.resources] == [""]  # the organizer's copy never says
    too_long = await env.writer.create_meeting(ALICE, ROOM2, _command("nrt-2", ROOM2, start, end))
    assert await env.answer(too_long, ROOM2) == RoomAnswer("declined", "too_long", DECLINE_REASON_TEXT["too_long"])
    clash = await env.writer.create_meeting(ALICE, ROOM1, _command("nrt-3", ROOM1, start, end))
    assert await env.answer(clash, ROOM1) == RoomAnswer("declined", "conflict", DECLINE_REASON_TEXT["conflict"])


async def test_an_answer_to_an_earlier_time_does_not_count_for_a_moved_meeting(env: Env) -> None:
    _quirk(env, no_response_type=True)
    start, end = _slot()
    written = await env.writer.create_meeting(ALICE, ROOM1, _command("stale-1", ROOM1, start, end))
    assert (await env.answer(written, ROOM1)).outcome == "accepted"
    # The room stops answering (a delegate decides from now on): its Accept of the old time stays in the Inbox.
    await env.control(lambda c: c.set_room_settings(ROOM1, {"AutomateProcessing": "AutoUpdate"}))
    moved = await env.writer.move(written, start + timedelta(hours=2), end + timedelta(hours=2), notify=True)
    await env.settle()
    assert await env.writer.room_answer(moved, ROOM1) == RoomAnswer("pending")


async def test_with_no_answer_at_the_organizer_the_rooms_own_copy_decides(env: Env) -> None:
    _quirk(env, no_response_type=True)
    start, end = _slot()
    written = await env.writer.create_meeting(ALICE, ROOM1, _command("copy-1", ROOM1, start, end))
    await env.settle()
    assert (await env.control(lambda c: c.decisions(room=ROOM1)))[-1]["outcome"] == "accepted"
    assert await _clear_inbox(env) >= 1  # nothing left on the organizer's side
    assert await env.writer.room_answer(written, ROOM1) == RoomAnswer("accepted")
    # A copy the room holds only tentatively (placed, not yet decided) is no acceptance.
    await env.control(lambda c: c.set_room_settings(ROOM2, {"AutomateProcessing": "AutoUpdate"}))
    pending = await env.writer.create_meeting(ALICE, ROOM2, _command("copy-2", ROOM2, start, end))
    await env.settle()
    assert await env.writer.room_answer(pending, ROOM2) == RoomAnswer("pending")


# -- moving and cancelling ----------------------------------------------------------------------------------------
async def test_moving_a_meeting_asks_the_room_again(env: Env) -> None:
    start, end = _slot()
    written = await env.writer.create_meeting(ALICE, ROOM1, _command("move-1", ROOM1, start, end))
    assert (await env.answer(written, ROOM1)).outcome == "accepted"

    later, later_end = start + timedelta(hours=3), end + timedelta(hours=3, minutes=30)
    # The room's answer changed the organizer's item since the create: the old change key must not fail the move.
    moved = await env.writer.move(written, later, later_end, notify=True)
    assert (moved.mailbox, moved.item_id, moved.uid) == (ALICE, written.item_id, written.uid)
    assert moved.change_key != written.change_key
    assert (await env.answer(moved, ROOM1)).outcome == "accepted"
    (booking,) = await env.room_bookings(ROOM1, start, later_end)
    assert (booking.uid, booking.start, booking.end) == (written.uid, later, later_end)

    # Into a slot Carol holds: the attendant declines the moved meeting.
    await env.control(lambda c: c.create_meeting(organizer=CAROL, start=start, end=end, rooms=[ROOM1], subject="c"))
    await env.settle()
    again = await env.writer.move(moved, start, end, notify=True)
    assert await env.answer(again, ROOM1) == RoomAnswer("declined", "conflict", DECLINE_REASON_TEXT["conflict"])


async def test_cancelling_a_meeting_frees_the_room(env: Env) -> None:
    start, end = _slot()
    written = await env.writer.create_meeting(ALICE, ROOM1, _command("cancel-1", ROOM1, start, end))
    assert (await env.answer(written, ROOM1)).outcome == "accepted"
    with counted(env.source) as calls:  # with the change key from the create, which the room's answer made stale
        await env.writer.cancel_meeting(written)
    assert calls == {("CreateItem", "NoError"): 1}
    await env.settle()
    assert await env.room_bookings(ROOM1, start, end) == []
    assert await env.writer.find_by_key(ALICE, "cancel-1", start, end) is None
    with pytest.raises(NotFound):
        await env.writer.room_answer(written, ROOM1)
    with pytest.raises(NotFound):
        await env.writer.cancel_meeting(written)


# -- appointments in the room -------------------------------------------------------------------------------------
async def test_an_appointment_records_its_booker_and_is_moved_and_deleted_quietly(env: Env) -> None:
    start, end = _slot()
    booker = Person("guest@example.org", "Gina Guest")
    with counted(env.source) as calls:
        written = await env.writer.create_appointment(ROOM2, _command(KEY, ROOM2, start, end, booker=booker))
    assert calls == {("CreateItem", "NoError"): 1}
    (booking,) = await env.room_bookings(ROOM2, start, end)
    assert booking.uid == written.uid and booking.id == booking_id_for(ROOM2, written.uid, None)
    assert booking.subject == "Gina Guest" and booking.organizer is not None and booking.organizer.email == ROOM2
    assert booking.attendees == () and booking.free_busy == "busy"
    item = await env.control(lambda c: c.organizer_item(written.uid))
    assert item.body == booker_text(booker) and "guest@example.org" in item.body and not item.is_meeting
    assert await env.writer.find_by_key(ROOM2, KEY, start, end) == written
    assert await env.writer.find_by_key(ROOM2, KEY[:-1], start, end) is None

    later, later_end = start + timedelta(hours=2), end + timedelta(hours=2)
    with counted(env.source) as calls:  # without a change key: read first
        moved = await env.writer.move(Written(ROOM2, written.item_id, written.uid), later, later_end, notify=False)
    assert calls == {("GetItem", "NoError"): 1, ("UpdateItem", "NoError"): 1}
    assert moved.change_key and moved.change_key != written.change_key
    (booking,) = await env.room_bookings(ROOM2, start, later_end)
    assert (booking.uid, booking.start, booking.end) == (written.uid, later, later_end)
    assert await env.control(lambda c: c.decisions(room=ROOM2)) == []  # nothing went through the attendant

    await env.writer.delete_appointment(moved)
    assert await env.room_bookings(ROOM2, start, later_end) == []
    assert await env.writer.find_by_key(ROOM2, KEY, start, end) is None


async def test_appointment_subject_falls_back_to_booked(env: Env) -> None:
    start, end = _slot()
    written = await env.writer.create_appointment(ROOM2, _command("anon", ROOM2, start, end, subject=None))
    item = await env.control(lambda c: c.organizer_item(written.uid))
    assert item.subject == "Booked" and item.body == booker_text(None)


# -- declining as the room ----------------------------------------------------------------------------------------
async def test_declining_as_the_room_keeps_the_organizers_meeting(env: Env) -> None:
    start, end = _slot()
    meeting = await env.control(lambda c: c.create_meeting(organizer=BOB, start=start, end=end, rooms=[ROOM1],
                                                           subject="Bob's"))
    await env.settle()
    uid = meeting.uid
    await env.writer.decline_as_room(ROOM1, uid, None, start, "The room is closed for maintenance.")
    assert await env.room_bookings(ROOM1, start, end) == []
    state = await env.control(lambda c: c.meeting_state(uid))
    assert state["organizer"]["email"] == BOB and not state["cancelled"]
    assert [a["response"] for a in state["attendees"] if a["email"] == ROOM1] == ["Decline"]
    # Bob learns why, as a MeetingResponse in his Inbox (what room_answer reads for the gateway's own meetings).
    answer = await env.writer.room_answer(_written_of(meeting), ROOM1)
    assert answer == RoomAnswer("declined", None, "The room is closed for maintenance.")

    with pytest.raises(NotFound):  # nothing left to decline
        await env.writer.decline_as_room(ROOM1, uid, None, start, None)


def _written_of(item: Any) -> Written:
    """The Written of a meeting the simulator's control layer created (its organizer's item)."""
    return Written(item.mailbox.smtp, ids.item_id(item.mailbox.idx, item.iid), item.uid)


async def test_declining_one_occurrence_as_the_room(env: Env) -> None:
    start, end = _slot()
    series = await _recurring_meeting(env, ROOM1, start, end, count=3)
    await env.settle()
    before = await env.room_bookings(ROOM1, start, end + timedelta(days=2))
    assert [b.original_start for b in before] == [start, start + timedelta(days=1), start + timedelta(days=2)]
    second = before[1]
    await env.writer.decline_as_room(ROOM1, series.uid, second.original_start, second.start, None)
    after = await env.room_bookings(ROOM1, start, end + timedelta(days=2))
    assert [b.original_start for b in after] == [start, start + timedelta(days=2)]
    state = await env.control(lambda c: c.meeting_state(series.uid))
    assert not state["cancelled"] and state["cancelled_occurrences"] == []  # the organizer's series is intact


async def test_the_room_does_not_decline_its_own_appointment(env: Env) -> None:
    start, end = _slot()
    written = await env.writer.create_appointment(ROOM2, _command("panel", ROOM2, start, end))
    with pytest.raises(PreconditionFailed) as caught:
        await env.writer.decline_as_room(ROOM2, written.uid, None, start, "no")
    assert caught.value.key == "room_is_organizer"
    with pytest.raises(NotFound):
        await env.writer.decline_as_room(ROOM2, "NO-SUCH-UID", None, start, "no")
    assert [b.uid for b in await env.room_bookings(ROOM2, start, end)] == [written.uid]


# -- busy times and availability ---------------------------------------------------------------------------------
async def test_busy_reads_the_rooms_calendar(env: Env) -> None:
    start, end = _slot()
    series = await _recurring_meeting(env, ROOM1, start, end, count=3)
    single = await env.writer.create_appointment(ROOM1, _command("a", ROOM1, start + timedelta(hours=2),
                                                                end + timedelta(hours=2)))

    def free_item() -> None:
        acct = env.ews.room(ROOM1)
        XCalendarItem(account=acct, folder=acct.calendar, subject="Free", legacy_free_busy_status="Free",
                      start=EWSDateTime.from_datetime(start + timedelta(hours=4)).astimezone(TZ),
                      end=EWSDateTime.from_datetime(end + timedelta(hours=4)).astimezone(TZ)).save()
    await asyncio.to_thread(free_item)
    await env.settle()

    busy = await env.writer.busy(ROOM1, start - timedelta(hours=1), start + timedelta(days=1, hours=8))
    assert [(b.start, b.end, b.uid, b.status) for b in busy] == [
        (start, end, series.uid, "busy"),
        (start + timedelta(hours=2), end + timedelta(hours=2), single.uid, "busy"),
        (start + timedelta(days=1), end + timedelta(days=1), series.uid, "busy"),  # occurrences expanded
    ]
    # [start, end) is half-open: what ends at the window's start is not in it.
    assert await env.writer.busy(ROOM1, end, end + timedelta(hours=1)) == []


@pytest.fixture
async def big_env(sim_factory: Callable[..., SimFixture]) -> Any:
    ews = sim_factory(SimulatorConfig(rba_delay=0.05), rooms=101, users=3)
    source = _source(ews, SERVICE_ACCOUNT)  # availability needs no impersonation of people
    yield Env(ews, source)
    await source.close()


async def test_availability_splits_requests_by_rooms_and_days(big_env: Env) -> None:
    env = big_env
    start, end = _slot()
    far_start, far_end = start + timedelta(days=50), end + timedelta(days=50)
    near = await env.writer.create_appointment(ROOM1, _command("n", ROOM1, start, end))
    await env.writer.create_appointment(ROOM1, _command("f", ROOM1, far_start, far_end))
    last = "room101@contoso.com"
    await env.writer.create_appointment(last, _command("l", last, start, end))
    assert near.uid

    rooms = [f"room{n}@contoso.com" for n in range(1, 102)]
    window = (start - timedelta(days=1), start + timedelta(days=60))  # two pieces of at most 42 days
    with counted(big_env.source) as calls:
        found = await env.writer.availability(rooms, *window)
    # 101 rooms -> 2 requests per piece; the UTC zone is built locally, never asked for.
    assert calls[("GetUserAvailability", "NoError")] == 4
    assert not [op for op, _ in calls if op == "GetServerTimeZones"]
    assert set(found) == set(rooms)
    assert [(b.start, b.end, b.status) for b in found[ROOM1]] == [(start, end, "busy"), (far_start, far_end, "busy")]
    assert [(b.start, b.end) for b in found[last]] == [(start, end)]
    assert found[ROOM2] == []

    with counted(big_env.source) as calls:
        short = await env.writer.availability([ROOM1], start + timedelta(minutes=10), start + timedelta(minutes=12))
    assert calls == {("GetUserAvailability", "NoError"): 1}
    assert [(b.start, b.end) for b in short[ROOM1]] == [(start, end)]

    with pytest.raises(NotFound) as caught:
        await env.writer.availability([ROOM1, "nosuchroom@contoso.com"], start, end)
    assert caught.value.key == "room_unknown" and "nosuchroom@contoso.com" in str(caught.value)


async def test_availability_works_against_a_server_without_get_server_time_zones(env: Env) -> None:
    """An EWS server that does not implement GetServerTimeZones (some non-Exchange ones) still answers free/busy:
    the UTC zone of the request is built by the gateway, so the operation is never called."""
    start, end = _slot()
    await env.writer.create_appointment(ROOM1, _command("tz", ROOM1, start, end))
    env.ews.call(lambda: env.ews.sim.faults.unsupported.add("GetServerTimeZones"))
    before = env.ews.call(lambda: sum(n for (op, _), n in env.ews.sim.calls.items() if op == "GetServerTimeZones"))
    for _ in range(2):
        found = await env.writer.availability([ROOM1, ROOM2], start - timedelta(hours=2), end + timedelta(hours=2))
        assert [(b.start, b.end, b.status) for b in found[ROOM1]] == [(start, end, "busy")]
        assert found[ROOM2] == []
    after = env.ews.call(lambda: sum(n for (op, _), n in env.ews.sim.calls.items() if op == "GetServerTimeZones"))
    assert after == before == 0
