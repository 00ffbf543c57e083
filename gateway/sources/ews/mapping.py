"""EWS calendar items (the XML Exchange returns) -> normalized bookings. Pure: no I/O.

The hot paths (a room's CalendarView, a GetItem of its meetings) are read straight from the response XML:
building exchangelib objects for every item costs about 0.5 ms each, reading the dozen fields we need costs a
few microseconds, and that decides whether a thousand rooms import in seconds or minutes.
"""

from __future__ import annotations

import base64
import functools
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from exchangelib import CalendarItem
from exchangelib.extended_properties import ExtendedProperty
from exchangelib.winzone import MS_TIMEZONE_TO_IANA_MAP
from lxml import etree

from gateway.model import Attendee, Booking, Person

TNS = "http://schemas.microsoft.com/exchange/services/2006/types"


COMMAND_KEY_PROPERTY = "ExchangeGatewayCommandKey"  # PublicStrings: the command that wrote an item
GATEWAY_UID_PREFIX = "ExchangeGateway-"  # + an upper-case UUID: the UIDs of the meetings the gateway makes
_GATEWAY_UID = re.compile(re.escape(GATEWAY_UID_PREFIX) + r"[0-9A-F]{8}(-[0-9A-F]{4}){3}-[0-9A-F]{12}")


class CleanGlobalObjectId(ExtendedProperty):
    """PidLidCleanGlobalObjectId: the same on every mailbox copy and every instance of a meeting."""

    distinguished_property_set_id = "Meeting"
    property_id = 0x23
    property_type = "Binary"


class CommandKey(ExtendedProperty):
    """The idempotency key of the command that wrote the item (sources/ews/writer.py stamps it)."""

    distinguished_property_set_id = "PublicStrings"
    property_name = COMMAND_KEY_PROPERTY
    property_type = "String"


def register_properties() -> None:
    """Teach exchangelib our extended properties (class-global, so once per process)."""
    names = {f.name for f in CalendarItem.FIELDS}
    if "clean_global_object_id" not in names:
        CalendarItem.register("clean_global_object_id", CleanGlobalObjectId)
    if "gateway_command_key" not in names:
        CalendarItem.register("gateway_command_key", CommandKey)


def gateway_uid() -> str:
    """A new meeting UID for an item the gateway writes. Exchange keeps the UID in the meeting's
    (Clean)GlobalObjectId on every copy (the organizer's, the room's), where an extended property set on the
    organizer's item is not carried; so the read path knows the gateway's meetings by their UID alone."""
    return f"{GATEWAY_UID_PREFIX}{str(uuid.uuid4()).upper()}"


def made_by_gateway(uid: str, *elements: etree._Element | None) -> bool:
    """The gateway wrote this meeting: its UID is one the gateway makes, or an item carries a command key."""
    if _GATEWAY_UID.fullmatch(uid):
        return True
    return any(el is not None and _command_key(el) for el in elements)


def _command_key(el: etree._Element) -> str | None:
    for prop in el.iterchildren(_T["ExtendedProperty"]):
        value = _command_key_of(prop)
        if value is not None:
            return value
    return None


# Cheap in a CalendarView (FindItem) ... (only what a booking is made of: every field more is bytes Exchange
# writes and the gateway parses, per instance; the writer asks for what it needs itself)
VIEW_FIELDS = (
    "start", "end", "subject", "is_all_day", "legacy_free_busy_status", "sensitivity", "type", "is_cancelled",
    "my_response_type", "_start_timezone", "original_start", "clean_global_object_id", "gateway_command_key",
)
# ... these only come with GetItem.
DETAIL_FIELDS = ("organizer", "required_attendees", "optional_attendees", "resources")
SYNC_FIELDS = ("type", "clean_global_object_id")

_RESPONSES = {
    "Accept": "accepted", "Tentative": "tentative", "Decline": "declined", "NoResponseReceived": "none",
    "Organizer": "organizer", "Unknown": "unknown",
}
_SENSITIVITY = {"Normal": "normal", "Personal": "personal", "Private": "private", "Confidential": "confidential"}
_FREE_BUSY = {"Free": "free", "Tentative": "tentative", "Busy": "busy", "OOF": "oof",
              "WorkingElsewhere": "working_elsewhere", "NoData": "busy"}
