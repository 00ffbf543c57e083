"""The SQLite store: one sync step is one transaction; the outbox is ordered, resumable and survives a kill -9.

Run as a script for the throughput benchmark: ``.venv/bin/python -m tests.test_store [batches]``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.errors import ConfigError, NotFound, PreconditionFailed, ProtocolError
from gateway.model import EVENT_TYPES, Attendee, Booking, Event, Person, Room, Window, to_json
from gateway.store import SqliteStore, migrations

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2025, 3, 10, 8, 0, tzinfo=UTC)
R1, R2 = "room1@contoso.com", "room2@contoso.com"


def booking(room: str, uid: str, hour: float = 0, minutes: int = 30, **kw) -> Booking:
    start = T0 + timedelta(hours=hour)
    return Booking(room=room, uid=uid, start=start, end=start + timedelta(minutes=minutes), **kw)


def event(b: Booking, kind: str = "created", eid: str | None = None) -> Event:
    return Event(id=eid or f"{kind}-{b.id}", type=EVENT_TYPES[kind], room=b.room, subject=b.id, time=T0,
                 data=to_json(b))


def room_event(room: str, eid: str) -> Event:
    return Event(id=eid, type=EVENT_TYPES["room_state"], room=room, subject=room, time=T0,
                 data={"room": room, "state": "verified"})


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock):
    s = SqliteStore(tmp_path / "gateway.db", clock=clock)
    s.upsert_room(Room(R1, name="Room 1", capacity=8, timezone="Europe/Berlin"))
    s.upsert_room(Room(R2, name="Room 2"))
    yield s
    s.close()


def create(store: SqliteStore, *bookings: Booking, **kw) -> list:
    return store.commit_sync(bookings[0].room, upserts=bookings, deletes=(), events=[event(b) for b in bookings],
                             **kw)


# -- the snapshot ------------------------------------------------------------------------------------------------
def test_bookings_round_trip_through_commit_sync(store: SqliteStore) -> None:
    rich = booking(R1, "uid-rich", 1, subject="Board", organizer=Person("alice@contoso.com", "Alice"),
                   attendees=(Attendee("bob@contoso.com", "Bob", "required", "accepted"),),
                   original_start=T0 + timedelta(hours=1), series_id="series-1", sensitivity="private",
                   online_meeting_url="https://meet.example/x", confirmed_at=T0)
    plain = booking(R1, "uid-plain", 0)
    create(store, rich, plain)

    known = store.known(R1)
    assert set(known) == {rich.id, plain.id}
    assert known[rich.id].booking == rich
    assert known[rich.id].content_hash == rich.content_hash()
    assert known[plain.id].booking == plain
    assert store.bookings(R1) == [plain, rich]  # by start
    assert store.known(R2) == {}
    assert store.booking(R1, rich.id) == rich and store.booking(R1, rich.id).confirmed_at == T0  # type: ignore[union-attr]
    assert store.booking(R2, rich.id) is None and store.booking(R1, "nope") is None


def test_known_decodes_a_stored_booking_only_when_asked_for_it(store: SqliteStore,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A reconciliation compares content hashes: decoding every stored booking for it was a third of its CPU.
    odd = booking(R1, "uid-odd", 1.0001)  # a start with microseconds: known, as published, to the second
    plain = booking(R1, "uid-plain", 2, confirmed_at=T0)
    create(store, odd, plain)
    from gateway.store import sqlite as module
    decoded: list[str] = []
    real = module.from_json
    monkeypatch.setattr(module, "from_json", lambda d: decoded.append(d["uid"]) or real(d))
    known = store.known(R1)
    assert decoded == []
    assert {k.uid: (k.start, k.end, k.content_hash) for k in known.values()} == {
        "uid-odd": (T0 + timedelta(hours=1), odd.end.replace(microsecond=0), odd.content_hash()),
        "uid-plain": (plain.start, plain.end, plain.content_hash())}
    assert decoded == []
    assert known[plain.id].booking == plain and known[plain.id].booking.confirmed_at == T0
    assert known[odd.id].booking.start == known[odd.id].start and decoded == ["uid-plain", "uid-odd"]
    assert known[plain.id].booking is known[plain.id].booking  # decoded once
    assert decoded == ["uid-plain", "uid-odd"]


def test_a_bookings_stored_times_are_utc_to_the_microsecond_however_it_was_given(store: SqliteStore) -> None:
    from zoneinfo import ZoneInfo
    starts = [T0, T0 + timedelta(microseconds=250), (T0 + timedelta(hours=3)).astimezone(ZoneInfo("Europe/Berlin")),
              datetime(2025, 3, 10, 9, 0, 0, 5, tzinfo=ZoneInfo("UTC"))]
    bs = [Booking(room=R1, uid=f"t{i}", start=s, end=s + timedelta(minutes=30)) for i, s in enumerate(starts)]
    create(store, *bs)
    with store.reading() as conn:
        rows = dict(conn.execute("SELECT uid, start_utc || ' ' || end_utc FROM bookings WHERE room = ?", (R1,)))
    assert rows == {b.uid: " ".join(t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") for t in (b.start, b.end))
                    for b in bs}
    assert rows["t0"] == "2025-03-10T08:00:00.000000Z 2025-03-10T08:30:00.000000Z"


def test_known_can_be_asked_for_some_meetings_only(store: SqliteStore) -> None:
    # An incremental sync compares only the meetings that changed: reading every booking of the room for it made
    # each sync cost as much as the room is big.
    a, b, b2 = booking(R1, "a", 0), booking(R1, "b", 1), booking(R1, "b", 2, original_start=T0 + timedelta(hours=2))
    create(store, a, b, b2)
    assert set(store.known(R1, frozenset({"b", "unknown"}))) == {b.id, b2.id}
    assert store.known(R1, frozenset()) == {}
    assert set(store.known(R1, None)) == {a.id, b.id, b2.id}


def test_a_room_state_and_its_event_are_one_transaction(store: SqliteStore) -> None:
    # Two transactions per state change (the row, then the event) were a third of an import's commits.
    syncing = Room(R1, name="Room 1", capacity=8, timezone="Europe/Berlin", state="syncing")
    [entry] = store.commit_sync(R1, upserts=(), deletes=(), events=[room_event(R1, "state-1")], room_row=syncing)
    assert entry.event.id == "state-1" and store.rooms()[0] == syncing
    with pytest.raises(PreconditionFailed):  # the event id is taken: neither the row nor the event is kept
        store.commit_sync(R1, upserts=(), deletes=(), events=[room_event(R1, "state-1")],
                          room_row=Room(R1, state="verified"))
    assert store.rooms()[0] == syncing and len(store.outbox_after(0)) == 1
    new = Room("room9@contoso.com", state="verified")  # a room the store did not hold yet is added with it
    store.commit_sync(new.email, upserts=(), deletes=(), events=[room_event(new.email, "state-2")], room_row=new)
    assert new in store.rooms()


def test_bookings_returns_those_overlapping_the_half_open_window(store: SqliteStore) -> None:
    a, b, c = booking(R1, "a", 0, 60), booking(R1, "b", 1, 60), booking(R1, "c", 2, 60)  # 8-9, 9-10, 10-11
    create(store, c, a, b)
    assert [x.uid for x in store.bookings(R1, T0 + timedelta(hours=1), T0 + timedelta(hours=2))] == ["b"]
    assert [x.uid for x in store.bookings(R1, T0 + timedelta(minutes=59), T0 + timedelta(hours=1, minutes=1))] \
        == ["a", "b"]
    assert [x.uid for x in store.bookings(R1, start=T0 + timedelta(hours=1, minutes=30))] == ["b", "c"]
    assert [x.uid for x in store.bookings(R1, end=T0 + timedelta(hours=1))] == ["a"]


def test_update_delete_and_confirm_apply_to_the_snapshot(store: SqliteStore, clock: Clock) -> None:
    a, b = booking(R1, "a", 0), booking(R1, "b", 1)
    create(store, a, b)
    moved = booking(R1, "a", 3, subject="moved")
    seen = clock.now + timedelta(minutes=5)
    store.commit_sync(R1, upserts=[moved], deletes=[b.id], events=[event(moved, "updated"), event(b, "deleted")])
    store.commit_sync(R1, upserts=(), deletes=(), events=(), confirmed=[moved.id], confirmed_at=seen)

    known = store.known(R1)
    assert list(known) == [moved.id]
    assert known[moved.id].booking == moved.confirmed(seen)
    assert known[moved.id].content_hash == moved.content_hash()  # freshness is not content


def test_a_complete_read_confirms_the_windows_bookings_in_one_row_and_freshness_never_goes_back(
        store: SqliteStore, clock: Clock) -> None:
    inside, edge, outside = booking(R1, "in", 1), booking(R1, "edge", 2.75), booking(R1, "out", 5)  # 9:00, 10:45, 13:00
    own = clock.now - timedelta(days=1)
    create(store, *(b.confirmed(own) for b in (inside, edge, outside)))
    other = booking(R2, "other", 1, confirmed_at=own)
    create(store, other)
    read = Window(T0, T0 + timedelta(hours=3))  # 8:00-11:00: "in" and "edge" overlap it, "out" does not
    seen = clock.now + timedelta(minutes=5)
    rows_before = _rows_written(store)
    store.commit_sync(R1, upserts=(), deletes=(), events=(), confirmed_at=seen, confirmed_window=read)
    assert _rows_written(store) == rows_before  # no booking's row was rewritten

    def freshness(room: str = R1) -> dict[str, datetime | None]:
        by_list = {b.uid: b.confirmed_at for b in store.bookings(room)}
        by_one = {b.uid: store.booking(room, b.id).confirmed_at for b in store.bookings(room)}  # type: ignore[union-attr]
        by_known = {k.booking.uid: k.booking.confirmed_at for k in store.known(room).values()}
        assert by_list == by_one == by_known
        return by_list

    assert freshness() == {"in": seen, "edge": seen, "out": own}
    assert freshness(R2) == {"other": own}  # another room's bookings are not its read's
    # A booking confirmed on its own later than the read keeps its own time.
    later = seen + timedelta(minutes=10)
    store.commit_sync(R1, upserts=(), deletes=(), events=(), confirmed=[inside.id], confirmed_at=later)
    assert freshness() == {"in": later, "edge": seen, "out": own}
    # The next read's window has moved on past "edge": what the last read confirmed keeps its freshness.
    moved = Window(T0 + timedelta(hours=4), T0 + timedelta(hours=8))
    last = later + timedelta(hours=1)
    store.commit_sync(R1, upserts=(), deletes=(), events=(), confirmed_at=last, confirmed_window=moved)
    assert freshness() == {"in": later, "edge": seen, "out": last}
    # A booking made after a read has its own, later time; one deleted is gone with its row.
    fresh = booking(R1, "fresh", 6).confirmed(last + timedelta(minutes=1))
    store.commit_sync(R1, upserts=[fresh], deletes=[outside.id], events=[event(fresh), event(outside, "deleted")])
    assert freshness() == {"in": later, "edge": seen, "fresh": last + timedelta(minutes=1)}
    # A room removed takes its mark with it.
    store.remove_room(R1)
    assert store.bookings(R1) == []
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM room_confirmations WHERE room = ?", (R1,)).fetchone() == (0,)


def _rows_written(store: SqliteStore) -> int:
    """How many times a bookings row was inserted or updated, by a trigger (the test's own, on this file)."""
    with sqlite3.connect(store.path) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS _writes (n INTEGER)")
        if conn.execute("SELECT count(*) FROM _writes").fetchone() == (0,):
            conn.execute("INSERT INTO _writes VALUES (0)")
        conn.execute("CREATE TRIGGER IF NOT EXISTS _written AFTER UPDATE ON bookings "
                     "BEGIN UPDATE _writes SET n = n + 1; END")
        return int(conn.execute("SELECT n FROM _writes").fetchone()[0])


def test_item_map_resolves_deleted_items_to_meetings(store: SqliteStore) -> None:
    store.commit_sync(R1, upserts=(), deletes=(), events=(), item_uids={"item-1": "uid-a", "item-2": "uid-b",
                                                                       "item-3": "uid-a"})
    assert store.uids_for_items(R1, frozenset({"item-1", "item-3", "unknown"})) == {"uid-a"}
    assert store.uids_for_items(R2, frozenset({"item-1"})) == frozenset()
    store.commit_sync(R1, upserts=(), deletes=(), events=(), removed_items=frozenset({"item-1", "item-3"}))
    assert store.uids_for_items(R1, frozenset({"item-1", "item-2", "item-3"})) == {"uid-b"}


def test_sync_state_is_stored_only_with_its_step_and_can_be_cleared(store: SqliteStore) -> None:
    assert store.sync_state(R1) is None
    store.commit_sync(R1, upserts=(), deletes=(), events=(), sync_state="state-1")
    store.commit_sync(R1, upserts=(), deletes=(), events=())  # None: keep the current state
    assert store.sync_state(R1) == "state-1"
    store.commit_sync(R1, upserts=(), deletes=(), events=(), clear_sync_state=True)
    assert store.sync_state(R1) is None


def test_a_one_megabyte_sync_state_is_kept_intact(store: SqliteStore) -> None:
    state = "".join(random.Random(11).choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
                                              k=1 << 20)) + "=="
    store.commit_sync(R1, upserts=(), deletes=(), events=(), sync_state=state)
    assert store.sync_state(R1) == state


