"""Graph event JSON -> normalized bookings. Pure: no I/O.

A booking's identity must be the one the ews source gives the same meeting (model.booking_id_for: the room, the
meeting's UID, the occurrence's original start). The ews source takes the UID from the meeting's
CleanGlobalObjectId (PidLidCleanGlobalObjectId, the same on every copy and instance); Graph gives the same property
as a single-value extended property (base64), read here the same way. ``iCalUId`` is no substitute: it differs per
occurrence.
"""

from __future__ import annotations

import base64
import binascii
import functools
from datetime import UTC, date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from exchangelib.winzone import MS_TIMEZONE_TO_IANA_MAP  # one Windows -> IANA table for EWS and Graph

from gateway.model import Attendee, Booking, Person

GOID_PROPERTY = "Binary {6ED8DA90-450B-101B-98DA-00AA003F1305} Id 0x23"  # PidLidCleanGlobalObjectId
COMMAND_KEY_PROPERTY = "String {00020329-0000-0000-C000-000000000046} Name ExchangeGatewayCommandKey"
EXPAND = f"singleValueExtendedProperties($filter=id eq '{GOID_PROPERTY}')"
GATEWAY_UID_PREFIX = "ExchangeGateway-"
TRANSACTION_PREFIX = "exchange-gateway-"  # the transactionId of every event the gateway's writer creates

_VCAL = b"vCal-Uid\x01\x00\x00\x00"
_RESPONSES = {"accepted": "accepted", "tentativelyAccepted": "tentative", "declined": "declined",
              "notResponded": "none", "none": "none", "organizer": "organizer"}
_SHOW_AS = {"free": "free", "tentative": "tentative", "busy": "busy", "oof": "oof",
            "workingElsewhere": "working_elsewhere", "unknown": "busy"}
_SENSITIVITY = ("normal", "personal", "private", "confidential")
_KINDS = ("required", "optional", "resource")


def uid_from_goid(goid: bytes) -> str:
    """The meeting's UID as the ews source makes it (sources/ews/mapping.py): the embedded iCalendar UID of a
    meeting that came from outside, else the id in upper-case hex."""
    at = goid.find(_VCAL)
    if at >= 0:
        return goid[at + len(_VCAL):].rstrip(b"\x00").decode("utf-8", errors="replace")
    return goid.hex().upper()


def _property(event: dict[str, Any], prop: str) -> str | None:
    for p in event.get("singleValueExtendedProperties") or ():
        if isinstance(p, dict) and str(p.get("id", "")).lower() == prop.lower():
            value = p.get("value")
            return str(value) if value else None
    return None


def event_uid(event: dict[str, Any]) -> str | None:
    """The meeting UID from the event's CleanGlobalObjectId, if the event carries it (None: read it)."""
    value = _property(event, GOID_PROPERTY)
    if not value:
        return None
    try:
        return uid_from_goid(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        return None


def command_key(event: dict[str, Any]) -> str | None:
    return _property(event, COMMAND_KEY_PROPERTY)


def parse_time(value: Any) -> datetime | None:
    """A dateTimeTimeZone (``{dateTime, timeZone}``, UTC as the gateway asks for it) or a DateTimeOffset string."""
    if isinstance(value, dict):
        text, zone = value.get("dateTime") or "", value.get("timeZone") or "UTC"
    elif isinstance(value, str):
        text, zone = value, "UTC"
    else:
        return None
    if not text:
        return None
    if zone == "UTC":
        return _utc_time(str(text))
    parsed = datetime.fromisoformat(str(text))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=ZoneInfo(iana_zone(str(zone), "UTC")))
    return parsed.astimezone(UTC)


@functools.lru_cache(maxsize=16384)  # (a year of half hours: a room's meetings start and end on few distinct times)
def _utc_time(text: str) -> datetime:
    # Graph writes seven digits of fraction, which fromisoformat (3.11) reads, truncated to six.
    parsed = datetime.fromisoformat(text)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def iana_zone(name: str | None, fallback: str) -> str:
    """An IANA zone for a Windows or IANA zone name; ``fallback`` for custom zones (tzone://Microsoft/Custom)."""
    if not name:
        return fallback
    mapped = MS_TIMEZONE_TO_IANA_MAP.get(name)
    if mapped:
        return mapped
    try:
        ZoneInfo(name)
        return name
    except (KeyError, ValueError):
        return fallback


def _person(value: Any) -> Person | None:
    email = value.get("emailAddress") if isinstance(value, dict) else None
    if not isinstance(email, dict):
        return None
    address = email.get("address")
    return Person(address.lower() if address else None, email.get("name"))


def _attendees(event: dict[str, Any]) -> tuple[Attendee, ...]:
    out = []
    for a in event.get("attendees") or ():
        email = a.get("emailAddress") if isinstance(a, dict) else None
        if not isinstance(email, dict) or not email.get("address"):
            continue
        address = str(email["address"])
        kind = a.get("type")
        status = a.get("status")
        response = status.get("response") if isinstance(status, dict) else None
        out.append(Attendee(address.lower(), email.get("name"), kind if kind in _KINDS else "required",
                            _RESPONSES.get(str(response or ""), "unknown")))
    return tuple(out)


