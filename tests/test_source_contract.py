"""The contract every calendar source keeps (gateway/ports.py: CalendarSource), run once per source.

Like vdirsyncer's ``StorageTests``: ``SourceContract`` holds the behaviours, and each source subclasses it with a
``world`` fixture that gives the source plus an ``Outlook``, a way to act on the source's calendars as people do
(the EWS source: the simulator's control layer, the same path its EWS operations take; the in-memory source: its
own methods). A new source is done when a subclass of ``SourceContract`` passes. What a source cannot have is
declared in its ``World`` (``person=None``: no notion of a mailbox it may not impersonate), and the test that
needs it is skipped with that reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pytest

from gateway.errors import GatewayError, ImpersonationDenied, NotFound, SyncStateInvalid
from gateway.model import Booking, Window, booking_id_for, meeting_id_for
from gateway.ports import CalendarSource, Changes
from gateway.simulator.control import Control
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from gateway.sources.ews.source import EwsSettings, EwsSource
from gateway.sources.memory import MemorySource
from gateway.sync.engine import is_live
from tests.conftest import SimFixture

PAGE_SIZE = 3  # small, so that a handful of meetings already spans several pages of changes
ROOM1, ROOM2 = "room1@contoso.com", "room2@contoso.com"
ALICE, BOB = "alice@contoso.com", "bob@contoso.com"
NOBODY = "nobody@contoso.com"


class Outlook(Protocol):
    """What people do to the calendars behind a source. Meetings are named by their UID as the organizer's copy
    has it; an occurrence by its original start. Every method returns once the rooms' calendars show the change
    (a booking attendant has answered)."""

    def book(self, organizer: str, rooms: Sequence[str], start: datetime, end: datetime, subject: str, *,
             repeat: str | None = None, count: int = 1) -> str:
        """A meeting (``repeat``: "daily" or "weekly", ``count`` occurrences) with the rooms as resources."""
        ...

    def appointment(self, room: str, start: datetime, end: datetime, subject: str) -> str:
        """An appointment in the room's own calendar (a room display or an anonymous booker)."""
        ...

    def move(self, uid: str, start: datetime, end: datetime, occurrence: datetime | None = None) -> None: ...

    def rename(self, uid: str, subject: str) -> None: ...

    def cancel(self, uid: str, occurrence: datetime | None = None) -> None:
        """The organizer cancels the meeting (or one occurrence); a room's own appointment is deleted."""
        ...

    def decline(self, uid: str, room: str, occurrence: datetime | None = None) -> None:
        """The room declines the meeting (or one occurrence) as itself; the organizer's meeting stays."""
        ...


@dataclasses.dataclass
class World:
    source: CalendarSource
    outlook: Outlook
    start: datetime  # a slot that the source's calendars accept bookings at (the window's "soon")
    person: str | None = ALICE  # a mailbox the source may not read as a room; None: the source has no such notion

    @property
    def window(self) -> Window:
        return Window(self.start - timedelta(days=1), self.start + timedelta(days=60))

    def at(self, hours: float, days: int = 0) -> tuple[datetime, datetime]:
        """A one-hour slot ``days`` and ``hours`` after ``start``."""
        s = self.start + timedelta(days=days, hours=hours)
        return s, s + timedelta(hours=1)


class Tracker:
    """Follows a room's change token the way the coordinator and its store do: item ids seen in pages are mapped
    to meetings, so a deleted item names the meeting it belonged to."""

    def __init__(self, source: CalendarSource, room: str) -> None:
        self.source = source
        self.room = room
        self.state: str | None = None
        self.items: dict[str, str] = {}
        self.pages: list[Changes] = []

    async def drain(self) -> set[str]:
        """Every page up to now; the UIDs of the meetings they say were created, changed or deleted."""
        touched: set[str] = set()
        while True:
            page = await self.source.changes(self.room, self.state)
            self.pages.append(page)
            assert page.sync_state, "every page carries the token to continue from"
            unknown = page.deleted_item_ids - set(self.items)
            assert not unknown, f"deleted items never reported before: {unknown}"
            assert set(page.item_uids.values()) <= page.changed_uids
            touched |= page.changed_uids | {self.items.pop(i) for i in page.deleted_item_ids}
            self.items.update(page.item_uids)
            self.state = page.sync_state
            if not page.more:
                return touched


