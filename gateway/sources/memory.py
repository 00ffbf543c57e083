"""MemorySource: a CalendarSource (and its ChangeFeed) held in memory, for tests and the contract suite.

It keeps the semantics the gateway relies on and nothing else: rooms hold copies of meetings (one item per meeting
and room, with an item id that never changes); a series expands into occurrences named by their original start;
a change token counts a room's changes, so a page reports each item touched since the token once (created,
changed, or deleted if it existed before); a token of another room or another source is refused. People act on
it through plain methods (``book``, ``move``, ``cancel``, ``decline``...), time is ``now`` (set or ``advance``
it), and ``fail`` makes the next calls raise an error (throttled, unavailable, refused credentials).

Unlike the booking attendant of a real room, it accepts every meeting and keeps subjects as the organizer wrote
them; an organizer's cancellation leaves the room's copy marked cancelled (Exchange either does that or removes
the copy; the EWS source meets the other way).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar

from gateway.errors import ConfigError, GatewayError, ImpersonationDenied, MailboxNotFound, NotFound, SyncStateInvalid
from gateway.model import Attendee, Booking, Person, Window
from gateway.ports import Capabilities, Changes, Dirty, FeedSettings, OpenedSource, RoomInfo, RoomList, SourceSpec

REPEATS = {"daily": timedelta(days=1), "weekly": timedelta(weeks=1)}


@dataclass
class _Meeting:
    """The organizer's meeting: what every room's copy shows."""

    uid: str
    organizer: Person
    rooms: tuple[str, ...]
    start: datetime
    end: datetime
    subject: str
    sensitivity: str = "normal"
    repeat: timedelta | None = None
    count: int = 1
    moved: dict[datetime, tuple[datetime, datetime]] = field(default_factory=dict)  # original start -> times
    removed: set[datetime] = field(default_factory=set)  # cancelled occurrences
    cancelled: bool = False

    def instances(self) -> Iterator[tuple[datetime | None, datetime, datetime]]:
        """(original start or None for a single meeting, start, end) of every instance still on."""
        if self.repeat is None:
            yield None, self.start, self.end
            return
        for k in range(self.count):
            original = self.start + k * self.repeat
            if original not in self.removed:
                yield (original, *self.moved.get(original, (original, original + (self.end - self.start))))


@dataclass
class _Item:
    """A room's copy of a meeting. ``born``/``stamp``/``gone`` are values of the room's change counter."""

    item_id: str
    uid: str
    born: int
    stamp: int
    gone: bool = False
    declined: set[datetime] = field(default_factory=set)  # occurrences the room declined


@dataclass
class _Room:
    email: str
    name: str | None
    capacity: int | None
    counter: int = 0
    items: dict[str, _Item] = field(default_factory=dict)  # by item id, removed ones too (deletes to report)

    def copy_of(self, uid: str) -> _Item | None:
        return next((i for i in self.items.values() if i.uid == uid and not i.gone), None)

    def tick(self, item: _Item) -> None:
        self.counter += 1
        item.stamp = self.counter


@dataclass
class _Failure:
    error: GatewayError
    room: str | None
    times: int | None  # None: until heal()


class MemorySource:
    """A CalendarSource and ChangeFeed in memory (see the module's docstring)."""

    def __init__(self, *, now: datetime | None = None, page_size: int = 512) -> None:
        self.now = now or datetime.now(UTC).replace(microsecond=0)
        self.page_size = page_size
        self.calls: Counter[str] = Counter()  # port calls by operation, failed ones included
        self._epoch = uuid.uuid4().hex[:8]  # a token from another source (or before a restart) is refused
        self._rooms: dict[str, _Room] = {}
        self._people: dict[str, Person] = {}
        self._lists: dict[str, tuple[str | None, tuple[str, ...]]] = {}  # room list -> (name, rooms)
        self._meetings: dict[str, _Meeting] = {}
        self._failures: list[_Failure] = []
        self._watchers: list[tuple[frozenset[str], Dirty]] = []
        self._pending: set[asyncio.Future[None]] = set()
        self._ids = itertools.count(1)
        self.notifying = True  # False: changes happen unheard (a lost subscription); reads still see them

    # -- the clock --------------------------------------------------------------------------------------------
    def clock(self) -> datetime:
        """The source's time: hand it to the coordinator (``clock=source.clock``) so both agree."""
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta

    # -- the directory ----------------------------------------------------------------------------------------
    def add_room(self, email: str, name: str | None = None, capacity: int | None = None) -> None:
        self._rooms[email.lower()] = _Room(email.lower(), name, capacity)

    def add_person(self, email: str, name: str | None = None) -> None:
        """A person's mailbox: the gateway may not read it as a room."""
        self._people[email.lower()] = Person(email.lower(), name or email.split("@")[0].title())

    def add_room_list(self, email: str, rooms: Sequence[str], name: str | None = None) -> None:
        """A room list (its rooms need not exist: a list can name a room that was since removed)."""
        self._lists[email.lower()] = (name, tuple(r.lower() for r in rooms))

    @property
    def directory(self) -> MemoryDirectory:
        """The Directory of this source's organisation."""
        return MemoryDirectory(self)

    # -- what people do ---------------------------------------------------------------------------------------
    def book(self, organizer: str, rooms: Sequence[str], start: datetime, end: datetime, subject: str = "", *,
             repeat: str | None = None, count: int = 1, private: bool = False, uid: str | None = None) -> str:
        """A meeting with the rooms as resources (``repeat``: "daily" or "weekly", ``count`` instances); every
        room accepts. Returns its UID."""
        if end <= start:
            raise ValueError(f"end {end} is not after start {start}")
        if repeat is not None and repeat not in REPEATS:
            raise ValueError(f"repeat {repeat!r} is not one of {sorted(REPEATS)}")
        who = organizer.lower()
        person = self._people.get(who)
        if person is None and who in self._rooms:
            person = Person(who, self._rooms[who].name)
        meeting = _Meeting(uid or uuid.uuid4().hex.upper(), person or Person(who), tuple(r.lower() for r in rooms),
                           start.astimezone(UTC), end.astimezone(UTC), subject,
                           "private" if private else "normal", REPEATS[repeat] if repeat else None, count)
        if meeting.uid in self._meetings:
            raise ValueError(f"a meeting with UID {meeting.uid} exists already")
        unknown = [r for r in meeting.rooms if r not in self._rooms]
        if unknown:
            raise ValueError(f"no room {unknown}; add_room() first")
        self._meetings[meeting.uid] = meeting
        for email in meeting.rooms:
            room = self._rooms[email]
            room.counter += 1
            item = _Item(f"{email}/{next(self._ids)}", meeting.uid, room.counter, room.counter)
            room.items[item.item_id] = item
            self._notify(email)
        return meeting.uid

    def appointment(self, room: str, start: datetime, end: datetime, subject: str = "", *,
                    repeat: str | None = None, count: int = 1, private: bool = False) -> str:
        """An appointment in the room's own calendar (a room display, an anonymous booker)."""
        return self.book(room, [room], start, end, subject, repeat=repeat, count=count, private=private)

    def move(self, uid: str, start: datetime, end: datetime, occurrence: datetime | None = None) -> None:
        m = self._meeting(uid)
        if occurrence is not None:
            m.moved[self._occurrence(m, occurrence)] = (start.astimezone(UTC), end.astimezone(UTC))
        else:  # a series that moves loses its exceptions, as in Exchange
            m.start, m.end = start.astimezone(UTC), end.astimezone(UTC)
            m.moved.clear()
            m.removed.clear()
        self._changed(m)

    def rename(self, uid: str, subject: str) -> None:
        m = self._meeting(uid)
        m.subject = subject
        self._changed(m)

    def cancel(self, uid: str, occurrence: datetime | None = None) -> None:
        """The organizer cancels the meeting or one occurrence; a room's own appointment is deleted."""
        m = self._meeting(uid)
        if occurrence is not None:
            m.removed.add(self._occurrence(m, occurrence))
        elif m.rooms == (m.organizer.email,):
            self._remove(m.rooms[0], m.uid)
            del self._meetings[m.uid]
            return
        else:
            m.cancelled = True
        self._changed(m)

    def decline(self, uid: str, room: str, occurrence: datetime | None = None) -> None:
        """The room declines (its copy leaves its calendar); the organizer's meeting and other rooms keep it."""
        m = self._meeting(uid)
        item = self._rooms[room.lower()].copy_of(uid)
        if item is None:
            raise ValueError(f"{room} has no copy of meeting {uid}")
        if occurrence is None:
            self._remove(room.lower(), uid)
            return
        item.declined.add(self._occurrence(m, occurrence))
        self._rooms[room.lower()].tick(item)
        self._notify(room.lower())

    def touch(self, room: str) -> None:
        """Re-stamp every item of the room without changing it (Exchange does, e.g. a new ChangeKey)."""
        r = self._rooms[room.lower()]
        for item in [i for i in r.items.values() if not i.gone]:
            r.tick(item)
        self._notify(r.email)

    # -- failures ---------------------------------------------------------------------------------------------
    def fail(self, error: GatewayError, *, room: str | None = None, times: int | None = 1) -> None:
        """The next ``times`` calls (for ``room``, or any room) raise ``error``; ``times=None``: until heal()."""
        self._failures.append(_Failure(error, room.lower() if room else None, times))

    def heal(self) -> None:
        self._failures.clear()

    # -- CalendarSource -------------------------------------------------------------------------------------
    async def verify(self, room: str) -> RoomInfo:
        r = self._enter("verify", room)
        return RoomInfo(r.email, r.name, r.capacity)

    async def read_window(self, room: str, window: Window) -> list[Booking]:
        r = self._enter("read_window", room)
        return self._bookings(r, window, None)

    async def read_meetings(self, room: str, window: Window, uids: frozenset[str]) -> list[Booking]:
        r = self._enter("read_meetings", room)
        return self._bookings(r, window, uids)

    async def changes(self, room: str, sync_state: str | None, detailed: bool = True) -> Changes:
        r = self._enter("changes", room)
        since = self._since(r, sync_state)
        touched = sorted((i for i in r.items.values() if i.stamp > since), key=lambda i: i.stamp)
        page, more = touched[:self.page_size], len(touched) > self.page_size
        changed, deleted, item_uids = set(), set(), {}
        for item in page:
            if not item.gone:
                changed.add(item.uid)
                item_uids[item.item_id] = item.uid
            elif item.born <= since:  # gone, and the holder of the token had seen it
                deleted.add(item.item_id)
        state = page[-1].stamp if more else r.counter
        return Changes(frozenset(changed), frozenset(deleted), item_uids, self.token(r.email, state), more)

    async def close(self) -> None:
        self._watchers.clear()

    def token(self, room: str, stamp: int | None = None) -> str:
        """The change token that covers everything the room saw (so far, or up to ``stamp``)."""
        r = self._rooms[room.lower()]
        return f"mem:{self._epoch}:{r.email}:{r.counter if stamp is None else stamp}"

    # -- ChangeFeed ---------------------------------------------------------------------------------------------
    async def watch(self, rooms: Sequence[str], on_dirty: Dirty) -> None:
        """Call ``on_dirty(room, "notification")`` on every change of the rooms, until cancelled."""
        watcher = (frozenset(r.lower() for r in rooms), on_dirty)
        self._watchers.append(watcher)
        try:
            await asyncio.Event().wait()
        finally:
            self._watchers.remove(watcher)

    # -- inside ---------------------------------------------------------------------------------------------
    def _check(self, operation: str, room: str | None) -> None:
        """Count the call; raise an injected failure (one for ``room``, or for any room)."""
        self.calls[operation] += 1
        for f in list(self._failures):
            if f.room is None or f.room == room:
                if f.times is not None:
                    f.times -= 1
                    if f.times <= 0:
                        self._failures.remove(f)
                raise copy.copy(f.error)

    def _enter(self, operation: str, room: str) -> _Room:
        """Count the call, raise an injected failure or the mailbox's own error, else the room."""
        email = room.lower()
        self._check(operation, email)
        r = self._rooms.get(email)
        if r is not None:
            return r
        if email in self._people:
            raise ImpersonationDenied(f"the service account may not impersonate {email}")
        raise MailboxNotFound(f"no mailbox {email}")

    def _since(self, r: _Room, token: str | None) -> int:
        if token is None:
            return 0
        prefix = f"mem:{self._epoch}:{r.email}:"
        stamp = token[len(prefix):] if token.startswith(prefix) else ""
        if not stamp.isdigit() or int(stamp) > r.counter:
            raise SyncStateInvalid(f"the change token {token!r} is not one of {r.email}'s")
        return int(stamp)

    def _bookings(self, r: _Room, window: Window, uids: frozenset[str] | None) -> list[Booking]:
        out = []
        for item in r.items.values():
            if item.gone or (uids is not None and item.uid not in uids):
                continue
            m = self._meetings[item.uid]
            own = m.organizer.email == r.email  # an appointment in the room's own calendar
            for original, start, end in m.instances():
                if original in item.declined:
                    continue
                b = Booking(
                    room=r.email, uid=m.uid, start=start, end=end, original_start=original, subject=m.subject,
                    organizer=m.organizer,
                    attendees=() if own else tuple(Attendee(e, self._rooms[e].name, "resource", "unknown")
                                                   for e in m.rooms),
                    sensitivity=m.sensitivity, response="organizer" if own else "accepted", cancelled=m.cancelled,
                    series_id=m.uid if m.repeat else None, is_exception=original in m.moved)
                if window.contains(b):
                    out.append(b)
        return sorted(out, key=lambda b: (b.start, b.uid))

    def _meeting(self, uid: str) -> _Meeting:
        m = self._meetings.get(uid)
        if m is None:
            raise ValueError(f"no meeting with UID {uid}")
        return m

    def _occurrence(self, m: _Meeting, original: datetime) -> datetime:
        original = original.astimezone(UTC)
        if m.repeat is None or original not in {o for o, _, _ in m.instances()}:
            raise ValueError(f"meeting {m.uid} has no occurrence at {original}")
        return original

    def _changed(self, m: _Meeting) -> None:
        for email in m.rooms:
            item = self._rooms[email].copy_of(m.uid)
            if item is not None:
                self._rooms[email].tick(item)
                self._notify(email)

    def _remove(self, room: str, uid: str) -> None:
        r = self._rooms[room]
        item = r.copy_of(uid)
        if item is not None:
            item.gone = True
            r.tick(item)
            self._notify(room)

    def _notify(self, room: str) -> None:
        if not self.notifying:
            return
        for rooms, on_dirty in list(self._watchers):
            if room in rooms:
                result = on_dirty(room, "notification")
                if inspect.isawaitable(result):  # kept until done: the loop holds tasks only weakly
                    task = asyncio.ensure_future(result)
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)


