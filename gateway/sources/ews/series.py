"""Recurring series that a CalendarView handed back unexpanded, expanded by the gateway.

Exchange's CalendarView returns the occurrences and exceptions of a series, never its RecurringMaster
(exchange-semantics.md §2). Some EWS servers that are not Exchange return the master instead, and a master read as a
booking is one booking at the series' first occurrence: every other occurrence is silently missing. So a master in a
CalendarView answer is expanded here, from what EWS says about the series:

- ``t:Recurrence``: a pattern (Daily, Weekly, AbsoluteMonthly, RelativeMonthly, AbsoluteYearly, RelativeYearly) and a
  range (NoEnd, EndDate, Numbered), evaluated in the series' own time zone, at the master's wall-clock time of day
  and wall-clock length (an occurrence on a DST-change day keeps its local times, as Exchange keeps them);
- minus ``t:DeletedOccurrences``;
- ``t:ModifiedOccurrences`` (exceptions) are read again by their own ItemIds: they carry their own times, subject,
  location, free/busy.

Each plain occurrence becomes a copy of the master's view element with its own Start, End and OriginalStart and
CalendarItemType Occurrence, so everything after the view (the mapping, busy times, the room's copy for a decline)
reads it like an occurrence Exchange returned. Its ItemId stays the master's (the meeting's organizer and attendees
are the same on every occurrence); the attributes ``MASTER`` and ``INSTANCE`` name the master and the occurrence's
1-based instance index, so an operation on that one occurrence addresses it with an OccurrenceItemId.

The pattern arithmetic is pure; the reads go through the ``fetch`` callable the source passes in.
"""

from __future__ import annotations

import calendar
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from lxml import etree

from gateway.sources.ews.mapping import TNS, element_uid, item_id, zone_name

log = structlog.get_logger("gateway.sources.ews")

RECURRENCE_FIELDS = ("recurrence", "modified_occurrences", "deleted_occurrences")
MASTER = "{urn:exchange-gateway}master"  # on an expanded occurrence: the master's ItemId
INSTANCE = "{urn:exchange-gateway}instance"  # ... and the occurrence's instance index (OccurrenceItemId)
MAX_OCCURRENCES = 100_000  # a pattern walked this far without reaching the window is not walked further

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")  # date.weekday() order
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WEEK_INDEX = ("First", "Second", "Third", "Fourth", "Last")
_DAY_GROUPS = {"Day": WEEKDAYS, "Weekday": WEEKDAYS[:5], "WeekendDay": WEEKDAYS[5:]}
_PATTERNS = ("DailyRecurrence", "WeeklyRecurrence", "AbsoluteMonthlyRecurrence", "RelativeMonthlyRecurrence",
             "AbsoluteYearlyRecurrence", "RelativeYearlyRecurrence")
_RANGES = ("NoEndRecurrence", "EndDateRecurrence", "NumberedRecurrence")

Fetch = Callable[[list[str], tuple[str, ...]], list[Any]]  # (item ids, extra fields) -> GetItem elements


def _t(name: str) -> str:
    return f"{{{TNS}}}{name}"


class Unexpandable(ValueError):
    """The series' recurrence is missing or of a kind EWS calendars do not use (a task's regeneration)."""