def made_by_gateway(event: dict[str, Any], uid: str) -> bool:
    """The gateway wrote this event: a UID the ews writer makes, the command key stamped on it, or the
    transactionId the Graph writer gives (an appointment in a room's calendar carries it itself)."""
    return uid.startswith(GATEWAY_UID_PREFIX) or bool(command_key(event)) or \
        str(event.get("transactionId") or "").startswith(TRANSACTION_PREFIX)


def _times(event: dict[str, Any], default_tz: str,
           ) -> tuple[datetime, datetime, str, date | None, date | None] | None:
    """(start, end, zone, start date, end date) of an event as its booking has them; None without times."""
    start, end = parse_time(event.get("start")), parse_time(event.get("end"))
    if start is None or end is None:
        return None
    tzname = iana_zone(event.get("originalStartTimeZone"), default_tz)
    if not event.get("isAllDay"):
        return start, end, tzname, None, None
    # Graph gives midnight in the zone asked for (UTC), whatever zone the event was made in: the dates are what
    # counts; the instants are those midnights in the event's own zone, as Exchange keeps them.
    zone = ZoneInfo(tzname)
    start_date, end_date = start.date(), end.date()
    return (datetime.combine(start_date, time(), zone).astimezone(UTC),
            datetime.combine(end_date, time(), zone).astimezone(UTC), tzname, start_date, end_date)


def in_window(event: dict[str, Any], start: datetime, end: datetime) -> bool:
    """Whether calendarView over [start, end) lists this instance (see ``listed``)."""
    times = _times(event, "UTC")
    return times is not None and listed(times[0], times[1], event.get("type") == "occurrence", start, end)


def listed(s: datetime, e: datetime, occurrence: bool, start: datetime, end: datetime) -> bool:
    """Whether calendarView over [start, end) lists an instance from ``s`` to ``e``: it overlaps the window (a
    zero-length one that is no occurrence when it lies within), by the instants Exchange keeps (an all-day event's
    midnights in its own zone)."""
    return (s < end and e > start) or (s == e and start <= s < end and not occurrence)


Shared = dict[str, tuple[Any, tuple[Attendee, ...]]]  # meeting UID -> an instance's attendees as read, and as made


def _shared_attendees(event: dict[str, Any], uid: str, shared: Shared | None) -> tuple[Attendee, ...]:
    """The event's attendees; with ``shared``, the same tuple as an earlier instance of the meeting whose list was
    equal (Graph repeats a series' attendees on every instance: read once, and their JSON made once a meeting, as
    the model keeps it by the tuple's identity, instead of once an instance)."""
    if shared is None:
        return _attendees(event)
    raw = event.get("attendees")
    known = shared.get(uid)
    if known is not None and known[0] == raw:
        return known[1]
    made = _attendees(event)
    shared[uid] = (raw, made)
    return made


def booking_from_event(event: dict[str, Any], room: str, uid: str, default_tz: str = "UTC", *,
                       ours: bool = False, shared: Shared | None = None) -> Booking | None:
    """One instance of a room's calendarView (singleInstance, occurrence or exception) as a booking; None for what
    is no booking (a series master, an item without times). ``ours``: the gateway is known to have written the
    meeting (a room's copy of a meeting carries neither the organizer's transactionId nor its command key).
    ``shared``: the attendees read of each meeting so far in this read (kept by the caller, one dict a read)."""
    kind = event.get("type") or "singleInstance"
    if kind == "seriesMaster":
        return None  # a series is its occurrences, never one booking at its first
    times = _times(event, default_tz)
    if times is None:
        return None
    start, end, tzname, start_date, end_date = times
    all_day = start_date is not None
    original = parse_time(event.get("originalStart")) if kind in ("occurrence", "exception") else None
    organizer = _person(event.get("organizer"))
    subject = event.get("subject")
    online: dict[str, Any] = event.get("onlineMeeting") or {}
    sensitivity = event.get("sensitivity") if event.get("sensitivity") in _SENSITIVITY else "normal"
    return Booking(
        room=room.lower(),
        uid=uid,
        start=start,
        end=end,
        timezone=tzname,
        original_start=original,
        all_day=all_day,
        start_date=start_date,
        end_date=end_date,
        subject=subject,
        subject_is_organizer_name=bool(subject and organizer and organizer.name
                                       and subject.strip() == organizer.name.strip()),
        organizer=organizer,
        attendees=_shared_attendees(event, uid, shared),
        sensitivity=str(sensitivity),
        online_meeting_url=event.get("onlineMeetingUrl") or online.get("joinUrl") or None,
        response=_RESPONSES.get(str((event.get("responseStatus") or {}).get("response") or ""), "unknown"),
        cancelled=bool(event.get("isCancelled")),
        series_id=uid if kind != "singleInstance" else None,
        is_exception=kind == "exception",
        free_busy=_SHOW_AS.get(str(event.get("showAs") or "busy"), "busy"),
        origin="gateway" if ours or made_by_gateway(event, uid) else "exchange",
    )