class MemoryDirectory:
    """A Directory (ports.Directory) over a MemorySource's rooms, people and room lists. Its calls count in the
    source's ``calls`` and its failures (``fail``) apply to it too."""

    def __init__(self, source: MemorySource) -> None:
        self._source = source

    async def room_lists(self) -> list[RoomList]:
        self._source._check("room_lists", None)
        return [RoomList(email, name) for email, (name, _) in sorted(self._source._lists.items())]

    async def rooms(self, room_list: str) -> list[RoomInfo]:
        self._source._check("rooms", None)
        found = self._source._lists.get(room_list.lower())
        if found is None:
            raise NotFound(f"no room list {room_list}", key="room_list_not_found",
                           remedy="check the room list's address in the configuration (room_lists)")
        rooms = self._source._rooms
        return [RoomInfo(r, rooms[r].name, rooms[r].capacity) for r in found[1] if r in rooms]

    async def room(self, email: str) -> RoomInfo:
        self._source._check("room", None)
        r = self._source._rooms.get(email.lower())
        if r is None:
            raise MailboxNotFound(f"the directory has no mailbox {email}")
        return RoomInfo(r.email, r.name, r.capacity)

    async def people(self, query: str) -> list[Person]:
        self._source._check("people", None)
        q = query.strip().lower()
        return sorted((p for p in self._source._people.values() if q and (
            (p.email or "").startswith(q) or any(w.lower().startswith(q) for w in (p.name or "").split()))),
            key=lambda p: p.email or "")


class MemoryKind:
    """The memory source kind, for tests built with the application factory: a SourceSpec's settings are the
    MemorySource itself (``SourceSpec("mem", "memory", source, rooms=...)``). It cannot be configured in a file."""

    name: ClassVar[str] = "memory"
    capabilities: ClassVar[Capabilities] = Capabilities(notifications=("streaming", "poll"), directory=True)

    def __init__(self, metrics: object = None) -> None:
        pass

    @staticmethod
    def settings(section: object, place: str) -> object:
        raise ConfigError(f"{place}: the memory kind is for tests and cannot be configured")

    def open(self, spec: SourceSpec, feed: FeedSettings) -> OpenedSource:
        if not isinstance(spec.settings, MemorySource):
            raise TypeError(f"source {spec.name}: a memory source's settings are the MemorySource itself")
        source = spec.settings
        return OpenedSource(spec.name, self.name, self.capabilities, source, source.close, directory=source.directory,
                            feed=None if feed.mode == "poll" else source)
