"""iCalendar (RFC 5545) as Exchange speaks it in MimeContent: a calendar item written out (GetItem with
IncludeMimeContent) and read in (CreateItem of a t:CalendarItem carrying only t:MimeContent).

What Exchange writes: a VCALENDAR with a VTIMEZONE for the item's zone (Windows name as TZID, yearly rules
derived from the zone), the item as a VEVENT (local times with TZID, VALUE=DATE for all-day items, RRULE and
EXDATE for a series) and one more VEVENT per modified occurrence (RECURRENCE-ID). What it reads: the same, and
times in UTC, floating times, IANA zone names and DURATION as other clients send them.
"""

from __future__ import annotations

import calendar as _cal
import functools
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from exchangelib.winzone import IANA_TO_MS_TIMEZONE_MAP, MS_TIMEZONE_TO_IANA_MAP

from gateway.simulator.calendar import MONTHS, WEEK_INDEX, WEEKDAYS, Attendee, CalendarItem, Recurrence, zone
from gateway.simulator.soap import EwsError

_DAY = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")  # index = WEEKDAYS index
_GROUPS = {"Day": _DAY, "Weekday": _DAY[:5], "WeekendDay": _DAY[5:]}
_SENSITIVITY = {"Normal": "PUBLIC", "Personal": "PRIVATE", "Private": "PRIVATE", "Confidential": "CONFIDENTIAL"}
_BUSY = {"Free": "FREE", "Tentative": "TENTATIVE", "Busy": "BUSY", "OOF": "OOF", "WorkingElsewhere": "WORKINGELSEWHERE"}
_PARTSTAT = {"Accept": "ACCEPTED", "Decline": "DECLINED", "Tentative": "TENTATIVE"}


# -- writing ------------------------------------------------------------------------------------------------------
def _escape(text: str) -> str:
    return (text.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,").replace("\r\n", "\\n")
            .replace("\n", "\\n"))


def _fold(line: str) -> str:
    """Content lines longer than 75 octets are folded (CRLF + space)."""
    raw = line.encode()
    if len(raw) <= 75:
        return line
    parts: list[str] = []
    start = 0
    while start < len(raw):
        end = min(start + (75 if not parts else 74), len(raw))
        while end < len(raw) and (raw[end] & 0xC0) == 0x80:  # never split a UTF-8 sequence
            end -= 1
        parts.append(raw[start:end].decode())
        start = end
    return "\r\n ".join(parts)