def live(bookings: list[Booking], uid: str | None = None) -> list[Booking]:
    return sorted((b for b in bookings if is_live(b) and (uid is None or b.uid == uid)), key=lambda b: b.start)


class SourceContract:
    """The behaviours of every CalendarSource. Subclasses provide the ``world`` fixture."""

    # -- verification --------------------------------------------------------------------------------------
    async def test_a_room_verifies(self, world: World) -> None:
        info = await world.source.verify(ROOM1)
        assert info.email == ROOM1

    async def test_an_unknown_mailbox_is_not_found_by_every_operation(self, world: World) -> None:
        with pytest.raises(NotFound) as verified:
            await world.source.verify(NOBODY)
        assert verified.value.key == "mailbox_not_found" and NOBODY in str(verified.value)
        for operation in (world.source.read_window(NOBODY, world.window), world.source.changes(NOBODY, None)):
            with pytest.raises(NotFound) as e:
                await operation
            assert e.value.key == "mailbox_not_found"

    async def test_a_mailbox_the_gateway_may_not_read_is_impersonation_denied(self, world: World) -> None:
        if world.person is None:
            pytest.skip("this source has no notion of a mailbox it may not impersonate")
        with pytest.raises(ImpersonationDenied) as e:
            await world.source.verify(world.person)
        assert e.value.key == "impersonation_denied" and world.person in str(e.value)
        with pytest.raises(ImpersonationDenied):
            await world.source.read_window(world.person, world.window)
        with pytest.raises(ImpersonationDenied):  # (a first sync verifies a room that was never imported)
            await world.source.changes(world.person, None)

    # -- reading ---------------------------------------------------------------------------------------------
    async def test_a_window_lists_single_meetings_and_series_expanded_into_occurrences(self, world: World) -> None:
        single = world.outlook.book(ALICE, [ROOM1], *world.at(1), "Design review")
        first, end = world.at(3)
        series = world.outlook.book(BOB, [ROOM1], first, end, "Weekly sync", repeat="weekly", count=3)
        other_room = world.outlook.book(ALICE, [ROOM2], *world.at(1), "Elsewhere")

        bookings = await world.source.read_window(ROOM1, world.window)
        assert {b.uid for b in bookings} == {single, series} and other_room not in {b.uid for b in bookings}
        assert all(b.room == ROOM1 for b in bookings)
        [one] = live(bookings, single)
        assert (one.start, one.end) == world.at(1) and one.subject == "Design review"
        assert one.original_start is None and one.series_id is None and one.organizer is not None
        assert one.organizer.email == ALICE
        occurrences = live(bookings, series)
        starts = [first + timedelta(weeks=k) for k in range(3)]
        assert [b.start for b in occurrences] == starts
        assert [b.original_start for b in occurrences] == starts
        assert all(b.series_id == series and not b.is_exception and b.end - b.start == timedelta(hours=1)
                   for b in occurrences)
        assert len({b.id for b in bookings}) == len(bookings) == 4

        # A window that ends before the third week holds the first two occurrences only.
        short = Window(world.window.start, first + timedelta(weeks=1, hours=2))
        assert [b.original_start for b in live(await world.source.read_window(ROOM1, short), series)] == starts[:2]
        # A window after everything holds nothing.
        later = Window(first + timedelta(weeks=3), first + timedelta(weeks=4))
        assert await world.source.read_window(ROOM1, later) == []

    async def test_read_meetings_reads_only_the_meetings_asked_for_as_the_window_shows_them(
            self, world: World) -> None:
        single = world.outlook.book(ALICE, [ROOM1], *world.at(1), "Design review")
        series = world.outlook.book(BOB, [ROOM1], *world.at(3), "Daily stand-up", repeat="daily", count=4)
        world.outlook.book(ALICE, [ROOM1], *world.at(5), "Not asked for")
        everything = {b.id: b.content_hash() for b in await world.source.read_window(ROOM1, world.window)}

        some = await world.source.read_meetings(ROOM1, world.window, frozenset({single, series}))
        assert {b.uid for b in some} == {single, series} and len(live(some, series)) == 4
        assert {b.id: b.content_hash() for b in some} == {k: v for k, v in everything.items()
                                                          if k in {b.id for b in some}}
        assert await world.source.read_meetings(ROOM1, world.window, frozenset({"no-such-meeting"})) == []

    # -- the change token ------------------------------------------------------------------------------------
    async def test_the_first_pages_list_every_meeting_of_the_room(self, world: World) -> None:
        uids = {world.outlook.book(ALICE, [ROOM1], *world.at(h), f"Meeting {h}") for h in range(5)}
        uids.add(world.outlook.appointment(ROOM1, *world.at(6), "At the room's display"))
        world.outlook.book(ALICE, [ROOM2], *world.at(1), "Elsewhere")
        tracker = Tracker(world.source, ROOM1)
        assert await tracker.drain() == uids
        assert len(tracker.pages) > 1 and all(p.more for p in tracker.pages[:-1])  # PAGE_SIZE items a page
        assert sorted(tracker.items.values()) == sorted(uids)
        assert await tracker.drain() == set()

    async def test_creates_moves_renames_and_deletes_come_through_the_change_token_and_nothing_else(
            self, world: World) -> None:
        tracker, elsewhere = Tracker(world.source, ROOM1), Tracker(world.source, ROOM2)
        assert await tracker.drain() == set() and await elsewhere.drain() == set()
        a = world.outlook.book(ALICE, [ROOM1], *world.at(1), "A")
        b = world.outlook.book(ALICE, [ROOM2], *world.at(1), "B")
        assert await tracker.drain() == {a}
        assert await elsewhere.drain() == {b}
        await world.source.read_window(ROOM1, world.window)  # reading changes nothing
        assert await tracker.drain() == set()

        world.outlook.move(a, *world.at(2))
        assert await tracker.drain() == {a}
        [moved] = await world.source.read_meetings(ROOM1, world.window, frozenset({a}))
        assert (moved.start, moved.end) == world.at(2)
        world.outlook.rename(a, "A, renamed")
        assert await tracker.drain() == {a}
        [renamed] = await world.source.read_meetings(ROOM1, world.window, frozenset({a}))
        assert renamed.subject == "A, renamed"

        world.outlook.move(b, *world.at(4))  # another room's change
        assert await tracker.drain() == set()
        assert await elsewhere.drain() == {b}

        world.outlook.cancel(a)
        assert await tracker.drain() == {a}
        assert live(await world.source.read_meetings(ROOM1, world.window, frozenset({a}))) == []
        assert await tracker.drain() == set()

        appointment = world.outlook.appointment(ROOM1, *world.at(5), "Walk-in")
        assert await tracker.drain() == {appointment}
        world.outlook.cancel(appointment)
        assert await tracker.drain() == {appointment}
        assert live(await world.source.read_window(ROOM1, world.window)) == []

    async def test_a_meeting_created_and_removed_between_two_syncs_is_not_reported(self, world: World) -> None:
        tracker = Tracker(world.source, ROOM1)
        await tracker.drain()
        gone = world.outlook.appointment(ROOM1, *world.at(1), "Booked and released")
        world.outlook.cancel(gone)
        kept = world.outlook.appointment(ROOM1, *world.at(2), "Kept")
        assert await tracker.drain() == {kept}

    async def test_a_change_made_while_paging_is_not_lost(self, world: World) -> None:
        uids = {world.outlook.book(ALICE, [ROOM1], *world.at(h), f"Meeting {h}") for h in range(PAGE_SIZE + 1)}
        tracker = Tracker(world.source, ROOM1)
        first = await world.source.changes(ROOM1, None)
        assert first.more
        tracker.items.update(first.item_uids)
        tracker.state = first.sync_state
        late = world.outlook.book(ALICE, [ROOM1], *world.at(9), "Booked while the gateway paged")
        # It comes in this round or (Exchange: a round is a snapshot) in the next; the change marks the room
        # dirty again either way.
        seen = first.changed_uids | await tracker.drain()
        assert seen | await tracker.drain() == uids | {late}

    async def test_series_changes_come_through_as_the_series(self, world: World) -> None:
        first, end = world.at(3)
        series = world.outlook.book(BOB, [ROOM1], first, end, "Weekly sync", repeat="weekly", count=3)
        tracker = Tracker(world.source, ROOM1)
        await tracker.drain()
        second = first + timedelta(weeks=1)
        world.outlook.move(series, second + timedelta(hours=2), end + timedelta(weeks=1, hours=2), occurrence=second)
        assert await tracker.drain() == {series}
        world.outlook.cancel(series, occurrence=first)
        assert await tracker.drain() == {series}

    async def test_pages_describe_meetings_completely_only_as_a_read_would(self, world: World) -> None:
        """A page may carry the bookings of meetings it describes completely (``complete_uids``); they are
        exactly what reading those meetings gives."""
        world.outlook.book(ALICE, [ROOM1], *world.at(1), "Single")
        world.outlook.book(BOB, [ROOM1], *world.at(3), "Series", repeat="daily", count=2)
        page = await world.source.changes(ROOM1, None)
        assert page.complete_uids <= page.changed_uids
        assert {b.uid for b in page.bookings} == set(page.complete_uids)
        if page.complete_uids:
            read = await world.source.read_meetings(ROOM1, world.window, page.complete_uids)
            assert sorted((b.id, b.content_hash()) for b in page.bookings) == sorted(
                (b.id, b.content_hash()) for b in read)

    async def test_an_invalid_change_token_raises_sync_state_invalid(self, world: World) -> None:
        world.outlook.book(ALICE, [ROOM1], *world.at(1), "A")
        tracker, other = Tracker(world.source, ROOM1), Tracker(world.source, ROOM2)
        await tracker.drain()
        await other.drain()
        assert tracker.state is not None and other.state is not None
        for bad in ("not a sync state", tracker.state[:-3], other.state):
            with pytest.raises(SyncStateInvalid) as e:
                await world.source.changes(ROOM1, bad)
            assert isinstance(e.value, GatewayError) and e.value.key == "sync_state_invalid"
        # The documented recovery: start again without a token.
        assert (await world.source.changes(ROOM1, None)).changed_uids

    # -- identity --------------------------------------------------------------------------------------------
    async def test_a_booking_keeps_its_id_when_the_meeting_moves(self, world: World) -> None:
        single = world.outlook.book(ALICE, [ROOM1], *world.at(1), "Single")
        first, end = world.at(3)
        series = world.outlook.book(BOB, [ROOM1], first, end, "Weekly", repeat="weekly", count=3)
        before = {(b.uid, b.original_start): b.id for b in await world.source.read_window(ROOM1, world.window)}

        world.outlook.move(single, *world.at(6, days=1))
        second = first + timedelta(weeks=1)
        world.outlook.move(series, second + timedelta(hours=2), end + timedelta(weeks=1, hours=2), occurrence=second)
        after = {(b.uid, b.original_start): b for b in await world.source.read_window(ROOM1, world.window)}
        assert {key: b.id for key, b in after.items()} == before
        assert (after[(single, None)].start, after[(single, None)].end) == world.at(6, days=1)
        moved = after[(series, second)]
        assert moved.is_exception and moved.start == second + timedelta(hours=2)
        assert not after[(series, first)].is_exception

    async def test_a_series_that_moves_starts_afresh_without_its_exceptions(self, world: World) -> None:
        first, end = world.at(3)
        series = world.outlook.book(BOB, [ROOM1], first, end, "Weekly", repeat="weekly", count=3)
        second = first + timedelta(weeks=1)
        world.outlook.move(series, second + timedelta(hours=2), end + timedelta(weeks=1, hours=2), occurrence=second)
        world.outlook.cancel(series, occurrence=first + timedelta(weeks=2))
        later = first + timedelta(hours=2)
        world.outlook.move(series, later, later + timedelta(hours=1))
        occurrences = live(await world.source.read_window(ROOM1, world.window), series)
        starts = [later + timedelta(weeks=k) for k in range(3)]
        assert [(b.start, b.original_start, b.is_exception) for b in occurrences] == [(s, s, False) for s in starts]

    async def test_every_copy_of_a_meeting_shares_its_identity(self, world: World) -> None:
        """Organizer's copy and rooms' copies: one UID (the organizer's), one meeting id; a booking per room."""
        uid = world.outlook.book(ALICE, [ROOM1, ROOM2], *world.at(1), "All hands")
        [one] = await world.source.read_window(ROOM1, world.window)
        [two] = await world.source.read_window(ROOM2, world.window)
        assert one.uid == two.uid == uid
        assert one.meeting_id == two.meeting_id == meeting_id_for(uid)
        assert (one.id, two.id) == (booking_id_for(ROOM1, uid, None), booking_id_for(ROOM2, uid, None))
        assert (one.start, one.end) == (two.start, two.end) == world.at(1)

    # -- cancellations and declines --------------------------------------------------------------------------
    async def test_a_cancelled_meeting_or_occurrence_is_no_active_booking(self, world: World) -> None:
        gone = world.outlook.book(ALICE, [ROOM1, ROOM2], *world.at(1), "Cancelled")
        kept = world.outlook.book(BOB, [ROOM1], *world.at(2), "Kept")
        first, end = world.at(3)
        series = world.outlook.book(BOB, [ROOM1], first, end, "Weekly", repeat="weekly", count=3)
        before = {b.id: b.content_hash() for b in await world.source.read_window(ROOM1, world.window)}

        world.outlook.cancel(gone)
        world.outlook.cancel(series, occurrence=first + timedelta(weeks=1))
        after = await world.source.read_window(ROOM1, world.window)
        assert live(after, gone) == [] and live(await world.source.read_window(ROOM2, world.window)) == []
        assert all(b.cancelled for b in after if b.uid == gone)  # if the source keeps it, it says so
        assert [b.original_start for b in live(after, series)] == [first, first + timedelta(weeks=2)]
        for b in live(after):  # nothing else changed
            assert before[b.id] == b.content_hash()
        assert {b.uid for b in live(after)} == {kept, series}

    async def test_a_meeting_the_room_declines_is_no_active_booking_of_that_room(self, world: World) -> None:
        both = world.outlook.book(ALICE, [ROOM1, ROOM2], *world.at(1), "Declined by room 1")
        first, end = world.at(3)
        series = world.outlook.book(BOB, [ROOM1], first, end, "Weekly", repeat="weekly", count=3)

        world.outlook.decline(both, ROOM1)
        world.outlook.decline(series, ROOM1, occurrence=first)
        mine = await world.source.read_window(ROOM1, world.window)
        assert live(mine, both) == []
        assert all(b.response == "declined" or b.cancelled for b in mine if b.uid == both)
        assert [b.original_start for b in live(mine, series)] == [first + timedelta(weeks=k) for k in (1, 2)]
        [theirs] = live(await world.source.read_window(ROOM2, world.window))  # the other room still has it
        assert theirs.uid == both


