"""The sync coordinator on the in-memory source: what people do to room calendars becomes exactly the expected
events and room states, without a network in between.

A source's change token tells when the coordinator has caught up (the store holds the token that covers every
change of the room, committed with that change's events), so the tests wait for that evidence, never for a
quiet period. The end-to-end versions over EWS and HTTP stay in test_gateway_sync.py and test_gateway_rooms.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from structlog.testing import capture_logs

from gateway import service
from gateway.errors import AuthError, Throttled, Unavailable, Unreachable
from gateway.model import EVENT_TYPES, ROOM_STATES, Event, Room
from gateway.sources.memory import MemorySource
from gateway.sources.outage import OutageGate
from gateway.store.sqlite import SqliteStore
from gateway.sync.coordinator import ROOMS_PER_SLOT, Coordinator, SyncSettings
from tests.conftest import eventually

ROOM1, ROOM2, ROOM3 = "room1@contoso.com", "room2@contoso.com", "room3@contoso.com"
ALICE, BOB = "alice@contoso.com", "bob@contoso.com"
CREATED, UPDATED, DELETED = EVENT_TYPES["created"], EVENT_TYPES["updated"], EVENT_TYPES["deleted"]
ROOM_STATE = EVENT_TYPES["room_state"]


class Running:
    """A coordinator syncing rooms of the in-memory source into a SQLite store, woken by the source's feed."""

    def __init__(self, source: MemorySource, store: SqliteStore, coordinator: Coordinator) -> None:
        self.source = source
        self.store = store
        self.coordinator = coordinator

    def events(self, room: str | None = None, type_: str | None = None) -> list[Event]:
        return [e.event for e in self.store.outbox_after(0, 100_000)
                if (room is None or e.event.room == room) and (type_ is None or e.event.type == type_)]

    def states(self, room: str) -> list[str]:
        return [e.data["state"] for e in self.events(room, ROOM_STATE)]

    def imported(self, *rooms: str) -> bool:
        return all(self.states(r)[-2:] == ["syncing", "verified"] for r in rooms)

    async def caught_up(self, *rooms: str) -> None:
        """Wait until the store holds the token that covers every change of the rooms so far."""
        await eventually(lambda: all(self.store.sync_state(r) == self.source.token(r) for r in rooms),
                         timeout=10, what=f"the coordinator caught up with {rooms}")


Start = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start(memory_source: MemorySource, tmp_path: Path) -> AsyncIterator[Start]:
    running: list[tuple[Running, asyncio.Task[None]]] = []

    async def run(rooms: tuple[str, ...], **settings: Any) -> Running:
        store = SqliteStore(tmp_path / "gateway.sqlite")
        sync = SyncSettings(**{"debounce_seconds": 0.0, "retry_seconds": 0.05, "auth_retry_seconds": 0.2,
                               **settings})
        coordinator = Coordinator(memory_source, store, sync, clock=memory_source.clock)
        await coordinator.start(rooms)
        feed = asyncio.get_running_loop().create_task(memory_source.watch(rooms, coordinator.mark_dirty))
        r = Running(memory_source, store, coordinator)
        running.append((r, feed))
        return r

    yield run
    for r, feed in running:
        feed.cancel()
        await r.coordinator.stop()
        r.store.close()


async def test_a_meeting_created_moved_and_cancelled_is_one_event_each_under_one_booking_id(
        start: Start, memory_source: MemorySource) -> None:
    g = await start((ROOM1, ROOM2))
    await eventually(lambda: g.imported(ROOM1, ROOM2), what="imported")
    begin = memory_source.now + timedelta(days=2)
    uid = memory_source.book(ALICE, [ROOM1], begin, begin + timedelta(hours=1), "Q3 review")
    await g.caught_up(ROOM1)
    [created] = g.events(ROOM1, CREATED)
    assert created.data["uid"] == uid and created.data["subject"] == "Q3 review"
    assert created.data["organizer"]["email"] == ALICE

    memory_source.move(uid, begin + timedelta(hours=2), begin + timedelta(hours=4))  # moved and extended
    await g.caught_up(ROOM1)
    [updated] = g.events(ROOM1, UPDATED)
    assert updated.data["id"] == created.data["id"] and updated.data["end"] > created.data["end"]

    memory_source.cancel(uid)
    await g.caught_up(ROOM1)
    [deleted] = g.events(ROOM1, DELETED)
    assert deleted.data["id"] == created.data["id"] and deleted.data["reason"] == "removed_from_exchange"
    assert len(g.events(ROOM1, CREATED)) == 1 and len(g.events(ROOM1, UPDATED)) == 1
    assert g.store.bookings(ROOM1) == [] and g.events(ROOM2, CREATED) == []