def test_rooms_round_trip_and_removal_keeps_undelivered_events(store: SqliteStore) -> None:
    assert store.rooms() == [Room(R1, name="Room 1", capacity=8, timezone="Europe/Berlin"), Room(R2, name="Room 2")]
    store.upsert_room(Room(R2, state="mailbox_not_found", reason="no mailbox", remedy="check the address"))
    assert store.rooms()[1] == Room(R2, state="mailbox_not_found", reason="no mailbox", remedy="check the address")

    create(store, booking(R1, "a"))
    store.commit_sync(R1, upserts=(), deletes=(), events=(), sync_state="s", item_uids={"i": "a"})
    store.remove_room(R1)
    assert [r.email for r in store.rooms()] == [R2]
    assert store.known(R1) == {} and store.sync_state(R1) is None
    assert store.uids_for_items(R1, frozenset({"i"})) == frozenset()
    assert len(store.outbox_after(0)) == 1
    assert store.check() == []


def test_a_step_for_a_room_not_in_the_store_is_refused(store: SqliteStore) -> None:
    b = booking("gone@contoso.com", "a")
    with pytest.raises(NotFound):
        store.commit_sync(b.room, upserts=[b], deletes=(), events=[event(b)])
    assert store.outbox_after(0) == []


# -- atomicity ---------------------------------------------------------------------------------------------------
def test_a_failing_step_leaves_nothing_behind(store: SqliteStore) -> None:
    first = booking(R1, "first")
    create(store, first, sync_state="state-1", item_uids={"item-first": "first"})
    before = (store.known(R1), store.outbox_after(0), store.outbox_stats())

    a, b = booking(R1, "a"), booking(R1, "b", 1)
    with pytest.raises(PreconditionFailed):
        # the second event reuses the first step's event id: the failure comes after rows were written
        store.commit_sync(R1, upserts=[a, b], deletes=[first.id], confirmed=[first.id],
                          events=[event(a), event(first, eid=f"created-{first.id}")],
                          item_uids={"item-a": "a"}, removed_items=frozenset({"item-first"}), sync_state="state-2")

    assert (store.known(R1), store.outbox_after(0), store.outbox_stats()) == before
    assert store.sync_state(R1) == "state-1"
    assert store.uids_for_items(R1, frozenset({"item-first", "item-a"})) == {"first"}
    # the per-room counter was not consumed either
    assert [e.room_seq for e in create(store, a)] == [2]