def _offset(delta: timedelta | None) -> str:
    minutes = int((delta or timedelta(0)).total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


@functools.cache
def _transitions(z: ZoneInfo, year: int) -> tuple[tuple[datetime, timedelta, timedelta], ...]:
    """(local wall time just before, offset before, offset after) of each offset change in ``year``."""
    out = []
    t = datetime(year, 1, 1, tzinfo=UTC)
    before = t.astimezone(z).utcoffset() or timedelta(0)
    while t.year == year:
        nxt = t + timedelta(days=1)
        after = nxt.astimezone(z).utcoffset() or timedelta(0)
        if after != before:
            # Zones change on quarter hours: find the first quarter of the day with the new offset.
            first = next(t + timedelta(minutes=15 * k) for k in range(1, 97)
                         if (t + timedelta(minutes=15 * k)).astimezone(z).utcoffset() == after)
            out.append(((first + before).replace(tzinfo=None), before, after))
            before = after
        t = nxt
    return tuple(out)


def _yearly_rule(local: datetime) -> str:
    last = local.day + 7 > _cal.monthrange(local.year, local.month)[1]
    week = -1 if last else (local.day - 1) // 7 + 1
    return f"FREQ=YEARLY;INTERVAL=1;BYDAY={week}{_DAY[local.weekday()]};BYMONTH={local.month}"


def vtimezone(tz_id: str, year: int) -> list[str]:
    z = zone(tz_id)
    lines = ["BEGIN:VTIMEZONE", f"TZID:{tz_id}"]
    changes = _transitions(z, year)
    if len(changes) != 2:
        offset = _offset(datetime(year, 1, 1, tzinfo=UTC).astimezone(z).utcoffset())
        return [*lines, "BEGIN:STANDARD", "DTSTART:16010101T000000", f"TZOFFSETFROM:{offset}",
                f"TZOFFSETTO:{offset}", "END:STANDARD", "END:VTIMEZONE"]
    for wall, before, after in sorted(changes, key=lambda c: c[2] > c[1]):  # STANDARD first, as Exchange
        kind = "DAYLIGHT" if after > before else "STANDARD"
        lines += [f"BEGIN:{kind}", f"DTSTART:16010101T{wall:%H%M%S}", f"TZOFFSETFROM:{_offset(before)}",
                  f"TZOFFSETTO:{_offset(after)}", f"RRULE:{_yearly_rule(wall)}", f"END:{kind}"]
    return [*lines, "END:VTIMEZONE"]


def _local(value: datetime, tz_id: str) -> str:
    return f"{value.astimezone(zone(tz_id)):%Y%m%dT%H%M%S}"


def _utc(value: datetime) -> str:
    return f"{value.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def _when(name: str, value: datetime, item: CalendarItem) -> str:
    if item.all_day:
        return f"{name};VALUE=DATE:{value.astimezone(zone(item.tz)):%Y%m%d}"
    return f"{name};TZID={item.tz}:{_local(value, item.tz)}"


def rrule(item: CalendarItem) -> str:
    rec = item.recurrence
    assert rec is not None
    parts = {"Daily": ["FREQ=DAILY"], "Weekly": ["FREQ=WEEKLY"], "AbsoluteMonthly": ["FREQ=MONTHLY"],
             "RelativeMonthly": ["FREQ=MONTHLY"], "AbsoluteYearly": ["FREQ=YEARLY"],
             "RelativeYearly": ["FREQ=YEARLY"]}[rec.kind]
    if rec.end_date is not None:
        if item.all_day:
            parts.append(f"UNTIL={rec.end_date:%Y%m%d}")
        else:
            local = item.start.astimezone(zone(item.tz))
            last = datetime.combine(rec.end_date, local.time(), tzinfo=zone(item.tz))
            parts.append(f"UNTIL={_utc(last)}")
    elif rec.count is not None:
        parts.append(f"COUNT={rec.count}")
    parts.append(f"INTERVAL={rec.interval if rec.kind not in ('AbsoluteYearly', 'RelativeYearly') else 1}")
    if rec.kind == "Weekly":
        days = rec.days_of_week or (WEEKDAYS[item.start.astimezone(zone(item.tz)).weekday()],)
        parts += [f"BYDAY={','.join(_DAY[WEEKDAYS.index(d)] for d in days)}",
                  f"WKST={_DAY[WEEKDAYS.index(rec.first_day_of_week)]}"]
    elif rec.kind in ("AbsoluteMonthly", "AbsoluteYearly"):
        parts.append(f"BYMONTHDAY={rec.day_of_month}")
    else:
        name = rec.days_of_week[0] if rec.days_of_week else "Monday"
        days = _GROUPS.get(name) or (_DAY[WEEKDAYS.index(name)],)
        pos = -1 if rec.day_of_week_index == "Last" else WEEK_INDEX.index(rec.day_of_week_index) + 1
        parts += [f"BYDAY={','.join(days)}", f"BYSETPOS={pos}"]
    if rec.kind in ("AbsoluteYearly", "RelativeYearly"):
        parts.append(f"BYMONTH={MONTHS.index(rec.month) + 1}")
    return ";".join(parts)


def _person(name: str, attendee: Attendee, role: str) -> str:
    p = attendee.person
    stat = _PARTSTAT.get(attendee.response, "NEEDS-ACTION")
    cutype = ";CUTYPE=RESOURCE" if role == "NON-PARTICIPANT" else ""
    return f"{name};ROLE={role}{cutype};PARTSTAT={stat};RSVP=TRUE;CN={_param(p.name)}:mailto:{p.email}"


def _param(value: str) -> str:
    value = value.replace('"', "'")
    return f'"{value}"' if any(c in value for c in ":;,") else value


def to_ics(item: CalendarItem, text_body: str | None = None, original: datetime | None = None) -> bytes:
    """The iCalendar document of ``item`` (or of its occurrence ``original``), as GetItem's MimeContent."""
    start, end = item.start, item.end
    lines = ["BEGIN:VCALENDAR", "METHOD:PUBLISH", "PRODID:Microsoft Exchange Server 2016", "VERSION:2.0"]
    lines += vtimezone(item.tz, start.astimezone(zone(item.tz)).year)
    exc = item.exceptions.get(original) if original is not None and item.exceptions else None
    subject, location = item.subject, item.location
    if original is not None:
        start, end = (exc.start, exc.end) if exc else (original, item.occurrence_end(original))
        subject = exc.subject if exc and exc.subject is not None else subject
        location = exc.location if exc and exc.location is not None else location
    lines += _vevent(item, start, end, subject, location, text_body, original)
    if original is None and item.recurrence is not None:
        for orig, mod in sorted((item.exceptions or {}).items()):
            lines += _vevent(item, mod.start, mod.end, mod.subject if mod.subject is not None else item.subject,
                             mod.location if mod.location is not None else item.location, None, orig)
    lines.append("END:VCALENDAR")
    return ("\r\n".join(_fold(line) for line in lines) + "\r\n").encode()


def _vevent(item: CalendarItem, start: datetime, end: datetime, subject: str, location: str | None,
            text_body: str | None, recurrence_id: datetime | None) -> list[str]:
    lines = ["BEGIN:VEVENT"]
    if item.is_meeting:
        org = item.organizer or item.mailbox.person
        lines.append(f"ORGANIZER;CN={_param(org.name)}:mailto:{org.email}")
        for role, atts in (("REQ-PARTICIPANT", item.required), ("OPT-PARTICIPANT", item.optional),
                           ("NON-PARTICIPANT", item.resources)):
            lines += [_person("ATTENDEE", a, role) for a in atts]
    if text_body:
        lines.append(f"DESCRIPTION;LANGUAGE=en-US:{_escape(text_body)}")
    if recurrence_id is None and item.recurrence is not None:
        lines.append(f"RRULE:{rrule(item)}")
        for orig in sorted(item.deleted or ()):
            lines.append(_when("EXDATE", orig, item))
    if recurrence_id is not None:
        lines.append(_when("RECURRENCE-ID", recurrence_id, item))
    lines += [
        f"UID:{item.uid}",
        f"SUMMARY;LANGUAGE=en-US:{_escape(subject or '')}",
        _when("DTSTART", start, item),
        _when("DTEND", end, item),
        f"CLASS:{_SENSITIVITY.get(item.sensitivity, 'PUBLIC')}",
        "PRIORITY:5",
        f"DTSTAMP:{_utc(item.modified)}",
        f"TRANSP:{'TRANSPARENT' if item.free_busy == 'Free' else 'OPAQUE'}",
        f"STATUS:{'CANCELLED' if item.is_cancelled else 'CONFIRMED'}",
        f"SEQUENCE:{item.meeting_seq}",
    ]
    if location:
        lines.append(f"LOCATION;LANGUAGE=en-US:{_escape(location)}")
    lines += [f"X-MICROSOFT-CDO-BUSYSTATUS:{_BUSY.get(item.free_busy, 'BUSY')}",
              f"X-MICROSOFT-CDO-ALLDAYEVENT:{'TRUE' if item.all_day else 'FALSE'}"]
    return [*lines, "END:VEVENT"]


# -- reading ------------------------------------------------------------------------------------------------------
@dataclass
class Prop:
    name: str
    params: dict[str, str]
    value: str


@dataclass
class Imported:
    """A calendar item read from iCalendar: CreateItem values, plus what only exists after the item does."""

    values: dict[str, Any] = field(default_factory=dict)
    deleted: list[datetime] = field(default_factory=list)  # EXDATE
    exceptions: list[tuple[datetime, dict[str, Any]]] = field(default_factory=list)  # RECURRENCE-ID VEVENTs
    attendees: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, address, name)


