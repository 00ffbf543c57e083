"""exchangelib calendar items -> normalized bookings. Pure: no I/O, testable on recorded items."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from exchangelib import CalendarItem
from exchangelib.extended_properties import ExtendedProperty

from gateway.model import Attendee, Booking, Person


class CleanGlobalObjectId(ExtendedProperty):
    """PidLidCleanGlobalObjectId: the same on every mailbox copy and every instance of a meeting."""

    distinguished_property_set_id = "Meeting"
    property_id = 0x23
    property_type = "Binary"


def register_properties() -> None:
    """Teach exchangelib our extended properties (class-global, so once per process)."""
    if "clean_global_object_id" not in {f.name for f in CalendarItem.FIELDS}:
        CalendarItem.register("clean_global_object_id", CleanGlobalObjectId)


# Cheap in a CalendarView (FindItem) ...
VIEW_FIELDS = (
    "start", "end", "subject", "is_all_day", "legacy_free_busy_status", "sensitivity", "type", "is_cancelled",
    "my_response_type", "is_meeting", "location", "_start_timezone", "_end_timezone", "original_start",
    "clean_global_object_id",
)
# ... these need GetItem (exchangelib fetches them automatically when asked for).
DETAIL_FIELDS = ("organizer", "required_attendees", "optional_attendees", "resources", "uid")
SYNC_FIELDS = ("type", "clean_global_object_id")

_RESPONSES = {
    "Accept": "accepted", "Tentative": "tentative", "Decline": "declined", "NoResponseReceived": "none",
    "Organizer": "organizer", "Unknown": "unknown",
}
_SENSITIVITY = {"Normal": "normal", "Personal": "personal", "Private": "private", "Confidential": "confidential"}
_FREE_BUSY = {"Free": "free", "Tentative": "tentative", "Busy": "busy", "OOF": "oof",
              "WorkingElsewhere": "working_elsewhere", "NoData": "busy"}
_VCAL = b"vCal-Uid\x01\x00\x00\x00"


def uid_from_goid(goid: bytes) -> str:
    """The meeting's UID as Exchange's calendar:UID gives it: the embedded iCalendar UID, else the id in hex."""
    at = goid.find(_VCAL)
    if at >= 0:
        return goid[at + len(_VCAL):].rstrip(b"\x00").decode("utf-8", errors="replace")
    return goid.hex().upper()


def meeting_uid(item: Any) -> str | None:
    goid = getattr(item, "clean_global_object_id", None)
    if goid:
        return uid_from_goid(goid)
    return getattr(item, "uid", None)


def _zone(item: Any, fallback: str) -> str:
    tz = getattr(item, "_start_timezone", None)
    key = getattr(tz, "key", None)
    if key:
        try:
            ZoneInfo(key)
            return str(key)
        except (KeyError, ValueError):
            pass
    return fallback


def utc(value: Any) -> datetime:
    """A plain UTC datetime (exchangelib's EWSDateTime refuses astimezone(UTC))."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return datetime(*value.timetuple()[:6], value.microsecond, tzinfo=UTC)
        return datetime.fromtimestamp(value.timestamp(), UTC)
    raise TypeError(f"expected a datetime, got {value!r}")


def _person(mailbox: Any) -> Person | None:
    if mailbox is None:
        return None
    return Person((mailbox.email_address or "").lower() or None, mailbox.name)


def _attendees(item: Any) -> tuple[Attendee, ...]:
    out = []
    for kind, attr in (("required", "required_attendees"), ("optional", "optional_attendees"),
                       ("resource", "resources")):
        for a in getattr(item, attr, None) or ():
            mb = a.mailbox
            if mb is None or not mb.email_address:
                continue
            response = _RESPONSES.get(a.response_type or "", "unknown")
            out.append(Attendee(mb.email_address.lower(), mb.name, kind, response))
    return tuple(out)


def to_booking(item: Any, room: str, default_tz: str = "UTC", detail: Any = None) -> Booking | None:
    """One CalendarView instance (plus, optionally, the item that carries its details) as a booking."""
    uid = meeting_uid(item) or (meeting_uid(detail) if detail is not None else None)
    if not uid:
        return None  # an item without identity (a draft) is no booking
    src = detail if detail is not None else item
    tzname = _zone(item, default_tz)
    all_day = bool(item.is_all_day)
    start_date: date | None = None
    end_date: date | None = None
    if all_day and isinstance(item.start, date) and not isinstance(item.start, datetime):
        # exchangelib turns all-day items into dates with an inclusive end; we carry [start, end) days.
        start_date = item.start
        end_date = item.end + timedelta(days=1)
        zone = ZoneInfo(tzname)
        start = datetime.combine(start_date, time(0), tzinfo=zone).astimezone(UTC)
        end = datetime.combine(end_date, time(0), tzinfo=zone).astimezone(UTC)
    else:
        start, end = utc(item.start), utc(item.end)
        if all_day:
            zone = ZoneInfo(tzname)
            start_date = start.astimezone(zone).date()
            end_date = end.astimezone(zone).date()
    kind = item.type or "Single"
    original = item.original_start if kind in ("Occurrence", "Exception") else None
    organizer = _person(getattr(src, "organizer", None))
    subject = item.subject
    return Booking(
        room=room.lower(),
        uid=uid,
        start=start,
        end=end,
        timezone=tzname,
        original_start=utc(original) if original is not None else None,
        all_day=all_day,
        start_date=start_date,
        end_date=end_date,
        subject=subject,
        subject_is_organizer_name=bool(subject and organizer and organizer.name and
                                       subject.strip() == organizer.name.strip()),
        organizer=organizer,
        attendees=_attendees(src),
        sensitivity=_SENSITIVITY.get(item.sensitivity or "Normal", "normal"),
        response=_RESPONSES.get(item.my_response_type or "", "unknown"),
        cancelled=bool(item.is_cancelled),
        series_id=uid if kind != "Single" else None,
        is_exception=kind == "Exception",
        free_busy=_FREE_BUSY.get(item.legacy_free_busy_status or "Busy", "busy"),
    )
