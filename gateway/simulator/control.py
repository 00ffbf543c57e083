"""Acting on the simulated organisation the way people do in Outlook, from Python or over HTTP.

``Control.of(sim)`` is the Python face: create a meeting (a user as organizer, an organizer from outside the
organisation, or a room booking its own calendar), move, extend, modify or cancel it (or one occurrence),
decline as a user or as a room, change a room's calendar-processing settings, inject faults, run activity and
read state. Every calendar change goes through ``sim.calendars`` (actions.py), the same path the EWS
operations take, so a meeting made here gets its organizer copy, invitations and booking-attendant answers
exactly as one made by a client's CreateItem.

``add_control_routes(app, sim)`` exposes the same under ``/control/...``: JSON in, JSON out, a bearer token
(``SimulatorConfig.control_token``) on every request, and a 4xx with a message for every bad input.

Meetings are named by their UID (``CalendarItem.uid``): the hex CleanGlobalObjectId Exchange makes for a meeting
created in Outlook, or the iCalendar UID an outside system gave it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from exchangelib.winzone import IANA_TO_MS_TIMEZONE_MAP, MS_TIMEZONE_TO_IANA_MAP

from gateway.simulator.actions import Invitation, _align_series_start, apply_values
from gateway.simulator.calendar import (
    GOID_HEADER,
    WEEK_INDEX,
    WEEKDAYS,
    Attendee,
    CalendarItem,
    Person,
    Recurrence,
    goid_for_uid,
    ms_id_for,
    zone,
)
from gateway.simulator.graph.control import ROUTES as GRAPH_ROUTES
from gateway.simulator.itemxml import all_day_bounds
from gateway.simulator.mailboxes import CalendarProcessing, Mailbox
from gateway.simulator.soap import EwsError

if TYPE_CHECKING:
    from gateway.simulator.activity import Activity
    from gateway.simulator.server import Simulator

log = structlog.get_logger("gateway.simulator.control")

SEND = "SendToAllAndSaveCopy"
RESPONSES = {"accept": "Accept", "tentative": "Tentative", "decline": "Decline"}
AUTOMATE_VALUES = ("None", "AutoUpdate", "AutoAccept")
SETTING_RANGES = {"booking_window_in_days": (0, 1080), "maximum_duration_in_minutes": (0, 2147483647),
                  "conflict_percentage_allowed": (0, 100), "maximum_conflict_instances": (0, 2147483647)}
OCCURRENCE_FIELDS = ("start", "end", "subject", "location", "body")
SERIES_FIELDS = ("start", "end", "subject", "location", "body", "private")


class ControlError(Exception):
    """Bad input to the control layer: becomes an HTTP 4xx with ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _bad(message: str, code: str = "bad_request") -> ControlError:
    return ControlError(400, code, message)


def _invalid(message: str, code: str) -> ControlError:
    return ControlError(422, code, message)


# -- input conversion --------------------------------------------------------------------------------------
def windows_tz(name: str | None, default: str) -> str:
    """A Windows time-zone id from a Windows id or an IANA name (what the item stores and EWS shows)."""
    if not name:
        return default
    if name in MS_TIMEZONE_TO_IANA_MAP:
        return name
    if name in IANA_TO_MS_TIMEZONE_MAP:
        return ms_id_for(name)
    raise _invalid(f"unknown time zone {name!r}: give a Windows id (W. Europe Standard Time) or an IANA name "
                   "(Europe/Berlin)", "unknown_time_zone")