# -- the sources ---------------------------------------------------------------------------------------------
def soon() -> datetime:
    """Tomorrow at 09:00 UTC: inside every room's booking window."""
    return (datetime.now(UTC) + timedelta(days=1)).replace(hour=9, minute=0, second=0, microsecond=0)


class TestMemorySource(SourceContract):
    @pytest.fixture
    def world(self) -> World:
        source = MemorySource(now=soon() - timedelta(hours=12), page_size=PAGE_SIZE)
        for email in (ROOM1, ROOM2):
            source.add_room(email)
        for email in (ALICE, BOB):
            source.add_person(email)
        return World(source, source, soon())


class SimulatorOutlook:
    """The Outlook of the simulated Exchange: its control layer, on the simulator's loop; every action waits until
    the rooms' booking attendants have answered."""

    def __init__(self, ews: SimFixture) -> None:
        self.ews = ews

    def _do(self, action: Callable[[Control], Any]) -> Any:
        result = self.ews.call(lambda: action(Control.of(self.ews.sim)))
        assert self.ews.call(lambda: Control.of(self.ews.sim).settle()), "the booking attendant never answered"
        return result

    def book(self, organizer: str, rooms: Sequence[str], start: datetime, end: datetime, subject: str, *,
             repeat: str | None = None, count: int = 1) -> str:
        recurrence = {"pattern": repeat, "count": count} if repeat else None
        return str(self._do(lambda c: c.create_meeting(organizer=organizer, rooms=list(rooms), start=start, end=end,
                                                       subject=subject, recurrence=recurrence).uid))

    def appointment(self, room: str, start: datetime, end: datetime, subject: str) -> str:
        return str(self._do(lambda c: c.create_meeting(organizer=room, start=start, end=end, subject=subject).uid))

    def move(self, uid: str, start: datetime, end: datetime, occurrence: datetime | None = None) -> None:
        self._do(lambda c: c.move(uid, start, end, occurrence=occurrence))

    def rename(self, uid: str, subject: str) -> None:
        self._do(lambda c: c.update(uid, {"subject": subject}))

    def cancel(self, uid: str, occurrence: datetime | None = None) -> None:
        self._do(lambda c: c.cancel(uid, occurrence=occurrence))

    def decline(self, uid: str, room: str, occurrence: datetime | None = None) -> None:
        self._do(lambda c: c.decline(uid, room, occurrence=occurrence))


