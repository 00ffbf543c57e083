"""The command service against an in-memory CalendarWriter (our own seam) and a real SQLite journal.

The same service against the real EwsWriter and the EWS simulator: tests/test_commands_ews.py.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.commands import CommandService, Policy, RateLimiter
from gateway.commands.organizers import OrganizerCheck
from gateway.config import CommandsConfig
from gateway.errors import (
    AuthError,
    ImpersonationDenied,
    MailboxNotFound,
    NotFound,
    PreconditionFailed,
    RoomIsOrganizer,
    TransientError,
    Unavailable,
)
from gateway.model import Booking, Command, CommandResult, Room, Window, accepted, booking_id_for, declined
from gateway.observability.metrics import Metrics
from gateway.ports import Busy, RoomAnswer, Written
from gateway.relay.protocol import ERROR_CODES, parse_command
from gateway.store.journal import CommandJournal
from gateway.store.sqlite import SqliteStore

ROOM1, ROOM2, ROOM3 = "room1@contoso.com", "room2@contoso.com", "room3@contoso.com"
ALICE, BOB = "alice@contoso.com", "bob@contoso.com"
SYNCED = (ROOM1, ROOM2, ROOM3)
T0 = (datetime.now(UTC) + timedelta(days=2)).replace(hour=9, minute=0, second=0, microsecond=0)


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


_keys = itertools.count(1)


def command(type_: str = "create", key: str | None = None, **fields: Any) -> Command:
    """A command as the relay delivers it: through the real parser."""
    doc: dict[str, Any] = {"key": key or f"k{next(_keys)}", "type": type_}
    if type_ in ("create", "update", "cancel", "decline", "resync"):
        doc["room"] = ROOM1
    if type_ in ("create", "update"):
        doc["start"], doc["end"] = iso(at(0)), iso(at(1))
    doc.update(fields)
    return parse_command(doc)


# -- an in-memory Exchange behind the CalendarWriter seam ----------------------------------------------------------
@dataclass
class Item:
    mailbox: str
    item_id: str
    uid: str
    key: str | None
    room: str
    start: datetime
    end: datetime
    kind: str  # meeting (in an organizer's calendar, the room invited), appointment (in the room's), external
    answer: str = "pending"  # meetings: the room's answer
    polls: int = 0  # room_answer calls since the meeting was sent
    room_organizes: bool = False  # external: an appointment the room itself organizes


class FakeWriter:
    """Meetings, room appointments and bookings made outside the gateway, with a scriptable attendant."""

    def __init__(self) -> None:
        self.items: dict[str, Item] = {}
        self.calls: list[str] = []
        self.attendant: dict[str, str] = {}  # room -> auto, accept, tentative, decline[:code], silent
        self.answer_after = 2  # room_answer polls before the attendant has run
        self.denied: set[str] = set()  # mailboxes the service account may not impersonate
        self.fail: dict[str, list[BaseException]] = {}  # method -> exceptions to raise on its next calls
        self.fail_after_write: dict[str, BaseException] = {}  # the write happens, then the answer is lost
        self.no_mailbox: set[str] = set()  # addresses without a mailbox in this Exchange
        self.after: dict[str, Callable[[], None]] = {}  # method -> hook run after it (races from outside)
        self.declined: list[tuple[str, str, str | None]] = []
        self._ids = itertools.count(1)

    async def _call(self, name: str, mailbox: str | None = None) -> None:
        self.calls.append(name)
        await asyncio.sleep(0)  # a network call: other commands run meanwhile
        await asyncio.sleep(0)
        if self.fail.get(name):
            raise self.fail[name].pop(0)
        if mailbox is not None and mailbox in self.denied:
            raise ImpersonationDenied(f"may not impersonate {mailbox}")
        if mailbox is not None and mailbox in self.no_mailbox:
            raise MailboxNotFound(f"no mailbox {mailbox}")

    def _done(self, name: str) -> None:
        hook = self.after.pop(name, None)
        if hook:
            hook()
        if name in self.fail_after_write:
            raise self.fail_after_write.pop(name)

    def _new(self, **kw: Any) -> Item:
        n = next(self._ids)
        item = Item(item_id=f"item-{n}", uid=f"uid-{n}", **kw)
        self.items[item.item_id] = item
        return item

    def external(self, room: str, start: datetime, end: datetime, *, room_organizes: bool = False) -> Item:
        """A booking somebody made outside the gateway."""
        return self._new(mailbox=room, key=None, room=room, start=start, end=end, kind="external", answer="accepted",
                         room_organizes=room_organizes)

    def of_kind(self, kind: str) -> list[Item]:
        return [i for i in self.items.values() if i.kind == kind]

    def _in_room(self, room: str, start: datetime, end: datetime, exclude: str | None = None) -> list[Item]:
        return [i for i in self.items.values() if i.room == room and i.start < end and i.end > start
                and i.answer in ("accepted", "tentative") and i.item_id != exclude]

    @staticmethod
    def _written(item: Item) -> Written:
        return Written(mailbox=item.mailbox, item_id=item.item_id, uid=item.uid, change_key=f"ck-{item.polls}")

    # -- the CalendarWriter protocol --
    async def create_meeting(self, organizer: str, room: str, cmd: Command) -> Written:
        await self._call("create_meeting", organizer)
        assert cmd.start and cmd.end
        item = self._new(mailbox=organizer, key=cmd.key, room=room, start=cmd.start, end=cmd.end, kind="meeting")
        self._done("create_meeting")
        return self._written(item)

    async def create_appointment(self, room: str, cmd: Command) -> Written:
        await self._call("create_appointment", room)
        assert cmd.start and cmd.end and cmd.organizer is None
        item = self._new(mailbox=room, key=cmd.key, room=room, start=cmd.start, end=cmd.end, kind="appointment",
                         answer="accepted")
        self._done("create_appointment")
        return self._written(item)

    async def find_by_key(self, mailbox: str, key: str, start: datetime, end: datetime) -> Written | None:
        await self._call("find_by_key", mailbox)
        found = [i for i in self.items.values() if i.mailbox == mailbox and i.key == key]
        return self._written(found[0]) if found else None

    async def room_answer(self, written: Written, room: str) -> RoomAnswer:
        await self._call("room_answer")
        item = self.items.get(written.item_id)
        if item is None:
            raise NotFound("no such meeting")
        item.polls += 1
        if item.answer == "pending" and item.polls > self.answer_after:
            mode = self.attendant.get(room, "auto")
            if mode == "auto":
                item.answer = "declined" if self._in_room(room, item.start, item.end, item.item_id) else "accepted"
                if item.answer == "declined":
                    return RoomAnswer("declined", "conflict")
            elif mode.startswith("decline"):
                item.answer = "declined"
                return RoomAnswer("declined", mode.partition(":")[2] or None, "Your request was declined.")
            elif mode in ("accept", "tentative"):
                item.answer = "accepted" if mode == "accept" else "tentative"
        outcome = {"pending": "pending", "accepted": "accepted", "tentative": "tentative"}.get(item.answer, "declined")
        return RoomAnswer(outcome)

    async def busy(self, room: str, start: datetime, end: datetime) -> list[Busy]:
        await self._call("busy", room)
        busy = [Busy(i.start, i.end, i.uid, "tentative" if i.answer == "tentative" else "busy")
                for i in self._in_room(room, start, end)]
        self._done("busy")
        return busy

    async def move(self, written: Written, start: datetime, end: datetime, *, notify: bool) -> Written:
        await self._call("move")
        item = self.items.get(written.item_id)
        if item is None:
            raise NotFound("no such item")
        item.start, item.end = start, end
        if item.kind == "meeting" and notify:
            item.answer, item.polls = "pending", 0  # Exchange resets the attendees' responses on a new time
        self._done("move")
        return self._written(item)

    async def cancel_meeting(self, written: Written) -> None:
        await self._call("cancel_meeting", written.mailbox)
        if self.items.pop(written.item_id, None) is None:
            raise NotFound("no such meeting")

    async def delete_appointment(self, written: Written) -> None:
        await self._call("delete_appointment", written.mailbox)
        item = self.items.get(written.item_id)
        if item is None or item.mailbox != written.mailbox:
            raise NotFound("no such appointment")
        del self.items[written.item_id]

    async def decline_as_room(self, room: str, uid: str, original_start: datetime | None, start: datetime,
                              message: str | None) -> None:
        await self._call("decline_as_room", room)
        item = next((i for i in self.items.values() if i.uid == uid and i.room == room), None)
        if item is None:
            raise NotFound("no such meeting in the room")
        if item.room_organizes:
            raise RoomIsOrganizer("ErrorCalendarIsOrganizerForDecline")
        item.answer = "declined"
        self.declined.append((room, uid, message))

    async def availability(self, rooms: Any, start: datetime, end: datetime) -> dict[str, list[Busy]]:
        await self._call("availability")
        return {room: [Busy(i.start, i.end, i.uid) for i in self._in_room(room, start, end)] for room in rooms}


class Env:
    def __init__(self, path: Any) -> None:
        self.store = SqliteStore(path / "gateway.sqlite")
        for room in SYNCED:
            self.store.upsert_room(Room(room))
        self.journal = CommandJournal(self.store)
        self.writer = FakeWriter()
        self.resyncs: list[str] = []
        self.rereads: list[frozenset[str]] = []  # the meetings each resync was asked to read back
        self.rooms: tuple[str, ...] = SYNCED

    def service(self, **settings: Any) -> CommandService:
        extra = {k: settings.pop(k) for k in ("metrics", "clock", "booking_lookup", "window", "organizers")
                 if k in settings}
        config = CommandsConfig(**{"attendant_timeout_seconds": 5.0, **settings})

        async def resync(room: str, uids: frozenset[str] = frozenset()) -> None:
            self.resyncs.append(room)
            self.rereads.append(uids)

        return CommandService(self.writer, self.store, self.journal, config, rooms=lambda: self.rooms,
                              resync=resync, poll_interval=0.01, **extra)

    def snapshot(self, room: str, uid: str, start: datetime, end: datetime, **kw: Any) -> Booking:
        """Put a booking in the store, as a sync would after reading it from Exchange."""
        b = Booking(room=room, uid=uid, start=start, end=end, **kw)
        self.store.commit_sync(room, upserts=[b], deletes=(), events=())
        return b


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.store.close()


def booker(**kw: Any) -> dict[str, Any]:
    return {"booker": {"name": "Room display"}, **kw}


def organizer(email: str = ALICE, **kw: Any) -> dict[str, Any]:
    return {"organizer": {"email": email, "name": "Alice"}, "subject": "Q3 review", **kw}


# -- the journal ---------------------------------------------------------------------------------------------------
def test_journal_begin_admits_a_key_once_even_from_many_threads(env):
    cmd = command(**booker())
    barrier = threading.Barrier(8)

    def begin(_: int) -> Any:
        barrier.wait()
        return env.journal.begin(cmd)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(begin, range(8)))
    assert results.count(None) == 1
    others = [r for r in results if r is not None]
    assert all(r.key == cmd.key and r.state == "started" and r.request_hash == cmd.request_hash() for r in others)


def test_journal_records_writes_and_results_and_finds_the_creator_of_a_meeting(env):
    cmd = command(**booker())
    assert env.journal.begin(cmd) is None
    assert env.journal.by_uid("uid-x") is None
    env.journal.record_write(cmd.key, Written(ROOM1, "item-x", "uid-x"))
    row = env.journal.get(cmd.key)
    assert row is not None and row.state == "started" and row.written == Written(ROOM1, "item-x", "uid-x")
    assert env.journal.by_uid("uid-x") == row  # a create still waiting for its answer made it
    result = replace(_accepted(cmd), uid="uid-x")
    env.journal.finish(cmd.key, result)
    done = env.journal.begin(cmd)
    assert done is not None and done.state == "done" and done.result == result
    # A declined create made nothing.
    other = command(**booker())
    env.journal.begin(other)
    env.journal.record_write(other.key, Written(ROOM1, "item-y", "uid-y"))
    env.journal.finish(other.key, _declined(other))
    assert env.journal.by_uid("uid-y") is None
    env.journal.forget(cmd.key)
    assert env.journal.get(cmd.key) is None


def _accepted(cmd: Command) -> CommandResult:
    return accepted(cmd, "ok", booking_id="b")


def _declined(cmd: Command) -> CommandResult:
    return declined(cmd, "conflict", "busy")


def test_journal_prune_drops_old_done_rows_but_keeps_started_ones_and_creators_of_live_bookings(env):
    now = [datetime.now(UTC)]
    journal = CommandJournal(env.store, clock=lambda: now[0])
    old_done, old_started, live_create, gone_create = (command(**booker()) for _ in range(4))
    for cmd in (old_done, old_started, live_create, gone_create):
        journal.begin(cmd)
    for cmd, uid in ((live_create, "uid-live"), (gone_create, "uid-gone")):
        journal.record_write(cmd.key, Written(ROOM1, f"item-{uid}", uid))
        journal.finish(cmd.key, replace(_accepted(cmd), uid=uid))
    journal.finish(old_done.key, _declined(old_done))
    env.snapshot(ROOM1, "uid-live", at(0), at(1))
    now[0] += timedelta(days=31)
    recent = command(**booker())
    journal.begin(recent)
    journal.finish(recent.key, _declined(recent))
    assert journal.prune(timedelta(days=30)) == 2
    assert journal.get(old_done.key) is None and journal.get(gone_create.key) is None
    assert journal.get(old_started.key) is not None and journal.get(recent.key) is not None
    assert journal.by_uid("uid-live") is not None


# -- policy --------------------------------------------------------------------------------------------------------
def test_policy_writable_rooms_and_longest_booking():
    every = Policy(CommandsConfig())
    assert every.writable(ROOM1, SYNCED) and every.writable(ROOM1.upper(), SYNCED)
    assert not every.writable("room9@contoso.com", SYNCED)
    some = Policy(CommandsConfig(writable_rooms=(ROOM2,), max_duration_minutes=90))
    assert some.writable(ROOM2, SYNCED) and not some.writable(ROOM1, SYNCED)
    assert not some.writable(ROOM2, (ROOM1,))  # listed but not synced
    assert some.too_long(at(0), at(2)) and not some.too_long(at(0), at(1.5))
    assert not Policy(CommandsConfig(max_duration_minutes=0)).too_long(at(0), at(1000))


def test_rate_limiter_allows_a_burst_then_refills_at_the_rate():
    now = [100.0]
    limiter = RateLimiter(60, 3, clock=lambda: now[0])
    assert [limiter.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert limiter.retry_after() == pytest.approx(1.0)
    now[0] += 1.0
    assert limiter.try_acquire() and not limiter.try_acquire()
    now[0] += 3600
    assert sum(limiter.try_acquire() for _ in range(10)) == 3  # never more than the burst
    assert all(RateLimiter(0, 1).try_acquire() for _ in range(100))  # 0: no limit


# -- the horizon: the gateway writes only what its sync window lets it see and undo --------------------------------
def sync_window() -> Window:
    """As the coordinator computes it: from the start of today minus days_back to now plus days_ahead."""
    now = datetime.now(UTC)
    return Window(now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=7),
                  now + timedelta(days=365))


@pytest.mark.parametrize("start", [
    T0 + timedelta(days=400),  # next year, beyond days_ahead
    datetime(2099, 3, 1, 9, tzinfo=UTC),
    datetime(9998, 3, 1, 9, tzinfo=UTC),
    datetime(9999, 12, 31, 22, tzinfo=UTC),  # the last hours a datetime can hold
])
async def test_a_create_outside_the_sync_window_is_declined_and_nothing_is_written(env, start):
    for cmd in (command(**booker(start=iso(start), end=iso(start + timedelta(hours=1)))),
                command(**organizer(start=iso(start), end=iso(start + timedelta(hours=1))))):
        result = await env.service(window=sync_window).execute(cmd)
        assert (result.status, result.reason) == ("declined", "outside_sync_window"), result
        assert "sync window" in result.message and "days_ahead" in result.message
    assert env.writer.calls == [] and env.writer.items == {}


async def test_a_booking_reaching_past_the_window_end_or_starting_before_its_start_is_declined(env):
    window = sync_window()
    svc = env.service(window=lambda: window)
    over_end = await svc.execute(command(**booker(start=iso(window.end - timedelta(minutes=30)),
                                                  end=iso(window.end + timedelta(minutes=30)))))
    assert (over_end.status, over_end.reason) == ("declined", "outside_sync_window")
    before = await svc.execute(command(**booker(start=iso(window.start - timedelta(hours=1)),
                                                end=iso(datetime.now(UTC) + timedelta(hours=1)))))
    assert (before.status, before.reason) == ("declined", "outside_sync_window")
    inside = await svc.execute(command(**booker()))
    assert inside.status == "accepted", inside
    assert len(env.writer.of_kind("appointment")) == 1


async def test_an_update_to_a_time_outside_the_window_is_declined_and_the_booking_stays(env):
    svc = env.service(window=sync_window)
    made = await svc.execute(command(**booker()))
    env.snapshot(ROOM1, made.uid, at(0), at(1))  # type: ignore[arg-type]
    far = datetime(2099, 1, 5, 9, tzinfo=UTC)
    moved = await svc.execute(command("update", booking_id=made.booking_id, start=iso(far),
                                      end=iso(far + timedelta(hours=1))))
    assert (moved.status, moved.reason) == ("declined", "outside_sync_window"), moved
    (item,) = env.writer.of_kind("appointment")
    assert (item.start, item.end) == (at(0), at(1)) and "move" not in env.writer.calls


async def test_a_date_the_writer_cannot_represent_is_an_invalid_command_not_an_internal_error(env):
    """Without a window (a service wired without one), year 9999 still never reaches 'internal'."""
    def overflow(*_: Any) -> None:
        raise OverflowError("date value out of range")

    env.writer.after["busy"] = overflow
    end_of_time = datetime(9999, 12, 31, 22, tzinfo=UTC)
    result = await env.service().execute(command(**booker(start=iso(end_of_time),
                                                          end=iso(end_of_time + timedelta(hours=1)))))
    assert (result.status, result.reason, result.retryable) == ("failed", "invalid_command", False), result
    assert "date" in result.message


# -- create: the room-calendar path ------------------------------------------------------------------------------------
async def test_create_for_a_booker_is_an_appointment_in_the_room_calendar(env):
    svc = env.service()
    cmd = command(**booker())
    result = await svc.execute(cmd)
    assert result.status == "accepted", result
    (item,) = env.writer.of_kind("appointment")
    assert item.mailbox == ROOM1 and item.key == cmd.key
    assert result.uid == item.uid and result.booking_id == booking_id_for(ROOM1, item.uid, None)
    assert env.resyncs == [ROOM1]
    assert env.rereads == [frozenset({item.uid})]  # what it wrote is read back, whatever SyncFolderItems says
    row = env.journal.get(cmd.key)
    assert row is not None and row.state == "done" and row.result == result and row.written is not None


async def test_a_retried_key_returns_the_stored_result_without_touching_exchange(env):
    svc = env.service()
    cmd = command(**booker())
    first = await svc.execute(cmd)
    calls = len(env.writer.calls)
    assert await svc.execute(cmd) == first
    assert len(env.writer.calls) == calls
    assert len(env.writer.of_kind("appointment")) == 1


async def test_a_key_reused_for_another_request_is_an_idempotency_conflict(env):
    svc = env.service()
    cmd = command(**booker())
    await svc.execute(cmd)
    result = await svc.execute(replace(cmd, end=at(2)))
    assert (result.status, result.reason, result.retryable) == ("failed", "idempotency_conflict", False)
    assert len(env.writer.of_kind("appointment")) == 1


async def test_a_busy_slot_is_declined_as_a_conflict_and_nothing_is_written(env):
    env.writer.external(ROOM1, at(0.5), at(1.5))
    result = await env.service().execute(command(**booker()))
    assert (result.status, result.reason) == ("declined", "conflict")
    assert env.writer.of_kind("appointment") == []


async def test_adjacent_bookings_do_not_conflict(env):
    env.writer.external(ROOM1, at(-1), at(0))
    env.writer.external(ROOM1, at(1), at(2))
    assert (await env.service().execute(command(**booker()))).status == "accepted"


async def test_a_booking_made_outside_the_gateway_during_our_write_makes_us_withdraw(env):
    env.writer.after["create_appointment"] = lambda: env.writer.external(ROOM1, at(0), at(1))
    cmd = command(**booker())
    result = await env.service().execute(cmd)
    assert (result.status, result.reason) == ("declined", "conflict")
    assert env.writer.of_kind("appointment") == [] and len(env.writer.of_kind("external")) == 1
    assert "delete_appointment" in env.writer.calls
    assert env.journal.get(cmd.key).state == "done"  # type: ignore[union-attr]
    assert env.resyncs == [ROOM1]


async def test_concurrent_creates_for_one_slot_give_exactly_one_acceptance(env):
    svc = env.service()
    cmds = [command(**booker(start=iso(at(0.25 * (i % 2))), end=iso(at(1)))) for i in range(6)]
    results = await asyncio.gather(*(svc.execute(c) for c in cmds))
    assert [r.status for r in results].count("accepted") == 1, results
    assert all(r.reason == "conflict" for r in results if r.status != "accepted")
    assert len(env.writer.of_kind("appointment")) == 1


async def test_concurrent_creates_in_different_rooms_both_succeed(env):
    svc = env.service()
    results = await asyncio.gather(svc.execute(command(**booker())), svc.execute(command(**booker(room=ROOM2))))
    assert [r.status for r in results] == ["accepted", "accepted"]


async def test_the_same_key_executed_twice_at_once_writes_once(env):
    svc = env.service()
    cmd = command(**booker())
    a, b = await asyncio.gather(svc.execute(cmd), svc.execute(cmd))
    assert a == b and a.status == "accepted"
    assert env.writer.calls.count("create_appointment") == 1


# -- create: the organizer path --------------------------------------------------------------------------------------
async def test_create_with_an_organizer_waits_for_the_room_to_accept(env):
    cmd = command(**organizer())
    result = await env.service().execute(cmd)
    assert result.status == "accepted" and "accepted" in result.message
    (item,) = env.writer.of_kind("meeting")
    assert item.mailbox == ALICE and item.answer == "accepted"
    assert env.writer.calls.count("room_answer") == env.writer.answer_after + 1
    assert result.uid == item.uid and result.booking_id == booking_id_for(ROOM1, item.uid, None)
    assert env.resyncs == [ROOM1]


async def test_a_tentative_answer_is_accepted_and_says_it_awaits_a_delegate(env):
    env.writer.attendant[ROOM1] = "tentative"
    result = await env.service().execute(command(**organizer()))
    assert result.status == "accepted" and "delegate" in result.message


@pytest.mark.parametrize("code", ["outside_booking_window", "too_long", "recurring_not_allowed", "not_permitted"])
async def test_the_attendants_decline_reason_is_the_result_and_the_meeting_is_withdrawn(env, code):
    env.writer.attendant[ROOM1] = f"decline:{code}"
    cmd = command(**organizer())
    result = await env.service().execute(cmd)
    assert (result.status, result.reason) == ("declined", code)
    assert env.writer.of_kind("meeting") == [] and "withdrawn" in result.message
    assert env.journal.by_uid("uid-1") is None


async def test_a_decline_without_a_reason_is_a_conflict_when_the_room_is_busy(env):
    env.writer.attendant[ROOM1] = "decline"
    env.writer.external(ROOM1, at(0.5), at(2))
    result = await env.service().execute(command(**organizer()))
    assert (result.status, result.reason) == ("declined", "conflict")


async def test_a_decline_without_a_reason_and_a_free_room_is_not_permitted(env):
    env.writer.attendant[ROOM1] = "decline"
    result = await env.service().execute(command(**organizer()))
    assert (result.status, result.reason) == ("declined", "not_permitted")


async def test_concurrent_meetings_for_one_slot_give_exactly_one_acceptance(env):
    svc = env.service()
    cmds = [command(**organizer(email)) for email in (ALICE, BOB)]
    results = await asyncio.gather(*(svc.execute(c) for c in cmds))
    assert sorted(r.status for r in results) == ["accepted", "declined"]
    assert [i.answer for i in env.writer.of_kind("meeting")] == ["accepted"]


async def test_a_silent_attendant_times_out_and_a_retry_of_the_key_goes_on_waiting(env):
    env.writer.attendant[ROOM1] = "silent"
    cmd = command(**organizer())
    result = await env.service(attendant_timeout_seconds=0.1).execute(cmd)
    assert (result.status, result.reason, result.retryable) == ("failed", "attendant_timeout", True)
    row = env.journal.get(cmd.key)
    assert row is not None and row.state == "started" and row.written is not None
    env.writer.attendant[ROOM1] = "accept"
    again = await env.service(attendant_timeout_seconds=0.1).execute(cmd)
    assert again.status == "accepted" and again.uid == row.uid
    assert env.writer.calls.count("create_meeting") == 1 and len(env.writer.of_kind("meeting")) == 1


async def test_an_organizer_the_gateway_may_not_impersonate_gets_a_room_calendar_booking(env):
    env.writer.denied.add(ALICE)
    result = await env.service().execute(command(**organizer()))
    assert result.status == "accepted" and "organizer as booker" in result.message
    (item,) = env.writer.of_kind("appointment")
    assert item.mailbox == ROOM1 and env.writer.of_kind("meeting") == []


# -- policy and the rate limit -----------------------------------------------------------------------------------------
async def test_a_room_the_gateway_does_not_sync_is_unknown(env):
    result = await env.service().execute(command(**booker(room="room9@contoso.com")))
    assert (result.status, result.reason) == ("declined", "room_unknown")
    assert env.writer.calls == []


async def test_a_room_policy_does_not_open_is_not_permitted(env):
    result = await env.service(writable_rooms=(ROOM2,)).execute(command(**booker()))
    assert (result.status, result.reason) == ("declined", "not_permitted")
    assert env.writer.calls == []


async def test_a_booking_longer_than_the_policy_allows_is_too_long(env):
    result = await env.service(max_duration_minutes=30).execute(command(**booker()))
    assert (result.status, result.reason) == ("declined", "too_long")
    assert env.writer.calls == []


async def test_commands_can_be_switched_off(env):
    result = await env.service(enabled=False).execute(command(**booker()))
    assert (result.status, result.reason) == ("declined", "not_permitted")


async def test_the_rate_limit_refuses_with_a_retryable_failure_until_the_bucket_refills(env):
    now = [0.0]
    svc = env.service(rate_per_minute=60, burst=2, clock=lambda: now[0])
    results = [await svc.execute(command("resync")) for _ in range(3)]
    assert [r.status for r in results] == ["accepted", "accepted", "failed"]
    assert (results[2].reason, results[2].retryable) == ("rate_limited", True)
    now[0] += 1.0
    assert (await svc.execute(command("resync"))).status == "accepted"
    assert env.resyncs == [ROOM1] * 3


# -- crash recovery ----------------------------------------------------------------------------------------------------
async def test_a_started_row_with_its_write_recorded_continues_without_writing_again(env):
    cmd = command(**booker())
    env.journal.begin(cmd)  # the previous process wrote, recorded it, and died before confirming
    written = await env.writer.create_appointment(ROOM1, cmd)
    env.journal.record_write(cmd.key, written)
    env.writer.calls.clear()
    result = await env.service().execute(cmd)
    assert result.status == "accepted" and result.uid == written.uid
    assert "create_appointment" not in env.writer.calls and "find_by_key" not in env.writer.calls
    assert env.journal.get(cmd.key).state == "done"  # type: ignore[union-attr]


async def test_a_started_row_without_a_record_asks_exchange_whether_the_write_happened(env):
    cmd = command(**booker())
    env.journal.begin(cmd)  # the previous process died between the write and recording it
    written = await env.writer.create_appointment(ROOM1, cmd)
    env.writer.calls.clear()
    result = await env.service().execute(cmd)
    assert result.status == "accepted" and result.uid == written.uid
    assert "find_by_key" in env.writer.calls and "create_appointment" not in env.writer.calls
    assert len(env.writer.of_kind("appointment")) == 1


async def test_a_started_row_whose_write_never_happened_writes_once(env):
    cmd = command(**booker())
    env.journal.begin(cmd)  # the previous process died before the write
    result = await env.service().execute(cmd)
    assert result.status == "accepted"
    assert env.writer.calls.count("create_appointment") == 1 and len(env.writer.of_kind("appointment")) == 1


async def test_a_started_meeting_is_found_in_the_organizers_calendar_and_awaited(env):
    cmd = command(**organizer())
    env.journal.begin(cmd)
    written = await env.writer.create_meeting(ALICE, ROOM1, cmd)
    env.writer.calls.clear()
    result = await env.service().execute(cmd)
    assert result.status == "accepted" and result.uid == written.uid
    assert "create_meeting" not in env.writer.calls and len(env.writer.of_kind("meeting")) == 1


async def test_a_lost_answer_to_a_write_is_retryable_and_the_retry_books_once(env):
    env.writer.fail_after_write["create_appointment"] = Unavailable("connection reset")
    svc = env.service()
    cmd = command(**booker())
    first = await svc.execute(cmd)
    assert (first.status, first.reason, first.retryable) == ("failed", "exchange_unavailable", True)
    assert env.journal.get(cmd.key).state == "started"  # type: ignore[union-attr]
    second = await svc.execute(cmd)
    assert second.status == "accepted"
    assert len(env.writer.of_kind("appointment")) == 1


class NobodyKnown:
    """A directory that knows nobody (every organizer is unknown: external by default)."""

    async def organizer(self, email: str, group: str | None) -> tuple[bool, bool | None] | None:
        return None


@pytest.mark.parametrize("why", ["external", "impersonation_denied", "no_mailbox"])
async def test_a_retried_room_calendar_create_answers_with_the_note_of_an_uninterrupted_one(env, why):
    organizers = OrganizerCheck(NobodyKnown(), CommandsConfig()) if why == "external" else None
    if why == "impersonation_denied":
        env.writer.denied.add(ALICE)
    elif why == "no_mailbox":
        env.writer.no_mailbox.add(ALICE)
    svc = env.service(organizers=organizers)
    plain = await svc.execute(command(**organizer(start=iso(at(4)), end=iso(at(5)))))
    assert plain.status == "accepted" and "organizer as booker" in plain.message
    env.writer.fail_after_write["create_appointment"] = Unavailable("connection reset")
    cmd = command(**organizer())
    first = await svc.execute(cmd)
    assert (first.status, first.retryable) == ("failed", True)
    second = await svc.execute(cmd)  # the write happened: the retry finds it and confirms it
    assert second.status == "accepted" and second.message == plain.message
    env.writer.fail["busy"] = [Unavailable("connection reset")]  # the write recorded, its check failed
    cmd = command(**organizer(start=iso(at(6)), end=iso(at(7))))
    assert (await svc.execute(cmd)).status == "failed"
    third = await svc.execute(cmd)
    assert third.status == "accepted" and third.message == plain.message
    assert len(env.writer.of_kind("appointment")) == 3


# -- errors from Exchange ----------------------------------------------------------------------------------------------
async def test_exchange_unavailable_before_any_write_is_retryable_and_leaves_no_journal_row(env):
    env.writer.fail["busy"] = [Unavailable("cannot connect")]
    svc = env.service()
    cmd = command(**booker())
    result = await svc.execute(cmd)
    assert (result.status, result.reason, result.retryable) == ("failed", "exchange_unavailable", True)
    assert env.journal.get(cmd.key) is None
    assert (await svc.execute(cmd)).status == "accepted"


async def test_an_auth_failure_is_not_retryable_and_says_what_to_do(env):
    env.writer.fail["create_appointment"] = [AuthError("401")]
    cmd = command(**booker())
    result = await env.service().execute(cmd)
    assert (result.status, result.retryable) == ("failed", False)
    assert result.reason in ERROR_CODES and AuthError.remedy in result.message
    assert env.journal.get(cmd.key) is None  # refused before writing: a retry after the fix starts afresh


async def test_an_unexpected_error_is_an_internal_failure_logged_once_with_the_key(env):
    env.writer.fail["busy"] = [RuntimeError("boom")]
    cmd = command(**booker())
    with capture_logs() as logs:
        result = await env.service().execute(cmd)
    assert (result.status, result.reason) == ("failed", "internal")
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1 and errors[0]["key"] == cmd.key
    assert env.journal.get(cmd.key) is None


async def test_every_outcome_is_logged_and_counted_without_subjects_or_people(env):
    metrics = Metrics()
    svc = env.service(metrics=metrics)
    with capture_logs() as logs:
        await svc.execute(command(**organizer()))
        await svc.execute(command(**booker(start=iso(at(0.5)), end=iso(at(1.5)))))
    done = [e for e in logs if e["event"] == "command.done"]
    assert [(e["type"], e["status"], e["reason"]) for e in done] == [("create", "accepted", None),
                                                                      ("create", "declined", "conflict")]
    assert all({"key", "room", "ms"} <= set(e) for e in done)
    text = repr(logs)
    assert "Q3 review" not in text and ALICE not in text and "Alice" not in text
    sample = metrics.registry.get_sample_value
    assert sample("gateway_commands_total", {"type": "create", "status": "accepted", "reason": ""}) == 1
    assert sample("gateway_commands_total", {"type": "create", "status": "declined", "reason": "conflict"}) == 1
    assert sample("gateway_command_duration_seconds_count", {"type": "create"}) == 2


# -- update -----------------------------------------------------------------------------------------------------------
async def _created(env: Env, svc: CommandService, **fields: Any) -> tuple[Booking, Any]:
    result = await svc.execute(command(**fields))
    assert result.status == "accepted", result
    booking = env.snapshot(ROOM1, result.uid, at(0), at(1))
    assert booking.id == result.booking_id
    return booking, result


async def test_update_moves_the_gateways_appointment(env):
    svc = env.service()
    booking, _ = await _created(env, svc, **booker())
    result = await svc.execute(command("update", booking_id=booking.id, start=iso(at(2)), end=iso(at(3))))
    assert result.status == "accepted" and result.booking_id == booking.id
    (item,) = env.writer.of_kind("appointment")
    assert (item.start, item.end) == (at(2), at(3))


async def test_update_into_a_busy_slot_is_declined_and_nothing_moves(env):
    svc = env.service()
    booking, _ = await _created(env, svc, **booker())
    env.writer.external(ROOM1, at(2), at(3))
    result = await svc.execute(command("update", booking_id=booking.id, start=iso(at(2)), end=iso(at(3))))
    assert (result.status, result.reason) == ("declined", "conflict")
    (item,) = env.writer.of_kind("appointment")
    assert (item.start, item.end) == (at(0), at(1))


async def test_extending_a_booking_over_its_own_time_is_no_conflict(env):
    svc = env.service()
    booking, _ = await _created(env, svc, **booker())
    result = await svc.execute(command("update", booking_id=booking.id, start=iso(at(0)), end=iso(at(1.5))))
    assert result.status == "accepted"


async def test_update_of_a_meeting_waits_for_the_room_again(env):
    svc = env.service()
    booking, _ = await _created(env, svc, **organizer())
    env.writer.calls.clear()
    result = await svc.execute(command("update", booking_id=booking.id, start=iso(at(4)), end=iso(at(5))))
    assert result.status == "accepted"
    assert env.writer.calls.count("room_answer") == env.writer.answer_after + 1
    env.writer.external(ROOM1, at(6), at(7))
    result = await svc.execute(command("update", booking_id=booking.id, start=iso(at(6)), end=iso(at(7))))
    assert (result.status, result.reason) == ("declined", "conflict")
    # The meeting goes back to the time of the booking the room had accepted, and the room is asked again.
    (item,) = env.writer.of_kind("meeting")
    assert (item.start, item.end) == (booking.start, booking.end) and "previous time" in result.message


async def test_update_of_an_unknown_booking_is_not_found(env):
    result = await env.service().execute(command("update", booking_id="nope"))
    assert (result.status, result.reason, result.retryable) == ("failed", "not_found", False)


async def test_update_of_a_booking_the_gateway_did_not_create_is_refused(env):
    b = env.snapshot(ROOM1, env.writer.external(ROOM1, at(0), at(1)).uid, at(0), at(1))
    result = await env.service().execute(command("update", booking_id=b.id))
    assert (result.status, result.reason) == ("failed", "not_created_by_gateway")
    assert "move" not in env.writer.calls


# -- cancel and decline -----------------------------------------------------------------------------------------------
async def test_cancel_deletes_the_gateways_appointment(env):
    svc = env.service()
    booking, _ = await _created(env, svc, **booker())
    env.resyncs.clear()
    result = await svc.execute(command("cancel", booking_id=booking.id))
    assert result.status == "accepted" and env.writer.of_kind("appointment") == []
    assert env.resyncs == [ROOM1]
    assert env.rereads[-1] == frozenset({booking.uid})


async def test_cancel_cancels_the_gateways_meeting_as_its_organizer(env):
    svc = env.service()
    booking, _ = await _created(env, svc, **organizer())
    result = await svc.execute(command("cancel", booking_id=booking.id))
    assert result.status == "accepted" and env.writer.of_kind("meeting") == []
    assert "cancel_meeting" in env.writer.calls


async def test_cancel_of_someone_elses_meeting_is_refused_and_nothing_is_deleted(env):
    b = env.snapshot(ROOM1, env.writer.external(ROOM1, at(0), at(1)).uid, at(0), at(1))
    result = await env.service().execute(command("cancel", booking_id=b.id))
    assert (result.status, result.reason) == ("failed", "not_created_by_gateway")
    assert len(env.writer.of_kind("external")) == 1


async def test_cancel_of_an_item_already_gone_from_exchange_is_not_found_and_resyncs(env):
    svc = env.service()
    booking, _ = await _created(env, svc, **booker())
    env.writer.items.clear()
    env.resyncs.clear()
    result = await svc.execute(command("cancel", booking_id=booking.id))
    assert (result.status, result.reason) == ("failed", "not_found")
    assert env.resyncs == [ROOM1]


async def test_decline_of_someone_elses_meeting_declines_as_the_room(env):
    item = env.writer.external(ROOM1, at(0), at(1))
    b = env.snapshot(ROOM1, item.uid, at(0), at(1))
    result = await env.service().execute(command("decline", booking_id=b.id, message="Room closed for works"))
    assert result.status == "accepted"
    assert env.writer.declined == [(ROOM1, item.uid, "Room closed for works")]
    # A server may apply the decline without a change SyncFolderItems reports: the meeting is read back anyway.
    assert (env.resyncs, env.rereads) == ([ROOM1], [frozenset({item.uid})])
    assert item.item_id in env.writer.items  # the organizer's meeting stays


async def test_decline_of_the_gateways_own_appointment_deletes_it(env):
    svc = env.service()
    booking, _ = await _created(env, svc, **booker())
    result = await svc.execute(command("decline", booking_id=booking.id))
    assert result.status == "accepted" and env.writer.of_kind("appointment") == []
    assert "decline_as_room" not in env.writer.calls


async def test_decline_of_an_appointment_made_in_the_room_calendar_by_someone_else_deletes_nothing(env):
    item = env.writer.external(ROOM1, at(0), at(1), room_organizes=True)
    b = Booking(room=ROOM1, uid=item.uid, start=at(0), end=at(1))
    env.store.commit_sync(ROOM1, upserts=[b], deletes=(), events=(), item_uids={item.item_id: item.uid})
    result = await env.service().execute(command("decline", booking_id=b.id))
    assert (result.status, result.reason, result.retryable) == ("failed", "not_created_by_gateway", False)
    assert len(env.writer.items) == 1  # the gateway never deletes what it did not create (design.md §5)
    series = env.snapshot(ROOM1, item.uid, at(0), at(1), original_start=at(0), series_id="s1")
    result = await env.service().execute(command("decline", key="k-occ", booking_id=series.id))
    assert (result.status, result.reason) == ("failed", "not_created_by_gateway")
    assert len(env.writer.items) == 1


# -- resync and availability -------------------------------------------------------------------------------------------
async def test_resync_asks_for_a_sync_of_a_known_room_only(env):
    svc = env.service()
    assert (await svc.execute(command("resync"))).status == "accepted"
    assert (env.resyncs, env.rereads) == ([ROOM1], [frozenset()])
    unknown = await svc.execute(command("resync", room="room9@contoso.com"))
    assert (unknown.status, unknown.reason) == ("declined", "room_unknown")


async def test_availability_lists_busy_times_per_room(env):
    env.writer.external(ROOM1, at(1), at(2))
    cmd = parse_command({"key": "a1", "type": "availability", "rooms": [ROOM1, ROOM2.upper()],
                         "start": iso(at(0)), "end": iso(at(8))})
    result = await env.service().execute(cmd)
    assert result.status == "accepted"
    assert result.data == {"rooms": {ROOM1: [{"start": iso(at(1)), "end": iso(at(2)), "status": "busy"}],
                                     ROOM2: []}}
    unknown = await env.service().execute(replace(cmd, rooms=(ROOM1, "room9@contoso.com")))
    assert (unknown.status, unknown.reason) == ("declined", "room_unknown")


async def test_availability_while_exchange_is_down_is_retryable(env):
    env.writer.fail["availability"] = [Unavailable("down")]
    cmd = parse_command({"key": "a2", "type": "availability", "rooms": [ROOM1], "start": iso(at(0)),
                         "end": iso(at(8))})
    result = await env.service().execute(cmd)
    assert (result.status, result.reason, result.retryable) == ("failed", "exchange_unavailable", True)



async def test_a_stale_item_during_a_move_is_retryable_and_resyncs(env):
    svc = env.service()
    booking, _ = await _created(env, svc, **booker())
    env.resyncs.clear()
    env.writer.fail["move"] = [PreconditionFailed("changed", key="stale_change_key")]
    cmd = command("update", booking_id=booking.id, start=iso(at(2)), end=iso(at(3)))
    result = await svc.execute(cmd)
    assert (result.status, result.reason, result.retryable) == ("failed", "exchange_unavailable", True)
    assert env.resyncs == [ROOM1]
    assert (await svc.execute(cmd)).status == "accepted"


async def test_a_retried_cancel_whose_first_attempt_reached_exchange_is_accepted(env):
    svc = env.service()
    booking, _ = await _created(env, svc, **booker())
    cmd = command("cancel", booking_id=booking.id)
    env.journal.begin(cmd)  # the first attempt deleted the item, then the process died
    env.writer.items.clear()
    result = await svc.execute(cmd)
    assert result.status == "accepted" and env.journal.get(cmd.key).state == "done"  # type: ignore[union-attr]


async def test_a_withdrawal_that_fails_still_reports_the_decline_and_says_the_meeting_stayed(env):
    env.writer.attendant[ROOM1] = "decline:too_long"
    env.writer.fail["cancel_meeting"] = [Unavailable("down")]
    result = await env.service().execute(command(**organizer()))
    assert (result.status, result.reason) == ("declined", "too_long")
    assert "still in the organizer's calendar" in result.message


async def test_recovery_looks_in_the_room_calendar_when_the_organizer_cannot_be_impersonated(env):
    cmd = command(**organizer())
    env.journal.begin(cmd)  # the first attempt fell back to the room calendar, then the process died
    written = await env.writer.create_appointment(ROOM1, replace(cmd, organizer=None, booker=cmd.organizer))
    env.writer.denied.add(ALICE)
    env.writer.calls.clear()
    result = await env.service().execute(cmd)
    assert result.status == "accepted" and result.uid == written.uid and "organizer as booker" in result.message
    assert "create_appointment" not in env.writer.calls and "create_meeting" not in env.writer.calls


async def test_a_busy_journal_is_a_retryable_failure(env, monkeypatch):
    def busy(cmd: Command) -> None:
        raise TransientError("database is locked", key="store_busy")

    monkeypatch.setattr(env.journal, "begin", busy)
    result = await env.service().execute(command(**booker()))
    assert (result.status, result.reason, result.retryable) == ("failed", "internal", True)
    assert env.writer.calls == []