def _invalid(why: str) -> EwsError:
    return EwsError("ErrorMimeContentInvalid", f"The MIME content is not a valid iCalendar object: {why}")


def _content_lines(text: str) -> list[Prop]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"\n[ \t]", "", text)  # unfold
    props = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        # NAME *(;PARAM=VALUE) : VALUE, with quoted parameter values that may hold ':' and ';'
        m = re.match(r'([A-Za-z0-9-]+)((?:;[A-Za-z0-9-]+=(?:"[^"]*"|[^";:,]*)(?:,(?:"[^"]*"|[^";:,]*))*)*):(.*)$',
                     line)
        if m is None:
            raise _invalid(f"cannot read the line {line[:80]!r}")
        params = {}
        for pm in re.finditer(r';([A-Za-z0-9-]+)=("[^"]*"|[^";:]*)', m.group(2)):
            params[pm.group(1).upper()] = pm.group(2).strip('"')
        props.append(Prop(m.group(1).upper(), params, m.group(3)))
    return props


def _unescape(value: str) -> str:
    return re.sub(r"\\([\\;,nN])", lambda m: "\n" if m.group(1) in "nN" else m.group(1), value)


def _zone_id(tzid: str | None, tz_context: str | None) -> str | None:
    """The Windows zone id an iCalendar TZID names (Windows or IANA name); None if it names no zone we know."""
    if not tzid:
        return tz_context or "UTC"
    tzid = tzid.strip('"')
    if tzid in MS_TIMEZONE_TO_IANA_MAP:
        return tzid
    entry = IANA_TO_MS_TIMEZONE_MAP.get(tzid)
    return entry[0] if entry else None