_VCAL = b"vCal-Uid\x01\x00\x00\x00"
_T = {name: f"{{{TNS}}}{name}" for name in (
    "ItemId", "Subject", "Sensitivity", "Start", "End", "OriginalStart", "IsAllDayEvent", "LegacyFreeBusyStatus",
    "IsCancelled", "CalendarItemType", "MyResponseType", "Organizer", "Mailbox", "Name", "EmailAddress",
    "RequiredAttendees", "OptionalAttendees", "Resources", "Attendee", "ResponseType", "StartTimeZone",
    "ExtendedProperty", "ExtendedFieldURI", "Value", "UID", "NetShowUrl", "ParentItemId")}
_URI, _VALUE, _EXT, _ITEM_ID = _T["ExtendedFieldURI"], _T["Value"], _T["ExtendedProperty"], _T["ItemId"]


def uid_from_goid(goid: bytes) -> str:
    """The meeting's UID as Exchange's calendar:UID gives it: the embedded iCalendar UID, else the id in hex."""
    at = goid.find(_VCAL)
    if at >= 0:
        return goid[at + len(_VCAL):].rstrip(b"\x00").decode("utf-8", errors="replace")
    return goid.hex().upper()


def meeting_uid(item: Any) -> str | None:
    """The meeting UID of an exchangelib item (SyncFolderItems pages) or of a raw t:CalendarItem element."""
    if isinstance(item, etree._Element):
        return element_uid(item)
    goid = getattr(item, "clean_global_object_id", None)
    if goid:
        return uid_from_goid(goid)
    return getattr(item, "uid", None)


def element_uid(el: etree._Element) -> str | None:
    for prop in el.iterchildren(_EXT):
        uri, value = _uri_and_value(prop)
        if uri is not None and uri.get("DistinguishedPropertySetId") == "Meeting" \
                and uri.get("PropertyId") in ("35", "0x23") and value is not None and value.text:
            return _uid_of(value.text)
    for child in el.iterchildren(_T["UID"]):
        return child.text or ""
    return None


@functools.lru_cache(maxsize=8192)  # every instance of a meeting carries the same value: decoded once
def _uid_of(value: str) -> str:
    return uid_from_goid(base64.b64decode(value))


def _first(el: etree._Element, tag: str) -> etree._Element | None:
    """The first child with this tag (found in C: no proxy is made for the other children)."""
    for child in el.iterchildren(tag):
        return child
    return None


def _uri_and_value(prop: etree._Element) -> tuple[etree._Element | None, etree._Element | None]:
    """An ExtendedProperty's ExtendedFieldURI and Value: its two children in that order, as Exchange writes them
    (looked up by index, in C; by tag when the order is another)."""
    if len(prop) == 2:
        uri, value = prop[0], prop[1]
        if uri.tag == _URI and value.tag == _VALUE:
            return uri, value
    return _first(prop, _URI), _first(prop, _VALUE)


def item_id(el: etree._Element) -> str | None:
    if len(el):
        first = el[0]  # (the ItemId comes first in every item Exchange writes)
        if first.tag == _ITEM_ID:
            return first.get("Id")
    for ident in el.iterchildren(_ITEM_ID):
        return ident.get("Id")
    return None


def _children(el: etree._Element) -> dict[Any, etree._Element]:
    """An element's children by tag (the first of each), in one pass: an lxml find() or findtext() by tag costs
    about as much as this whole pass, and a booking needs a dozen of them."""
    out: dict[Any, etree._Element] = {}
    for child in el:
        out.setdefault(child.tag, child)
    return out


def _value(children: dict[Any, etree._Element], name: str) -> str | None:
    """What findtext() gives: the child's text, "" for an empty child, None when there is none."""
    child = children.get(_T[name])
    return None if child is None else (child.text or "")


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    t = datetime.fromisoformat(value)  # (Python 3.11 reads the Z itself)
    return t if t.tzinfo is UTC else t.astimezone(UTC)