def test_several_rooms_steps_commit_together_each_whole_or_not_at_all(store: SqliteStore) -> None:
    # One transaction for several rooms' steps (an import commits a room every few milliseconds); a step that
    # commit_sync would refuse leaves nothing of itself, and the others are kept with their own sequences.
    first = booking(R1, "first")
    create(store, first, sync_state="r1-0")
    a, b, c = booking(R1, "a"), booking(R2, "b"), booking(R2, "c", 1)
    reused = event(a, eid=f"created-{first.id}")  # the first step's event id again: refused after rows were written
    outcomes = store.commit_syncs([
        (R2, {"upserts": [b], "deletes": (), "events": [event(b)], "sync_state": "r2-1"}),
        (R1, {"upserts": [a], "deletes": [first.id], "events": [reused], "sync_state": "r1-1"}),
        ("room9@contoso.com", {"upserts": (), "deletes": (), "events": [], "sync_state": "x"}),  # not in the store
        (R1, {"upserts": [c], "deletes": (), "events": []}),  # a booking of another room
        (R2, {"upserts": [c], "deletes": (), "events": [event(c)], "sync_state": "r2-2"}),
    ])
    assert [type(o).__name__ for o in outcomes] == ["list", "PreconditionFailed", "NotFound", "ValueError", "list"]
    assert [[e.room_seq for e in o] for o in outcomes if isinstance(o, list)] == [[1], [2]]
    assert set(store.known(R1)) == {first.id} and store.sync_state(R1) == "r1-0"
    assert set(store.known(R2)) == {b.id, c.id} and store.sync_state(R2) == "r2-2"
    assert [e.event.subject for e in store.outbox_after(0)] == [first.id, b.id, c.id]
    assert [e.room_seq for e in create(store, a)] == [2]  # R1's counter was not consumed by the refused step