def _fixed_zones(props: list[Prop]) -> dict[str, timedelta]:
    """TZID -> standard offset of each VTIMEZONE (for zones known by neither name)."""
    out: dict[str, timedelta] = {}
    tzid, standard = None, False
    for p in props:
        if p.name == "BEGIN" and p.value.upper() == "STANDARD":
            standard = True
        elif p.name == "END" and p.value.upper() == "STANDARD":
            standard = False
        elif p.name == "TZID":
            tzid = p.value.strip('"')
        elif p.name == "TZOFFSETTO" and standard and tzid:
            m = re.fullmatch(r"([+-])(\d\d)(\d\d)", p.value.strip())
            if m:
                delta = timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
                out[tzid] = -delta if m.group(1) == "-" else delta
    return out


class _Reader:
    def __init__(self, props: list[Prop], tz_context: str | None) -> None:
        self.tz_context = tz_context
        self.fixed = _fixed_zones(props)

    def when(self, p: Prop) -> tuple[datetime, str, bool]:
        """(instant, Windows zone id, is a date) of a DTSTART/DTEND/RECURRENCE-ID/EXDATE value."""
        value = p.value.strip().split(",")[0]
        if p.params.get("VALUE", "").upper() == "DATE" or re.fullmatch(r"\d{8}", value):
            d = datetime.strptime(value[:8], "%Y%m%d")
            day_zone = _zone_id(p.params.get("TZID"), self.tz_context) or "UTC"
            return d.replace(tzinfo=zone(day_zone)).astimezone(UTC), day_zone, True
        try:
            local = datetime.strptime(value.rstrip("Zz"), "%Y%m%dT%H%M%S")
        except ValueError as e:
            raise _invalid(f"{p.name} {value!r} is not a date-time") from e
        if value.upper().endswith("Z"):
            return local.replace(tzinfo=UTC), self.tz_context or "UTC", False
        tzid = p.params.get("TZID")
        tz_id = _zone_id(tzid, self.tz_context)
        if tz_id is None:
            offset = self.fixed.get((tzid or "").strip('"'))
            if offset is None:
                raise _invalid(f"the time zone {tzid!r} is neither known nor defined by a VTIMEZONE")
            return (local - offset).replace(tzinfo=UTC), "UTC", False
        return local.replace(tzinfo=zone(tz_id)).astimezone(UTC), tz_id, False