def to_datetime(value: Any, tz: str, what: str) -> datetime:
    """ISO 8601 text (or a datetime) -> aware UTC; a value without offset is read in ``tz``."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip())
        except ValueError:
            raise _bad(f"{what}: {value!r} is not an ISO 8601 date-time") from None
    else:
        raise _bad(f"{what}: expected an ISO 8601 date-time string, got {type(value).__name__}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=zone(tz))
    return dt.astimezone(UTC)


def to_date(value: Any, what: str) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip()[:10])
        except ValueError:
            pass
    raise _bad(f"{what}: {value!r} is not an ISO 8601 date (YYYY-MM-DD)")


def _int(value: Any, what: str, lo: int = 1, hi: int = 10_000) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{what}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise _invalid(f"{what}: {value} is outside {lo}..{hi}", "out_of_range")
    return value


def _minutes(value: Any, what: str, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"{what}: expected minutes (a number), got {value!r}")
    if not (0 if zero else 0.001) <= value <= 100_000:
        raise _invalid(f"{what}: {value} is outside {'0' if zero else 'above 0'}..100000 minutes", "out_of_range")
    return float(value)


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{what}: expected a string, got {type(value).__name__}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"{what}: expected true or false, got {value!r}")
    return value


def _day(value: Any, what: str) -> str:
    if isinstance(value, str):
        for name in WEEKDAYS:
            if value.strip().lower() in (name.lower(), name[:3].lower()):
                return name
    raise _invalid(f"{what}: {value!r} is not a day of the week (Monday … Sunday)", "bad_recurrence")


def to_recurrence(spec: Recurrence | Mapping[str, Any], first: date) -> Recurrence:
    """A recurrence from its JSON form.

    ``{"pattern": "daily"|"weekly"|"monthly"|"relative_monthly", "interval": 1, "days": ["Monday", ...],
    "day_of_month": 15, "week": "First"|...|"Last", "count": 10 | "until": "2026-12-31"}``; without count and
    until the series has no end. The range starts on the first meeting's date.
    """
    if isinstance(spec, Recurrence):
        return spec
    if not isinstance(spec, Mapping):
        raise _bad("recurrence: expected an object like {\"pattern\": \"weekly\", \"days\": [\"Monday\"]}")
    known = {"pattern", "interval", "days", "day_of_month", "week", "count", "until", "first_day_of_week"}
    unknown = set(spec) - known
    if unknown:
        raise _bad(f"recurrence: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    pattern = str(spec.get("pattern", "")).lower()
    kinds = {"daily": "Daily", "weekly": "Weekly", "monthly": "AbsoluteMonthly", "absolute_monthly": "AbsoluteMonthly",
             "relative_monthly": "RelativeMonthly"}
    if pattern not in kinds:
        raise _invalid(f"recurrence.pattern: {spec.get('pattern')!r} is not one of {sorted(kinds)}", "bad_recurrence")
    rec = Recurrence(kind=kinds[pattern], start_date=first)
    rec.interval = _int(spec.get("interval", 1), "recurrence.interval", 1, 99)
    days = spec.get("days")
    if days is not None:
        if isinstance(days, str):
            days = [days]
        if not isinstance(days, list) or not days:
            raise _bad("recurrence.days: expected a list of day names")
        rec.days_of_week = tuple(_day(d, "recurrence.days") for d in days)
    if rec.kind == "Weekly" and not rec.days_of_week:
        rec.days_of_week = (WEEKDAYS[first.weekday()],)
    if rec.kind == "RelativeMonthly":
        rec.days_of_week = rec.days_of_week[:1] or (WEEKDAYS[first.weekday()],)
        week = spec.get("week", WEEK_INDEX[min((first.day - 1) // 7, 4)])
        if week not in WEEK_INDEX:
            raise _invalid(f"recurrence.week: {week!r} is not one of {list(WEEK_INDEX)}", "bad_recurrence")
        rec.day_of_week_index = week
    if rec.kind == "AbsoluteMonthly":
        rec.day_of_month = _int(spec.get("day_of_month", first.day), "recurrence.day_of_month", 1, 31)
    if "first_day_of_week" in spec:
        rec.first_day_of_week = _day(spec["first_day_of_week"], "recurrence.first_day_of_week")
    if "count" in spec and "until" in spec:
        raise _bad("recurrence: give count or until, not both")
    if "count" in spec:
        rec.count = _int(spec["count"], "recurrence.count", 1, 999)
    elif "until" in spec:
        rec.end_date = to_date(spec["until"], "recurrence.until")
        if rec.end_date < first:
            raise _invalid("recurrence.until is before the first meeting", "bad_recurrence")
    return rec


def recurrence_json(rec: Recurrence) -> dict[str, Any]:
    out: dict[str, Any] = {"pattern": {"Daily": "daily", "Weekly": "weekly", "AbsoluteMonthly": "monthly",
                                       "RelativeMonthly": "relative_monthly"}.get(rec.kind, rec.kind),
                           "interval": rec.interval, "start": rec.start_date.isoformat()}
    if rec.kind == "Weekly":
        out["days"] = list(rec.days_of_week)
    elif rec.kind == "AbsoluteMonthly":
        out["day_of_month"] = rec.day_of_month
    elif rec.kind == "RelativeMonthly":
        out["days"] = list(rec.days_of_week)
        out["week"] = rec.day_of_week_index
    if rec.count is not None:
        out["count"] = rec.count
    if rec.end_date is not None:
        out["until"] = rec.end_date.isoformat()
    return out


def goid_of_uid(uid: str) -> bytes:
    """The CleanGlobalObjectId behind a UID as ``CalendarItem.uid`` shows it."""
    if uid.upper().startswith(GOID_HEADER.hex().upper()):
        try:
            return bytes.fromhex(uid)
        except ValueError:
            pass
    return goid_for_uid(uid)


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def setting_name(name: str) -> str:
    """``AllowConflicts`` (Set-CalendarProcessing) or ``allow_conflicts`` -> ``allow_conflicts``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


# -- the control layer -------------------------------------------------------------------------------------
_CONTROLS: weakref.WeakKeyDictionary[Any, Control] = weakref.WeakKeyDictionary()