def test_a_batch_whose_steps_all_go_through_is_written_without_a_savepoint_a_step(store: SqliteStore) -> None:
    # (under a savepoint SQLite copies every page a step changes to a sub-journal first: the dearer way is kept for
    # a batch with a refused step, above)
    statements: list[str] = []
    store._writer.set_trace_callback(statements.append)
    a, b = booking(R1, "a"), booking(R2, "b")
    outcomes = store.commit_syncs([
        (R1, {"upserts": [a], "deletes": (), "events": [event(a)], "sync_state": "r1-1"}),
        (R2, {"upserts": [b], "deletes": (), "events": [event(b)], "sync_state": "r2-1"}),
        (R1, {"upserts": [b], "deletes": (), "events": []}),  # refused before writing: the batch goes on
    ])
    store._writer.set_trace_callback(None)
    assert [type(o).__name__ for o in outcomes] == ["list", "list", "ValueError"]
    assert not [s for s in statements if "SAVEPOINT" in s.upper()] and statements.count("COMMIT") == 1
    assert set(store.known(R1)) == {a.id} and set(store.known(R2)) == {b.id}
    assert (store.sync_state(R1), store.sync_state(R2)) == ("r1-1", "r2-1")
    assert [e.event.subject for e in store.outbox_after(0)] == [a.id, b.id]