def _duration(text: str) -> timedelta:
    m = re.fullmatch(r"([+-])?P(?:(\d+)W)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?", text.strip())
    if m is None:
        raise _invalid(f"DURATION {text!r}")
    sign, w, d, h, mi, s = m.groups()
    delta = timedelta(weeks=int(w or 0), days=int(d or 0), hours=int(h or 0), minutes=int(mi or 0),
                      seconds=int(s or 0))
    return -delta if sign == "-" else delta


def _recurrence(rule: str, start: datetime, tz_id: str, all_day: bool) -> Recurrence:
    parts = dict(p.split("=", 1) for p in rule.upper().split(";") if "=" in p)
    freq = parts.get("FREQ", "")
    local = start.astimezone(zone(tz_id))
    days = [d for d in parts.get("BYDAY", "").split(",") if d]
    rec = Recurrence(kind="Daily", interval=max(1, int(parts.get("INTERVAL", "1"))), start_date=local.date())

    def weekdays(codes: list[str]) -> tuple[str, ...]:
        try:
            return tuple(WEEKDAYS[_DAY.index(c[-2:])] for c in codes)
        except ValueError:
            raise _invalid(f"BYDAY={','.join(codes)}") from None

    def relative(codes: list[str]) -> None:
        pos = parts.get("BYSETPOS") or (re.match(r"[+-]?\d+", codes[0]).group(0)  # type: ignore[union-attr]
                                        if re.match(r"[+-]?\d+", codes[0]) else "1")
        index = int(pos)
        rec.day_of_week_index = "Last" if index < 0 else WEEK_INDEX[min(index, 4) - 1]
        plain = tuple(c[-2:] for c in codes)
        group = next((name for name, members in _GROUPS.items() if set(members) == set(plain)), None)
        rec.days_of_week = (group,) if group else weekdays([plain[0]])

    if freq == "DAILY" and not days:
        rec.kind = "Daily"
    elif freq in ("DAILY", "WEEKLY"):
        rec.kind = "Weekly"
        rec.days_of_week = weekdays(days) if days else (WEEKDAYS[local.weekday()],)
        if "WKST" in parts:
            rec.first_day_of_week = weekdays([parts["WKST"]])[0]
    elif freq == "MONTHLY":
        if days:
            rec.kind = "RelativeMonthly"
            relative(days)
        else:
            rec.kind = "AbsoluteMonthly"
            rec.day_of_month = int(parts.get("BYMONTHDAY", local.day))
    elif freq == "YEARLY":
        rec.month = MONTHS[int(parts.get("BYMONTH", local.month)) - 1]
        if days:
            rec.kind = "RelativeYearly"
            relative(days)
        else:
            rec.kind = "AbsoluteYearly"
            rec.day_of_month = int(parts.get("BYMONTHDAY", local.day))
    else:
        raise _invalid(f"RRULE FREQ={freq or '?'} is not one Exchange can store")
    if "COUNT" in parts:
        rec.count = int(parts["COUNT"])
    elif "UNTIL" in parts:
        until = parts["UNTIL"]
        if len(until) == 8:
            rec.end_date = datetime.strptime(until, "%Y%m%d").date()
        else:
            moment = datetime.strptime(until.rstrip("Z"), "%Y%m%dT%H%M%S")
            aware = moment.replace(tzinfo=UTC if until.endswith("Z") else zone(tz_id))
            rec.end_date = aware.astimezone(zone(tz_id)).date()
    return rec