class Control:
    """What a person (or an admin, or a test) does to the simulated organisation. Use it on the sim's loop."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.external: dict[bytes, CalendarItem] = {}  # goid -> the outside organizer's item (not in any mailbox)
        self.organizers: dict[bytes, str] = {}  # goid -> organizer smtp, for meetings created here
        self.activity: Activity | None = None
        self._activity_epoch = 0

    @classmethod
    def of(cls, sim: Simulator) -> Control:
        """The one control layer of ``sim`` (it remembers external meetings and the running activity)."""
        ctl = _CONTROLS.get(sim)
        if ctl is None:
            ctl = _CONTROLS[sim] = cls(sim)
        return ctl

    @property
    def directory(self) -> Any:
        return self.sim.directory

    # -- lookups ---------------------------------------------------------------------------------------
    def mailbox(self, email: Any, what: str = "mailbox", kind: str | None = None) -> Mailbox:
        address = _str(email, what).strip()
        mb = self.directory.find(address)
        if mb is None:
            raise _invalid(f"{what}: no mailbox {address!r} in this organisation", f"unknown_{kind or 'mailbox'}")
        if kind == "room" and mb.kind != "room":
            raise _invalid(f"{what}: {address} is not a room mailbox", "not_a_room")
        return mb

    def organizer_item(self, uid: str) -> CalendarItem:
        """The organizer's copy of a meeting (or the outside organizer's item, or a room's own appointment)."""
        goid = goid_of_uid(_str(uid, "uid"))
        ext = self.external.get(goid)
        if ext is not None:
            return ext
        cal = self.sim.calendars
        known = self.organizers.get(goid)
        if known is not None:
            mb = self.directory.find(known)
            item = cal.copy_for(mb, goid) if mb is not None else None
            if item is not None and item.my_response == "Organizer":
                return item
        for mb in self.directory.by_idx:
            iid = mb.calendar.by_goid.get(goid)
            if iid is None:
                continue
            item = self.directory.item(iid)
            if item is not None and item.my_response == "Organizer":
                return item
        raise ControlError(404, "unknown_meeting", f"no meeting with UID {uid!r} (cancelled, or never created)")

    def copy_in(self, uid: str, email: Any) -> CalendarItem:
        """A mailbox's own copy of a meeting."""
        mb = self.mailbox(email, "as")
        item = self.sim.calendars.copy_for(mb, goid_of_uid(uid))
        if item is None:
            raise ControlError(404, "no_copy", f"{mb.smtp} has no copy of meeting {uid} (not yet answered by the "
                                               "booking attendant, declined, or never invited)")
        return item

    def occurrence_start(self, item: CalendarItem, occurrence: Any) -> datetime:
        """An occurrence named by its original start (ISO 8601) or its 1-based index -> original start."""
        if item.recurrence is None:
            raise _invalid("occurrence: the meeting is not a recurring series", "not_recurring")
        if isinstance(occurrence, int) and not isinstance(occurrence, bool):
            original = item.find_instance(_int(occurrence, "occurrence", 1, 100_000))
            if original is None:
                raise _invalid(f"occurrence: the series has no occurrence #{occurrence}", "no_such_occurrence")
        else:
            original = to_datetime(occurrence, item.tz, "occurrence")
            if item.index_of(original) is None:
                raise _invalid(f"occurrence: no occurrence of the series starts at {_iso(original)} (give the "
                               "original start in UTC, or the 1-based index)", "no_such_occurrence")
        if item.deleted and original in item.deleted:
            raise _invalid(f"occurrence: the occurrence at {_iso(original)} was cancelled already",
                           "occurrence_cancelled")
        return original

    # -- organizer actions -------------------------------------------------------------------------------
    def create_meeting(self, *, organizer: str, start: Any, end: Any, rooms: Sequence[str] = (),
                       attendees: Sequence[str] = (), optional_attendees: Sequence[str] = (), subject: str = "",
                       body: str | None = None, location: str | None = None, tz: str | None = None,
                       all_day: bool = False, private: bool = False,
                       recurrence: Recurrence | Mapping[str, Any] | None = None, uid: str | None = None,
                       organizer_name: str | None = None) -> CalendarItem:
        """Create and send a meeting, as its organizer would in Outlook; returns the organizer's item.

        - ``organizer`` in the organisation (a user): the meeting goes into their calendar with the rooms as
          Resource attendees; invitations go out; each room's booking attendant answers later.
        - ``organizer`` outside the organisation: the request reaches each room directly (an external meeting
          request, which rooms refuse unless ProcessExternalMeetingMessages is set).
        - ``organizer`` a room: an appointment in the room's own calendar (a room panel or anonymous booking);
          no attendees, no booking attendant.
        """
        org_address = _str(organizer, "organizer").strip().lower()
        if "@" not in org_address:
            raise _invalid(f"organizer: {organizer!r} is not an e-mail address", "bad_address")
        org_mb = self.directory.find(org_address)
        room_mbs = [self.mailbox(r, "rooms", "room") for r in _list(rooms, "rooms")]
        if len({m.smtp for m in room_mbs}) != len(room_mbs):
            raise _invalid("rooms: a room is listed twice", "duplicate_room")
        people = [self._person(a, "attendees") for a in _list(attendees, "attendees")]
        optional = [self._person(a, "optional_attendees") for a in _list(optional_attendees, "optional_attendees")]
        default_tz = org_mb.working_tz if org_mb is not None else (room_mbs[0].working_tz if room_mbs
                                                                    else "W. Europe Standard Time")
        tzid = windows_tz(tz, default_tz)
        s, e = to_datetime(start, tzid, "start"), to_datetime(end, tzid, "end")
        if e < s:
            raise _invalid(f"end {_iso(e)} is before start {_iso(s)}", "end_before_start")
        if e == s and not all_day:
            raise _invalid("end equals start: a meeting needs a duration", "end_before_start")
        values: dict[str, Any] = {"subject": _str(subject, "subject"), "start": s, "end": e, "tz": tzid,
                                  "all_day": _bool(all_day, "all_day"),
                                  "sensitivity": "Private" if _bool(private, "private") else "Normal"}
        if body is not None:
            values["body"] = _str(body, "body")
            values["body_type"] = "Text"
        names = [m.name for m in room_mbs]
        values["location"] = _str(location, "location") if location is not None else ("; ".join(names) or None)
        if recurrence is not None:
            values["recurrence"] = to_recurrence(recurrence, s.astimezone(zone(tzid)).date())
        goid = goid_of_uid(_str(uid, "uid")) if uid else None
        if goid is not None and (goid in self.external or goid in self.organizers):
            raise ControlError(409, "uid_in_use", f"a meeting with UID {uid} exists already")
        if org_mb is not None and org_mb.kind == "room":
            if (room_mbs and room_mbs != [org_mb]) or people or optional:
                raise _invalid("a room books its own calendar alone: no other rooms or attendees",
                               "room_as_organizer")
            values["location"] = values["location"] or org_mb.name
            item = self._ews(lambda: self.sim.calendars.create(org_mb, _with_goid(values, goid), send="SendToNone"))
        elif org_mb is not None:
            if not (room_mbs or people or optional):
                raise _invalid("a meeting needs at least one room or attendee", "no_attendees")
            values["required"] = tuple(Attendee(p) for p in people)
            values["optional"] = tuple(Attendee(p) for p in optional)
            values["resources"] = tuple(Attendee(m.person) for m in room_mbs)
            item = self._ews(lambda: self.sim.calendars.create(org_mb, _with_goid(values, goid), send=SEND))
        else:
            if not (room_mbs or people or optional):
                raise _invalid("a meeting needs at least one room or attendee", "no_attendees")
            values["required"] = tuple(Attendee(p) for p in people)
            values["optional"] = tuple(Attendee(p) for p in optional)
            values["resources"] = tuple(Attendee(m.person) for m in room_mbs)
            person = Person(org_address, organizer_name or org_address.split("@")[0].replace(".", " ").title(),
                            "SMTP", "OneOff")
            item = self._external_item(person, values, goid, room_mbs[0] if room_mbs else None)
        self.organizers[item.goid] = org_address
        log.debug("control.meeting_created", uid=item.uid, organizer=org_address, rooms=[m.smtp for m in room_mbs],
                 recurring=item.recurrence is not None, external=org_mb is None)
        return item

    def _person(self, email: Any, what: str) -> Person:
        address = _str(email, what).strip()
        if "@" not in address:
            raise _invalid(f"{what}: {address!r} is not an e-mail address", "bad_address")
        return self.directory.person(address)

    def _ews(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except EwsError as e:
            raise ControlError(409, e.code, e.text) from e

    def _external_item(self, person: Person, values: dict[str, Any], goid: bytes | None,
                       anchor: Mailbox | None) -> CalendarItem:
        """An outside organizer's meeting: held here (it lives in no mailbox of ours) and sent to the attendees."""
        values = dict(values)
        if values["all_day"]:
            values["start"], values["end"] = all_day_bounds(values["start"], values["end"], values["tz"])
        if values.get("recurrence") is not None:
            self._ews(lambda: _align_series_start(values, values["recurrence"]))
        holder = anchor or self.directory.by_idx[0]
        item = CalendarItem(0, holder, holder.calendar, start=values.pop("start"), end=values.pop("end"),
                            tz=values.pop("tz"), goid=goid)
        apply_values(item, values)
        item.organizer = person
        item.is_meeting = True
        item.my_response = "Organizer"
        item.request_sent = True
        for a in item.attendees():
            a.response = "Unknown"
        self.external[item.goid] = item
        self._send_external(item, "request")
        return item

    def _send_external(self, item: CalendarItem, kind: str, original: datetime | None = None) -> None:
        cal = self.sim.calendars
        snap = cal.snapshot(item)
        if kind == "cancel" and original is None:
            snap.is_cancelled = True
        for a in item.attendees():
            target = self.directory.find(a.person.email)
            if target is not None:
                cal.deliver(target, Invitation(kind, snap, None, original))

    def update(self, uid: str, values: Mapping[str, Any], occurrence: Any = None) -> CalendarItem:
        """Change a meeting (the series, or one occurrence) as its organizer and send the update."""
        item = self.organizer_item(uid)
        allowed = OCCURRENCE_FIELDS if occurrence is not None else SERIES_FIELDS
        unknown = set(values) - set(allowed)
        if unknown:
            raise _bad(f"unknown or unchangeable field(s) {sorted(unknown)}; changeable"
                       f"{' on one occurrence' if occurrence is not None else ''}: {list(allowed)}")
        if not values:
            raise _bad(f"nothing to change; give one of {list(allowed)}")
        if occurrence is not None:
            original = self.occurrence_start(item, occurrence)
            exc = (item.exceptions or {}).get(original)
            cur_start = exc.start if exc else original
            cur_end = exc.end if exc else original + (item.end - item.start)
            changes = self._typed(values, item.tz)
            new_start, new_end = changes.get("start", cur_start), changes.get("end", cur_end)
            if new_end <= new_start:
                raise _invalid(f"end {_iso(new_end)} is not after start {_iso(new_start)}", "end_before_start")
            changes["start"], changes["end"] = new_start, new_end
            if item.iid == 0:
                self._ews(lambda: self.sim.calendars.modify_instance(item, original, changes))
                item.meeting_seq += 1
                self._send_external(item, "request", original)
            else:
                self._ews(lambda: self.sim.calendars.update_occurrence(item, original, changes, SEND))
            return item
        changes = self._typed(values, item.tz)
        new_start, new_end = changes.get("start", item.start), changes.get("end", item.end)
        if "start" in changes and "end" not in changes:
            new_end = new_start + (item.end - item.start)  # a move keeps the duration
            changes["end"] = new_end
        if new_end < new_start or (new_end == new_start and not item.all_day):
            raise _invalid(f"end {_iso(new_end)} is not after start {_iso(new_start)}", "end_before_start")
        if item.recurrence is not None and "start" in changes:
            shifted = self._shift_series(item, changes["start"])
            if shifted is not None:
                changes["recurrence"] = shifted
        if item.iid == 0:
            self._update_external(item, changes)
        else:
            self._ews(lambda: self.sim.calendars.update(item, changes, SEND))
        return item

    def _typed(self, values: Mapping[str, Any], tz: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in values.items():
            if key in ("start", "end"):
                out[key] = to_datetime(value, tz, key)
            elif key == "private":
                out["sensitivity"] = "Private" if _bool(value, key) else "Normal"
            elif key == "body":
                out[key] = None if value is None else _str(value, key)
            else:
                out[key] = _str(value, key)
        return out

    def _shift_series(self, item: CalendarItem, new_start: datetime) -> Recurrence | None:
        """Moving a series to another day moves its pattern (daily and weekly patterns only)."""
        assert item.recurrence is not None
        tz = zone(item.tz)
        days = (new_start.astimezone(tz).date() - item.start.astimezone(tz).date()).days
        if days == 0:
            return None
        rec = item.recurrence
        if rec.kind not in ("Daily", "Weekly"):
            raise _invalid("a monthly series can only be moved within its day; change its time, or cancel it and "
                           "create a new one", "series_move_unsupported")
        moved = Recurrence(kind=rec.kind, interval=rec.interval, first_day_of_week=rec.first_day_of_week,
                           start_date=rec.start_date + timedelta(days=days),
                           end_date=rec.end_date + timedelta(days=days) if rec.end_date else None, count=rec.count)
        moved.days_of_week = tuple(WEEKDAYS[(WEEKDAYS.index(d) + days) % 7] for d in rec.days_of_week)
        return moved

    def _update_external(self, item: CalendarItem, changes: dict[str, Any]) -> None:
        values = dict(changes)
        values.setdefault("start", item.start)
        values.setdefault("end", item.end)
        values["tz"] = item.tz
        if item.all_day:
            values["start"], values["end"] = all_day_bounds(values["start"], values["end"], item.tz)
        if values.get("recurrence") is not None:
            self._ews(lambda: _align_series_start(values, values["recurrence"]))
            item.exceptions, item.deleted = None, None
        apply_values(item, values)
        item.meeting_seq += 1
        for a in item.attendees():
            a.response = "Unknown"
        self._send_external(item, "request")

    def move(self, uid: str, start: Any, end: Any = None, occurrence: Any = None) -> CalendarItem:
        values: dict[str, Any] = {"start": start}
        if end is not None:
            values["end"] = end
        elif occurrence is not None:
            item = self.organizer_item(uid)
            original = self.occurrence_start(item, occurrence)
            exc = (item.exceptions or {}).get(original)
            length = (exc.end - exc.start) if exc else (item.end - item.start)
            values["end"] = to_datetime(start, item.tz, "start") + length
        return self.update(uid, values, occurrence)

    def extend(self, uid: str, minutes: int, occurrence: Any = None) -> CalendarItem:
        """Make a meeting (or one occurrence) longer (or, with negative minutes, shorter)."""
        minutes = _int(minutes, "minutes", -24 * 60, 24 * 60)
        item = self.organizer_item(uid)
        if occurrence is not None:
            original = self.occurrence_start(item, occurrence)
            exc = (item.exceptions or {}).get(original)
            end = exc.end if exc else original + (item.end - item.start)
            return self.update(uid, {"end": end + timedelta(minutes=minutes)}, occurrence)
        return self.update(uid, {"end": item.end + timedelta(minutes=minutes)})

    def cancel(self, uid: str, occurrence: Any = None) -> CalendarItem:
        """The organizer cancels the meeting (or one occurrence): every attendee and room hears."""
        item = self.organizer_item(uid)
        cal = self.sim.calendars
        if occurrence is not None:
            original = self.occurrence_start(item, occurrence)
            if item.iid == 0:
                self._ews(lambda: _remove(item, original))
                self._send_external(item, "cancel", original)
            else:
                self._ews(lambda: cal.delete_occurrence(item, original, SEND))
            return item
        if item.iid == 0:
            del self.external[item.goid]
            item.is_cancelled = True
            self._send_external(item, "cancel")
        else:
            self._ews(lambda: cal.cancel(item, send=True))
        self.organizers.pop(item.goid, None)
        return item

    def respond(self, uid: str, as_: str, response: str = "decline", occurrence: Any = None,
                comment: str | None = None) -> CalendarItem:
        """An attendee (a user, or a room acting for itself) answers: accept, tentative or decline.

        The organizer gets a MeetingResponse whose body is ``comment``."""
        kind = RESPONSES.get(_str(response, "response").lower())
        if kind is None:
            raise _invalid(f"response: {response!r} is not one of {sorted(RESPONSES)}", "bad_response")
        text = _str(comment, "comment") if comment is not None else None
        item = self.copy_in(uid, as_)
        original = self.occurrence_start(item, occurrence) if occurrence is not None else None
        self._ews(lambda: self.sim.calendars.respond(item, kind, original, send=True, body=text))
        return item

    def decline(self, uid: str, as_: str, occurrence: Any = None, comment: str | None = None) -> CalendarItem:
        return self.respond(uid, as_, "decline", occurrence, comment)

    # -- rooms -------------------------------------------------------------------------------------------
    def room_settings(self, room: str) -> dict[str, Any]:
        mb = self.mailbox(room, "room", "room")
        if mb.processing is None:
            mb.processing = CalendarProcessing()
        return mb.processing.as_dict()

    def set_room_settings(self, room: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Set-CalendarProcessing: names as in PowerShell (AllowConflicts) or in snake case (allow_conflicts)."""
        mb = self.mailbox(room, "room", "room")
        if not isinstance(values, Mapping) or not values:
            raise _bad("settings: expected an object with at least one setting")
        defaults = CalendarProcessing()
        known = {f.name for f in fields(CalendarProcessing)}
        typed: dict[str, Any] = {}
        for raw, value in values.items():
            name = setting_name(str(raw))
            if name not in known:
                raise _invalid(f"unknown calendar-processing setting {raw!r}; known: {sorted(known)}",
                               "unknown_setting")
            kind = type(getattr(defaults, name))
            if kind is bool:
                typed[name] = _bool(value, str(raw))
            elif kind is int:
                lo, hi = SETTING_RANGES.get(name, (0, 2147483647))
                typed[name] = _int(value, str(raw), lo, hi)
            elif kind is tuple:  # BookInPolicy, RequestInPolicy: mailboxes of this organisation
                typed[name] = tuple(self.mailbox(v, str(raw)).smtp for v in _list(value, str(raw)))
            else:
                if value not in AUTOMATE_VALUES:
                    raise _invalid(f"{raw}: {value!r} is not one of {list(AUTOMATE_VALUES)}", "bad_setting")
                typed[name] = value
        if mb.processing is None:
            mb.processing = CalendarProcessing()
        mb.processing.update(typed)
        log.info("control.room_settings_changed", room=mb.smtp, **typed)
        return mb.processing.as_dict()

    def rooms(self) -> list[dict[str, Any]]:
        return [{"email": mb.smtp, "name": mb.name, "capacity": mb.capacity, "items": len(mb.calendar.items),
                 "source": mb.side} for mb in self.directory.rooms()]

    # -- faults and lifecycle -------------------------------------------------------------------------------
    def set_faults(self, *, latency: Mapping[str, Any] | None = None, http_503_next: Any = None,
                   http_503_rate: Any = None) -> dict[str, Any]:
        faults = self.sim.faults
        if latency is not None:
            if not isinstance(latency, Mapping):
                raise _bad("latency: expected an object {operation or \"*\": seconds}")
            for op, seconds in latency.items():
                if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= 600:
                    raise _invalid(f"latency.{op}: expected seconds between 0 and 600, got {seconds!r}",
                                   "out_of_range")
            for op, seconds in latency.items():
                if seconds:
                    faults.latency[str(op)] = float(seconds)
                else:
                    faults.latency.pop(str(op), None)
        if http_503_next is not None:
            faults.http_503_next = _int(http_503_next, "http_503_next", 0, 1_000_000)
        if http_503_rate is not None:
            if isinstance(http_503_rate, bool) or not isinstance(http_503_rate, int | float) \
                    or not 0 <= http_503_rate <= 1:
                raise _invalid(f"http_503_rate: expected a fraction between 0 and 1, got {http_503_rate!r}",
                               "out_of_range")
            faults.http_503_rate = float(http_503_rate)
        log.info("control.faults_set", latency=dict(faults.latency), http_503_next=faults.http_503_next,
                 http_503_rate=faults.http_503_rate)
        return self.faults()

    def faults(self) -> dict[str, Any]:
        f = self.sim.faults
        return {"latency": dict(f.latency), "http_503_next": f.http_503_next, "http_503_rate": f.http_503_rate}

    def clear_faults(self) -> dict[str, Any]:
        self.sim.faults.clear()
        return self.faults()

    def set_lockout(self, *, threshold: Any = None, window_minutes: Any = None,
                    duration_minutes: Any = None) -> dict[str, Any]:
        """The account lockout policy (gateway/simulator/lockout.py): failed logons that lock, the window they are
        counted in, and how long the lock lasts (0: until unlocked)."""
        lockouts = self.sim.lockouts
        n = lockouts.threshold if threshold is None else _int(threshold, "threshold", 0, 999)
        window = lockouts.window_minutes if window_minutes is None else _minutes(window_minutes, "window_minutes")
        duration = (lockouts.duration_minutes if duration_minutes is None
                    else _minutes(duration_minutes, "duration_minutes", zero=True))
        lockouts.set_policy(n, window, duration)
        log.info("control.lockout_set", **lockouts.policy())
        return lockouts.state()

    def unlock(self, account: Any = None) -> list[str]:
        """Unlock one account (a logon name or an address) or, without one, every account."""
        lockouts = self.sim.lockouts
        if account is None:
            names = [name for name, a in lockouts.state()["accounts"].items() if a["locked"]]
        else:
            name = _str(account, "account").strip()
            mb = self.directory.logon(name) or self.directory.find(name)
            if mb is None:
                raise ControlError(404, "unknown_account", f"account: no account {name!r} in this organisation")
            names = [mb.smtp]
        for name in names:
            lockouts.unlock(name)
        return names

    def expire_subscriptions(self, subscription_ids: Sequence[str] | None = None) -> Any:
        """Make subscriptions expire (all of them, or the given ones), as Exchange does after missed polls."""
        hook = getattr(self.sim.notifications, "expire", None)
        if hook is None:
            raise ControlError(501, "not_available", "this simulator's notification hub cannot expire subscriptions")
        result = hook(list(subscription_ids)) if subscription_ids else hook()
        return result

    def reset_streams(self) -> Any:
        """Cut every open GetStreamingEvents connection mid-way (a load balancer or IIS hiccup)."""
        hook = getattr(self.sim.notifications, "reset_streams", None)
        if hook is None:
            raise ControlError(501, "not_available", "this simulator's notification hub cannot reset streams")
        return hook()

    def restart(self) -> int:
        self.sim.restart()
        return self.sim.generation

    def start_activity(self, rate: float, seed: int = 0, max_steps: int | None = None) -> Activity:
        from gateway.simulator.activity import Activity

        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1000:
            raise _invalid(f"rate: expected changes per second in (0, 1000], got {rate!r}", "out_of_range")
        seed = _int(seed, "seed", -(2**63), 2**63)
        self.stop_activity()
        self._activity_epoch += 1
        self.activity = Activity(self, rate=float(rate), seed=seed, epoch=self._activity_epoch, max_steps=max_steps)
        self.activity.start()
        return self.activity

    def stop_activity(self) -> dict[str, Any] | None:
        if self.activity is None:
            return None
        self.activity.stop()
        return self.activity.stats()

    # -- state ------------------------------------------------------------------------------------------------
    def meeting_state(self, uid: str) -> dict[str, Any]:
        item = self.organizer_item(uid)
        return self.describe(item)

    def describe(self, item: CalendarItem) -> dict[str, Any]:
        organizer = item.organizer or item.mailbox.person
        external = item.iid == 0
        out: dict[str, Any] = {
            "uid": item.uid,
            "organizer": {"email": organizer.email, "name": organizer.name, "external": external},
            "subject": item.subject, "start": _iso(item.start), "end": _iso(item.end), "time_zone": item.tz,
            "all_day": item.all_day, "private": item.sensitivity == "Private", "cancelled": item.is_cancelled,
            "recurrence": recurrence_json(item.recurrence) if item.recurrence else None,
            "modified_occurrences": sorted(_iso(k) for k in (item.exceptions or {})),
            "cancelled_occurrences": sorted(_iso(k) for k in (item.deleted or ())),
            "attendees": [], "copies": [],
        }
        if not item.is_meeting:
            out["appointment_in"] = item.mailbox.smtp
        groups = (("required", item.required), ("optional", item.optional), ("resource", item.resources))
        mailboxes: list[Mailbox] = [] if external else [item.mailbox]
        for kind, atts in groups:
            for a in atts:
                out["attendees"].append({"email": a.person.email, "type": kind, "response": a.response})
                mb = self.directory.find(a.person.email)
                if mb is not None and mb not in mailboxes:
                    mailboxes.append(mb)
        for mb in mailboxes:
            copy = self.sim.calendars.copy_for(mb, item.goid)
            if copy is None:
                out["copies"].append({"mailbox": mb.smtp, "present": False})
                continue
            out["copies"].append({"mailbox": mb.smtp, "present": True, "response": copy.my_response,
                                  "subject": copy.subject, "start": _iso(copy.start), "end": _iso(copy.end),
                                  "cancelled": copy.is_cancelled, "free_busy": copy.free_busy,
                                  "private": copy.sensitivity == "Private"})
        return out

    def decisions(self, room: str | None = None, uid: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        out = []
        for d in reversed(self.sim.attendant.decisions):
            if room and d.room != room.lower():
                continue
            if uid and d.uid != uid:
                continue
            out.append({"room": d.room, "uid": d.uid, "subject": d.subject, "outcome": d.outcome,
                        "reason": d.reason, "declined_instances": d.declined_instances, "at": _iso(d.at)})
            if len(out) >= limit:
                break
        out.reverse()
        return out

    def calls(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (op, code), n in sorted(self.sim.calls.items()):
            out.setdefault(op, {})[code] = n
        return out

    def state(self) -> dict[str, Any]:
        d = self.directory
        att = self.sim.attendant
        return {
            "generation": self.sim.generation,
            "mailboxes": {"users": sum(1 for m in d.by_idx if m.kind == "user" and m.impersonation is None),
                          "service_accounts": sum(1 for m in d.by_idx if m.impersonation is not None),
                          "rooms": sum(1 for m in d.by_idx if m.kind == "room")},
            "items": len(d.items),
            "calls": self.calls(),
            "failed_logons": self.sim.failed_logons,
            "throttle": {"busy_answers": self.sim.throttle.busy_answers,
                         "connection_count_answers": self.sim.throttle.connection_count_answers},
            "attendant": {"pending": att.pending, "decisions": len(att.decisions),
                          "outcomes": _outcomes(att.decisions), "recent": self.decisions(limit=20)},
            "activity": self.activity.stats() if self.activity is not None else None,
            "faults": self.faults(),
            "external_meetings": len(self.external),
        }

    async def settle(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until the booking attendant has answered every message; True if it has."""
        try:
            await asyncio.wait_for(self.sim.attendant.idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


def _with_goid(values: dict[str, Any], goid: bytes | None) -> dict[str, Any]:
    return {**values, "goid": goid} if goid is not None else dict(values)


def _remove(item: CalendarItem, original: datetime) -> None:
    from gateway.simulator.actions import remove_instance

    remove_instance(item, original)


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list | tuple):
        raise _bad(f"{what}: expected a list of e-mail addresses")
    return list(value)


def _outcomes(decisions: Iterable[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in decisions:
        out[d.outcome] = out.get(d.outcome, 0) + 1
    return out


# -- HTTP ----------------------------------------------------------------------------------------------------
Handler = Callable[[web.Request, Control, dict[str, Any]], Awaitable[Any]]


def _authorized(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def _json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, default=str))


def _error(status: int, code: str, message: str) -> web.Response:
    return _json_response({"error": code, "message": message}, status)


def _endpoint(sim: Simulator, fn: Handler, status: int = 200) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        if not _authorized(request, sim.config.control_token):
            resp = _error(401, "unauthorized", "missing or wrong bearer token (SimulatorConfig.control_token)")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="simulator-control"'
            return resp
        body: dict[str, Any] = {}
        if request.body_exists:
            raw = await request.read()
            if raw.strip():
                try:
                    parsed = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as e:
                    return _error(400, "bad_json", f"the body is not JSON: {e}")
                if not isinstance(parsed, dict):
                    return _error(400, "bad_json", "the body must be a JSON object")
                body = parsed
        try:
            result = await fn(request, Control.of(sim), body)
        except ControlError as e:
            return _error(e.status, e.code, e.message)
        except EwsError as e:
            return _error(409, e.code, e.text)
        except (ValueError, TypeError, KeyError, OverflowError) as e:
            log.info("control.bad_request", path=request.path, error=repr(e))
            return _error(400, "bad_request", str(e) or repr(e))
        except Exception as e:  # a simulator bug, not bad input: say so in JSON, with the trace in the log
            log.exception("control.failed", path=request.path)
            return _error(500, "internal_error", f"the simulator failed: {e!r}")
        return _json_response(result, status)
    return handle


def _field(body: Mapping[str, Any], name: str) -> Any:
    if name not in body:
        raise _bad(f"missing field {name!r}")
    return body[name]


def _only(body: Mapping[str, Any], allowed: Iterable[str]) -> None:
    unknown = set(body) - set(allowed)
    if unknown:
        raise _bad(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def _query_bool(request: web.Request, body: Mapping[str, Any], name: str) -> bool:
    if name in body:
        return _bool(body[name], name)
    return request.query.get(name, "").lower() in ("1", "true", "yes")


async def _finish(ctl: Control, request: web.Request, body: Mapping[str, Any], item: CalendarItem) -> dict[str, Any]:
    settled = None
    if _query_bool(request, body, "wait"):
        settled = await ctl.settle(float(request.query.get("timeout", 10)))
    out = ctl.describe(item)
    if settled is not None:
        out["settled"] = settled
    return out


CREATE_FIELDS = ("organizer", "organizer_name", "rooms", "attendees", "optional_attendees", "subject", "body",
                 "location", "start", "end", "time_zone", "all_day", "private", "recurrence", "uid", "wait")


async def _create(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    _only(body, CREATE_FIELDS)
    item = ctl.create_meeting(organizer=_field(body, "organizer"), start=_field(body, "start"),
                              end=_field(body, "end"), rooms=body.get("rooms", ()),
                              attendees=body.get("attendees", ()),
                              optional_attendees=body.get("optional_attendees", ()),
                              subject=body.get("subject", ""), body=body.get("body"), location=body.get("location"),
                              tz=body.get("time_zone"), all_day=body.get("all_day", False),
                              private=body.get("private", False), recurrence=body.get("recurrence"),
                              uid=body.get("uid"), organizer_name=body.get("organizer_name"))
    return await _finish(ctl, request, body, item)


async def _get_meeting(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    return ctl.meeting_state(request.match_info["uid"])


async def _patch_meeting(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    changes = {k: v for k, v in body.items() if k not in ("occurrence", "wait")}
    item = ctl.update(request.match_info["uid"], changes, body.get("occurrence"))
    return await _finish(ctl, request, body, item)


async def _move(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    _only(body, ("start", "end", "occurrence", "wait"))
    item = ctl.move(request.match_info["uid"], _field(body, "start"), body.get("end"), body.get("occurrence"))
    return await _finish(ctl, request, body, item)


async def _extend(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    _only(body, ("minutes", "occurrence", "wait"))
    item = ctl.extend(request.match_info["uid"], _field(body, "minutes"), body.get("occurrence"))
    return await _finish(ctl, request, body, item)


async def _cancel(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    _only(body, ("occurrence", "wait"))
    occurrence = body.get("occurrence", request.query.get("occurrence"))
    item = ctl.cancel(request.match_info["uid"], occurrence)
    return await _finish(ctl, request, body, item)


async def _respond(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    _only(body, ("as", "response", "occurrence", "comment", "wait"))
    default = "decline" if request.path.rstrip("/").endswith("/decline") else None
    response = body.get("response", default)
    if response is None:
        raise _bad("missing field 'response' (accept, tentative or decline)")
    item = ctl.respond(request.match_info["uid"], _field(body, "as"), response, body.get("occurrence"),
                       body.get("comment"))
    settled = await ctl.settle(float(request.query.get("timeout", 10))) if _query_bool(request, body, "wait") \
        else None
    answer = {"mailbox": item.mailbox.smtp, "uid": item.uid, "response": RESPONSES[str(response).lower()],
              "occurrence": body.get("occurrence")}
    return {**answer, "settled": settled} if settled is not None else answer


async def _rooms(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    return ctl.rooms()


async def _room(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    mb = ctl.mailbox(request.match_info["room"], "room", "room")
    return {"email": mb.smtp, "name": mb.name, "capacity": mb.capacity, "items": len(mb.calendar.items),
            "settings": ctl.room_settings(mb.smtp)}


async def _room_settings(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    if request.method == "GET":
        return ctl.room_settings(request.match_info["room"])
    return ctl.set_room_settings(request.match_info["room"], body)


async def _faults(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    if request.method == "GET":
        return ctl.faults()
    if request.method == "DELETE":
        return ctl.clear_faults()
    _only(body, ("latency", "http_503_next", "http_503_rate"))
    return ctl.set_faults(latency=body.get("latency"), http_503_next=body.get("http_503_next"),
                          http_503_rate=body.get("http_503_rate"))


async def _lockout(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    if request.method == "GET":
        return ctl.sim.lockouts.state()
    _only(body, ("threshold", "window_minutes", "duration_minutes"))
    return ctl.set_lockout(threshold=body.get("threshold"), window_minutes=body.get("window_minutes"),
                           duration_minutes=body.get("duration_minutes"))


async def _unlock(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    _only(body, ("account",))
    return {"unlocked": ctl.unlock(body.get("account"))}


async def _expire(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    _only(body, ("subscription_ids",))
    ids = body.get("subscription_ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        raise _bad("subscription_ids: expected a list of subscription ids")
    return {"expired": ctl.expire_subscriptions(ids)}


async def _reset_streams(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    return {"reset": ctl.reset_streams()}


async def _restart(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    return {"generation": ctl.restart()}


async def _activity(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    if request.method == "GET":
        return ctl.activity.stats() if ctl.activity is not None else {"running": False}
    if request.method == "DELETE":
        return ctl.stop_activity() or {"running": False}
    _only(body, ("rate", "seed"))
    return ctl.start_activity(_field(body, "rate"), body.get("seed", 0)).stats()


async def _state(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    return ctl.state()


async def _decisions(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise _bad("limit: expected an integer") from None
    return ctl.decisions(request.query.get("room"), request.query.get("uid"), max(1, min(limit, 10_000)))


async def _calls(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    return ctl.calls()


async def _settle(request: web.Request, ctl: Control, body: dict[str, Any]) -> Any:
    _only(body, ("timeout",))
    timeout = body.get("timeout", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout <= 120:
        raise _invalid("timeout: expected seconds between 0 and 120", "out_of_range")
    settled = await ctl.settle(float(timeout))
    return {"settled": settled, "pending": ctl.sim.attendant.pending}


ROUTES: list[tuple[str, str, Handler, int]] = [
    ("GET", "/control/state", _state, 200),
    ("GET", "/control/calls", _calls, 200),
    ("GET", "/control/decisions", _decisions, 200),
    ("POST", "/control/attendant/settle", _settle, 200),
    ("GET", "/control/rooms", _rooms, 200),
    ("GET", "/control/rooms/{room}", _room, 200),
    ("GET", "/control/rooms/{room}/settings", _room_settings, 200),
    ("PATCH", "/control/rooms/{room}/settings", _room_settings, 200),
    ("PUT", "/control/rooms/{room}/settings", _room_settings, 200),
    ("POST", "/control/meetings", _create, 201),
    ("GET", "/control/meetings/{uid}", _get_meeting, 200),
    ("PATCH", "/control/meetings/{uid}", _patch_meeting, 200),
    ("DELETE", "/control/meetings/{uid}", _cancel, 200),
    ("POST", "/control/meetings/{uid}/move", _move, 200),
    ("POST", "/control/meetings/{uid}/extend", _extend, 200),
    ("POST", "/control/meetings/{uid}/cancel", _cancel, 200),
    ("POST", "/control/meetings/{uid}/decline", _respond, 200),
    ("POST", "/control/meetings/{uid}/respond", _respond, 200),
    ("GET", "/control/faults", _faults, 200),
    ("POST", "/control/faults", _faults, 200),
    ("DELETE", "/control/faults", _faults, 200),
    ("GET", "/control/lockout", _lockout, 200),
    ("PUT", "/control/lockout", _lockout, 200),
    ("POST", "/control/lockout/unlock", _unlock, 200),
    ("POST", "/control/subscriptions/expire", _expire, 200),
    ("POST", "/control/streams/reset", _reset_streams, 200),
    ("POST", "/control/restart", _restart, 200),
    ("GET", "/control/activity", _activity, 200),
    ("POST", "/control/activity", _activity, 200),
    ("DELETE", "/control/activity", _activity, 200),
    *GRAPH_ROUTES,
]


def add_control_routes(app: web.Application, sim: Simulator) -> None:
    """Register ``/control/...`` (before the EWS catch-all route)."""
    for method, path, fn, status in ROUTES:
        app.router.add_route(method, path, _endpoint(sim, fn, status))

    async def not_found(request: web.Request) -> web.Response:
        if not _authorized(request, sim.config.control_token):
            return _error(401, "unauthorized", "missing or wrong bearer token (SimulatorConfig.control_token)")
        known = sorted({f"{m} {p}" for m, p, _, _ in ROUTES})
        return _error(404, "unknown_endpoint", f"no control endpoint {request.method} {request.path}; "
                                               f"known: {known}")
    app.router.add_route("*", "/control/{tail:.*}", not_found)


__all__ = ["Control", "ControlError", "add_control_routes"]