def _person(el: etree._Element | None) -> Person | None:
    if el is None:
        return None
    return _mailbox(_children(el))


def _mailbox(children: dict[Any, etree._Element]) -> Person | None:
    mb = children.get(_T["Mailbox"])
    if mb is None:
        return None
    f = _children(mb)
    email = (_value(f, "EmailAddress") or "").lower() or None
    return Person(email, _value(f, "Name"))


def _attendees(el: etree._Element, children: dict[Any, etree._Element] | None = None) -> tuple[Attendee, ...]:
    f = _children(el) if children is None else children
    out = []
    for kind, tag in (("required", "RequiredAttendees"), ("optional", "OptionalAttendees"),
                      ("resource", "Resources")):
        group = f.get(_T[tag])
        if group is None:
            continue
        for a in group.iterchildren(_T["Attendee"]):
            af = _children(a)
            p = _mailbox(af)
            if p is None or not p.email:
                continue
            out.append(Attendee(p.email, p.name, kind, _RESPONSES.get(_value(af, "ResponseType") or "", "unknown")))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Meeting:
    """What every instance of a meeting shares, read once from its GetItem answer (or from an item that has it)."""

    organizer: Person | None
    attendees: tuple[Attendee, ...]
    online_meeting_url: str | None
    commanded: bool  # the item carries the key of the gateway command that wrote it


def meeting_from_xml(el: etree._Element) -> Meeting:
    text, parts, commanded = _item_fields(el)
    return _meeting(el, text, parts, commanded)


def _meeting(el: etree._Element, text: dict[str, str], parts: dict[str, etree._Element], commanded: bool) -> Meeting:
    return Meeting(_person(parts.get(_ORGANIZER)), _attendees(el, parts), text.get(_NET_SHOW_URL), commanded)


_TZ, _ORGANIZER = _T["StartTimeZone"], _T["Organizer"]
_START, _END, _ORIGINAL, _SUBJECT, _KIND, _ALL_DAY = (
    _T[n] for n in ("Start", "End", "OriginalStart", "Subject", "CalendarItemType", "IsAllDayEvent"))
_SENSITIVITY_, _RESPONSE, _CANCELLED, _FREE_BUSY_, _NET_SHOW_URL = (
    _T[n] for n in ("Sensitivity", "MyResponseType", "IsCancelled", "LegacyFreeBusyStatus", "NetShowUrl"))
_PARTS = frozenset((_TZ, _ORGANIZER, _T["RequiredAttendees"], _T["OptionalAttendees"], _T["Resources"]))
_TEXTS = frozenset((_START, _END, _ORIGINAL, _SUBJECT, _KIND, _ALL_DAY, _SENSITIVITY_, _RESPONSE, _CANCELLED,
                    _FREE_BUSY_, _NET_SHOW_URL))  # the simple fields a booking is made of (no other text is read)


def _item_fields(el: etree._Element) -> tuple[dict[str, str], dict[str, etree._Element], bool]:
    """An item's fields in one pass: the text of each simple field a booking reads (what findtext() gives: "" for
    an empty one), the elements of those with parts (time zone, organizer, attendees), and whether one of its
    extended properties is a command key. The first of each tag counts. Texts, not elements: each element kept alive
    cost more than reading its text (an lxml proxy per child), and an item has a dozen and a half children."""
    text: dict[str, str] = {}
    parts: dict[str, etree._Element] = {}
    commanded = False
    for child in el:
        tag = child.tag
        if tag in _TEXTS:
            if tag not in text:
                text[tag] = child.text or ""
        elif tag in _PARTS:
            if tag not in parts:
                parts[tag] = child
        elif tag == _EXT:
            commanded = commanded or bool(_command_key_of(child))
    return text, parts, commanded


def _command_key_of(prop: etree._Element) -> str | None:
    uri, value = _uri_and_value(prop)
    if uri is not None and uri.get("PropertyName") == COMMAND_KEY_PROPERTY \
            and uri.get("DistinguishedPropertySetId") == "PublicStrings":
        return None if value is None else (value.text or "")
    return None