class TestEwsSource(SourceContract):
    @pytest.fixture
    async def world(self, sim_factory: Any) -> AsyncIterator[World]:
        ews = sim_factory(SimulatorConfig(rba_delay=0.01), rooms=2, users=2)

        def keep_subjects() -> None:  # rooms that show the organizer's subject, as the contract's rename needs
            for room in (ROOM1, ROOM2):
                Control.of(ews.sim).set_room_settings(room, {"DeleteSubject": False, "AddOrganizerToSubject": False})
        ews.call(keep_subjects)
        source = EwsSource(EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{SERVICE_ACCOUNT}", max_workers=2,
                                       sync_page_size=PAGE_SIZE), SERVICE_PASSWORD)
        yield World(source, SimulatorOutlook(ews), soon())
        await source.close()


class TestGraphSource(SourceContract):
    """Exchange Online through Microsoft Graph: msal over HTTPS against the simulator's Graph side, the rooms and
    people all online; an application access policy scoped to the rooms keeps the app out of people's mailboxes."""

    @pytest.fixture
    async def world(self, graph_sim_factory: Any) -> AsyncIterator[World]:
        from gateway.sources.graph.auth import TokenSource
        from gateway.sources.graph.client import GraphClient
        from gateway.sources.graph.settings import GraphSettings
        from gateway.sources.graph.source import GraphSource

        g = graph_sim_factory(SimulatorConfig(rba_delay=0.01), rooms=2, users=2, graph_rooms=2, graph_users=2)

        def keep_subjects() -> None:
            for room in (ROOM1, ROOM2):
                Control.of(g.sim).set_room_settings(room, {"DeleteSubject": False, "AddOrganizerToSubject": False})
        g.call(keep_subjects)
        status, _ = g.control("PUT", "/graph/access-policy", {"mailboxes": [ROOM1, ROOM2]})
        assert status == 200
        settings = GraphSettings(tenant_id=g.tenant_id, client_id=g.client_id, credential="client_secret",
                                 authority_host=g.authority.rsplit("/", 1)[0], graph_url=g.graph_url,
                                 ca_bundle=g.ca_bundle, page_size=PAGE_SIZE)
        source = GraphSource(settings, GraphClient(settings, TokenSource(settings, g.client_secret)))
        yield World(source, SimulatorOutlook(g), soon())
        await source.close()