async def test_many_new_rooms_read_the_room_table_once_not_once_a_room(
        start: Start, memory_source: MemorySource, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each new room looked its row up among every stored room on its first state: 10,000 rooms read 10^8 rows.
    rooms = tuple(f"many{i}@contoso.com" for i in range(40))
    for room in rooms:
        memory_source.add_room(room)
    reads: list[int] = []
    every_room = SqliteStore.rooms

    def counted(self: SqliteStore) -> list[Room]:
        reads.append(1)
        return every_room(self)
    monkeypatch.setattr(SqliteStore, "rooms", counted)
    g = await start(rooms, max_concurrent_rooms=4)
    await eventually(lambda: g.imported(*rooms), what="every room imported")
    assert len(reads) == 1  # start()'s, to release rooms no longer owned
    await g.coordinator.remove_room(rooms[0])
    assert len(reads) == 1 and rooms[0] not in {r.email for r in every_room(g.store)}


async def imported_then_stopped(start: Start, memory_source: MemorySource, rooms: tuple[str, ...], slots: int) -> None:
    """The rooms, imported by a coordinator that then stopped: the store a restart finds."""
    for room in rooms:
        memory_source.add_room(room)
    first = await start(rooms, max_concurrent_rooms=slots)
    await eventually(lambda: first.imported(*rooms), what="every room imported")
    await first.coordinator.stop()


def hold_full_reads(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Full reads (Coordinator.reconcile) wait until the event returned is set."""
    held = asyncio.Event()
    reconcile = Coordinator.reconcile

    async def slow(self: Coordinator, w: Any, **kwargs: Any) -> Any:
        await held.wait()
        return await reconcile(self, w, **kwargs)
    monkeypatch.setattr(Coordinator, "reconcile", slow)
    return held


async def test_after_a_restart_every_room_catches_up_before_any_is_read_in_full_a_few_at_a_time(
        start: Start, memory_source: MemorySource, monkeypatch: pytest.MonkeyPatch) -> None:
    # A restart owes each room a full read; a change made while no gateway ran, in the last room, is read by that
    # room's sync from its stored state, which comes before all but the first few full reads, not after them.
    rooms = tuple(f"room{i}@contoso.com" for i in range(10, 30))
    await imported_then_stopped(start, memory_source, rooms, slots=2)
    begin = memory_source.now + timedelta(days=1)
    meanwhile = memory_source.book(ALICE, [rooms[-1]], begin, begin + timedelta(hours=1), "Meanwhile")
    order: list[tuple[str, str]] = []
    for op in ("changes", "read_window"):
        def logged(original: Any, name: str) -> Callable[..., Awaitable[Any]]:
            async def call(room: str, *args: Any, **kwargs: Any) -> Any:
                order.append((name, room))
                return await original(room, *args, **kwargs)
            return call
        setattr(memory_source, op, logged(getattr(memory_source, op), op))
    reading: set[str] = set()
    most = 0
    reconcile = Coordinator.reconcile

    async def counted(self: Coordinator, w: Any, **kwargs: Any) -> Any:
        nonlocal most
        reading.add(w.email)
        most = max(most, len(reading))
        try:
            await asyncio.sleep(0.01)  # (a read takes a while)
            return await reconcile(self, w, **kwargs)
        finally:
            reading.discard(w.email)
    monkeypatch.setattr(Coordinator, "reconcile", counted)
    g = await start(rooms, max_concurrent_rooms=2)
    await eventually(lambda: all(g.coordinator.workers[r].horizon is not None for r in rooms),
                     what="every room read in full again")
    catch_ups = [i for i, (op, _) in enumerate(order) if op == "changes"]
    reads = [i for i, (op, _) in enumerate(order) if op == "read_window"]
    assert {order[i][1] for i in catch_ups} == {order[i][1] for i in reads} == set(rooms)
    early = [i for i in reads if i < max(catch_ups)]  # full reads before the last room caught up: its turns at most
    assert len(early) <= ROOMS_PER_SLOT * 2, f"{len(early)} rooms were read in full before every room caught up"
    assert [e.data["uid"] for e in g.events(rooms[-1], CREATED)] == [meanwhile]
    # The full reads wait their turns: at most ROOMS_PER_SLOT a request slot at once (two slots here).
    assert 2 <= most <= ROOMS_PER_SLOT * 2 < len(rooms)


async def test_a_room_waiting_for_its_full_read_after_a_restart_syncs_its_changes_meanwhile(
        start: Start, memory_source: MemorySource, monkeypatch: pytest.MonkeyPatch) -> None:
    rooms = tuple(f"room{i}@contoso.com" for i in range(10, 20))
    await imported_then_stopped(start, memory_source, rooms, slots=1)
    held = hold_full_reads(monkeypatch)  # the full reads that got their turn do not end until the test says so
    g = await start(rooms, max_concurrent_rooms=1)
    await eventually(lambda: all(g.coordinator.workers[r].last_success is not None for r in rooms),
                     what="every room caught up")
    begin = memory_source.now + timedelta(days=1)
    uid = memory_source.book(ALICE, [rooms[-1]], begin, begin + timedelta(hours=1), "While the others are read")
    await eventually(lambda: [e.data["uid"] for e in g.events(rooms[-1], CREATED)] == [uid],
                     what="the last room's change, while the full reads ahead of it wait")
    assert all(g.coordinator.workers[r].horizon is None for r in rooms)  # (no full read has ended)
    held.set()
    await eventually(lambda: all(g.coordinator.workers[r].horizon is not None for r in rooms),
                     what="every room read in full again")
    assert g.coordinator._starting._value == ROOMS_PER_SLOT * 1  # every turn used and given back


async def test_a_room_removed_while_its_full_read_waits_its_turn_gives_the_turn_back(
        start: Start, memory_source: MemorySource, monkeypatch: pytest.MonkeyPatch) -> None:
    rooms = tuple(f"room{i}@contoso.com" for i in range(10, 16))
    await imported_then_stopped(start, memory_source, rooms, slots=1)
    held = hold_full_reads(monkeypatch)
    g = await start(rooms, max_concurrent_rooms=1)
    await eventually(lambda: all(g.coordinator.workers[r].last_success is not None for r in rooms),
                     what="every room caught up")
    await asyncio.sleep(0.1)  # (the first rooms hold their turns, the others wait for one)
    for room in (rooms[0], rooms[-1]):  # one reading, one waiting (another replica owns them now)
        await g.coordinator.remove_room(room)
    held.set()
    await eventually(lambda: all(g.coordinator.workers[r].horizon is not None for r in rooms[1:-1]),
                     what="the other rooms read in full")
    await eventually(lambda: g.coordinator._starting._value == ROOMS_PER_SLOT * 1, what="every turn given back")


async def test_a_room_is_verified_by_its_first_call_an_import_or_after_a_restart_a_sync_from_its_state(
        start: Start, memory_source: MemorySource) -> None:
    # An import's first SyncFolderItems fails as the verification would (tests/test_source_contract.py): one call
    # less per room. After a restart, so does the sync from the room's stored state that catches up with what
    # happened meanwhile, before the room's whole window is read again; it takes the mark of the room's new
    # subscription with it (a second sync would find nothing).
    begin = memory_source.now + timedelta(days=1)
    memory_source.book(ALICE, [ROOM1], begin, begin + timedelta(hours=1), "Planning")
    first = await start((ROOM1,))
    await eventually(lambda: first.imported(ROOM1), what="imported")
    assert memory_source.calls["verify"] == 0 and first.states(ROOM1) == ["syncing", "verified"]
    await first.coordinator.stop()
    meanwhile = memory_source.book(BOB, [ROOM1], begin + timedelta(hours=2), begin + timedelta(hours=3), "Meanwhile")
    calls = memory_source.calls.copy()

    second = await start((ROOM1,))
    second.coordinator.mark_dirty(ROOM1, "subscribed")  # (the room's task has not run yet)
    await eventually(lambda: second.coordinator.workers[ROOM1].last_success is not None, what="ROOM1 read again")
    await asyncio.sleep(0.3)  # a sync for the mark would start at once (debounce 0)
    assert memory_source.calls - calls == Counter({"changes": 1, "read_meetings": 1, "read_window": 1})
    assert second.states(ROOM1) == ["syncing", "verified"]  # (as the store left it: nothing new to announce)
    assert second.coordinator.workers[ROOM1].state == "verified"
    assert [e.data["uid"] for e in second.events(ROOM1, CREATED)] == [first.events(ROOM1, CREATED)[0].data["uid"],
                                                                      meanwhile]


async def test_a_room_marked_dirty_before_its_import_is_not_synced_again_after_it(
        start: Start, memory_source: MemorySource) -> None:
    # Every new subscription marks its room dirty (to catch what happened before it); an import that starts after
    # the mark reads all of that itself, and a sync after it would find nothing (a call per room at 10,000 rooms).
    begin = memory_source.now + timedelta(days=1)
    memory_source.book(ALICE, [ROOM1], begin, begin + timedelta(hours=1), "Planning")
    running = await start((ROOM1,))
    running.coordinator.mark_dirty(ROOM1, "subscribed")  # (the room's task has not run yet)
    await eventually(lambda: running.imported(ROOM1), what="imported")
    await asyncio.sleep(0.3)  # a sync for the mark would start at once (debounce 0)
    assert memory_source.calls["changes"] == 1
    running.coordinator.mark_dirty(ROOM1, "notification")  # a mark after the import is synced
    await eventually(lambda: memory_source.calls["changes"] == 2, what="a sync for the later mark")


async def test_rooms_steps_that_meet_at_the_store_share_a_transaction_and_each_is_whole(
        start: Start, memory_source: MemorySource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An import commits a room every few milliseconds: the steps that arrive while the store writes share its next
    # transaction. Here the store's writer is held until several rooms' steps wait for it.
    rooms = tuple(f"room{i}@contoso.com" for i in range(40, 52))
    for i, room in enumerate(rooms):
        memory_source.add_room(room)
        begin = memory_source.clock() + timedelta(hours=i + 1)
        memory_source.book(ALICE, [room], begin, begin + timedelta(hours=1), f"Meeting {i}")
    known = SqliteStore(tmp_path / "gateway.sqlite")  # the rooms' rows, as a restarted gateway finds them
    for room in rooms:
        known.upsert_room(Room(room))
    known.close()
    batches: list[list[str]] = []
    real = SqliteStore.commit_syncs
    monkeypatch.setattr(SqliteStore, "commit_syncs",
                        lambda self, steps: batches.append([room for room, _ in steps]) or real(self, steps))
    # Every room's import asks for its first changes; then the store's writer is held, and the answers go out.
    asked: list[str] = []
    answer = asyncio.Event()
    first_changes = memory_source.changes

    async def gathered(room: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(room)
        await answer.wait()
        return await first_changes(room, *args, **kwargs)
    memory_source.changes = gathered  # type: ignore[method-assign]
    g = await start(rooms, max_concurrent_rooms=12)
    await eventually(lambda: len(asked) >= len(rooms), what="every room's import asking for its first changes")
    held = threading.Event()
    g.coordinator._writer.submit(held.wait, 30)
    answer.set()
    # A room's state is set as its step is handed to the store: every room's waits now.
    await eventually(lambda: all(w.state == "syncing" for w in g.coordinator.workers.values()),
                     what="every room's syncing state waiting for the store")
    held.set()
    await eventually(lambda: g.imported(*rooms), what="every room imported")
    assert max(len(b) for b in batches) >= 4
    for i, room in enumerate(rooms):  # each room's step whole: its booking, its events, its sequence
        assert [e.data["subject"] for e in g.events(room, CREATED)] == [f"Meeting {i}"]
        assert [e.sequence for e in g.events(room)] == list(range(1, len(g.events(room)) + 1))


@pytest.mark.parametrize("announce", [True, False])
async def test_a_replicas_import_into_an_empty_snapshot_is_framed_by_room_snapshot_events(
        start: Start, memory_source: MemorySource, announce: bool) -> None:
    snapshot = EVENT_TYPES["room_snapshot"]
    begin = memory_source.now + timedelta(days=2)
    uid = memory_source.book(ALICE, [ROOM1], begin, begin + timedelta(hours=1), "Before the handover")
    g = await start((ROOM1,), announce_snapshots=announce)
    await eventually(lambda: g.imported(ROOM1), what="imported")
    kinds = [e.type for e in g.events(ROOM1) if e.type != ROOM_STATE]
    if not announce:  # one gateway owns its rooms for good: nothing to frame
        assert kinds == [CREATED]
        return
    assert kinds == [snapshot, CREATED, snapshot]
    first, last = g.events(ROOM1, snapshot)
    assert (first.data["phase"], last.data["phase"]) == ("begin", "end")
    assert first.data["window"] == last.data["window"] and first.data["room"] == ROOM1
    schemas = Path(__file__).resolve().parent.parent / "gateway" / "schemas"
    registry: Registry[Any] = Registry().with_resources(
        (f"https://exchange-gateway.dev/schemas/{p.relative_to(schemas).as_posix()}",
         Resource.from_contents(json.loads(p.read_text()))) for p in schemas.rglob("*.json"))
    check = Draft202012Validator(json.loads((schemas / "relay" / "cloudevent.v1.json").read_text()), registry=registry)
    for event in (first, last):
        check.validate(event.to_cloudevent())

    # Later changes, and a full read of a room whose snapshot is not empty, are not framed.
    memory_source.move(uid, begin + timedelta(hours=2), begin + timedelta(hours=3))
    await g.caught_up(ROOM1)
    await g.coordinator.reconcile(g.coordinator.workers[ROOM1], snapshot=True)
    assert len(g.events(ROOM1, snapshot)) == 2 and len(g.events(ROOM1, UPDATED)) == 1


async def test_a_series_with_a_moved_and_a_cancelled_occurrence(start: Start, memory_source: MemorySource) -> None:
    g = await start((ROOM2,))
    await eventually(lambda: g.imported(ROOM2), what="imported")
    first = memory_source.now + timedelta(days=3)
    uid = memory_source.book(BOB, [ROOM2], first, first + timedelta(minutes=30), "Weekly sync", repeat="weekly",
                             count=4)
    await g.caught_up(ROOM2)
    ids = {e.data["id"] for e in g.events(ROOM2, CREATED)}
    assert len(ids) == 4 and {e.data["series_id"] for e in g.events(ROOM2, CREATED)} == {uid}

    second, third = first + timedelta(weeks=1), first + timedelta(weeks=2)
    memory_source.move(uid, second + timedelta(hours=1), second + timedelta(hours=1, minutes=30), occurrence=second)
    memory_source.cancel(uid, occurrence=third)
    await g.caught_up(ROOM2)
    [updated], [deleted] = g.events(ROOM2, UPDATED), g.events(ROOM2, DELETED)
    assert updated.data["is_exception"] and updated.data["id"] in ids
    assert deleted.data["id"] in ids and deleted.data["id"] != updated.data["id"]
    assert len(g.events(ROOM2, CREATED)) == 4 and len(g.store.bookings(ROOM2)) == 3


async def test_a_change_of_the_token_without_a_change_of_content_sends_nothing(
        start: Start, memory_source: MemorySource) -> None:
    begin = memory_source.now + timedelta(days=1)
    memory_source.book(ALICE, [ROOM1], begin, begin + timedelta(hours=1), "Stable")
    g = await start((ROOM1,))
    await eventually(lambda: g.imported(ROOM1), what="imported")
    await g.caught_up(ROOM1)
    before, reads = len(g.events()), memory_source.calls["read_meetings"]

    memory_source.touch(ROOM1)  # every item re-stamped (a new ChangeKey), nothing else
    await g.caught_up(ROOM1)
    assert memory_source.calls["read_meetings"] > reads  # the coordinator did look at the meeting again
    assert len(g.events()) == before


async def test_an_invalid_change_token_leads_to_a_new_import_without_duplicates(
        start: Start, memory_source: MemorySource) -> None:
    begin = memory_source.now + timedelta(days=1)
    g = await start((ROOM2,))
    await eventually(lambda: g.imported(ROOM2), what="imported")
    memory_source.book(ALICE, [ROOM2], begin, begin + timedelta(hours=1), "Before")
    await g.caught_up(ROOM2)
    g.store.commit_sync(ROOM2, upserts=(), deletes=(), events=(), sync_state="not-a-token-of-this-source")

    with capture_logs() as logs:
        memory_source.book(ALICE, [ROOM2], begin + timedelta(hours=3), begin + timedelta(hours=4), "After")
        await g.caught_up(ROOM2)
    assert [e["room"] for e in logs if e["event"] == "sync.state_invalid"] == [ROOM2]
    # The new import takes the token before it reads the window, and announces the room in sync again.
    await eventually(lambda: g.states(ROOM2)[-2:] == ["syncing", "verified"], what="the new import announced")
    created = Counter(e.data["subject"] for e in g.events(ROOM2, CREATED))
    assert created == {"Before": 1, "After": 1} and g.events(ROOM2, DELETED) == []


async def test_a_new_import_that_reads_a_known_room_empty_is_held_back_and_the_room_stays_suspect(
        start: Start, memory_source: MemorySource) -> None:
    """A new import stores its token, what it read and the room's state in one transaction; held back, the room says
    so until a second empty read confirms the deletions (it was announced verified right after)."""
    begin = memory_source.now + timedelta(days=1)
    uids = [memory_source.appointment(ROOM2, begin + timedelta(hours=2 * i), begin + timedelta(hours=2 * i + 1),
                                      f"Meeting {i}") for i in range(6)]
    g = await start((ROOM2,))
    await eventually(lambda: g.imported(ROOM2) and len(g.events(ROOM2, CREATED)) == 6, what="imported")
    await g.caught_up(ROOM2)
    # The import's bookings and the room's "verified" were one step (one time of writing), after its token.
    *_, booked, verified = [e for e in g.store.outbox_after(0, 1000) if e.event.room == ROOM2]
    assert (booked.event.type, verified.event.data["state"]) == (CREATED, "verified")
    assert booked.created_at == verified.created_at
    g.store.commit_sync(ROOM2, upserts=(), deletes=(), events=(), sync_state="not-a-token-of-this-source")
    for uid in uids:  # (all at once: the sync that finds the token invalid reads the room empty)
        memory_source.cancel(uid)

    await g.caught_up(ROOM2)
    worker = g.coordinator.workers[ROOM2]
    assert g.states(ROOM2)[-2:] == ["syncing", "suspect_empty"] and worker.state == "suspect_empty"
    assert g.store.room(ROOM2).state == "suspect_empty"
    assert g.events(ROOM2, DELETED) == [] and len(g.store.bookings(ROOM2)) == 6

    await g.coordinator.reconcile(worker)  # the second empty read confirms them
    assert len(g.events(ROOM2, DELETED)) == 6 and g.store.bookings(ROOM2) == []
    last = g.events(ROOM2)[-1]
    assert last.type == ROOM_STATE and last.data["state"] == "verified" and worker.state == "verified"


async def test_the_window_rolls_forward_with_the_clock_and_a_weekly_series_yields_its_next_occurrence(
        start: Start, memory_source: MemorySource) -> None:
    g = await start((ROOM1,), days_back=1, days_ahead=2, roll_seconds=0.05, reconcile_seconds=3600.0)
    await eventually(lambda: g.imported(ROOM1), what="imported")
    first = memory_source.now + timedelta(days=1)
    memory_source.book(ALICE, [ROOM1], first, first + timedelta(hours=1), "Weekly planning", repeat="weekly",
                       count=4)
    await g.caught_up(ROOM1)
    assert [e.data["original_start"] for e in g.events(ROOM1, CREATED)] == [_iso(first)]

    memory_source.advance(timedelta(days=7))  # the second occurrence enters the two-day window
    created = await eventually(lambda: len(g.events(ROOM1, CREATED)) == 2 and g.events(ROOM1, CREATED),
                               what="the next occurrence")
    assert [e.data["original_start"] for e in created] == [_iso(first), _iso(first + timedelta(days=7))]
    assert g.events(ROOM1, DELETED) == [] and g.events(ROOM1, UPDATED) == []


async def test_a_room_this_gateway_no_longer_owns_is_released_without_a_word_to_consumers(
        start: Start, memory_source: MemorySource, tmp_path: Path) -> None:
    begin = memory_source.now + timedelta(days=1)
    for room in (ROOM1, ROOM2):
        memory_source.book(ALICE, [room], begin, begin + timedelta(hours=1), f"In {room}")
    first = await start((ROOM1, ROOM2))
    await eventually(lambda: first.imported(ROOM1, ROOM2), what="imported")
    await first.caught_up(ROOM1, ROOM2)
    ids = {e.data["id"] for e in first.events(ROOM2, CREATED)}
    await first.coordinator.stop()

    with capture_logs() as logs:
        second = await start((ROOM1,))  # ROOM2 now belongs to another source or replica, or to nobody
        await eventually(lambda: second.states(ROOM1)[-1:] == ["verified"] and second.coordinator.workers[
            ROOM1].last_success is not None, what="ROOM1 synced again")
    assert [(e["room"], e["bookings"]) for e in logs if e["event"] == "room.released"] == [(ROOM2, 1)]
    assert second.events(ROOM2, DELETED) == []
    assert second.states(ROOM2) == ["syncing", "verified"]  # as the first left them: nothing new
    assert ROOM2 not in {r.email for r in second.store.rooms()}
    assert second.store.bookings(ROOM2) == [] and second.store.sync_state(ROOM2) is None
    assert len(second.events(ROOM1, CREATED)) == 1 and second.events(ROOM1, DELETED) == []

    # Its new owner imports it: the same bookings under the same ids, which consumers apply idempotently.
    store = SqliteStore(tmp_path / "new-owner.sqlite")
    owner = Coordinator(memory_source, store, SyncSettings(debounce_seconds=0.0), clock=memory_source.clock)
    try:
        await owner.start((ROOM2,))
        await eventually(lambda: store.sync_state(ROOM2) == memory_source.token(ROOM2) and store.bookings(ROOM2),
                         what="the new owner's import")
        assert {e.event.data["id"] for e in store.outbox_after(0, 100) if e.event.type == CREATED} == ids
    finally:
        await owner.stop()
        store.close()


async def test_forgetting_a_room_withdraws_each_of_its_bookings_then_the_room(
        start: Start, memory_source: MemorySource, tmp_path: Path) -> None:
    begin = memory_source.now + timedelta(days=1)
    for hour in (0, 2):
        memory_source.book(ALICE, [ROOM2], begin + timedelta(hours=hour), begin + timedelta(hours=hour + 1))
    g = await start((ROOM1, ROOM2))
    await eventually(lambda: g.imported(ROOM1, ROOM2), what="imported")
    await g.caught_up(ROOM2)
    ids = {e.data["id"] for e in g.events(ROOM2, CREATED)}
    await g.coordinator.stop()  # the gateway is stopped, the room taken out of its configuration

    assert service.forget_room(tmp_path / "gateway.sqlite", ROOM2) == 0
    deleted = g.events(ROOM2, DELETED)
    assert {e.data["id"] for e in deleted} == ids and len(ids) == 2
    assert {e.data["reason"] for e in deleted} == {"room_disconnected"}
    last = g.events(ROOM2)[-1]
    assert last.type == ROOM_STATE and last.data["state"] == "disconnected"
    assert last.data["remedy"] == ROOM_STATES["disconnected"]
    assert ROOM2 not in {r.email for r in g.store.rooms()} and g.store.bookings(ROOM2) == []
    assert service.forget_room(tmp_path / "gateway.sqlite", ROOM2) == 1  # nothing left to withdraw
    assert g.events(ROOM1, DELETED) == []


async def test_misconfigured_rooms_get_their_states_and_a_created_mailbox_is_picked_up(
        start: Start, memory_source: MemorySource) -> None:
    nobody = "nobody@contoso.com"
    g = await start((ROOM1, ALICE, nobody))
    expected = {ROOM1: "verified", ALICE: "impersonation_denied", nobody: "mailbox_not_found"}
    await eventually(lambda: all(g.states(r)[-1:] == [s] for r, s in expected.items()), what="every room's state")
    begin = memory_source.now + timedelta(days=1)
    memory_source.book(BOB, [ROOM1], begin, begin + timedelta(hours=1), "The good room still syncs")
    await g.caught_up(ROOM1)
    assert len(g.events(ROOM1, CREATED)) == 1
    assert g.states(ALICE) == ["impersonation_denied"] and g.states(nobody) == ["mailbox_not_found"]  # once each

    memory_source.add_room(nobody, "Annex Room 9")  # the admin creates the mailbox: the next retry imports it
    await eventually(lambda: g.imported(nobody), what="the new room imported")
    assert g.coordinator.workers[ALICE].state == "impersonation_denied"


async def test_throttling_and_an_outage_are_announced_and_stall_no_other_room(
        start: Start, memory_source: MemorySource) -> None:
    memory_source.fail(Throttled("Exchange is busy", back_off=30.0), room=ROOM1, times=None)
    memory_source.fail(Unavailable("Exchange did not answer"), room=ROOM2, times=2)
    g = await start((ROOM1, ROOM2, ROOM3))
    await eventually(lambda: g.imported(ROOM2, ROOM3) and g.states(ROOM1), what="the other rooms imported")
    assert g.states(ROOM1) == ["throttled"] and g.coordinator.workers[ROOM1].state == "throttled"
    assert g.states(ROOM2) == ["cannot_connect", "syncing", "verified"]  # announced once, retried
    assert g.states(ROOM3) == ["syncing", "verified"]  # (verified by its import's first call)


async def test_refused_credentials_are_auth_required_for_every_room_until_they_work_again(
        start: Start, memory_source: MemorySource) -> None:
    memory_source.fail(AuthError("Exchange refused the service account's credentials"), times=None)
    with capture_logs() as logs:
        g = await start((ROOM1, ROOM2, ROOM3), auth_retry_seconds=0.1)
        await eventually(lambda: all(g.states(r) == ["auth_required"] for r in (ROOM1, ROOM2, ROOM3)),
                         what="auth_required")
        probes = memory_source.calls["changes"]  # (rooms never imported: their import's first call verifies them)
        await eventually(lambda: memory_source.calls["changes"] > probes, what="a later probe")
        memory_source.heal()
        await eventually(lambda: g.imported(ROOM1, ROOM2, ROOM3), what="recovered")
    assert [e["event"] for e in logs if e["event"].startswith("exchange.auth")] == [
        "exchange.auth_failed", "exchange.auth_restored"]
    assert all(g.states(r) == ["auth_required", "syncing", "verified"] for r in (ROOM1, ROOM2, ROOM3))


async def test_a_room_held_back_by_an_outage_heard_ended_since_goes_on_without_a_second_outage(
        start: Start, memory_source: MemorySource) -> None:
    gate = OutageGate()
    gate.record(gate.admit(), Unreachable("cannot connect to mail:443: the connection was refused"))
    try:
        gate.admit()
    except Unreachable as e:
        late = e  # a room's call held back by the outage, its answer not yet heard by the coordinator ...
    memory_source.fail(late, room=ROOM2)
    with capture_logs() as logs:
        g = await start((ROOM1, ROOM2, ROOM3), retry_seconds=30)
        outage, _ = g.coordinator._outage(None)
        outage.failed(Unreachable("cannot connect to mail:443: the connection was refused"))
        g.coordinator.exchange_recovered()  # ... while the probe's answer, which ended the outage, was
        await eventually(lambda: g.imported(ROOM1, ROOM2, ROOM3), what="imported")
    assert [e["event"] for e in logs if e["event"].startswith("exchange.")] == [
        "exchange.outage_started", "exchange.outage_ended"]
    assert g.states(ROOM2) == ["syncing", "verified"]  # never said cannot_connect, nor waited 30 s to retry
    assert memory_source.calls["changes"] >= 4  # ROOM2's held call failed, then went on


def _iso(value: Any) -> str:
    return str(value.strftime("%Y-%m-%dT%H:%M:%SZ"))
