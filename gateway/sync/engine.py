"""The sync decision: a pure function from (what we knew, what Exchange shows now) to actions.

Nothing here does I/O. The coordinator runs the plan: it writes the snapshot changes and the outbox events in
one store transaction. "Changed" means the normalized content moved, never merely the ChangeKey: an item that
Exchange re-stamped with identical content produces no event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from gateway.model import Booking, Window

MASS_DELETE_MINIMUM = 5  # a room known with this many bookings that suddenly lists none is held back


@dataclass(frozen=True, slots=True)
class Known:
    """What the store remembers of one booking."""

    booking: Booking
    content_hash: str


@dataclass(frozen=True, slots=True)
class Scope:
    """What one observation covers: a time window, optionally only some meetings (by UID)."""

    window: Window
    uids: frozenset[str] | None = None  # None: every meeting in the window (a full read)

    def covers(self, b: Booking) -> bool:
        return self.window.contains(b) and (self.uids is None or b.uid in self.uids)

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
    known_in_scope = {bid: k for bid, k in previous.items() if scope.covers(k.booking)}
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