def zone_name(el: etree._Element, fallback: str, children: dict[Any, etree._Element] | None = None) -> str:
    tz = (_children(el) if children is None else children).get(_T["StartTimeZone"])
    ms_id = tz.get("Id") if tz is not None else None
    if not ms_id:
        return fallback
    try:
        name = _ZONES[ms_id]
    except KeyError:
        name = _ZONES[ms_id] = _iana(ms_id)
    return name or fallback


def _iana(ms_id: str) -> str | None:
    """The IANA name of an Exchange time zone id (an IANA name itself on some servers), None if neither."""
    name = MS_TIMEZONE_TO_IANA_MAP.get(ms_id)
    if name is None:
        try:
            ZoneInfo(ms_id)
            name = ms_id
        except (KeyError, ValueError):
            name = None
    return name


_ZONES: dict[str, str | None] = {}  # Exchange's zone id -> IANA name: a handful of zones, read per instance


def bookings_from_xml(items: Iterable[tuple[str, etree._Element]], room: str, default_tz: str = "UTC",
                      details: Mapping[str, etree._Element] | None = None) -> list[Booking]:
    """The bookings of a CalendarView's (meeting UID, t:CalendarItem) pairs, with each meeting's details from its
    GetItem answer in ``details`` (by UID), read once per meeting however many instances it has."""
    meetings: dict[str, Meeting] = {}
    out = []
    for uid, el in items:
        detail = details.get(uid) if details else None
        meeting = None
        if detail is not None:
            meeting = meetings.get(uid)
            if meeting is None:
                meeting = meetings[uid] = meeting_from_xml(detail)
        b = _booking(el, room, default_tz, uid, meeting)
        if b is not None:
            out.append(b)
    return out


def booking_from_xml(el: etree._Element, room: str, default_tz: str = "UTC",
                     detail: etree._Element | None = None, uid: str | None = None) -> Booking | None:
    """One t:CalendarItem of a CalendarView (an instance), with its meeting's details from GetItem if given.
    ``uid``: the meeting's UID when the caller has already read it."""
    uid = uid or element_uid(el) or (element_uid(detail) if detail is not None else None)
    return _booking(el, room, default_tz, uid, None if detail is None else meeting_from_xml(detail))


def _booking(el: etree._Element, room: str, default_tz: str, uid: str | None,
             meeting: Meeting | None) -> Booking | None:
    """``meeting``: what its GetItem answer says of the meeting; None: the item says it itself."""
    text, parts, commanded = _item_fields(el)
    start, end = _time(text.get(_START)), _time(text.get(_END))
    if not uid or start is None or end is None:
        return None  # a draft without identity or times is no booking
    kind = text.get(_KIND) or "Single"
    if kind == "RecurringMaster":
        return None  # a series is its occurrences (sources/ews/series.py), never one booking at its first
    if meeting is None:
        meeting = _meeting(el, text, parts, commanded)
    tzname = zone_name(el, default_tz, parts)
    all_day = text.get(_ALL_DAY) == "true"
    start_date: date | None = None
    end_date: date | None = None
    if all_day:
        zone = ZoneInfo(tzname)
        start_date = start.astimezone(zone).date()
        end_date = end.astimezone(zone).date()
    original = _time(text.get(_ORIGINAL)) if kind in ("Occurrence", "Exception") else None
    organizer = meeting.organizer
    subject = text.get(_SUBJECT)
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
        subject_is_organizer_name=bool(subject and organizer and organizer.name and
                                       subject.strip() == organizer.name.strip()),
        organizer=organizer,
        attendees=meeting.attendees,
        sensitivity=_SENSITIVITY.get(text.get(_SENSITIVITY_) or "Normal", "normal"),
        online_meeting_url=meeting.online_meeting_url,
        response=_RESPONSES.get(text.get(_RESPONSE) or "", "unknown"),
        cancelled=text.get(_CANCELLED) == "true",
        series_id=uid if kind != "Single" else None,
        is_exception=kind == "Exception",
        free_busy=_FREE_BUSY.get(text.get(_FREE_BUSY_) or "Busy", "busy"),
        origin="gateway" if commanded or meeting.commanded or _GATEWAY_UID.fullmatch(uid) else "exchange",
    )
