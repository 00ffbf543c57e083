"""The events the gateway emits: a booking created, updated or deleted, and a room's state. Pure constructors; the
coordinator and an explicit removal (gateway/sync/ownership.py) both build their events here."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime
from json.encoder import encode_basestring_ascii as _json_str

from gateway.model import EVENT_TYPES, Booking, BookingData, Event, Room, Window


def event_id() -> str:
    """A time-ordered UUID (RFC 9562 version 7: the milliseconds since 1970, then 74 random bits), as text.

    The outbox keeps event ids unique with an index: random (version 4) ids landed on a different page of it each,
    and every commit rewrote a page per event (a sixth of an import's commit time); these append at its end.

    The random digits come from the OS's randomness a block at a time, each thread its own (a system call per id
    was a third of an id's cost); a forked child draws its own (_forget)."""
    r = _random
    at = r.at
    h = r.digits[at:at + 20]
    if len(h) < 20:
        r.digits = os.urandom(_BLOCK).hex()
        at = 0
        h = r.digits[:20]
    r.at = at + 20
    ms = f"{time.time_ns() // 1_000_000:012x}"
    return f"{ms[:8]}-{ms[8:]}-7{h[:3]}-{_VARIANT[h[3]]}{h[4:7]}-{h[8:20]}"


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}  # RFC 4122: the top two bits are 10
_BLOCK = 4096  # bytes of randomness drawn at once: 409 ids


class _Randomness(threading.local):
    digits = ""  # hex digits of the block drawn last
    at = 0  # the first not handed out


_random = _Randomness()


def _forget() -> None:
    """In a forked child: the parent's undrawn digits are the parent's (its next ids would repeat them)."""
    global _random
    _random = _Randomness()


os.register_at_fork(after_in_child=_forget)


def booking_event(kind: str, booking: Booking, *, time: datetime, source: str, reason: str | None = None) -> Event:
    """``kind``: created, updated or deleted; ``reason`` (deleted): removed_from_exchange, room_disconnected."""
    # The stored text is the content's own (already encoded for its hash) with freshness appended: one encoding.
    # The data as a dict (BookingData) is made only if somebody in the process reads it.
    data = BookingData(booking, reason)
    confirmed = data.confirmed_at
    tail = f', "confirmed_at": {"null" if confirmed is None else _json_str(confirmed)}'
    if reason:
        tail += f', "reason": {_json_str(reason)}'
    text = f"{booking.content_json()[:-1]}{tail}}}"
    return Event(id=event_id(), type=EVENT_TYPES[kind], room=booking.room, subject=booking.id, time=time,
                 data=data, source=source, data_json=text)


def room_event(room: Room, *, time: datetime, source: str) -> Event:
    data = {"room": room.email, "state": room.state, "reason": room.reason, "remedy": room.remedy}
    return Event(id=event_id(), type=EVENT_TYPES["room_state"], room=room.email, subject=room.email,
                 time=time, data=data, source=source)


def snapshot_event(room: str, phase: str, window: Window, *, time: datetime, source: str) -> Event:
    """``phase`` begin or end: every booking of the room in ``window`` is announced between the two (an import by a
    room's new owner), so a consumer drops the room's bookings there that were not."""
    data = {"room": room, "phase": phase,
            "window": {"start": window.start.isoformat().replace("+00:00", "Z"),
                       "end": window.end.isoformat().replace("+00:00", "Z")}}
    return Event(id=event_id(), type=EVENT_TYPES["room_snapshot"], room=room, subject=room, time=time,
                 data=data, source=source)
