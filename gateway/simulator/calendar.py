"""Calendar items as Exchange stores them: one item per mailbox copy; occurrences live inside the master.

Times are held as aware UTC datetimes; ``tz`` is the Windows time-zone id the item was created in, which
drives recurrence expansion across DST and anchors all-day items (as Exchange does).
"""

from __future__ import annotations

import calendar as _cal
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from exchangelib.winzone import IANA_TO_MS_TIMEZONE_MAP, MS_TIMEZONE_TO_IANA_MAP

if TYPE_CHECKING:
    from gateway.simulator.mailboxes import Folder, Mailbox

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WEEK_INDEX = ("First", "Second", "Third", "Fourth", "Last")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
GOID_HEADER = bytes.fromhex("040000008200E00074C5B7101A82E008")


@cache
def zone(ms_id: str | None) -> ZoneInfo:
    """Windows time-zone id -> IANA zone (UTC for unknown ids, as Exchange falls back)."""
    if not ms_id:
        return ZoneInfo("UTC")
    name = MS_TIMEZONE_TO_IANA_MAP.get(ms_id)
    if name is None and ms_id in IANA_TO_MS_TIMEZONE_MAP:
        name = ms_id
    return ZoneInfo(name or "UTC")


def ms_id_for(iana: str) -> str:
    entry = IANA_TO_MS_TIMEZONE_MAP.get(iana)
    return entry[0] if entry else "UTC"


def new_goid(created: datetime) -> bytes:
    """A CleanGlobalObjectId as Outlook/Exchange make them (instance date bytes zero)."""
    ft = int((created - datetime(1601, 1, 1, tzinfo=UTC)).total_seconds() * 10_000_000)
    data = os.urandom(16)
    return GOID_HEADER + b"\x00\x00\x00\x00" + struct.pack("<Q", ft) + b"\x00" * 8 + struct.pack("<I", len(data)) + data


def goid_for_uid(uid: str) -> bytes:
    """An external iCalendar UID wrapped the way Exchange wraps it ("vCal-Uid")."""
    data = b"vCal-Uid\x01\x00\x00\x00" + uid.encode() + b"\x00"
    return GOID_HEADER + b"\x00" * 4 + b"\x00" * 8 + b"\x00" * 8 + struct.pack("<I", len(data)) + data


def uid_of(goid: bytes) -> str:
    if b"vCal-Uid" in goid[:60]:
        raw = goid[40 + 12:]
        return raw.rstrip(b"\x00").decode(errors="replace")
    return goid.hex().upper()


class Person:
    """A mailbox as EWS names it (EmailAddressType)."""

    __slots__ = ("email", "mailbox_type", "name", "routing")

    def __init__(self, email: str, name: str = "", routing: str = "SMTP", mailbox_type: str = "Mailbox") -> None:
        self.email = email
        self.name = name or email
        self.routing = routing
        self.mailbox_type = mailbox_type

    def __repr__(self) -> str:
        return f"Person({self.email!r})"


class Attendee:
    __slots__ = ("person", "response", "response_time")

    def __init__(self, person: Person, response: str = "Unknown", response_time: datetime | None = None) -> None:
        self.person = person
        self.response = response
        self.response_time = response_time

    def copy(self) -> Attendee:
        return Attendee(self.person, self.response, self.response_time)


@dataclass
class Recurrence:
    """A pattern plus a range, exactly the EWS shapes (RecurrenceType)."""

    kind: str  # Daily, Weekly, AbsoluteMonthly, RelativeMonthly, AbsoluteYearly, RelativeYearly
    interval: int = 1
    days_of_week: tuple[str, ...] = ()
    first_day_of_week: str = "Monday"
    day_of_month: int = 1
    day_of_week_index: str = "First"
    month: str = "January"
    start_date: date = field(default_factory=date.today)
    end_date: date | None = None
    count: int | None = None

    def local_dates(self) -> Iterator[date]:
        """Occurrence dates in the series' own time zone, in order, honouring the range."""
        for n, d in enumerate(self._pattern_dates()):
            if self.end_date is not None and d > self.end_date:
                return
            if self.count is not None and n >= self.count:
                return
            yield d

    def _pattern_dates(self) -> Iterator[date]:
        s = self.start_date
        if self.kind == "Daily":
            d = s
            while True:
                yield d
                d += timedelta(days=self.interval)
        elif self.kind == "Weekly":
            days = sorted(WEEKDAYS.index(x) for x in self.days_of_week) or [s.weekday()]
            fdow = WEEKDAYS.index(self.first_day_of_week) if self.first_day_of_week in WEEKDAYS else 0
            week_start = s - timedelta(days=(s.weekday() - fdow) % 7)
            order = sorted(days, key=lambda wd: (wd - fdow) % 7)
            while True:
                for wd in order:
                    d = week_start + timedelta(days=(wd - fdow) % 7)
                    if d >= s:
                        yield d
                week_start += timedelta(weeks=self.interval)
        elif self.kind in ("AbsoluteMonthly", "RelativeMonthly"):
            y, mo = s.year, s.month
            while True:
                found = self._in_month(y, mo)
                if found is not None and found >= s:
                    yield found
                mo += self.interval
                y, mo = y + (mo - 1) // 12, (mo - 1) % 12 + 1
                if y > 9000:
                    return
        else:  # yearly
            mo = MONTHS.index(self.month) + 1
            y = s.year
            while y < 9000:
                found = self._in_month(y, mo)
                if found is not None and found >= s:
                    yield found
                y += 1

    def _in_month(self, y: int, mo: int) -> date | None:
        last = _cal.monthrange(y, mo)[1]
        if self.kind in ("AbsoluteMonthly", "AbsoluteYearly"):
            return date(y, mo, min(self.day_of_month, last))
        name = self.days_of_week[0] if self.days_of_week else "Monday"
        if name == "Day":
            candidates = list(range(1, last + 1))
        elif name == "Weekday":
            candidates = [d for d in range(1, last + 1) if date(y, mo, d).weekday() < 5]
        elif name == "WeekendDay":
            candidates = [d for d in range(1, last + 1) if date(y, mo, d).weekday() >= 5]
        else:
            wd = WEEKDAYS.index(name)
            candidates = [d for d in range(1, last + 1) if date(y, mo, d).weekday() == wd]
        idx = WEEK_INDEX.index(self.day_of_week_index)
        day = candidates[-1] if idx == 4 else candidates[min(idx, len(candidates) - 1)]
        return date(y, mo, day)