def test_an_exception_while_writing_rolls_back_everything(store: SqliteStore) -> None:
    a = booking(R1, "a")
    bad = Event(id="bad", type=EVENT_TYPES["created"], room=R1, subject="x", time=T0, data={"when": T0})
    with pytest.raises(TypeError):  # data that is not JSON
        store.commit_sync(R1, upserts=[a], deletes=(), events=[bad], sync_state="s")
    assert store.known(R1) == {} and store.sync_state(R1) is None and store.outbox_after(0) == []


# -- the outbox --------------------------------------------------------------------------------------------------
def test_events_get_a_global_seq_and_a_per_room_sequence(store: SqliteStore) -> None:
    e1 = create(store, booking(R1, "a"), booking(R1, "b"))
    e2 = create(store, booking(R2, "c"))
    e3 = store.commit_sync(R1, upserts=(), deletes=(), events=[room_event(R1, "r1"), room_event(R2, "r2")])

    entries = e1 + e2 + e3
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert [(e.event.room, e.room_seq) for e in entries] == [(R1, 1), (R1, 2), (R2, 1), (R1, 3), (R2, 2)]
    assert all(e.event.sequence == e.room_seq for e in entries)
    assert store.outbox_after(0) == entries  # what was returned is what is stored
    assert entries[0].event.to_cloudevent()["sequence"] == "1"


def test_outbox_after_resumes_from_a_sequence(store: SqliteStore) -> None:
    for i in range(10):
        create(store, booking(R1, f"b{i}", i))
    assert [e.seq for e in store.outbox_after(4, limit=3)] == [5, 6, 7]
    assert [e.seq for e in store.outbox_after(7)] == [8, 9, 10]
    assert store.outbox_after(10) == []
    assert store.last_seq() == 10


def test_ack_is_monotonic_and_drives_the_stats(store: SqliteStore, clock: Clock) -> None:
    assert store.outbox_stats() == (0, None)
    first_at = clock.now
    create(store, booking(R1, "a"), booking(R1, "b"))
    clock.now += timedelta(minutes=1)
    create(store, booking(R1, "c"))
    assert store.outbox_stats() == (3, first_at)

    store.ack(2)
    assert store.outbox_stats() == (1, clock.now)
    store.ack(1)  # acknowledging less is a no-op
    assert store.acked() == 2 and store.outbox_stats() == (1, clock.now)
    store.ack(3)
    assert store.outbox_stats() == (0, None)
    with pytest.raises(ProtocolError):
        store.ack(4)  # never issued
    assert store.acked() == 3


