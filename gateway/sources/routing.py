"""Rooms routed to the source that owns them. The coordinator and the command service each see one CalendarSource
and one CalendarWriter; behind them every room's calls go to its own source, whatever its kind.

A room belongs to exactly one source (the configuration checks explicit addresses; ``RoomRoutes.add`` checks what
room lists expand to). A write that names no room but an item the gateway wrote earlier goes to the source of the
mailbox it is in: a room's own source, or the source an organizer's meeting was written through (remembered in this
process); after a restart an organizer's item is looked for in each writable source, and a source that does not know
the mailbox or item says NotFound (or refuses the impersonation) before anything is written.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import TypeVar

from gateway.errors import ConfigError, ImpersonationDenied, NotFound, RoomUnknown
from gateway.model import Booking, Command, Window
from gateway.ports import Busy, CalendarSource, CalendarWriter, Changes, RoomAnswer, RoomInfo, Written

T = TypeVar("T")


class RoomRoutes:
    """Which source owns which room, and each source's calendar and writer (None: it cannot write)."""

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}
        self._calendars: dict[str, CalendarSource] = {}
        self._writers: dict[str, CalendarWriter | None] = {}

    def add(self, name: str, calendar: CalendarSource, writer: CalendarWriter | None, rooms: Iterable[str]) -> None:
        rooms = sorted({r.lower() for r in rooms})
        for room in rooms:
            other = self._owner.get(room)
            if other is not None and other != name:
                raise ConfigError(f"the room {room} belongs to source '{other}' and to source '{name}' (one of them "
                                  "through a room list)", key="room_in_two_sources",
                                  remedy="a room belongs to exactly one source: remove it from the mailboxes or the "
                                         "room list of one of them")
        self._calendars[name] = calendar
        self._writers[name] = writer
        self._owner.update(dict.fromkeys(rooms, name))

    def drop(self, rooms: Iterable[str]) -> None:
        """Rooms no source owns any more (they left the directory)."""
        for room in rooms:
            self._owner.pop(room.lower(), None)

    def remove(self, name: str) -> None:
        self._calendars.pop(name, None)
        self._writers.pop(name, None)
        self._owner = {room: owner for room, owner in self._owner.items() if owner != name}

    def owner(self, room: str) -> str | None:
        return self._owner.get(room.lower())

    def rooms(self, source: str | None = None) -> list[str]:
        """The rooms of one source, or of all."""
        return sorted(r for r, owner in self._owner.items() if source is None or owner == source)

    @property
    def sources(self) -> list[str]:
        return sorted(self._calendars)

    def calendar(self, room: str) -> CalendarSource:
        return self._calendars[self._known(room)]

    def writer(self, room: str) -> CalendarWriter:
        name = self._known(room)
        writer = self._writers[name]
        if writer is None:
            raise ConfigError(f"the source '{name}' of {room.lower()} cannot write bookings", key="source_read_only",
                              remedy="leave its rooms out of commands.writable_rooms")
        return writer

    def writers(self) -> list[tuple[str, CalendarWriter]]:
        return [(name, w) for name, w in sorted(self._writers.items()) if w is not None]

    def _known(self, room: str) -> str:
        owner = self._owner.get(room.lower())
        if owner is None:
            raise RoomUnknown(f"no configured source lists the room {room}",
                              remedy="add the room to the mailboxes or a room list of a source")
        return owner


class RoutedCalendar:
    """A CalendarSource over every source: each call goes to the room's own source."""

    def __init__(self, routes: RoomRoutes) -> None:
        self.routes = routes

    async def verify(self, room: str) -> RoomInfo:
        return await self.routes.calendar(room).verify(room)

    async def read_window(self, room: str, window: Window) -> list[Booking]:
        return await self.routes.calendar(room).read_window(room, window)

    async def read_meetings(self, room: str, window: Window, uids: frozenset[str]) -> list[Booking]:
        return await self.routes.calendar(room).read_meetings(room, window, uids)

    async def changes(self, room: str, sync_state: str | None, detailed: bool = True) -> Changes:
        return await self.routes.calendar(room).changes(room, sync_state, detailed)

    async def close(self) -> None:
        """Nothing: each source is closed by the one that opened it."""


class RoutedWriter:
    """A CalendarWriter over every source that can write (see the module's docstring for items without a room)."""

    def __init__(self, routes: RoomRoutes) -> None:
        self.routes = routes
        self._mailboxes: dict[str, CalendarWriter] = {}  # organizer -> the writer that wrote their meeting

    async def create_meeting(self, organizer: str, room: str, cmd: Command) -> Written:
        writer = self.routes.writer(room)
        written = await writer.create_meeting(organizer, room, cmd)
        self._mailboxes[organizer.lower()] = writer
        return written

    async def create_appointment(self, room: str, cmd: Command) -> Written:
        return await self.routes.writer(room).create_appointment(room, cmd)

    async def find_by_key(self, mailbox: str, key: str, start: datetime, end: datetime) -> Written | None:
        async def find(writer: CalendarWriter) -> Written | None:
            return await writer.find_by_key(mailbox, key, start, end)
        return await self._in_mailbox(mailbox, find)

    async def room_answer(self, written: Written, room: str) -> RoomAnswer:
        return await self.routes.writer(room).room_answer(written, room)

    async def busy(self, room: str, start: datetime, end: datetime) -> list[Busy]:
        return await self.routes.writer(room).busy(room, start, end)

    async def move(self, written: Written, start: datetime, end: datetime, *, notify: bool) -> Written:
        async def move(writer: CalendarWriter) -> Written:
            return await writer.move(written, start, end, notify=notify)
        return await self._in_mailbox(written.mailbox, move)

    async def cancel_meeting(self, written: Written) -> None:
        async def cancel(writer: CalendarWriter) -> None:
            await writer.cancel_meeting(written)
        await self._in_mailbox(written.mailbox, cancel)

    async def delete_appointment(self, written: Written) -> None:
        async def delete(writer: CalendarWriter) -> None:
            await writer.delete_appointment(written)
        await self._in_mailbox(written.mailbox, delete)

    async def decline_as_room(self, room: str, uid: str, original_start: datetime | None, start: datetime,
                              message: str | None) -> None:
        await self.routes.writer(room).decline_as_room(room, uid, original_start, start, message)

    async def availability(self, rooms: Sequence[str], start: datetime, end: datetime) -> dict[str, list[Busy]]:
        by_source: dict[str, list[str]] = {}
        for room in rooms:
            by_source.setdefault(self.routes._known(room), []).append(room)
        found: dict[str, list[Busy]] = {}
        for group in by_source.values():
            found.update(await self.routes.writer(group[0]).availability(group, start, end))
        return found

    async def _in_mailbox(self, mailbox: str, call: Callable[[CalendarWriter], Awaitable[T]]) -> T:
        """``call`` with the writer of the source that holds ``mailbox`` (see the module's docstring)."""
        if self.routes.owner(mailbox) is not None:
            return await call(self.routes.writer(mailbox))
        known = self._mailboxes.get(mailbox.lower())
        candidates = [known] if known is not None else [w for _, w in self.routes.writers()]
        if not candidates:
            raise ConfigError("no source of this gateway can write bookings", key="source_read_only")
        for i, writer in enumerate(candidates):
            try:
                result = await call(writer)
            except (NotFound, ImpersonationDenied):
                if i == len(candidates) - 1:
                    raise
                continue
            self._mailboxes[mailbox.lower()] = writer
            return result
        raise AssertionError("unreachable")
