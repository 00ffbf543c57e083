"""The small interfaces between the sync core and its adapters (design.md §3)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from gateway.model import Booking, Event, Room, Window
from gateway.sync.engine import Known


@dataclass(frozen=True, slots=True)
class RoomInfo:
    """What verifying a room against the source found."""

    email: str
    name: str | None = None
    capacity: int | None = None


@dataclass(frozen=True, slots=True)
class Changes:
    """One page of incremental changes (SyncFolderItems / delta) for one room."""

    changed_uids: frozenset[str]  # meetings created or updated (masters and singles)
    deleted_item_ids: frozenset[str]  # items gone; the store maps them to meetings
    item_uids: dict[str, str] = field(default_factory=dict)  # item id -> uid for every changed item
    sync_state: str = ""
    more: bool = False
    # Meetings the page already describes completely (single items read with all their fields), so they need
    # no further read; their bookings are here.
    complete_uids: frozenset[str] = frozenset()
    bookings: tuple[Booking, ...] = ()


class CalendarSource(Protocol):
    """A calendar backend (EWS on-premise, Graph online). Every source passes tests/test_source_contract.py."""

    async def verify(self, room: str) -> RoomInfo:
        """Check the mailbox exists and its calendar is readable as the gateway; raise a GatewayError if not."""
        ...

    async def read_window(self, room: str, window: Window) -> list[Booking]:
        """Every booking in the window, recurring series expanded."""
        ...

    async def read_meetings(self, room: str, window: Window, uids: frozenset[str]) -> list[Booking]:
        """The bookings of some meetings in the window (a changed series re-expanded)."""
        ...

    async def changes(self, room: str, sync_state: str | None, detailed: bool = True) -> Changes:
        """The next page of changes since ``sync_state`` (None: from the beginning). ``detailed=False`` when only
        the new state matters (an import reads the window anyway)."""
        ...

    async def close(self) -> None: ...


Dirty = Callable[[str, str], Awaitable[None] | None]  # (room, why) -> mark the room for a sync


class ChangeFeed(Protocol):
    """Notifications that a room changed (streaming / pull). They trigger syncs; they are never the data."""

    async def watch(self, rooms: Sequence[str], on_dirty: Dirty) -> None:
        """Run until cancelled, calling ``on_dirty`` for every room that changed or whose feed was interrupted."""
        ...


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    seq: int  # global, increasing: the SSE/tunnel resume point
    room_seq: int  # per-room order
    event: Event
    created_at: datetime


class Store(Protocol):
    """Durable state: rooms, sync states, the booking snapshot and the outbox (SQLite file by default)."""

    def rooms(self) -> list[Room]: ...

    def upsert_room(self, room: Room) -> None: ...

    def remove_room(self, email: str) -> None: ...

    def sync_state(self, room: str) -> str | None: ...

    def known(self, room: str) -> dict[str, Known]:
        """The room's booking snapshot, by booking id."""
        ...

    def bookings(self, room: str, start: datetime | None = None, end: datetime | None = None) -> list[Booking]: ...

    def uids_for_items(self, room: str, item_ids: frozenset[str]) -> frozenset[str]: ...

    def commit_sync(self, room: str, *, upserts: Sequence[Booking], deletes: Sequence[str], events: Sequence[Event],
                    confirmed: Sequence[str] = (), confirmed_at: datetime | None = None,
                    item_uids: dict[str, str] | None = None, removed_items: frozenset[str] = frozenset(),
                    sync_state: str | None = None, clear_sync_state: bool = False) -> list[OutboxEntry]:
        """Apply one sync step atomically: snapshot rows, item map, outbox events, and the new sync state."""
        ...

    def outbox_after(self, seq: int, limit: int = 500) -> list[OutboxEntry]: ...

    def outbox_stats(self) -> tuple[int, datetime | None]:
        """(depth: events not yet acknowledged, time of the oldest of them)."""
        ...

    def ack(self, seq: int) -> None: ...

    def close(self) -> None: ...