@dataclass(frozen=True)
class Pattern:
    """A t:Recurrence: what repeats and for how long (dates in the series' time zone)."""

    kind: str  # Daily, Weekly, AbsoluteMonthly, RelativeMonthly, AbsoluteYearly, RelativeYearly
    start: date
    interval: int = 1
    days: tuple[str, ...] = ()  # Weekly: the days; Relative*: one day name or Day / Weekday / WeekendDay
    first_day_of_week: str = "Sunday"
    day_of_month: int = 1
    index: str = "First"  # Relative*: First .. Fourth, Last
    month: int = 1
    end: date | None = None  # EndDateRecurrence: the last day an occurrence may fall on
    count: int | None = None  # NumberedRecurrence

    @classmethod
    def from_xml(cls, el: etree._Element | None) -> Pattern:
        if el is None:
            raise Unexpandable("the series has no Recurrence")
        pattern = next((c for c in el if etree.QName(c).localname in _PATTERNS), None)
        rng = next((c for c in el if etree.QName(c).localname in _RANGES), None)
        if pattern is None or rng is None:
            names = ", ".join(etree.QName(c).localname for c in el)
            raise Unexpandable(f"a recurrence the gateway cannot expand ({names})")
        try:
            start = _xs_date(rng.findtext(_t("StartDate")))
            kind = etree.QName(pattern).localname.removesuffix("Recurrence")
            end_date = rng.findtext(_t("EndDate"))
            count = rng.findtext(_t("NumberOfOccurrences"))
            month = pattern.findtext(_t("Month"))
            return cls(
                kind=kind, start=start, interval=max(1, int(pattern.findtext(_t("Interval")) or 1)),
                days=tuple((pattern.findtext(_t("DaysOfWeek")) or "").split()),
                first_day_of_week=pattern.findtext(_t("FirstDayOfWeek")) or "Sunday",
                day_of_month=int(pattern.findtext(_t("DayOfMonth")) or 1),
                index=pattern.findtext(_t("DayOfWeekIndex")) or "First",
                month=MONTHS.index(month) + 1 if month else 1,
                end=_xs_date(end_date) if end_date else None, count=int(count) if count else None)
        except (ValueError, TypeError) as e:
            raise Unexpandable(f"a recurrence the gateway cannot read: {e}") from e

    def dates(self) -> Iterator[date]:
        """The dates of the series, first to last (endless for NoEnd), deleted occurrences included."""
        for n, d in enumerate(self._candidates()):
            if (self.count is not None and n >= self.count) or (self.end is not None and d > self.end):
                return
            yield d

    def _candidates(self) -> Iterator[date]:
        s = self.start
        if self.kind == "Daily":
            d = s
            while True:
                yield d
                d += timedelta(days=self.interval)
        elif self.kind == "Weekly":
            days = sorted({WEEKDAYS.index(x) for name in self.days for x in _DAY_GROUPS.get(name, (name,))
                           if x in WEEKDAYS}) or [s.weekday()]
            first = WEEKDAYS.index(self.first_day_of_week) if self.first_day_of_week in WEEKDAYS else 6
            week = s - timedelta(days=(s.weekday() - first) % 7)
            order = sorted(days, key=lambda wd: (wd - first) % 7)
            while True:
                for wd in order:
                    d = week + timedelta(days=(wd - first) % 7)
                    if d >= s:
                        yield d
                week += timedelta(weeks=self.interval)
        elif self.kind in ("AbsoluteMonthly", "RelativeMonthly"):
            y, m = s.year, s.month
            while y <= date.max.year - 1:
                d = self._in_month(y, m)
                if d >= s:
                    yield d
                m += self.interval
                y, m = y + (m - 1) // 12, (m - 1) % 12 + 1
        elif self.kind in ("AbsoluteYearly", "RelativeYearly"):
            for y in range(s.year, date.max.year):
                d = self._in_month(y, self.month)
                if d >= s:
                    yield d
        else:
            raise Unexpandable(f"a {self.kind} pattern")

    def _in_month(self, y: int, m: int) -> date:
        last = calendar.monthrange(y, m)[1]
        if self.kind.startswith("Absolute"):
            # Day 31 of a 30-day month is its last day (Outlook: "the occurrence will fall on the last day").
            return date(y, m, min(self.day_of_month, last))
        name = self.days[0] if self.days else "Monday"
        allowed = {WEEKDAYS.index(x) for x in _DAY_GROUPS.get(name, (name,)) if x in WEEKDAYS}
        candidates = [day for day in range(1, last + 1) if date(y, m, day).weekday() in allowed]
        at = WEEK_INDEX.index(self.index) if self.index in WEEK_INDEX else 0
        return date(y, m, candidates[-1] if at == 4 else candidates[min(at, len(candidates) - 1)])


def _xs_date(text: str | None) -> date:
    """An xs:date as Exchange writes a recurrence's dates: "2026-11-23", "2026-11-23Z" or "2026-11-23+01:00"."""
    if not text:
        raise ValueError("a recurrence range without a StartDate")
    return date.fromisoformat(text.strip()[:10])


def _time(el: etree._Element, name: str) -> datetime | None:
    text = el.findtext(_t(name))
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC) if text else None


def _set(el: etree._Element, name: str, value: str) -> None:
    child = el.find(_t(name))
    if child is None:
        child = etree.SubElement(el, _t(name))
    child.text = value


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Expansion:
    """What a master yields in [start, end): its plain occurrences, and the exceptions still to be read."""

    occurrences: list[etree._Element]
    exception_ids: list[str]