class Modified:
    """A modified occurrence (an exception) of a recurring master."""

    __slots__ = (
        "body",
        "end",
        "free_busy",
        "iid",
        "location",
        "modified",
        "original_start",
        "response",
        "start",
        "subject",
        "version",
    )

    def __init__(self, iid: int, original_start: datetime, start: datetime, end: datetime) -> None:
        self.iid = iid
        self.original_start = original_start
        self.start = start
        self.end = end
        self.subject: str | None = None
        self.location: str | None = None
        self.body: str | None = None
        self.free_busy: str | None = None
        self.version = 1
        self.modified = datetime.now(UTC)
        self.response: str | None = None


class CalendarItem:
    """One mailbox's copy of a calendar item (single, or a recurring master holding its occurrences)."""

    __slots__ = (
        "__weakref__",
        "all_day",
        "body",
        "body_type",
        "categories",
        "created",
        "created_seq",
        "deleted",
        "end",
        "exceptions",
        "ext",
        "folder",
        "free_busy",
        "goid",
        "iid",
        "importance",
        "is_cancelled",
        "is_meeting",
        "item_class",
        "location",
        "mailbox",
        "meeting_seq",
        "modified",
        "my_response",
        "online_url",
        "optional",
        "organizer",
        "recurrence",
        "reminder",
        "reply_time",
        "request_sent",
        "required",
        "resources",
        "response_requested",
        "sensitivity",
        "seq",
        "start",
        "subject",
        "tz",
        "version",
    )

    def __init__(self, iid: int, mailbox: Mailbox, folder: Folder, *, start: datetime, end: datetime,
                 subject: str = "", tz: str = "UTC", goid: bytes | None = None,
                 created: datetime | None = None) -> None:
        now = created or datetime.now(UTC)
        self.iid = iid
        self.mailbox = mailbox
        self.folder = folder
        self.version = 1
        self.goid = goid or new_goid(now)
        self.subject = subject
        self.body: str | None = None
        self.body_type = "HTML"
        self.location: str | None = None
        self.start = start
        self.end = end
        self.all_day = False
        self.tz = tz
        self.sensitivity = "Normal"
        self.free_busy = "Busy"
        self.importance = "Normal"
        self.organizer: Person | None = None
        self.required: tuple[Attendee, ...] = ()
        self.optional: tuple[Attendee, ...] = ()
        self.resources: tuple[Attendee, ...] = ()
        self.my_response = "Organizer"
        self.is_meeting = False
        self.is_cancelled = False
        self.request_sent = False
        self.response_requested = True
        self.recurrence: Recurrence | None = None
        self.exceptions: dict[datetime, Modified] | None = None
        self.deleted: set[datetime] | None = None
        self.created = now
        self.modified = now
        self.seq = 0
        self.created_seq = 0
        self.ext: dict[tuple[str, str, str], Any] | None = None
        self.categories: tuple[str, ...] = ()
        self.meeting_seq = 0
        self.reminder: int | None = 15
        self.reply_time: datetime | None = None
        self.online_url: str | None = None
        self.item_class = "IPM.Appointment"

    # -- identity ---------------------------------------------------------------------------------
    @property
    def uid(self) -> str:
        return uid_of(self.goid)

    @property
    def is_master(self) -> bool:
        return self.recurrence is not None

    @property
    def item_type(self) -> str:
        return "RecurringMaster" if self.recurrence is not None else "Single"

    def attendees(self) -> Iterator[Attendee]:
        yield from self.required
        yield from self.optional
        yield from self.resources

    # -- recurrence -------------------------------------------------------------------------------
    def occurrence_starts(self, until: datetime | None = None) -> Iterator[tuple[int, datetime]]:
        """(instance index, original start in UTC) for every instance of the series, deleted ones included."""
        assert self.recurrence is not None
        tz = zone(self.tz)
        local = self.start.astimezone(tz)
        tod = time(local.hour, local.minute, local.second)
        for index, d in enumerate(self.recurrence.local_dates(), start=1):
            s = datetime.combine(d, tod, tzinfo=tz).astimezone(UTC)
            if until is not None and s >= until:
                return
            yield index, s

    def instances(self, start: datetime, end: datetime) -> Iterator[Instance]:
        """Instances overlapping [start, end): singles yield themselves; masters their live occurrences."""
        if self.recurrence is None:
            if self.overlaps(start, end):
                yield Instance(self, 0, None)
            return
        exceptions = self.exceptions or {}
        deleted = self.deleted or ()
        # An exception can be moved away from its original slot, so look a little wider.
        widen = max((abs(x.start - x.original_start) for x in exceptions.values()), default=timedelta(0))
        # A DST change moves an occurrence's end by at most a few hours: occurrences ending well before ``start``
        # are skipped without working out their exact local end.
        reach = self.end - self.start + timedelta(hours=3)
        length = self._local_length()
        for index, original in self.occurrence_starts(until=end + widen):
            if original in deleted:
                continue
            exc = exceptions.get(original)
            if exc is not None:
                s, e = exc.start, exc.end
            elif original + reach <= start:
                continue
            else:
                s, e = original, self.occurrence_end(original, length)
            if s < end and e > start:
                yield Instance(self, index, original, e)

    def _local_length(self) -> timedelta:
        tz = zone(self.tz)
        return self.end.astimezone(tz).replace(tzinfo=None) - self.start.astimezone(tz).replace(tzinfo=None)

    def overlaps(self, start: datetime, end: datetime) -> bool:
        """Whether a single item overlaps [start, end) (an item of no length: whether it lies in it)."""
        return (self.start < end and self.end > start) or (self.start == self.end and start <= self.start < end)

    def occurrence_end(self, original: datetime, local_length: timedelta | None = None) -> datetime:
        """The end of the occurrence starting at ``original``.

        Exchange keeps a series' start and end as local wall-clock offsets in the series' time zone, so an
        occurrence on a DST-change day keeps its local end (an all-day occurrence lasts 23 or 25 hours).
        """
        tz = zone(self.tz)
        if local_length is None:
            local_length = self._local_length()
        local_end = original.astimezone(tz).replace(tzinfo=None) + local_length
        return local_end.replace(tzinfo=tz).astimezone(UTC)

    def find_instance(self, index: int) -> datetime | None:
        for i, original in self.occurrence_starts():
            if i == index:
                return original
            if i > index:
                break
        return None

    def index_of(self, original: datetime) -> int | None:
        for i, s in self.occurrence_starts(until=original + timedelta(seconds=1)):
            if s == original:
                return i
        return None

    def first_last(self) -> tuple[Instance | None, Instance | None]:
        """The first and (for ended series) the last live instance."""
        assert self.recurrence is not None
        first = last = None
        rng = self.recurrence
        for index, original in self.occurrence_starts():
            if self.deleted and original in self.deleted:
                continue
            inst = Instance(self, index, original)
            if first is None:
                first = inst
            last = inst
            if rng.end_date is None and rng.count is None:
                return first, None
            if index > 5000:
                break
        return first, last


