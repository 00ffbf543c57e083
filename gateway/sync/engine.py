"""The sync decision: a pure function from (what we knew, what Exchange shows now) to actions.

Nothing here does I/O. The coordinator runs the plan: it writes the snapshot changes and the outbox events in
one store transaction. "Changed" means the normalized content moved, never merely the ChangeKey: an item that
Exchange re-stamped with identical content produces no event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from gateway.model import Booking, Window

MASS_DELETE_MINIMUM = 5  # a room known with this many bookings that suddenly lists none is held back


class Known:
    """What the store remembers of one booking: its content hash, when it is and its meeting, and the booking itself,
    decoded from what the store keeps only when asked (a reconciliation compares hashes and decodes almost none)."""

    __slots__ = ("_booking", "_decode", "content_hash", "end", "start", "uid")

    def __init__(self, booking: Booking | None, content_hash: str, *, uid: str = "",
                 start: datetime | None = None, end: datetime | None = None,
                 decode: Callable[[], Booking] | None = None) -> None:
        """Either ``booking``, or its ``uid``, ``start``, ``end`` and how to ``decode`` it."""
        self.content_hash = content_hash
        self._booking = booking
        self._decode = decode
        if booking is not None:
            uid, start, end = booking.uid, booking.start, booking.end
        elif decode is None or start is None or end is None:
            raise ValueError("Known needs the booking, or its uid, start, end and a way to decode it")
        self.uid, self.start, self.end = uid, start, end

    @property
    def booking(self) -> Booking:
        if self._booking is None:
            assert self._decode is not None
            self._booking = self._decode()
        return self._booking

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Known):
            return NotImplemented
        return self.content_hash == other.content_hash and self.booking == other.booking

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Known(uid={self.uid!r}, start={self.start!r}, content_hash={self.content_hash!r})"


@dataclass(frozen=True, slots=True)
class Scope:
    """What one observation covers: a time window, optionally only some meetings (by UID)."""

    window: Window
    uids: frozenset[str] | None = None  # None: every meeting in the window (a full read)

    def covers(self, b: Booking | Known) -> bool:
        return b.start < self.window.end and b.end > self.window.start and (self.uids is None or b.uid in self.uids)

    @property
    def complete(self) -> bool:
        return self.uids is None


@dataclass
class Plan:
    created: list[Booking] = field(default_factory=list)
    updated: list[Booking] = field(default_factory=list)
    deleted: list[Booking] = field(default_factory=list)
    confirmed: list[Booking] = field(default_factory=list)  # unchanged, seen again: freshness only
    held_back: bool = False
    reason: str = ""

    @property
    def changes(self) -> int:
        return len(self.created) + len(self.updated) + len(self.deleted)


def is_live(b: Booking) -> bool:
    """Cancelled meetings and ones the room declined are not bookings (Exchange shows both ways)."""
    return not b.cancelled and b.response != "declined"


def plan(previous: Mapping[str, Known], observed: Iterable[Booking], scope: Scope, now: datetime,
         *, empty_confirmed: bool = False) -> Plan:
    """Compare what we knew inside ``scope`` with what Exchange shows there now.

    ``empty_confirmed`` lets a full read that lists nothing delete a room's bookings; without it such a read
    is held back (a room does not lose every booking at once; a broken read does).
    """
    result = Plan()
    seen: dict[str, Booking] = {}
    for b in observed:
        if scope.covers(b) and is_live(b):
            seen[b.id] = b
    known_in_scope = {bid: k for bid, k in previous.items() if scope.covers(k)}
    if (scope.complete and not seen and len(known_in_scope) >= MASS_DELETE_MINIMUM and not empty_confirmed):
        result.held_back = True
        result.reason = f"the room lists no bookings although {len(known_in_scope)} were known"
        return result
    for bid, b in seen.items():
        old = previous.get(bid)
        if old is None:
            result.created.append(b.confirmed(now))
        elif old.content_hash != b.content_hash():
            result.updated.append(b.confirmed(now))
        else:
            result.confirmed.append(b)
    for bid, k in known_in_scope.items():
        if bid not in seen:
            result.deleted.append(k.booking)
    return result
