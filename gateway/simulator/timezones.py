"""Windows time-zone definitions, generated from zoneinfo for every id exchangelib's winzone map knows.

Exchange describes a zone as ``Periods`` (a name and a ``Bias`` = -UTC offset), ``TransitionsGroups`` (the rules of
one era: a single ``Transition`` into a standard period, or a pair of ``RecurringDayTransition`` s into daylight and
back) and top-level ``Transitions`` saying from when each group applies (``Transition`` for the first group,
``AbsoluteDateTransition`` for the later ones). This module derives exactly that from the IANA zone behind a
Windows id: it finds every UTC-offset change between FIRST_YEAR and LAST_YEAR, turns each year into a rule,
merges consecutive years with the same rule into one group, and falls back to exact piecewise-fixed groups for
the odd years that fit no rule (a zone changing its standard offset, say).

The same rules give the availability service's ``SerializableTimeZone`` (``t:TimeZone`` in GetUserAvailability and
in WorkingHours), and :class:`RuleZone` turns such a ``t:TimeZone`` back into a tzinfo.

One table (exchangelib's ``MS_TIMEZONE_TO_IANA_MAP``, via :mod:`gateway.simulator.calendar`) and one code path:
:func:`definition` for every id, with no hand-written zone data except display names.
"""

from __future__ import annotations

import calendar as _cal
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from functools import cache
from zoneinfo import ZoneInfo

from lxml import etree

from gateway.simulator.calendar import MS_TIMEZONE_TO_IANA_MAP, WEEKDAYS
from gateway.simulator.soap import sub

FIRST_YEAR = 2000  # the first group covers every earlier year too
LAST_YEAR = 2037  # the last group goes on for ever

_STEP = 7 * 86400  # scan step; no zone changes offset twice within a week (checked against a daily scan)

# Windows display names of the zones people meet most; the others get "(UTC+hh:mm) <IANA city>".
DISPLAY_NAMES = {
    "UTC": "(UTC) Coordinated Universal Time",
    "GMT Standard Time": "(UTC+00:00) Dublin, Edinburgh, Lisbon, London",
    "W. Europe Standard Time": "(UTC+01:00) Amsterdam, Berlin, Bern, Rome, Stockholm, Vienna",
    "Central Europe Standard Time": "(UTC+01:00) Belgrade, Bratislava, Budapest, Ljubljana, Prague",
    "Romance Standard Time": "(UTC+01:00) Brussels, Copenhagen, Madrid, Paris",
    "Central European Standard Time": "(UTC+01:00) Sarajevo, Skopje, Warsaw, Zagreb",
    "FLE Standard Time": "(UTC+02:00) Helsinki, Kyiv, Riga, Sofia, Tallinn, Vilnius",
    "Eastern Standard Time": "(UTC-05:00) Eastern Time (US & Canada)",
    "Central Standard Time": "(UTC-06:00) Central Time (US & Canada)",
    "Mountain Standard Time": "(UTC-07:00) Mountain Time (US & Canada)",
    "Pacific Standard Time": "(UTC-08:00) Pacific Time (US & Canada)",
    "India Standard Time": "(UTC+05:30) Chennai, Kolkata, Mumbai, New Delhi",
    "China Standard Time": "(UTC+08:00) Beijing, Chongqing, Hong Kong, Urumqi",
    "Singapore Standard Time": "(UTC+08:00) Kuala Lumpur, Singapore",
    "Tokyo Standard Time": "(UTC+09:00) Osaka, Sapporo, Tokyo",
    "AUS Eastern Standard Time": "(UTC+10:00) Canberra, Melbourne, Sydney",
    "New Zealand Standard Time": "(UTC+12:00) Auckland, Wellington",
}


