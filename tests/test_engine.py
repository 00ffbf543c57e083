"""The pure sync decision: unit cases and a Hypothesis state machine that churns a room."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway import model
from gateway.model import Attendee, Booking, Person, Window, booking_id_for, from_json, to_json
from gateway.store import sqlite
from gateway.sync.engine import MASS_DELETE_MINIMUM, Known, Scope, plan
from gateway.sync.events import booking_event, event_id

NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
WINDOW = Window(NOW - timedelta(days=7), NOW + timedelta(days=365))


def booking(uid: str, hours: int = 1, subject: str = "Review", **kw) -> Booking:
    start = NOW + timedelta(days=1, hours=hours)
    return Booking(room="room1@contoso.com", uid=uid, start=start, end=start + timedelta(hours=1), subject=subject,
                   organizer=Person("alice@contoso.com", "Alice"), **kw)


def known(*bs: Booking) -> dict[str, Known]:
    return {b.id: Known(b, b.content_hash()) for b in bs}


def test_new_changed_and_gone_bookings():
    a, b, c = booking("A"), booking("B"), booking("C")
    result = plan(known(a, b), [replace(a, subject="Moved"), c], Scope(WINDOW), NOW)
    assert [x.uid for x in result.created] == ["C"]
    assert [x.uid for x in result.updated] == ["A"]
    assert [x.uid for x in result.deleted] == ["B"]


def test_identical_content_sends_nothing_even_if_exchange_restamped_it():
    a = booking("A")
    result = plan(known(a), [replace(a, confirmed_at=NOW)], Scope(WINDOW), NOW)
    assert result.changes == 0 and [x.uid for x in result.confirmed] == ["A"]


def test_cancelled_or_declined_items_are_deletions():
    a, b = booking("A"), booking("B")
    result = plan(known(a, b), [replace(a, cancelled=True), replace(b, response="declined")], Scope(WINDOW), NOW)
    assert {x.uid for x in result.deleted} == {"A", "B"} and not result.created


def test_a_room_that_suddenly_lists_nothing_is_held_back():
    many = [booking(f"M{i}", hours=i) for i in range(MASS_DELETE_MINIMUM + 3)]
    result = plan(known(*many), [], Scope(WINDOW), NOW)
    assert result.held_back and not result.deleted and "were known" in result.reason
    confirmed = plan(known(*many), [], Scope(WINDOW), NOW, empty_confirmed=True)
    assert len(confirmed.deleted) == len(many)


def test_a_partial_read_only_judges_the_meetings_it_covers():
    a, b = booking("A"), booking("B")
    result = plan(known(a, b), [], Scope(WINDOW, frozenset({"A"})), NOW)
    assert [x.uid for x in result.deleted] == ["A"]


def test_bookings_outside_the_window_are_ignored():
    far = replace(booking("F"), start=NOW + timedelta(days=900), end=NOW + timedelta(days=900, hours=1))
    assert plan({}, [far], Scope(WINDOW), NOW).changes == 0


def test_instances_of_a_series_are_separate_bookings_with_stable_ids():
    first = booking("S", original_start=NOW + timedelta(days=1), series_id="S")
    second = replace(first, original_start=NOW + timedelta(days=8), start=first.start + timedelta(days=7),
                     end=first.end + timedelta(days=7))
    assert first.id != second.id
    moved = replace(first, start=first.start + timedelta(hours=2), end=first.end + timedelta(hours=2),
                    is_exception=True)
    assert moved.id == first.id  # moving an instance keeps its identity
    result = plan(known(first, second), [moved, second], Scope(WINDOW), NOW)
    assert [x.id for x in result.updated] == [first.id]


def test_json_round_trip_keeps_everything():
    b = booking("J", all_day=False, sensitivity="private", series_id="J", original_start=NOW)
    assert from_json(to_json(b)) == b


def test_a_booking_is_serialized_once_however_often_it_is_confirmed_hashed_and_published():
    # An import serialized each booking five times (content, hash, snapshot row, event, again after confirmed()):
    # a quarter of the gateway's CPU. Freshness is not content, so a confirmed copy shares both.
    b = booking("S", sensitivity="private", original_start=NOW)
    seen = b.confirmed(NOW)
    assert seen.content_json() is b.content_json() and seen.content_hash() == b.content_hash()
    assert seen.content() is seen.content() and json.loads(b.content_json()) == b.content() == seen.content()
    assert b.confirmed(NOW).content() is b.content()  # (a content made before is shared too)
    assert seen.content_hash() == replace(b, confirmed_at=NOW).content_hash()
    published = to_json(seen)
    assert list(published)[-1] == "confirmed_at" and published["confirmed_at"] == "2026-11-23T08:00:00Z"
    assert {k: v for k, v in published.items() if k != "confirmed_at"} == b.content()


def test_times_are_published_and_hashed_to_the_second_in_utc_as_they_always_were():
    # Booking ids are hashes over these texts: a faster formatting must give the very same characters.
    berlin = datetime(2026, 3, 29, 3, 30, 59, 999_999, tzinfo=ZoneInfo("Europe/Berlin"))
    b = booking("T", original_start=berlin)
    assert to_json(b)["original_start"] == berlin.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") \
        == "2026-03-29T01:30:59Z"
    for utc in (berlin.astimezone(UTC), datetime(2026, 3, 29, 1, 30, 59, tzinfo=UTC),
                datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC)):
        expected = utc.strftime("%Y-%m-%dT%H:%M:%SZ").rjust(20, "0")
        assert to_json(booking("U", original_start=utc))["original_start"] == expected
    assert b.id == booking_id_for("room1@contoso.com", "T", berlin) == \
        hashlib.sha256("\x1f".join(("booking", "room1@contoso.com", "T", "2026-03-29T01:30:59Z")).encode()
                       ).hexdigest()[:32]


_texts = st.text(st.characters(codec="utf-8"), max_size=12)
_maybe = st.none() | _texts


@st.composite
def bookings(draw: st.DrawFn) -> Booking:
    start = NOW + timedelta(minutes=draw(st.integers(-10_000, 100_000)))
    people = st.builds(Attendee, _texts, _maybe, st.sampled_from(["required", "optional", "resource"]),
                       st.sampled_from(["accepted", "none", "unknown"]))
    all_day = draw(st.booleans())
    return Booking(
        room=draw(_texts), uid=draw(_texts), start=start, end=start + timedelta(minutes=draw(st.integers(1, 900))),
        timezone=draw(_texts), original_start=draw(st.none() | st.just(start)), all_day=all_day,
        start_date=start.date() if all_day else None, end_date=start.date() if all_day else None,
        subject=draw(_maybe), subject_is_organizer_name=draw(st.booleans()),
        organizer=draw(st.none() | st.builds(Person, _maybe, _maybe)),
        attendees=tuple(draw(st.lists(people, max_size=3))),
        sensitivity=draw(_texts), online_meeting_url=draw(_maybe), response=draw(_texts), cancelled=draw(st.booleans()),
        series_id=draw(_maybe), is_exception=draw(st.booleans()), origin=draw(_texts), free_busy=draw(_texts),
        confirmed_at=draw(st.none() | st.just(NOW)))


@given(bookings())
@settings(max_examples=300, deadline=None)
def test_the_content_text_is_what_json_dumps_with_sorted_keys_gives_character_for_character(b: Booking) -> None:
    # Stored content hashes were taken of json.dumps(content, sort_keys=True): a faster encoding must give the very
    # same text, or every booking of an upgraded gateway would look changed.
    assert b.content_json() == json.dumps(b.content(), sort_keys=True)  # written from the fields
    assert b.content_hash() == hashlib.sha256(json.dumps(b.content(), sort_keys=True).encode()).hexdigest()[:32]
    published = replace(b)
    published.content()
    assert published.content_json() == b.content_json()  # written from the content dict made before


def test_a_content_hash_needs_no_content_dict() -> None:
    # A reconciliation compares hashes of bookings it then drops: the dict is made only for what is published.
    b = booking("H", original_start=NOW, attendees=(Attendee("bob@contoso.com", None, "required", "none"),))
    b.content_hash()
    assert b._content is None
    assert b.content_json() == json.dumps(b.content(), sort_keys=True)


def test_a_series_shares_its_attendees_encoding_and_no_other_tuple_is_taken_for_theirs() -> None:
    # Every instance of a series holds its meeting's one tuple of attendees: encoded once, by the tuple's identity.
    people = (Attendee("bob@contoso.com", "Bob", "required", "accepted"), Attendee("eve@contoso.com", None,
                                                                                  "optional", "none"))
    first = booking("S", original_start=NOW, attendees=people)
    second = booking("S", original_start=NOW + timedelta(days=7), attendees=people)
    assert first.content()["attendees"] is second.content()["attendees"]
    for b in (first, second):
        assert b.content_json() == json.dumps(b.content(), sort_keys=True)
    # Equal people in another tuple, and other people in a tuple made after the first is gone (it may reuse its
    # address): each encoded from its own attendees.
    for other in ((people[0], people[1]), (Attendee("mallory@contoso.com", "M", "required", "declined"),)):
        b = booking("T", attendees=other)
        assert b.content()["attendees"] == [{"email": a.email, "name": a.name, "kind": a.kind, "response": a.response}
                                            for a in other]
        assert b.content_json() == json.dumps(b.content(), sort_keys=True)
    # Past its size the cache starts again, and still answers for every tuple.
    many = [(Attendee(f"p{i}@contoso.com", None, "required", "none"),) for i in range(model._attendees_json._size + 5)]
    for group in many + many[:3]:
        b = booking("U", attendees=group)
        assert json.loads(b.content_json())["attendees"][0]["email"] == group[0].email
    assert len(model._attendees_json._entries) <= model._attendees_json._size


def test_content_of_unexpected_types_is_still_encoded_as_json_dumps_does() -> None:
    for b in (booking("X", subject=12), booking("Y", subject=12)):  # type: ignore[arg-type]  # (a hand-edited row)
        if b.uid == "Y":
            b.content()  # (the text from the dict)
        assert b.content_json() == json.dumps(b.content(), sort_keys=True)


@given(bookings(), st.sampled_from([None, "removed_from_exchange", "room_disconnected"]))
@settings(max_examples=100, deadline=None)
def test_a_booking_events_stored_text_is_its_data(b: Booking, reason: str | None) -> None:
    event = booking_event("deleted" if reason else "created", b, time=NOW, source="urn:test", reason=reason)
    assert event.data_json is not None and json.loads(event.data_json) == event.data == \
        (to_json(b) | ({"reason": reason} if reason else {}))


def test_a_booking_events_data_reads_as_the_dict_it_stands_for() -> None:
    # (made when first read: an import's events are stored and relayed as their text, and their dicts were never read)
    b = booking("D", subject="Board")
    event = booking_event("deleted", b, time=NOW, source="urn:test", reason="removed_from_exchange")
    expected = to_json(b) | {"reason": "removed_from_exchange"}
    data = event.data
    assert data.get("subject") == "Board" and data["reason"] == "removed_from_exchange" and data.get("nope", 1) == 1
    assert "id" in data and "nope" not in data and len(data) == len(expected) and list(data) == list(expected)
    assert dict(data) == expected and {**data} == expected and data == expected and expected == data
    assert event == replace(event) and repr(data) == repr(expected)
    # Encoders are given a dict: the CloudEvent, and the store's text of an event that came without its text.
    assert json.loads(json.dumps(event.to_cloudevent()))["data"] == expected
    assert json.loads(sqlite._event_text(replace(event, data_json=None))) == expected
    # Its freshness is the event's, as its text says, even if the booking is stamped after (as a new read is).
    fresh = booking("E")
    announced = booking_event("created", fresh, time=NOW, source="urn:test")
    fresh.confirmed(NOW)
    assert announced.data["confirmed_at"] is None and announced.data == json.loads(announced.data_json or "")


def test_each_publication_carries_its_own_confirmation_time() -> None:
    # (a step's bookings share one confirmed_at, formatted once: a later step's time is not the earlier one's)
    b, later = booking("F"), NOW + timedelta(seconds=1)
    published = [to_json(b.confirmed(at))["confirmed_at"] for at in (NOW, NOW, later, NOW, None)]
    assert published == ["2026-11-23T08:00:00Z"] * 2 + ["2026-11-23T08:00:01Z", "2026-11-23T08:00:00Z", None]


def test_the_utc_text_of_a_wall_time_the_clock_passes_twice_is_each_instants() -> None:
    # UTC texts are kept by time (an import formats a few times a booking): two times of one zone at the hour the
    # clock goes back are equal keys to Python, and other instants.
    berlin = ZoneInfo("Europe/Berlin")
    first, second = (datetime(2026, 10, 25, 2, 30, tzinfo=berlin, fold=fold) for fold in (0, 1))
    assert first == second and hash(first) == hash(second)
    assert [model.utc_text(t) for t in (first, second, first)] == [
        "2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z", "2026-10-25T00:30:00Z"]
    utc = datetime(2026, 10, 25, 0, 30, 59, 999999, tzinfo=UTC)
    assert model.utc_text(utc) == model.utc_text(utc.replace(microsecond=0)) == "2026-10-25T00:30:59Z"


def test_event_ids_are_time_ordered_uuids() -> None:
    # The outbox's unique index on event ids: random ids cost a page write per event and commit; these append.
    before = time.time_ns() // 1_000_000
    ids = [event_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text)
        assert (u.version, u.variant, str(u)) == (7, uuid.RFC_4122, text)
        assert before <= u.int >> 80 <= after  # its first 48 bits: the milliseconds since 1970
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)  # ordered by time, to the millisecond


def test_a_forked_child_never_hands_out_its_parents_random_digits() -> None:
    # Event ids draw on the OS's randomness: a child process must draw its own, not replay what its parent holds
    # (should ids ever draw it in blocks).
    event_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, ",".join(event_id()[-17:] for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode().split(",")
    os.waitpid(pid, 0)
    os.close(read)
    parent = [event_id()[-17:] for _ in range(5)]
    assert len(child) == 5 and not set(child) & set(parent)


def test_an_event_with_its_sequence_is_the_same_event_otherwise() -> None:
    event = booking_event("created", booking("Q"), time=NOW, source="urn:test")
    numbered = event.sequenced(7)
    assert numbered == replace(event, sequence=7) and numbered.data_json == event.data_json and event.sequence == 0


def test_a_confirmed_copy_hashes_nothing_again(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # An import confirms every booking it plans: copying it through __init__ hashed both its ids once more.
    b = booking("C", original_start=NOW)
    b.content_hash()
    hashed: list[tuple[str, ...]] = []
    real = model._short_hash
    monkeypatch.setattr(model, "_short_hash", lambda *parts: hashed.append(parts) or real(*parts))
    seen = b.confirmed(NOW)
    assert hashed == []
    assert (seen.id, seen.meeting_id, seen.content_hash(), seen.confirmed_at) == \
        (b.id, b.meeting_id, b.content_hash(), NOW)
    assert seen == replace(b, confirmed_at=NOW) and seen.content_json() is b.content_json()


def test_a_booking_just_read_is_stamped_itself_and_a_confirmed_one_is_copied_and_left_alone() -> None:
    # A source's fresh booking is held by no one but the sync planning it: stamping it saves a 27-field copy per
    # booking an import publishes. One already confirmed may be stored or published: it never changes.
    fresh = booking("F")
    assert fresh.confirmed_at is None
    seen = fresh.confirmed(NOW)
    assert seen is fresh and fresh.confirmed_at == NOW
    later = NOW + timedelta(minutes=5)
    again = seen.confirmed(later)
    assert again is not seen and (again.confirmed_at, seen.confirmed_at) == (later, NOW)
    assert again == replace(seen, confirmed_at=later) and again.content_json() is seen.content_json()


class RoomChurn(RuleBasedStateMachine):
    """Exchange churns a room; the gateway observes it fully, partially or through a broken (empty) read.

    Invariant: a consumer that applies the planned events in order holds exactly what the gateway holds, and
    after a full, truthful read both equal what Exchange has.
    """

    def __init__(self) -> None:
        super().__init__()
        self.exchange: dict[str, Booking] = {}
        self.store: dict[str, Known] = {}
        self.consumer: dict[str, Booking] = {}
        self.counter = 0

    def _apply(self, result) -> None:  # type: ignore[no-untyped-def]
        for b in result.created + result.updated:
            self.store[b.id] = Known(b, b.content_hash())
            self.consumer[b.id] = b
        for b in result.deleted:
            self.store.pop(b.id, None)
            self.consumer.pop(b.id, None)

    @rule(hours=st.integers(0, 200))
    def create(self, hours: int) -> None:
        self.counter += 1
        b = booking(f"U{self.counter}", hours=hours)
        self.exchange[b.id] = b

    @rule(data=st.data())
    def modify(self, data) -> None:  # type: ignore[no-untyped-def]
        if self.exchange:
            bid = data.draw(st.sampled_from(sorted(self.exchange)))
            self.exchange[bid] = replace(self.exchange[bid], subject=data.draw(st.sampled_from(["x", "y", "z"])))

    @rule(data=st.data())
    def delete(self, data) -> None:  # type: ignore[no-untyped-def]
        if self.exchange:
            del self.exchange[data.draw(st.sampled_from(sorted(self.exchange)))]

    @rule()
    def full_read(self) -> None:
        result = plan(self.store, list(self.exchange.values()), Scope(WINDOW), NOW,
                      empty_confirmed=not self.exchange)
        self._apply(result)
        assert {k: v.booking.content() for k, v in self.store.items()} == \
            {k: v.content() for k, v in self.exchange.items()}

    @rule(data=st.data())
    def partial_read(self, data) -> None:  # type: ignore[no-untyped-def]
        uids = frozenset(data.draw(st.sets(st.sampled_from([f"U{i}" for i in range(1, self.counter + 2)]))))
        observed = [b for b in self.exchange.values() if b.uid in uids]
        self._apply(plan(self.store, observed, Scope(WINDOW, uids), NOW))

    @rule()
    def broken_empty_read(self) -> None:
        before = dict(self.store)
        result = plan(self.store, [], Scope(WINDOW), NOW)
        if len(before) >= MASS_DELETE_MINIMUM:
            assert result.held_back and not result.deleted
        self._apply(result)

    @invariant()
    def consumer_mirrors_the_store(self) -> None:
        assert {k: v.booking for k, v in self.store.items()} == self.consumer


TestRoomChurn = RoomChurn.TestCase
TestRoomChurn.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