def from_ics(data: bytes, tz_context: str | None = None) -> Imported:
    """Read the first VEVENT (and its RECURRENCE-ID siblings) of an iCalendar document."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _invalid("it is not UTF-8") from e
    props = _content_lines(text)
    reader = _Reader(props, tz_context)
    events: list[list[Prop]] = []
    current: list[Prop] | None = None
    depth = 0
    for p in props:
        if p.name == "BEGIN":
            if p.value.upper() == "VEVENT" and depth == 1:
                current = []
            depth += 1
        elif p.name == "END":
            depth -= 1
            if p.value.upper() == "VEVENT" and current is not None:
                events.append(current)
                current = None
        elif current is not None:
            current.append(p)
    if not events:
        raise _invalid("it holds no VEVENT")
    masters = [e for e in events if not any(p.name == "RECURRENCE-ID" for p in e)]
    master = masters[0] if masters else events[0]
    out = Imported()
    out.values.update(_event_values(master, reader, out))
    for ev in events:
        rid = next((p for p in ev if p.name == "RECURRENCE-ID"), None)
        if rid is None or ev is master:
            continue
        values = _event_values(ev, reader, None)
        out.exceptions.append((reader.when(rid)[0], {k: v for k, v in values.items()
                                                     if k in ("start", "end", "subject", "location", "body")}))
    return out


def _event_values(event: list[Prop], reader: _Reader, out: Imported | None) -> dict[str, Any]:
    by_name: dict[str, Prop] = {}
    for p in event:
        by_name.setdefault(p.name, p)
    values: dict[str, Any] = {}
    if "DTSTART" not in by_name:
        raise _invalid("the VEVENT has no DTSTART")
    start, tz_id, is_date = reader.when(by_name["DTSTART"])
    values["start"], values["tz"] = start, tz_id
    if "DTEND" in by_name:
        values["end"] = reader.when(by_name["DTEND"])[0]
    elif "DURATION" in by_name:
        values["end"] = start + _duration(by_name["DURATION"].value)
    else:
        values["end"] = start + (timedelta(days=1) if is_date else timedelta(0))
    all_day = is_date or by_name.get("X-MICROSOFT-CDO-ALLDAYEVENT", Prop("", {}, "")).value.upper() == "TRUE"
    if all_day:
        values["all_day"] = True
    if "SUMMARY" in by_name:
        values["subject"] = _unescape(by_name["SUMMARY"].value)
    if "LOCATION" in by_name:
        values["location"] = _unescape(by_name["LOCATION"].value)
    if "DESCRIPTION" in by_name:
        values["body"], values["body_type"] = _unescape(by_name["DESCRIPTION"].value), "Text"
    if out is None:
        return values
    if "UID" in by_name:
        values["uid"] = by_name["UID"].value.strip()
    cls = by_name.get("CLASS")
    if cls is not None:
        values["sensitivity"] = {"PRIVATE": "Private", "CONFIDENTIAL": "Confidential"}.get(cls.value.upper(),
                                                                                         "Normal")
    busy = by_name.get("X-MICROSOFT-CDO-BUSYSTATUS")
    transp = by_name.get("TRANSP")
    if busy is not None:
        values["free_busy"] = {v: k for k, v in _BUSY.items()}.get(busy.value.upper(), "Busy")
    elif transp is not None and transp.value.upper() == "TRANSPARENT":
        values["free_busy"] = "Free"
    if "RRULE" in by_name:
        values["recurrence"] = _recurrence(by_name["RRULE"].value, start, tz_id, all_day)
    for p in event:
        if p.name == "EXDATE":
            for one in p.value.split(","):
                out.deleted.append(reader.when(Prop(p.name, p.params, one))[0])
        elif p.name == "ATTENDEE":
            address = re.sub(r"(?i)^mailto:", "", p.value.strip())
            role = p.params.get("ROLE", "REQ-PARTICIPANT").upper()
            kind = "resources" if role == "NON-PARTICIPANT" or p.params.get("CUTYPE", "").upper() in (
                "RESOURCE", "ROOM") else "optional" if role == "OPT-PARTICIPANT" else "required"
            out.attendees.append((kind, address, p.params.get("CN", "")))
    return values