def occurrences(view: etree._Element, master: etree._Element, start: datetime, end: datetime,
                default_tz: str = "UTC") -> Expansion:
    """The occurrences of the series ``master`` (a GetItem of the master with RECURRENCE_FIELDS) overlapping
    [start, end), as copies of its CalendarView element ``view``. Pure."""
    pattern = Pattern.from_xml(master.find(_t("Recurrence")))
    first_start, first_end = _time(master, "Start") or _time(view, "Start"), _time(master, "End") or _time(view, "End")
    if first_start is None or first_end is None:
        raise Unexpandable("the series has no Start or End")
    zone = ZoneInfo(zone_name(view, zone_name(master, default_tz)))
    local_start, local_end = first_start.astimezone(zone), first_end.astimezone(zone)
    time_of_day = time(local_start.hour, local_start.minute, local_start.second)
    length = local_end.replace(tzinfo=None) - local_start.replace(tzinfo=None)  # wall-clock length
    deleted = {t for t in (_time(d, "Start") for d in master.iterfind(f"{_t('DeletedOccurrences')}/*")) if t}
    modified: dict[datetime, tuple[str, datetime | None, datetime | None]] = {}
    for occ in master.iterfind(f"{_t('ModifiedOccurrences')}/*"):
        original, ident = _time(occ, "OriginalStart"), item_id(occ)
        if original is not None and ident:
            modified[original] = (ident, _time(occ, "Start"), _time(occ, "End"))
    master_id = item_id(view) or item_id(master) or ""
    out: list[etree._Element] = []
    last_day = (end.astimezone(zone) + timedelta(days=1)).date()
    for index, day in enumerate(pattern.dates(), start=1):
        if day > last_day or index > MAX_OCCURRENCES:
            break
        local = datetime.combine(day, time_of_day, tzinfo=zone)
        original = local.astimezone(UTC)
        if original in deleted or original in modified:
            continue
        occurrence_end = (local.replace(tzinfo=None) + length).replace(tzinfo=zone).astimezone(UTC)
        if not (original < end and occurrence_end > start):
            continue
        el = copy.deepcopy(view)
        _set(el, "Start", _iso(original))
        _set(el, "End", _iso(occurrence_end))
        _set(el, "OriginalStart", _iso(original))
        _set(el, "CalendarItemType", "Occurrence")
        el.set(MASTER, master_id)
        el.set(INSTANCE, str(index))
        out.append(el)
    exceptions = [ident for ident, s, e in modified.values() if s is None or e is None or (s < end and e > start)]
    return Expansion(out, exceptions)


class SeriesExpander:
    """Replaces the RecurringMasters of a CalendarView answer by their occurrences (one per EwsSource)."""

    def __init__(self, default_tz: str = "UTC") -> None:
        self.default_tz = default_tz
        self._warned: set[str] = set()  # rooms whose server was seen returning masters (said once per room)

    def expand(self, room: str, items: list[Any], start: datetime, end: datetime, fetch: Fetch) -> list[Any]:
        """``items`` of a CalendarView of ``room`` over [start, end), masters replaced by their occurrences in it
        and by its exceptions. Costs nothing when there is no master (Exchange never returns one)."""
        masters = [el for el in items if el.findtext(_t("CalendarItemType")) == "RecurringMaster"]
        if not masters:
            return items
        if room not in self._warned:
            self._warned.add(room)
            log.warning("ews.calendar_view_unexpanded", room=room, series=len(masters),
                        hint="the server returned recurring series unexpanded; the gateway expands them itself")
        details = {item_id(d): d for d in fetch([i for i in (item_id(m) for m in masters) if i], RECURRENCE_FIELDS)}
        out = [el for el in items if el.findtext(_t("CalendarItemType")) != "RecurringMaster"]
        exception_ids: list[str] = []
        for view in masters:
            detail = details.get(item_id(view))
            try:
                if detail is None:
                    raise Unexpandable("the server did not return the series")
                found = occurrences(view, detail, start, end, self.default_tz)
            except Unexpandable as problem:
                # Never a master as one booking: its occurrences stay unknown, and the log says which series.
                log.error("ews.series_not_expanded", room=room, uid=element_uid(view), error=str(problem))
                continue
            out += found.occurrences
            exception_ids += found.exception_ids
        if exception_ids:
            for el in fetch(exception_ids, ()):
                moved_start, moved_end = _time(el, "Start"), _time(el, "End")
                if moved_start is not None and moved_end is not None and moved_start < end and moved_end > start:
                    out.append(el)
        return out