class Instance:
    """One instance seen through a CalendarView: the single item itself, or occurrence ``index`` of a master."""

    __slots__ = ("_end", "index", "item", "original_start")

    def __init__(self, item: CalendarItem, index: int, original_start: datetime | None,
                 end: datetime | None = None) -> None:
        self.item = item
        self.index = index
        self.original_start = original_start
        self._end = end  # worked out already by the expansion that found the instance (it lives for one request)

    @property
    def exception(self) -> Modified | None:
        if self.original_start is None or not self.item.exceptions:
            return None
        return self.item.exceptions.get(self.original_start)

    @property
    def start(self) -> datetime:
        exc = self.exception
        if exc:
            return exc.start
        return self.original_start or self.item.start

    @property
    def end(self) -> datetime:
        if self._end is not None:
            return self._end
        exc = self.exception
        if exc:
            return exc.end
        if self.original_start is None:
            return self.item.end
        return self.item.occurrence_end(self.original_start)

    @property
    def item_type(self) -> str:
        if self.original_start is None:
            return "Single"
        return "Exception" if self.exception else "Occurrence"

    @property
    def subject(self) -> str:
        exc = self.exception
        return exc.subject if exc and exc.subject is not None else self.item.subject

    @property
    def location(self) -> str | None:
        exc = self.exception
        return exc.location if exc and exc.location is not None else self.item.location

    @property
    def free_busy(self) -> str:
        exc = self.exception
        return exc.free_busy if exc and exc.free_busy is not None else self.item.free_busy