def test_prune_deletes_old_acknowledged_events_only(store: SqliteStore, clock: Clock) -> None:
    create(store, booking(R1, "a"), booking(R1, "b"), booking(R1, "c"))  # seq 1-3, created at t
    clock.now += timedelta(days=2)
    create(store, booking(R1, "d"))  # seq 4, created at t+2d
    store.ack(2)
    clock.now += timedelta(hours=1)

    assert store.prune(timedelta(days=1)) == 2
    assert [e.seq for e in store.outbox_after(0)] == [3, 4]  # 3 is old but unacknowledged
    store.ack(4)
    assert store.prune(timedelta(days=1)) == 1  # 4 is acknowledged but recent
    assert store.prune(timedelta(0)) == 1
    # sequences keep counting after the outbox was emptied
    assert store.outbox_after(0) == []
    assert [(e.seq, e.room_seq) for e in create(store, booking(R1, "e"))] == [(5, 5)]


def test_without_a_hub_old_events_are_pruned_acknowledged_or_not(store: SqliteStore, clock: Clock) -> None:
    create(store, booking(R1, "a"), booking(R1, "b"))  # seq 1-2, nobody acknowledges them
    clock.now += timedelta(days=2)
    create(store, booking(R1, "c"))
    assert store.prune(timedelta(days=1)) == 0
    assert store.prune(timedelta(days=1), acked_only=False) == 2
    assert [e.seq for e in store.outbox_after(0)] == [3]


def test_readers_in_other_threads_see_whole_steps_while_the_writer_commits(store: SqliteStore) -> None:
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                # a step writes 5 bookings and 5 events: a reader sees multiples of 5, never a half step
                assert len(store.known(R1)) % 5 == 0
                assert len(store.outbox_after(0, limit=10_000)) % 5 == 0
        except BaseException as e:
            errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    for step in range(40):
        create(store, *(booking(R1, f"s{step}-{i}", i) for i in range(5)))
    done.set()
    for t in readers:
        t.join()
    assert not errors, errors
    assert len(store.known(R1)) == 200


def test_close_is_idempotent_and_a_closed_store_refuses_use(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "closed.db")
    store.rooms()
    store.close()
    store.close()
    with pytest.raises(RuntimeError):
        store.rooms()
    with pytest.raises(RuntimeError):
        store.ack(0)
    assert not (tmp_path / "closed.db-wal").exists()  # the last close checkpointed the WAL away


# -- migrations --------------------------------------------------------------------------------------------------
def _file_at_version_1(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in migrations.statements(migrations.MIGRATIONS[0]):
        conn.execute(statement)
    conn.execute("PRAGMA user_version=1")
    conn.execute("INSERT INTO rooms (email, name, updated_at) VALUES ('room1@contoso.com', 'Old', 'x')")
    conn.close()


def test_an_older_file_is_upgraded_on_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.db"
    _file_at_version_1(path)
    upgrade = "ALTER TABLE rooms ADD COLUMN floor INTEGER;\nUPDATE rooms SET floor = 3;"
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, upgrade])

    store = SqliteStore(path)
    try:
        assert store.schema_version() == len(migrations.MIGRATIONS)
        assert store.rooms() == [Room(R1, name="Old")]
        with store._read() as conn:
            assert conn.execute("SELECT floor FROM rooms").fetchone() == (3,)
    finally:
        store.close()