# -- the model -------------------------------------------------------------------------------------------------
def nth_weekday(year: int, month: int, weekday: int, occurrence: int) -> date:
    """The ``occurrence``-th (1..4; 5 or -1 = last) ``weekday`` (0 = Monday) of a month."""
    first = date(year, month, 1)
    day = 1 + (weekday - first.weekday()) % 7
    if occurrence in (-1, 5):
        last = _cal.monthrange(year, month)[1]
        day += 7 * ((last - day) // 7)
    else:
        day += 7 * (max(1, occurrence) - 1)
    return date(year, month, day)


@dataclass(frozen=True)
class DayRule:
    """A RecurringDayTransition: the ``occurrence``-th ``weekday`` of ``month`` at local wall time ``seconds``."""

    month: int
    weekday: int  # 0 = Monday, as in Python
    occurrence: int  # 1..4, or -1 for the last one
    seconds: int  # local wall-clock time of the change, read in the period before it


@dataclass(frozen=True)
class Rule:
    """One TransitionsGroup: a fixed UTC offset, or a standard offset plus one daylight period a year."""

    std: int  # UTC offset in minutes
    dst: int | None = None
    to_dst: DayRule | None = None
    to_std: DayRule | None = None

    @property
    def has_dst(self) -> bool:
        return self.dst is not None and self.to_dst is not None and self.to_std is not None


@dataclass(frozen=True)
class Era:
    start: datetime | None  # naive local wall time from which the group applies; None: since ever
    label: str
    rule: Rule


@dataclass(frozen=True)
class WindowsZone:
    ms_id: str
    name: str
    iana: str
    eras: tuple[Era, ...]

    def era_for_year(self, year: int) -> Era:
        """The group exchangelib picks for ``year``: the last whose start year is not after it."""
        chosen = self.eras[0]
        for era in self.eras[1:]:
            if era.start is not None and era.start.year <= year:
                chosen = era
        return chosen

    def serializable(self, year: int) -> SerializableZone:
        return SerializableZone.from_rule(self.era_for_year(year).rule)


@dataclass(frozen=True)
class ZoneTime:
    """SerializableTimeZoneTime: when (and with which extra bias) standard or daylight time starts."""

    bias: int  # minutes, added to the zone's Bias
    time: time
    day_order: int  # 1..4, 5 = last; 0 with month 0 = no transition
    month: int
    weekday: int  # 0 = Monday


_NO_TRANSITION = ZoneTime(0, time(0), 0, 0, 6)


@dataclass(frozen=True)
class SerializableZone:
    """The availability service's t:TimeZone: Bias (= -standard offset) plus StandardTime and DaylightTime."""

    bias: int
    standard: ZoneTime = _NO_TRANSITION
    daylight: ZoneTime = _NO_TRANSITION

    @classmethod
    def from_rule(cls, rule: Rule) -> SerializableZone:
        if not rule.has_dst:
            return cls(-rule.std)
        assert rule.to_dst is not None and rule.to_std is not None and rule.dst is not None

        def at(r: DayRule, bias: int) -> ZoneTime:
            clock = (datetime.min + timedelta(seconds=r.seconds)).time()
            return ZoneTime(bias, clock, 5 if r.occurrence == -1 else r.occurrence, r.month, r.weekday)

        return cls(-rule.std, at(rule.to_std, 0), at(rule.to_dst, -(rule.dst - rule.std)))

    def write(self, parent: etree._Element, tag: str = "t:TimeZone") -> etree._Element:
        el = sub(parent, tag)
        sub(el, "t:Bias", self.bias)
        for name, part in (("t:StandardTime", self.standard), ("t:DaylightTime", self.daylight)):
            p = sub(el, name)
            sub(p, "t:Bias", part.bias)
            sub(p, "t:Time", part.time.strftime("%H:%M:%S"))
            sub(p, "t:DayOrder", part.day_order)
            sub(p, "t:Month", part.month)
            sub(p, "t:DayOfWeek", WEEKDAYS[part.weekday])
        return el

    @classmethod
    def parse(cls, el: etree._Element) -> SerializableZone:
        """Read a t:TimeZone (SerializableTimeZone) element."""
        ns = etree.QName(el).namespace

        def text(parent: etree._Element, name: str, default: str = "0") -> str:
            value = parent.findtext(f"{{{ns}}}{name}")
            return value.strip() if value and value.strip() else default

        def part(name: str) -> ZoneTime:
            p = el.find(f"{{{ns}}}{name}")
            if p is None:
                return _NO_TRANSITION
            hh, mm, ss = [*text(p, "Time", "00:00:00").split(":"), "0", "0"][:3]
            wd = text(p, "DayOfWeek", "Sunday")
            return ZoneTime(int(text(p, "Bias")), time(int(hh) % 24, int(mm), int(float(ss))),
                            int(text(p, "DayOrder")), int(text(p, "Month")),
                            WEEKDAYS.index(wd) if wd in WEEKDAYS else 6)

        return cls(int(text(el, "Bias")), part("StandardTime"), part("DaylightTime"))

    def tzinfo(self) -> RuleZone:
        return RuleZone(self)


class RuleZone(tzinfo):
    """A tzinfo following a SerializableTimeZone's yearly rule, as Exchange reads a request's t:TimeZone."""

    def __init__(self, zone: SerializableZone) -> None:
        self.zone = zone
        self.std = timedelta(minutes=-(zone.bias + zone.standard.bias))
        self.dst_offset = timedelta(minutes=-(zone.bias + zone.daylight.bias))
        self.has_dst = bool(zone.standard.month and zone.daylight.month and self.std != self.dst_offset)

    def __repr__(self) -> str:
        return f"RuleZone({self.zone!r})"

    @staticmethod
    def _local(part: ZoneTime, year: int) -> datetime:
        d = nth_weekday(year, part.month, part.weekday, part.day_order)
        return datetime.combine(d, part.time)

    def _in_dst_local(self, dt: datetime) -> bool:
        if not self.has_dst:
            return False
        naive = dt.replace(tzinfo=None)
        start = self._local(self.zone.daylight, naive.year)  # standard wall clock
        end = self._local(self.zone.standard, naive.year)  # daylight wall clock
        if start < end:
            return start <= naive < end - (timedelta(0) if dt.fold == 0 else self.dst_offset - self.std)
        return not (end - (timedelta(0) if dt.fold == 0 else self.dst_offset - self.std) <= naive < start)

    def utcoffset(self, dt: datetime | None) -> timedelta:
        if dt is None:
            return self.std
        return self.dst_offset if self._in_dst_local(dt) else self.std

    def dst(self, dt: datetime | None) -> timedelta:
        return self.utcoffset(dt) - self.std

    def tzname(self, dt: datetime | None) -> str:
        off = self.utcoffset(dt)
        return _format_offset(off)

    def fromutc(self, dt: datetime) -> datetime:
        if not self.has_dst:
            return (dt + self.std).replace(tzinfo=self)
        naive = dt.replace(tzinfo=None)
        year = (naive + self.std).year
        start = self._local(self.zone.daylight, year) - self.std
        end = self._local(self.zone.standard, year) - self.dst_offset
        in_dst = start <= naive < end if start < end else not (end <= naive < start)
        local = naive + (self.dst_offset if in_dst else self.std)
        fold = 1 if in_dst is False and self._in_dst_local(local.replace(tzinfo=self)) else 0
        return local.replace(tzinfo=self, fold=fold)


def _format_offset(off: timedelta) -> str:
    minutes = int(off.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    return f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _duration(minutes: int) -> str:
    """xs:duration as Exchange writes a Bias: -PT1H, PT8H, -PT5H30M, PT0H."""
    if minutes == 0:
        return "PT0H"
    h, m = divmod(abs(minutes), 60)
    return ("-" if minutes < 0 else "") + "PT" + (f"{h}H" if h else "") + (f"{m}M" if m else "")


def _offset_duration(seconds: int) -> str:
    """A TimeOffset (time of day) as xs:duration: PT2H, PT3H, PT23H59M59S, PT0H."""
    if seconds == 0:
        return "PT0H"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "PT" + (f"{h}H" if h else "") + (f"{m}M" if m else "") + (f"{s}S" if s else "")


# -- generation from zoneinfo ----------------------------------------------------------------------------------
@dataclass
class _Change:
    utc: int  # unix seconds
    old: int  # minutes
    new: int

    @property
    def local_before(self) -> datetime:
        return datetime(1970, 1, 1) + timedelta(seconds=self.utc + self.old * 60)


def _offset(zi: ZoneInfo, ts: int) -> int:
    off = datetime.fromtimestamp(ts, tz=zi).utcoffset()
    assert off is not None
    return int(off.total_seconds()) // 60


def _changes(zi: ZoneInfo, start: int, end: int) -> list[_Change]:
    """Every UTC-offset change in [start, end), to the second (weekly scan, then bisection)."""
    out: list[_Change] = []
    prev_t, prev = start, _offset(zi, start)
    t = start + _STEP
    while t <= end:
        cur = _offset(zi, t)
        if cur != prev:
            lo, hi = prev_t, t
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _offset(zi, mid) == prev:
                    lo = mid
                else:
                    hi = mid
            out.append(_Change(hi, prev, _offset(zi, hi)))
            prev_t, prev = hi, out[-1].new
            if prev != cur:  # two changes within one step: look again from the first one
                t = hi + 1
                continue
        prev_t, prev = t, cur
        t += _STEP
    return out


@dataclass
class _Piece:
    start: datetime | None
    std: int
    dst: int | None = None
    to_dst: tuple[int, int, int] | None = None  # month, weekday, seconds
    to_std: tuple[int, int, int] | None = None
    dst_occ: set[int] = field(default_factory=set)
    std_occ: set[int] = field(default_factory=set)

    def key(self) -> tuple[object, ...]:
        return (self.std, self.dst, self.to_dst, self.to_std)

    def absorb(self, other: _Piece) -> bool:
        if self.key() != other.key():
            return False
        if self.dst is None:
            return True
        dst_occ, std_occ = self.dst_occ & other.dst_occ, self.std_occ & other.std_occ
        if not dst_occ or not std_occ:
            return False
        self.dst_occ, self.std_occ = dst_occ, std_occ
        return True

    def rule(self) -> Rule:
        if self.dst is None or self.to_dst is None or self.to_std is None:
            return Rule(self.std)

        def pick(occ: set[int]) -> int:
            plain = sorted(o for o in occ if 1 <= o <= 4)
            return plain[0] if plain else -1

        m, wd, s = self.to_dst
        to_dst = DayRule(m, wd, pick(self.dst_occ), s)
        m, wd, s = self.to_std
        return Rule(self.std, self.dst, to_dst, DayRule(m, wd, pick(self.std_occ), s))


def _occurrences(d: datetime) -> set[int]:
    occ = {(d.day - 1) // 7 + 1}
    if d.day + 7 > _cal.monthrange(d.year, d.month)[1]:
        occ.add(-1)
    return occ


def _pieces(zi: ZoneInfo) -> list[_Piece]:
    start = int(datetime(FIRST_YEAR - 1, 12, 30, tzinfo=UTC).timestamp())
    end = int(datetime(LAST_YEAR + 1, 1, 2, tzinfo=UTC).timestamp())
    changes = _changes(zi, start, end)
    current = _offset(zi, start)
    by_year: dict[int, list[_Change]] = {}
    for c in changes:
        year = c.local_before.year
        if year < FIRST_YEAR:
            current = c.new
        elif year <= LAST_YEAR:
            by_year.setdefault(year, []).append(c)
    pieces: list[_Piece] = []
    for year in range(FIRST_YEAR, LAST_YEAR + 1):
        jan1 = datetime(year, 1, 1)
        todo = by_year.get(year, [])
        first = todo[0] if todo else None
        if not todo:
            pieces.append(_Piece(jan1, current))
        elif len(todo) == 2 and first is not None and todo[1].new == current and first.new != current:
            lo, hi = sorted((current, first.new))
            up, down = (first, todo[1]) if first.new == hi else (todo[1], first)
            lu, ld = up.local_before, down.local_before
            pieces.append(_Piece(
                jan1, lo, hi,
                (lu.month, lu.weekday(), lu.hour * 3600 + lu.minute * 60 + lu.second),
                (ld.month, ld.weekday(), ld.hour * 3600 + ld.minute * 60 + ld.second),
                _occurrences(lu), _occurrences(ld)))
        else:  # no yearly rule fits: fixed offsets switched at the exact instants
            pieces.append(_Piece(jan1, current))
            for c in todo:
                pieces.append(_Piece(c.local_before, c.new))
        if todo:
            current = todo[-1].new
    merged: list[_Piece] = []
    for p in pieces:
        if merged and merged[-1].absorb(p):
            continue
        merged.append(p)
    merged[0].start = None
    return merged


@cache
def definition(ms_id: str) -> WindowsZone | None:
    """The Windows definition of ``ms_id``, or None when the id is unknown."""
    iana = MS_TIMEZONE_TO_IANA_MAP.get(ms_id)
    if iana is None:
        return None
    zi = ZoneInfo(iana)
    pieces = _pieces(zi)
    eras: list[Era] = []
    used: dict[str, int] = {}
    for p in pieces:
        if len(pieces) == 1:
            label = "1"
        else:
            year = FIRST_YEAR if p.start is None else p.start.year
            n = used.get(str(year), 0)
            used[str(year)] = n + 1
            label = str(year) if n == 0 else f"{year}_{n}"
        eras.append(Era(p.start, label, p.rule()))
    name = DISPLAY_NAMES.get(ms_id)
    if name is None:
        std = eras[-1].rule.std
        city = iana.rsplit("/", 1)[-1].replace("_", " ")
        name = f"({_format_offset(timedelta(minutes=std))}) {city}"
    return WindowsZone(ms_id, name, iana, tuple(eras))


def known_ids() -> list[str]:
    return sorted(MS_TIMEZONE_TO_IANA_MAP)


# -- XML ---------------------------------------------------------------------------------------------------------
def write_definition(parent: etree._Element, zone: WindowsZone, *, full: bool = True,
                     tag: str = "t:TimeZoneDefinition") -> etree._Element:
    """Append a t:TimeZoneDefinition (or StartTimeZone/EndTimeZone, same type) as Exchange 2016 writes it."""
    el = sub(parent, tag, Name=zone.name, Id=zone.ms_id)
    if not full:
        return el
    base = f"trule:Microsoft/Registry/{zone.ms_id}"
    periods = sub(el, "t:Periods")
    width = len(str(len(zone.eras) - 1)) if len(zone.eras) > 10 else 1  # exchangelib sorts group ids as text
    group_ids = [str(i).zfill(width) for i in range(len(zone.eras))]
    for era in zone.eras:
        sub(periods, "t:Period", Bias=_duration(-era.rule.std), Name="Standard", Id=f"{base}/{era.label}-Standard")
        if era.rule.has_dst:
            assert era.rule.dst is not None
            sub(periods, "t:Period", Bias=_duration(-era.rule.dst), Name="Daylight",
                Id=f"{base}/{era.label}-Daylight")
    groups = sub(el, "t:TransitionsGroups")
    for gid, era in zip(group_ids, zone.eras, strict=True):
        g = sub(groups, "t:TransitionsGroup", Id=gid)
        rule = era.rule
        if not rule.has_dst:
            tr = sub(g, "t:Transition")
            sub(tr, "t:To", f"{base}/{era.label}-Standard", Kind="Period")
            continue
        assert rule.to_dst is not None and rule.to_std is not None
        for target, r in (("Daylight", rule.to_dst), ("Standard", rule.to_std)):
            tr = sub(g, "t:RecurringDayTransition")
            sub(tr, "t:To", f"{base}/{era.label}-{target}", Kind="Period")
            sub(tr, "t:TimeOffset", _offset_duration(r.seconds))
            sub(tr, "t:Month", r.month)
            sub(tr, "t:DayOfWeek", WEEKDAYS[r.weekday])
            sub(tr, "t:Occurrence", r.occurrence)
    transitions = sub(el, "t:Transitions")
    for gid, era in zip(group_ids, zone.eras, strict=True):
        if era.start is None:
            tr = sub(transitions, "t:Transition")
            sub(tr, "t:To", gid, Kind="Group")
        else:
            tr = sub(transitions, "t:AbsoluteDateTransition")
            sub(tr, "t:To", gid, Kind="Group")
            sub(tr, "t:DateTime", era.start.strftime("%Y-%m-%dT%H:%M:%S"))
    return el
