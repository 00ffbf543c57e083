"""Which rooms a gateway syncs, and what it means for a room to leave it (design.md §6).

A gateway syncs the rooms it owns: those its sources list now. A room it no longer owns (taken out of the
configuration, moved to another source, or later to another replica) is *released*: its local state (the booking
snapshot, the sync state, the item map) is dropped and consumers are told nothing, since a handover never emits
deletions: the room's new owner imports it and consumers apply events idempotently by booking id. Only an explicit
removal *withdraws* a room: ``gateway rooms forget ROOM`` sends a deletion for every booking the gateway holds for it
(reason ``room_disconnected``), then the room's state ``disconnected``, and drops it.

Both run on the store's writer (blocking calls).
"""

from __future__ import annotations

from datetime import datetime

from gateway.model import Room, RoomState
from gateway.ports import OutboxEntry, Store
from gateway.sync.events import booking_event, room_event


def release(store: Store, room: str) -> int:
    """Drop what the store holds of a room this gateway no longer owns, without an event; the bookings dropped."""
    known = store.known(room)
    store.commit_sync(room, upserts=(), deletes=list(known), events=(), clear_sync_state=True)
    store.remove_room(room)
    return len(known)


def withdraw(store: Store, room: str, *, now: datetime, source: str) -> list[OutboxEntry]:
    """Tell consumers that the room and its bookings are gone, then drop it: a deletion per booking, the room's
    state last."""
    known = store.known(room)
    events = [booking_event("deleted", k.booking, time=now, source=source, reason="room_disconnected")
              for k in known.values()]
    gone = Room(room, state=RoomState.DISCONNECTED, reason="removed with `gateway rooms forget`",
                remedy=RoomState.DISCONNECTED.remedy)
    events.append(room_event(gone, time=now, source=source))
    entries = store.commit_sync(room, upserts=(), deletes=list(known), events=events, clear_sync_state=True)
    store.remove_room(room)
    return entries