def test_a_failing_migration_leaves_the_previous_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.db"
    _file_at_version_1(path)
    broken = "ALTER TABLE rooms ADD COLUMN floor INTEGER;\nUPDATE no_such_table SET x = 1;"
    shipped = len(migrations.MIGRATIONS)
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, broken])
    with pytest.raises(sqlite3.OperationalError):
        SqliteStore(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (shipped,)  # the migrations before it did apply
    assert "floor" not in [r[1] for r in conn.execute("PRAGMA table_info(rooms)")]
    conn.close()


def test_a_file_from_a_newer_gateway_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    SqliteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={len(migrations.MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(ConfigError) as err:
        SqliteStore(path)
    assert err.value.key == "store_too_new"
    assert "newer gateway" in str(err.value) and "new data directory" in str(err.value)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(ConfigError) as err:
        SqliteStore(path)
    assert err.value.key == "store_corrupt"


def test_the_file_uses_wal_and_foreign_keys(store: SqliteStore) -> None:
    with store._read() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert store._writer.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL


def test_a_new_file_has_large_pages_and_an_existing_one_keeps_its_own(tmp_path: Path) -> None:
    new = SqliteStore(tmp_path / "new.db")
    assert new.schema_version() == len(migrations.MIGRATIONS)
    with new.reading() as conn:
        assert conn.execute("PRAGMA page_size").fetchone() == (16384,)
    new.close()
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE t (x)")  # a file SQLite made with its default pages
    conn.close()
    store = SqliteStore(old)
    with store.reading() as conn:
        assert conn.execute("PRAGMA page_size").fetchone() == (4096,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    store.close()


# -- durability --------------------------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys
    from datetime import UTC, datetime, timedelta
    from gateway.model import EVENT_TYPES, Booking, Event, Room, to_json
    from gateway.store import SqliteStore

    store = SqliteStore(sys.argv[1])
    rooms = ["room1@contoso.com", "room2@contoso.com"]
    for r in rooms:
        store.upsert_room(Room(r))
    step = int(sys.argv[2])
    t0 = datetime(2025, 3, 10, tzinfo=UTC)
    previous = {r: list(store.known(r)) for r in rooms}
    while True:
        room = rooms[step % 2]
        new = [Booking(room, f"step{step}-{i}", t0 + timedelta(hours=i), t0 + timedelta(hours=i, minutes=30))
               for i in range(50)]
        events = [Event(f"{step}-c-{b.id}", EVENT_TYPES["created"], room, b.id, t0, to_json(b)) for b in new]
        events += [Event(f"{step}-d-{bid}", EVENT_TYPES["deleted"], room, bid, t0, {"id": bid})
                   for bid in previous[room]]
        store.commit_sync(room, upserts=new, deletes=previous[room], events=events, sync_state=f"step{step}",
                          item_uids={f"item-{step}": f"step{step}"})
        previous[room] = [b.id for b in new]
        print(step, flush=True)
        step += 1
""")


def _check_consistent(path: Path) -> dict[str, int]:
    """Every committed step is whole: snapshot, outbox and sync state tell the same story. Returns last steps."""
    store = SqliteStore(path)
    try:
        assert store.check() == []
        last: dict[str, int] = {}
        for room in (R1, R2):
            entries = store.outbox_after(0, limit=1_000_000)
            mine = [e for e in entries if e.event.room == room]
            assert [e.room_seq for e in mine] == list(range(1, len(mine) + 1))
            steps: dict[int, int] = {}
            for e in mine:
                step = int(e.event.id.split("-")[0])
                steps[step] = steps.get(step, 0) + 1
            if not steps:
                assert store.known(room) == {} and store.sync_state(room) is None
                continue
            ordered = sorted(steps)
            assert ordered == list(range(ordered[0], ordered[-1] + 1, 2))  # this room's steps, none missing
            assert steps[ordered[0]] == 50 and all(steps[s] == 100 for s in ordered[1:])  # no half step
            final = ordered[-1]
            assert store.sync_state(room) == f"step{final}"
            assert sorted(b.uid for b in store.bookings(room)) == sorted(f"step{final}-{i}" for i in range(50))
            assert store.uids_for_items(room, frozenset({f"item-{final}"})) == {f"step{final}"}
            last[room] = final
        return last
    finally:
        store.close()


def test_a_killed_writer_leaves_every_committed_step_whole(tmp_path: Path) -> None:
    path = tmp_path / "killed.db"
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    next_step = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(next_step)], stdout=subprocess.PIPE,
                                text=True, env=env)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one step in
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        reported = [int(line) for line in proc.stdout.read().split()]
        proc.wait()
        proc.stdout.close()

        last = _check_consistent(path)
        newest = max(last.values())
        # every step the writer saw committed is there; at most the one in flight when killed is extra
        assert reported and newest >= reported[-1], f"seed {seed}"
        assert newest <= reported[-1] + 1, f"seed {seed}"
        next_step = newest + 1


# -- throughput (measured, not asserted) -------------------------------------------------------------------------
def bench(path: Path, batches: int = 20, size: int = 200, synchronous: str = "NORMAL") -> float:
    """Commit ``batches`` steps of ``size`` bookings + ``size`` events; return steps per second."""
    store = SqliteStore(path, synchronous=synchronous)
    try:
        store.upsert_room(Room(R1))
        attendees = tuple(Attendee(f"person{i}@contoso.com", f"Person {i}", "required", "accepted") for i in range(5))
        steps = []
        for n in range(batches):
            bs = [booking(R1, f"bench-{n}-{i}", i / 4, subject=f"Meeting {i}", attendees=attendees,
                          organizer=Person("alice@contoso.com", "Alice")) for i in range(size)]
            steps.append((bs, [event(b) for b in bs]))
        started = time.perf_counter()
        for bs, events in steps:
            store.commit_sync(R1, upserts=bs, deletes=(), events=events, sync_state="x" * 2000)
        elapsed = time.perf_counter() - started
    finally:
        store.close()
    return batches / elapsed


def test_the_benchmarks_large_steps_commit_every_booking_and_event(tmp_path: Path) -> None:
    """What the benchmark below measures is correct work (its numbers: ``python -m tests.test_store``)."""
    bench(tmp_path / "bench.db", batches=5)
    store = SqliteStore(tmp_path / "bench.db")
    try:
        assert len(store.bookings(R1)) == 5 * 200
        entries = store.outbox_after(0, 10_000)
        assert [e.seq for e in entries] == list(range(1, 5 * 200 + 1))
        assert {e.event.subject for e in entries} == {b.id for b in store.bookings(R1)}
        assert store.sync_state(R1) == "x" * 2000
    finally:
        store.close()


if __name__ == "__main__":
    import tempfile

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    for mode in ("NORMAL", "FULL"):
        with tempfile.TemporaryDirectory() as tmp:
            rate = bench(Path(tmp) / "bench.db", batches=count, synchronous=mode)
        print(f"synchronous={mode}: {count} steps, {rate:.1f} steps/s of 200 bookings + 200 events "
              f"({1000 / rate:.1f} ms per step, {rate * 200:.0f} bookings/s)")


def test_the_outbox_as_text_is_each_events_cloudevent_without_its_data_decoded(store: SqliteStore) -> None:
    # The relay and the SSE stream send stored events as text (data put in as stored): it must say what
    # to_cloudevent() of the decoded event says, for every kind of event and the characters JSON escapes.
    from gateway.model import EventType
    from gateway.sync.events import booking_event, snapshot_event
    from gateway.sync.events import room_event as state_event

    at = T0 + timedelta(microseconds=123456)  # (the store keeps microseconds; a CloudEvent's time is to the second)
    odd = booking(R1, "uid-ö", subject='Ünïcode "quoted" \\ line\nbreak \u2028 \x01',
                  organizer=Person("anna@contoso.com", "Änna"),
                  attendees=(Attendee("bob@contoso.com", None, "required", "accepted"),),
                  sensitivity="private").confirmed(at)
    events = [booking_event("created", odd, time=at, source="urn:test"),
              state_event(Room(R1, state="verified", reason="ok"), time=at, source="urn:test"),
              snapshot_event(R1, "begin", Window(T0, T0 + timedelta(days=1)), time=at, source="urn:test"),
              Event(id="p-1", type=EventType.PERSON_CREATED, room="directory:ad", subject="p1", time=at,
                    data={"id": "p1", "email": "zoë@contoso.com", "manager": None})]
    store.commit_sync(R1, upserts=[odd], deletes=(), events=events[:3])
    store.commit_sync(R1, upserts=(), deletes=(), events=events[3:])
    entries, texts = store.outbox_after(0), store.outbox_texts_after(0)
    assert len(texts) == len(entries) == 4
    for e, t in zip(entries, texts, strict=True):
        assert (t.seq, t.room_seq, t.type, t.event_id) == (e.seq, e.room_seq, e.event.type, e.event.id)
        assert json.loads(t.cloudevent) == e.event.to_cloudevent()
        assert t.cloudevent.isascii() and "\n" not in t.cloudevent  # (one SSE data line; its length its size)
    assert [t.seq for t in store.outbox_texts_after(entries[1].seq, limit=2)] == [entries[2].seq, entries[3].seq]
