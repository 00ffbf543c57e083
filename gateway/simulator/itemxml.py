"""The XML form of calendar items: response shapes (FieldURI by FieldURI) and parsing of CreateItem/UpdateItem."""

from __future__ import annotations

import base64
import functools
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from lxml import etree

from gateway.simulator import ids
from gateway.simulator.calendar import (
    MONTHS,
    WEEK_INDEX,
    WEEKDAYS,
    Attendee,
    CalendarItem,
    Instance,
    Recurrence,
    zone,
)
from gateway.simulator.ical import Imported, from_ics, to_ics
from gateway.simulator.mailboxes import Directory
from gateway.simulator.mapi import ITEM_PROPERTIES, ExtKey, ext_key
from gateway.simulator.messages import MeetingMessage
from gateway.simulator.schema import TNS, child_order
from gateway.simulator.soap import EwsError, fragment, parse_bool, parse_datetime, sub, t, xs_text


@dataclass
class Shape:
    """What an ItemShape asked for."""

    base: str = "Default"
    uris: list[str] = field(default_factory=list)
    ext: list[etree._Element] = field(default_factory=list)
    body_type: str = "Best"
    # render_fast's writers for this shape, worked out on first use (False: not yet; None: no fast path) ...
    plan: Any = field(default=False, repr=False, compare=False)
    # ... and the fields each series' occurrences share, written once per answer (a Shape lives for one request)
    series: dict[tuple[int, int, int], list[str | None]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, el: etree._Element | None) -> Shape:
        shape = cls()
        if el is None:
            return shape
        for child in el:
            name = etree.QName(child).localname
            if name == "BaseShape":
                shape.base = (child.text or "Default").strip()
            elif name == "BodyType":
                shape.body_type = (child.text or "Best").strip()
            elif name == "IncludeMimeContent":
                if parse_bool(child.text):
                    shape.uris.append("item:MimeContent")
            elif name == "AdditionalProperties":
                for p in child:
                    pn = etree.QName(p).localname
                    if pn == "FieldURI":
                        shape.uris.append(p.get("FieldURI", ""))
                    elif pn == "ExtendedFieldURI":
                        shape.ext.append(p)
        return shape

    def field_uris(self) -> list[str]:
        base = {"IdOnly": ["item:ItemId"], "Default": DEFAULT_FIELDS, "AllProperties": ALL_FIELDS}.get(
            self.base, DEFAULT_FIELDS)
        out = list(base)
        for u in self.uris:
            if u not in out:
                out.append(u)
        return out


class View:
    """An item, or one instance of a series, as it is about to be rendered."""

    __slots__ = ("directory", "inst", "item")
    item: CalendarItem
    inst: Instance | None
    directory: Directory

    def __init__(self, item: CalendarItem, inst: Instance | None, directory: Directory) -> None:
        self.item = item
        self.inst = inst if inst is not None and inst.original_start is not None else None
        self.directory = directory

    @property
    def start(self) -> datetime:
        return self.inst.start if self.inst else self.item.start

    @property
    def end(self) -> datetime:
        return self.inst.end if self.inst else self.item.end

    @property
    def item_id(self) -> tuple[str, str]:
        it = self.item
        if self.inst is not None:
            exc = self.inst.exception
            version = exc.version if exc else it.version
            return ids.occurrence_id(it.mailbox.idx, it.iid, self.inst.index), ids.change_key(it.iid, version)
        return ids.item_id(it.mailbox.idx, it.iid), ids.change_key(it.iid, it.version)


def _mailbox(parent: etree._Element, tag: str, person: Any) -> None:
    mb = sub(parent, tag)
    sub(mb, "t:Name", person.name)
    sub(mb, "t:EmailAddress", person.email)
    sub(mb, "t:RoutingType", person.routing)
    sub(mb, "t:MailboxType", person.mailbox_type)


def _attendees(tag: str, attendees: Iterable[Attendee]) -> Callable[[etree._Element, View], None]:
    def write(parent: etree._Element, v: View) -> None:
        atts = list(attendees)
        if not atts:
            return
        el = sub(parent, tag)
        for a in atts:
            ae = sub(el, "t:Attendee")
            _mailbox(ae, "t:Mailbox", a.person)
            if a.response:  # optional in the schema; a server that tracks no answers leaves it out
                sub(ae, "t:ResponseType", a.response)
            if a.response_time is not None:
                sub(ae, "t:LastResponseTime", a.response_time)
    return write


def _duration(delta: timedelta) -> str:
    secs = int(delta.total_seconds())
    days, rem = divmod(secs, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, seconds = divmod(rem, 60)
    out = "P" + (f"{days}D" if days else "")
    timepart = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "") + (f"{seconds}S" if seconds else "")
    if timepart or not days:
        out += "T" + (timepart or "0S")
    return out


def _goid_with_instance(goid: bytes, original: datetime | None) -> bytes:
    if original is None:
        return goid
    return goid[:16] + struct.pack(">HBB", original.year, original.month, original.day) + goid[20:]


def _xs_date(d: date, tz: str) -> str:
    """A recurrence range date as Exchange writes it: with the series zone's offset ("2026-11-23+01:00")."""
    offset = datetime.combine(d, datetime.min.time(), tzinfo=zone(tz)).utcoffset() or timedelta(0)
    if not offset:
        return f"{d.isoformat()}Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{d.isoformat()}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def write_recurrence(parent: etree._Element, rec: Recurrence, tag: str = "t:Recurrence", tz: str = "UTC") -> None:
    el = sub(parent, tag)
    k = rec.kind
    p = sub(el, f"t:{k}Recurrence")
    if k in ("Daily", "Weekly", "AbsoluteMonthly", "RelativeMonthly"):
        sub(p, "t:Interval", rec.interval)
    if k == "Weekly":
        sub(p, "t:DaysOfWeek", " ".join(rec.days_of_week))
        sub(p, "t:FirstDayOfWeek", rec.first_day_of_week)
    elif k == "RelativeMonthly":
        sub(p, "t:DaysOfWeek", rec.days_of_week[0] if rec.days_of_week else "Monday")
        sub(p, "t:DayOfWeekIndex", rec.day_of_week_index)
    elif k == "AbsoluteMonthly":
        sub(p, "t:DayOfMonth", rec.day_of_month)
    elif k == "RelativeYearly":
        sub(p, "t:DaysOfWeek", rec.days_of_week[0] if rec.days_of_week else "Monday")
        sub(p, "t:DayOfWeekIndex", rec.day_of_week_index)
        sub(p, "t:Month", rec.month)
    elif k == "AbsoluteYearly":
        sub(p, "t:DayOfMonth", rec.day_of_month)
        sub(p, "t:Month", rec.month)
    if rec.end_date is not None:
        r = sub(el, "t:EndDateRecurrence")
        sub(r, "t:StartDate", _xs_date(rec.start_date, tz))
        sub(r, "t:EndDate", _xs_date(rec.end_date, tz))
    elif rec.count is not None:
        r = sub(el, "t:NumberedRecurrence")
        sub(r, "t:StartDate", _xs_date(rec.start_date, tz))
        sub(r, "t:NumberOfOccurrences", rec.count)
    else:
        r = sub(el, "t:NoEndRecurrence")
        sub(r, "t:StartDate", _xs_date(rec.start_date, tz))


def _occurrence_info(parent: etree._Element, tag: str, v: View, inst: Instance) -> None:
    el = sub(parent, tag)
    it = v.item
    sub(el, "t:ItemId", Id=ids.occurrence_id(it.mailbox.idx, it.iid, inst.index),
        ChangeKey=ids.change_key(it.iid, it.version))
    sub(el, "t:Start", inst.start)
    sub(el, "t:End", inst.end)
    sub(el, "t:OriginalStart", inst.original_start)


def _w_first(parent: etree._Element, v: View) -> None:
    if v.inst is None and v.item.recurrence is not None:
        first, _ = v.item.first_last()
        if first:
            _occurrence_info(parent, "t:FirstOccurrence", v, first)


def _w_last(parent: etree._Element, v: View) -> None:
    if v.inst is None and v.item.recurrence is not None:
        _, last = v.item.first_last()
        if last:
            _occurrence_info(parent, "t:LastOccurrence", v, last)


def _w_modified(parent: etree._Element, v: View) -> None:
    it = v.item
    if v.inst is None and it.recurrence is not None and it.exceptions:
        el = sub(parent, "t:ModifiedOccurrences")
        for original in sorted(it.exceptions):
            idx = it.index_of(original) or 0
            _occurrence_info(el, "t:Occurrence", v, Instance(it, idx, original))


def _w_deleted(parent: etree._Element, v: View) -> None:
    it = v.item
    if v.inst is None and it.recurrence is not None and it.deleted:
        el = sub(parent, "t:DeletedOccurrences")
        for original in sorted(it.deleted):
            sub(sub(el, "t:DeletedOccurrence"), "t:Start", original)


def _w_body(parent: etree._Element, v: View, body_type: str = "Best") -> None:
    exc = v.inst.exception if v.inst else None
    text = exc.body if exc is not None and exc.body is not None else v.item.body
    if text is None:
        return
    kind = v.item.body_type if body_type == "Best" else body_type
    if kind == "Text" and v.item.body_type == "HTML":
        text = _strip_html(text)
    elif kind == "HTML" and v.item.body_type == "Text":
        text = f"<html><body>{_escape(text)}</body></html>"
    sub(parent, "t:Body", text, BodyType=kind)


def _w_text_body(parent: etree._Element, v: View) -> None:
    if v.item.body is not None:
        text = _strip_html(v.item.body) if v.item.body_type == "HTML" else v.item.body
        sub(parent, "t:TextBody", text, BodyType="Text")


def _strip_html(text: str) -> str:
    try:
        return "".join(etree.fromstring(f"<x>{text}</x>", etree.HTMLParser()).itertext())
    except etree.XMLSyntaxError:
        return text


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _tz_el(tag: str) -> Callable[[etree._Element, View], None]:
    def write(parent: etree._Element, v: View) -> None:
        sub(parent, tag, Id=v.item.tz, Name=v.item.tz)
    return write


def _state(it: CalendarItem) -> int:
    state = 0
    if it.is_meeting:
        state |= 1
        if it.my_response != "Organizer":
            state |= 2
    if it.is_cancelled:
        state |= 4
    return state


def _display(atts: Iterable[Attendee]) -> str:
    return "; ".join(a.person.name for a in atts)


class _Simple:
    """A field that is one element with text (absent when the value is None or empty)."""

    __slots__ = ("getter", "tag")

    def __init__(self, tag: str, getter: Callable[[View], Any]) -> None:
        self.tag = tag
        self.getter = getter

    def __call__(self, parent: etree._Element, v: View) -> None:
        value = self.getter(v)
        if value is not None and value != "":
            sub(parent, self.tag, value)

    def fast(self, v: View) -> str:
        value = self.getter(v)
        if value is None or value == "":
            return ""
        return _el(self.tag, value)


def _simple(tag: str, getter: Callable[[View], Any]) -> _Simple:
    return _Simple(tag, getter)


def _w_item_id(parent: etree._Element, v: View) -> None:
    iid, ck = v.item_id
    sub(parent, "t:ItemId", Id=iid, ChangeKey=ck)


def _w_parent(parent: etree._Element, v: View) -> None:
    f = v.item.folder
    sub(parent, "t:ParentFolderId", Id=f.id, ChangeKey=f.change_key)


def _w_categories(parent: etree._Element, v: View) -> None:
    if v.item.categories:
        el = sub(parent, "t:Categories")
        for c in v.item.categories:
            sub(el, "t:String", c)


def _w_organizer(parent: etree._Element, v: View) -> None:
    person = v.item.organizer or v.item.mailbox.person
    org = sub(parent, "t:Organizer")
    _mailbox(org, "t:Mailbox", person)


def _w_recurrence(parent: etree._Element, v: View) -> None:
    if v.inst is None and v.item.recurrence is not None:
        write_recurrence(parent, v.item.recurrence, tz=v.item.tz)


def _w_start(parent: etree._Element, v: View) -> None:
    sub(parent, "t:Start", v.start)


def _w_end(parent: etree._Element, v: View) -> None:
    sub(parent, "t:End", v.end)


def _w_original_start(parent: etree._Element, v: View) -> None:
    if v.inst is not None:
        sub(parent, "t:OriginalStart", v.inst.original_start)


def _w_recurrence_id(parent: etree._Element, v: View) -> None:
    if v.inst is not None:
        sub(parent, "t:RecurrenceId", v.inst.original_start)


def _w_mime(parent: etree._Element, v: View) -> None:
    """The item as iCalendar, base64: what Exchange gives a calendar item's MimeContent."""
    it = v.item
    body = (_strip_html(it.body) if it.body_type == "HTML" else it.body) if it.body else None
    original = v.inst.original_start if v.inst is not None else None
    data = to_ics(it, body, original)
    sub(parent, "t:MimeContent", base64.b64encode(data).decode(), CharacterSet="UTF-8")


def _w_size(parent: etree._Element, v: View) -> None:
    sub(parent, "t:Size", 900 + len(v.item.subject or "") + len(v.item.body or ""))


WRITERS: dict[str, Callable[[etree._Element, View], None]] = {
    "item:MimeContent": _w_mime,
    "item:ItemId": _w_item_id,
    "item:ParentFolderId": _w_parent,
    "item:ItemClass": _simple("t:ItemClass", lambda v: v.item.item_class),
    "item:Subject": _simple("t:Subject", lambda v: v.inst.subject if v.inst else v.item.subject),
    "item:Sensitivity": _simple("t:Sensitivity", lambda v: v.item.sensitivity),
    "item:Body": _w_body,
    "item:DateTimeReceived": _simple("t:DateTimeReceived", lambda v: v.item.created),
    "item:Size": _w_size,
    "item:Categories": _w_categories,
    "item:Importance": _simple("t:Importance", lambda v: v.item.importance),
    "item:IsSubmitted": _simple("t:IsSubmitted", lambda v: False),
    "item:IsDraft": _simple("t:IsDraft", lambda v: False),
    "item:IsFromMe": _simple("t:IsFromMe", lambda v: False),
    "item:IsResend": _simple("t:IsResend", lambda v: False),
    "item:IsUnmodified": _simple("t:IsUnmodified", lambda v: v.item.version == 1),
    "item:DateTimeSent": _simple("t:DateTimeSent", lambda v: v.item.created),
    "item:DateTimeCreated": _simple("t:DateTimeCreated", lambda v: v.item.created),
    "item:ReminderIsSet": _simple("t:ReminderIsSet", lambda v: v.item.reminder is not None),
    "item:ReminderMinutesBeforeStart": _simple("t:ReminderMinutesBeforeStart", lambda v: v.item.reminder or 0),
    "item:DisplayCc": _simple("t:DisplayCc", lambda v: _display(v.item.optional)),
    "item:DisplayTo": _simple("t:DisplayTo", lambda v: _display(v.item.required)),
    "item:HasAttachments": _simple("t:HasAttachments", lambda v: False),
    "item:Culture": _simple("t:Culture", lambda v: "en-US"),
    "item:LastModifiedName": _simple("t:LastModifiedName", lambda v: v.item.mailbox.name),
    "item:LastModifiedTime": _simple("t:LastModifiedTime", lambda v: v.item.modified),
    "item:IsAssociated": _simple("t:IsAssociated", lambda v: False),
    "item:TextBody": lambda p, v: _w_text_body(p, v),
    "calendar:UID": _simple("t:UID", lambda v: v.item.uid),
    "calendar:RecurrenceId": _w_recurrence_id,
    "calendar:DateTimeStamp": _simple("t:DateTimeStamp", lambda v: v.item.modified),
    "calendar:Start": _w_start,
    "calendar:End": _w_end,
    "calendar:OriginalStart": _w_original_start,
    "calendar:IsAllDayEvent": _simple("t:IsAllDayEvent", lambda v: v.item.all_day),
    "calendar:LegacyFreeBusyStatus": _simple("t:LegacyFreeBusyStatus",
                                             lambda v: v.inst.free_busy if v.inst else v.item.free_busy),
    "calendar:Location": _simple("t:Location", lambda v: v.inst.location if v.inst else v.item.location),
    "calendar:IsMeeting": _simple("t:IsMeeting", lambda v: v.item.is_meeting),
    "calendar:IsCancelled": _simple("t:IsCancelled", lambda v: v.item.is_cancelled),
    "calendar:IsRecurring": _simple("t:IsRecurring", lambda v: v.inst is not None),
    "calendar:MeetingRequestWasSent": _simple("t:MeetingRequestWasSent", lambda v: v.item.request_sent),
    "calendar:IsResponseRequested": _simple("t:IsResponseRequested", lambda v: v.item.response_requested),
    "calendar:CalendarItemType": _simple("t:CalendarItemType",
                                         lambda v: v.inst.item_type if v.inst else v.item.item_type),
    "calendar:MyResponseType": _simple("t:MyResponseType", lambda v: v.item.my_response),
    "calendar:Organizer": _w_organizer,
    "calendar:ConflictingMeetingCount": _simple("t:ConflictingMeetingCount", lambda v: 0),
    "calendar:AdjacentMeetingCount": _simple("t:AdjacentMeetingCount", lambda v: 0),
    "calendar:Duration": _simple("t:Duration", lambda v: _duration(v.end - v.start)),
    "calendar:TimeZone": _simple("t:TimeZone", lambda v: v.item.tz),
    "calendar:AppointmentReplyTime": _simple("t:AppointmentReplyTime", lambda v: v.item.reply_time),
    "calendar:AppointmentSequenceNumber": _simple("t:AppointmentSequenceNumber", lambda v: v.item.meeting_seq),
    "calendar:AppointmentState": _simple("t:AppointmentState", lambda v: _state(v.item)),
    "calendar:Recurrence": _w_recurrence,
    "calendar:FirstOccurrence": _w_first,
    "calendar:LastOccurrence": _w_last,
    "calendar:ModifiedOccurrences": _w_modified,
    "calendar:DeletedOccurrences": _w_deleted,
    "calendar:StartTimeZone": _tz_el("t:StartTimeZone"),
    "calendar:EndTimeZone": _tz_el("t:EndTimeZone"),
    "calendar:ConferenceType": _simple("t:ConferenceType", lambda v: 0),
    "calendar:AllowNewTimeProposal": _simple("t:AllowNewTimeProposal", lambda v: True),
    "calendar:IsOnlineMeeting": _simple("t:IsOnlineMeeting", lambda v: v.item.online_url is not None),
    "calendar:NetShowUrl": _simple("t:NetShowUrl", lambda v: v.item.online_url),
}
_ATTENDEE_URIS = {"calendar:RequiredAttendees": ("t:RequiredAttendees", "required"),
                  "calendar:OptionalAttendees": ("t:OptionalAttendees", "optional"),
                  "calendar:Resources": ("t:Resources", "resources")}
# URIs Exchange accepts but this simulator has nothing to say about (returned as absent, as for empty values).
IGNORED_URIS = {
    "item:Attachments", "item:InReplyTo", "item:InternetMessageHeaders", "item:ResponseObjects",
    "item:ReminderDueBy", "item:EffectiveRights", "item:WebClientReadFormQueryString",
    "item:WebClientEditFormQueryString", "item:ConversationId", "item:UniqueBody", "calendar:When",
    "calendar:ConflictingMeetings", "calendar:AdjacentMeetings", "calendar:MeetingWorkspaceUrl",
    "calendar:MeetingTimeZone", "item:StoreEntryId", "item:InstanceKey", "item:NormalizedBody",
    "item:EntityExtractionResult", "item:Flag", "item:PolicyTag", "item:ArchiveTag", "item:RetentionDate",
    "item:Preview", "calendar:EnhancedLocation", "calendar:StartWallClock",
    "calendar:EndWallClock", "calendar:StartTimeZoneId", "calendar:EndTimeZoneId", "calendar:IntendedFreeBusyStatus",
    "calendar:JoinOnlineMeetingUrl", "calendar:OnlineMeetingSettings", "calendar:IsOrganizer",
    "calendar:InboundShadowAttendees",
}

DEFAULT_FIELDS = [
    "item:ItemId", "item:ParentFolderId", "item:ItemClass", "item:Subject", "item:Sensitivity",
    "item:HasAttachments", "item:IsAssociated", "calendar:Start", "calendar:End", "calendar:IsAllDayEvent",
    "calendar:LegacyFreeBusyStatus", "calendar:Location", "calendar:CalendarItemType", "calendar:Organizer",
]
ALL_FIELDS = [
    "item:ItemId", "item:ParentFolderId", "item:ItemClass", "item:Subject", "item:Sensitivity", "item:Body",
    "item:DateTimeReceived", "item:Size", "item:Categories", "item:Importance", "item:IsSubmitted", "item:IsDraft",
    "item:IsFromMe", "item:IsResend", "item:IsUnmodified", "item:DateTimeSent", "item:DateTimeCreated",
    "item:ReminderIsSet", "item:ReminderMinutesBeforeStart", "item:DisplayCc", "item:DisplayTo",
    "item:HasAttachments", "item:Culture", "item:LastModifiedName", "item:LastModifiedTime", "item:IsAssociated",
    "calendar:UID", "calendar:RecurrenceId", "calendar:DateTimeStamp", "calendar:Start", "calendar:End",
    "calendar:OriginalStart", "calendar:IsAllDayEvent", "calendar:LegacyFreeBusyStatus", "calendar:Location",
    "calendar:IsMeeting", "calendar:IsCancelled", "calendar:IsRecurring", "calendar:MeetingRequestWasSent",
    "calendar:IsResponseRequested", "calendar:CalendarItemType", "calendar:MyResponseType", "calendar:Organizer",
    "calendar:RequiredAttendees", "calendar:OptionalAttendees", "calendar:Resources", "calendar:Duration",
    "calendar:TimeZone", "calendar:AppointmentSequenceNumber", "calendar:AppointmentState", "calendar:Recurrence",
    "calendar:FirstOccurrence", "calendar:LastOccurrence", "calendar:ModifiedOccurrences",
    "calendar:DeletedOccurrences", "calendar:StartTimeZone", "calendar:EndTimeZone", "calendar:ConferenceType",
    "calendar:AllowNewTimeProposal", "calendar:IsOnlineMeeting",
]
KNOWN_URIS = set(WRITERS) | set(_ATTENDEE_URIS) | IGNORED_URIS


def check_shape(shape: Shape) -> None:
    for uri in shape.uris:
        if uri not in KNOWN_URIS and not uri.startswith(("item:", "calendar:", "message:", "meeting:",
                                                          "meetingRequest:", "folder:", "contacts:",
                                                          "task:", "postitem:", "conversation:", "persona:",
                                                          "distributionlist:")):
            raise EwsError("ErrorInvalidPropertyRequest", f"The property {uri} is not valid for this object type.")


def _ext_value(v: View, key: ExtKey) -> Any:
    computed = ITEM_PROPERTIES.get(key)
    if computed is not None:
        return computed(v)
    pset, name, _ptype = key
    if pset == "Meeting" and name == "35":
        return v.item.goid
    if pset == "Appointment" and name == "33281":  # PidLidAppointmentSequence, on meetings and their responses
        return v.item.meeting_seq
    if pset == "Meeting" and name == "3":
        if isinstance(v.item, MeetingMessage):
            return _goid_with_instance(v.item.goid, v.item.recurrence_id)
        return _goid_with_instance(v.item.goid, v.inst.original_start if v.inst else None)
    return (v.item.ext or {}).get(key)


def write_ext(parent: etree._Element, v: View, uri_el: etree._Element) -> None:
    key = ext_key(uri_el)
    value = _ext_value(v, key)
    if value is None:
        return
    el = sub(parent, "t:ExtendedProperty")
    etree.SubElement(el, t("ExtendedFieldURI"), dict(uri_el.attrib))
    values = value if isinstance(value, list) else None
    if values is not None:
        vs = sub(el, "t:Values")
        for x in values:
            sub(vs, "t:Value", ext_text(x))
    else:
        sub(el, "t:Value", ext_text(value))


def ext_text(value: Any) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


# -- the fast path: an item's XML written as text, spliced into the response by the server --------------------
# The fields of the hot reads (a CalendarView, a GetItem of meetings, a SyncFolderItems page) are written
# straight as text, byte for byte what the element tree above serialises to (tests/test_simulator_render.py
# compares the two); a shape with any other field is rendered as elements. See soap.fragment for the splice.
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})
_ATTR_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\n": "&#10;",
                               "\r": "&#13;", "\t": "&#9;"})
_TEXT_SPECIAL = re.compile(r"[&<>\r]")
_ATTR_SPECIAL = re.compile(r'[&<>"\n\r\t]')


def _esc(text: str) -> str:
    return text.translate(_TEXT_ESCAPES) if _TEXT_SPECIAL.search(text) else text


def _esc_attr(text: str) -> str:
    return text.translate(_ATTR_ESCAPES) if _ATTR_SPECIAL.search(text) else text


def _el(tag: str, value: Any) -> str:
    """``sub(parent, tag, value)`` as text (None: an empty element; "": an element with empty text, as lxml)."""
    key = (tag, value.__class__, value)  # the class too: True == 1, but one is written "true"
    text = _ELEMENTS.get(key)
    if text is None:
        if len(_ELEMENTS) >= 100_000:
            _ELEMENTS.clear()
        if value is None:
            text = f"<{tag}/>"
        else:
            text = f"<{tag}>{_esc(value if type(value) is str else xs_text(value))}</{tag}>"
        _ELEMENTS[key] = text
    return text


# Elements written lately, by (tag, class, value): most values repeat (Busy, Normal, Occurrence, a room's name,
# the meeting's subject on every occurrence, the same slots day after day); a lookup is 10x cheaper than writing.
_ELEMENTS: dict[tuple[str, type, Any], str] = {}


def _empty(tag: str, **attrs: Any) -> str:
    """``sub(parent, tag, **attrs)`` as text."""
    pairs = "".join(f' {k}="{_esc_attr(v if type(v) is str else xs_text(v))}"' for k, v in attrs.items()
                    if v is not None)
    return f"<{tag}{pairs}/>"


def _f_mailbox(tag: str, person: Any) -> str:
    return (f"<{tag}>{_el('t:Name', person.name)}{_el('t:EmailAddress', person.email)}"
            f"{_el('t:RoutingType', person.routing)}{_el('t:MailboxType', person.mailbox_type)}</{tag}>")


def _f_attendees(tag: str, attr: str) -> Callable[[View], str]:
    def write(v: View) -> str:
        atts: tuple[Attendee, ...] = getattr(v.item, attr)
        if not atts:
            return ""
        out = [f"<{tag}>"]
        for a in atts:
            out.append("<t:Attendee>")
            out.append(_f_mailbox("t:Mailbox", a.person))
            if a.response:
                out.append(_el("t:ResponseType", a.response))
            if a.response_time is not None:
                out.append(_el("t:LastResponseTime", a.response_time))
            out.append("</t:Attendee>")
        out.append(f"</{tag}>")
        return "".join(out)
    return write


def _f_item_id(v: View) -> str:
    iid, ck = v.item_id
    return f'<t:ItemId Id="{iid}" ChangeKey="{ck}"/>'  # base64: nothing to escape


def _f_parent(v: View) -> str:
    f = v.item.folder
    return _empty("t:ParentFolderId", Id=f.id, ChangeKey=f.change_key)


def _f_categories(v: View) -> str:
    if not v.item.categories:
        return ""
    return "<t:Categories>" + "".join(_el("t:String", c) for c in v.item.categories) + "</t:Categories>"


def _f_tz(tag: str) -> Callable[[View], str]:
    def write(v: View) -> str:
        tz = _esc_attr(v.item.tz)
        return f'<{tag} Id="{tz}" Name="{tz}"/>'
    return write


# URI -> (the element it writes, its writer as text); _Simple fields join them below.
_FAST: dict[str, tuple[str, Callable[[View], str]]] = {
    "item:ItemId": ("t:ItemId", _f_item_id),
    "item:ParentFolderId": ("t:ParentFolderId", _f_parent),
    "item:Categories": ("t:Categories", _f_categories),
    "item:Size": ("t:Size", lambda v: _el("t:Size", 900 + len(v.item.subject or "") + len(v.item.body or ""))),
    "calendar:Start": ("t:Start", lambda v: _el("t:Start", v.start)),
    "calendar:End": ("t:End", lambda v: _el("t:End", v.end)),
    "calendar:OriginalStart": ("t:OriginalStart",
                               lambda v: _el("t:OriginalStart", v.inst.original_start) if v.inst else ""),
    "calendar:RecurrenceId": ("t:RecurrenceId",
                              lambda v: _el("t:RecurrenceId", v.inst.original_start) if v.inst else ""),
    "calendar:Organizer": ("t:Organizer", lambda v: "<t:Organizer>" + _f_mailbox(
        "t:Mailbox", v.item.organizer or v.item.mailbox.person) + "</t:Organizer>"),
    "calendar:StartTimeZone": ("t:StartTimeZone", _f_tz("t:StartTimeZone")),
    "calendar:EndTimeZone": ("t:EndTimeZone", _f_tz("t:EndTimeZone")),
    **{uri: (tag, _f_attendees(tag, attr)) for uri, (tag, attr) in _ATTENDEE_URIS.items()},
    **{uri: (w.tag, w.fast) for uri, w in WRITERS.items() if isinstance(w, _Simple)},
}


# Fields that differ between the occurrences of a series (that are no exceptions); the rest are written once per
# series and answer: a CalendarView of a room is mostly occurrences of a few weekly series.
_PER_INSTANCE = {"item:ItemId", "calendar:Start", "calendar:End", "calendar:OriginalStart", "calendar:RecurrenceId",
                 "calendar:CalendarItemType", "calendar:IsRecurring", "calendar:Duration"}


def _f_ext(uri_el: etree._Element) -> tuple[Callable[[View], str], bool]:
    """The writer of one ExtendedProperty, and whether it differs between occurrences."""
    key = ext_key(uri_el)
    field_uri = _empty("t:ExtendedFieldURI", **dict(uri_el.attrib))

    def write(v: View) -> str:
        value = _ext_value(v, key)
        if value is None:
            return ""
        if isinstance(value, list):
            values = "<t:Values>" + "".join(_el("t:Value", ext_text(x)) for x in value) + "</t:Values>"
        else:
            values = _el("t:Value", ext_text(value))
        return f"<t:ExtendedProperty>{field_uri}{values}</t:ExtendedProperty>"
    # computed ones may read the instance (its start, end, ...); the GlobalObjectId carries the instance's date
    return write, key in ITEM_PROPERTIES or key[:2] == ("Meeting", "3")


class _Plan:
    """How render_fast writes a CalendarItem of one shape: its writers in schema order, and which of them differ
    between the occurrences of a series."""

    __slots__ = ("per_instance", "writers")

    def __init__(self, steps: list[tuple[Callable[[View], str], bool]]) -> None:
        self.writers = tuple(w for w, _ in steps)
        self.per_instance = tuple(p for _, p in steps)

    def text(self, v: View, series: dict[tuple[int, int, int], list[str | None]]) -> str:
        """The item's XML; ``series`` holds what was written for each series in this answer so far."""
        inst = v.inst
        if inst is None or inst.exception is not None:
            inner = "".join([w(v) for w in self.writers])
        else:
            it = v.item
            key = (it.iid, it.seq, it.version)
            shared = series.get(key)
            if shared is None:
                shared = series[key] = [None if p else w(v) for w, p in zip(self.writers, self.per_instance,
                                                                             strict=True)]
            inner = "".join([w(v) if s is None else s for w, s in zip(self.writers, shared, strict=True)])
        return f"<t:CalendarItem>{inner}</t:CalendarItem>" if inner else "<t:CalendarItem/>"


def _plan(shape: Shape) -> _Plan | None:
    """How to write a CalendarItem in ``shape`` as text; None if a field has no fast writer."""
    if shape.plan is False:
        key = (shape.base, tuple(shape.uris), tuple(tuple(el.attrib.items()) for el in shape.ext))
        if key not in _PLANS:
            if len(_PLANS) >= 256:
                _PLANS.clear()
            _PLANS[key] = _plan_of(shape)
        shape.plan = _PLANS[key]
    return shape.plan


_PLANS: dict[tuple[Any, ...], _Plan | None] = {}  # clients ask for the same few shapes on every call


def _plan_of(shape: Shape) -> _Plan | None:
    order = _tag_order("CalendarItemType")
    steps: list[tuple[int, Callable[[View], str], bool]] = []
    for uri in shape.field_uris():
        if uri not in WRITERS and uri not in _ATTENDEE_URIS:
            continue  # nothing to say about it (the element tree leaves it out too)
        fast = _FAST.get(uri)
        if fast is None:
            return None
        steps.append((order.get(t(fast[0].partition(":")[2]), 999), fast[1], uri in _PER_INSTANCE))
    ext_at = order.get(t("ExtendedProperty"), 999)
    steps += [(ext_at, *_f_ext(uri_el)) for uri_el in shape.ext]
    steps.sort(key=lambda s: s[0])  # stable: as the element tree's sort of the children
    return _Plan([(w, p) for _, w, p in steps])


def render_fast(parent: etree._Element, view: View, shape: Shape) -> None:
    """``render``, as text spliced in by the server where the shape allows (the hot reads), else as elements."""
    render_all(parent, [view], shape)


def item_text(view: View, shape: Shape) -> str | None:
    """The item's XML as render_fast writes it; None where it is written as elements."""
    plan = _plan(shape)
    if plan is None or isinstance(view.item, MeetingMessage):
        return None
    return plan.text(view, shape.series)


def render_all(parent: etree._Element, views: Iterable[View], shape: Shape) -> None:
    """``render_fast`` of each view in turn; consecutive ones written as text go in as one fragment."""
    plan = _plan(shape)
    texts: list[str] = []
    for view in views:
        if plan is not None and not isinstance(view.item, MeetingMessage):
            texts.append(plan.text(view, shape.series))
            continue
        if texts:
            fragment(parent, "".join(texts))
            texts = []
        render(parent, view, shape)
    if texts:
        fragment(parent, "".join(texts))


def render(parent: etree._Element, view: View, shape: Shape) -> etree._Element:
    """Append one t:CalendarItem (or t:MeetingResponse) with the fields ``shape`` asks for, in schema order."""
    if isinstance(view.item, MeetingMessage):
        return _render_message(parent, view, shape)
    el = etree.SubElement(parent, t("CalendarItem"))
    for uri in shape.field_uris():
        if uri in _ATTENDEE_URIS:
            tag, attr = _ATTENDEE_URIS[uri]
            _attendees(tag, getattr(view.item, attr))(el, view)
            continue
        writer = WRITERS.get(uri)
        if writer is None:
            continue
        if uri == "item:Body":
            _w_body(el, view, shape.body_type)
        else:
            writer(el, view)
    for uri_el in shape.ext:
        write_ext(el, view, uri_el)
    order = _tag_order("CalendarItemType")
    keys = [order.get(c.tag, 999) for c in el]
    if keys != sorted(keys):
        el[:] = sorted(el, key=lambda c: order.get(c.tag, 999))
    return el


# -- meeting responses (messages.MeetingMessage) --------------------------------------------------------
def _msg(v: View) -> MeetingMessage:
    assert isinstance(v.item, MeetingMessage)
    return v.item


def _recipient(tag: str, person: Callable[[MeetingMessage], Any]) -> Callable[[etree._Element, View], None]:
    def write(parent: etree._Element, v: View) -> None:
        _mailbox(sub(parent, tag), "t:Mailbox", person(_msg(v)))
    return write


def _w_to(parent: etree._Element, v: View) -> None:
    el = sub(parent, "t:ToRecipients")
    for person in _msg(v).recipients:
        _mailbox(el, "t:Mailbox", person)


def _w_associated(parent: etree._Element, v: View) -> None:
    msg = _msg(v)
    item = v.directory.item(msg.associated_iid) if msg.associated_iid is not None else None
    if item is not None:
        sub(parent, "t:AssociatedCalendarItemId", Id=ids.item_id(item.mailbox.idx, item.iid),
            ChangeKey=ids.change_key(item.iid, item.version))


_MESSAGE_SHARED = (
    "item:ItemId", "item:ParentFolderId", "item:ItemClass", "item:Subject", "item:Sensitivity", "item:Body",
    "item:DateTimeReceived", "item:Size", "item:Importance", "item:IsSubmitted", "item:IsDraft", "item:IsFromMe",
    "item:IsResend", "item:IsUnmodified", "item:DateTimeSent", "item:DateTimeCreated", "item:HasAttachments",
    "item:Culture", "item:LastModifiedName", "item:LastModifiedTime", "item:IsAssociated", "item:TextBody",
    "calendar:DateTimeStamp", "calendar:Start", "calendar:End", "calendar:Location",
)
MESSAGE_WRITERS: dict[str, Callable[[etree._Element, View], None]] = {
    "item:MimeContent": _w_mime,
    **{uri: WRITERS[uri] for uri in _MESSAGE_SHARED},
    "item:Categories": _w_categories,
    "item:ReminderIsSet": _simple("t:ReminderIsSet", lambda v: False),
    "item:DisplayTo": _simple("t:DisplayTo", lambda v: "; ".join(p.name for p in _msg(v).recipients)),
    "message:Sender": _recipient("t:Sender", lambda m: m.sender),
    "message:From": _recipient("t:From", lambda m: m.sender),
    "message:ToRecipients": _w_to,
    "message:ReceivedBy": _recipient("t:ReceivedBy", lambda m: m.received_by),
    "message:ReceivedRepresenting": _recipient("t:ReceivedRepresenting", lambda m: m.received_by),
    "message:IsRead": _simple("t:IsRead", lambda v: _msg(v).is_read),
    "message:IsResponseRequested": _simple("t:IsResponseRequested", lambda v: False),
    "message:IsReadReceiptRequested": _simple("t:IsReadReceiptRequested", lambda v: False),
    "message:IsDeliveryReceiptRequested": _simple("t:IsDeliveryReceiptRequested", lambda v: False),
    "message:ConversationTopic": _simple("t:ConversationTopic",
                                         lambda v: v.item.subject.split(": ", 1)[-1] if v.item.subject else None),
    "message:InternetMessageId": _simple("t:InternetMessageId",
                                         lambda v: f"<{v.item.iid}.{v.item.created.timestamp():.0f}@"
                                                   f"{v.item.mailbox.smtp.split('@')[-1]}>"),
    "meeting:AssociatedCalendarItemId": _w_associated,
    "meeting:IsDelegated": _simple("t:IsDelegated", lambda v: False),
    "meeting:IsOutOfDate": _simple("t:IsOutOfDate", lambda v: False),
    "meeting:HasBeenProcessed": _simple("t:HasBeenProcessed", lambda v: True),
    "meeting:ResponseType": _simple("t:ResponseType", lambda v: _msg(v).response_type),
    "calendar:UID": _simple("t:UID", lambda v: v.item.uid),
    "calendar:RecurrenceId": _simple("t:RecurrenceId", lambda v: _msg(v).recurrence_id),
    "calendar:IsOrganizer": _simple("t:IsOrganizer", lambda v: False),
    "calendar:CalendarItemType": _simple("t:CalendarItemType",
                                         lambda v: "Single" if _msg(v).recurrence_id is None else "Occurrence"),
}
MESSAGE_DEFAULT_FIELDS = [
    "item:ItemId", "item:ParentFolderId", "item:ItemClass", "item:Subject", "item:Sensitivity",
    "item:HasAttachments", "item:IsAssociated", "message:Sender", "message:ToRecipients", "message:From",
    "message:IsRead", "meeting:AssociatedCalendarItemId", "meeting:IsDelegated", "meeting:IsOutOfDate",
    "meeting:HasBeenProcessed", "meeting:ResponseType", "calendar:UID",
]
MESSAGE_ALL_FIELDS = [
    *MESSAGE_DEFAULT_FIELDS, "item:Body", "item:DateTimeReceived", "item:Size", "item:Importance",
    "item:DateTimeSent", "item:DateTimeCreated", "item:LastModifiedTime", "message:ConversationTopic",
    "message:InternetMessageId", "message:ReceivedBy", "calendar:RecurrenceId", "calendar:Start", "calendar:End",
    "calendar:Location",
]


def _render_message(parent: etree._Element, view: View, shape: Shape) -> etree._Element:
    el = etree.SubElement(parent, t("MeetingResponse"))
    base = {"IdOnly": ["item:ItemId"], "AllProperties": MESSAGE_ALL_FIELDS}.get(shape.base, MESSAGE_DEFAULT_FIELDS)
    seen: set[str] = set()
    for uri in [*base, *shape.uris]:
        if uri in seen:
            continue
        seen.add(uri)
        writer = MESSAGE_WRITERS.get(uri)
        if writer is None:
            continue  # a property of another item type (a client asks for the union over an Inbox's types)
        if uri == "item:Body":
            _w_body(el, view, shape.body_type)
        else:
            writer(el, view)
    for uri_el in shape.ext:
        write_ext(el, view, uri_el)
    order = _tag_order("MeetingResponseMessageType")
    el[:] = sorted(el, key=lambda c: order.get(c.tag, 999))
    return el


@functools.cache
def _tag_order(type_name: str) -> dict[str, int]:
    """Child element (Clark name) -> position in the schema's sequence for ``type_name``."""
    return {f"{{{TNS}}}{name}": i for name, i in child_order(type_name).items()}


# -- parsing -----------------------------------------------------------------------------------------
def _local(el: etree._Element) -> str:
    return etree.QName(el).localname


def parse_recurrence(el: etree._Element) -> Recurrence:
    pattern, rng = el[0], el[1]
    kind = _local(pattern).removesuffix("Recurrence")
    vals = {_local(c): (c.text or "").strip() for c in pattern}
    rec = Recurrence(kind=kind)
    if "Interval" in vals:
        rec.interval = max(1, int(vals["Interval"]))
    if "DaysOfWeek" in vals:
        days = tuple(vals["DaysOfWeek"].split())
        for d in days:
            if d not in WEEKDAYS and d not in ("Day", "Weekday", "WeekendDay"):
                raise EwsError("ErrorCalendarInvalidRecurrence", f"Invalid day of week {d!r}.")
        rec.days_of_week = days
    if "FirstDayOfWeek" in vals:
        rec.first_day_of_week = vals["FirstDayOfWeek"]
    if "DayOfMonth" in vals:
        rec.day_of_month = int(vals["DayOfMonth"])
    if "DayOfWeekIndex" in vals:
        if vals["DayOfWeekIndex"] not in WEEK_INDEX:
            raise EwsError("ErrorCalendarInvalidRecurrence", "Invalid DayOfWeekIndex.")
        rec.day_of_week_index = vals["DayOfWeekIndex"]
    if "Month" in vals:
        if vals["Month"] not in MONTHS:
            raise EwsError("ErrorCalendarInvalidRecurrence", "Invalid Month.")
        rec.month = vals["Month"]
    rvals = {_local(c): (c.text or "").strip() for c in rng}
    rec.start_date = _parse_date(rvals["StartDate"])
    if _local(rng) == "EndDateRecurrence":
        rec.end_date = _parse_date(rvals["EndDate"])
        if rec.end_date < rec.start_date:
            raise EwsError("ErrorCalendarInvalidRecurrence", "The recurrence ends before it starts.")
    elif _local(rng) == "NumberedRecurrence":
        rec.count = int(rvals["NumberOfOccurrences"])
        if rec.count < 1:
            raise EwsError("ErrorCalendarInvalidRecurrence", "NumberOfOccurrences must be positive.")
    return rec


def _parse_date(text: str) -> date:
    # xs:date may carry an offset ("2026-11-23+01:00" or "2026-11-23Z"); the date part is what counts.
    return date.fromisoformat(text[:10])


@dataclass
class ItemFields:
    """The fields a CreateItem/UpdateItem carried, already typed."""

    values: dict[str, Any] = field(default_factory=dict)
    ext: dict[ExtKey, Any] = field(default_factory=dict)
    mime: Imported | None = None  # what a MimeContent carried beyond values (EXDATEs, modified occurrences)


def parse_attendees(el: etree._Element, directory: Directory) -> tuple[Attendee, ...]:
    out = []
    for att in el:
        mb_el = att.find(t("Mailbox"))
        if mb_el is None:
            continue
        email = (mb_el.findtext(t("EmailAddress")) or "").strip()
        name = (mb_el.findtext(t("Name")) or "").strip()
        if not email:
            raise EwsError("ErrorInvalidRecipients", "An attendee has no e-mail address.")
        out.append(Attendee(directory.person(email, name)))
    return tuple(out)


def ext_from_xml(prop: etree._Element) -> tuple[ExtKey, Any]:
    uri = prop.find(t("ExtendedFieldURI"))
    if uri is None:
        raise EwsError("ErrorInvalidExtendedProperty", "ExtendedProperty without ExtendedFieldURI.")
    key = ext_key(uri)
    values = prop.find(t("Values"))
    if values is not None:
        return key, [_ext_parse(key[2], v.text or "") for v in values]
    return key, _ext_parse(key[2], prop.findtext(t("Value")) or "")


_INTEGER_TYPES = ("Short", "Integer", "Long", "Error", "Currency")


def _ext_parse(ptype: str, text: str) -> Any:
    """A value of MAPI type ``ptype`` as Exchange stores it (so restrictions compare numbers as numbers)."""
    base = ptype.removesuffix("Array")
    try:
        if base == "Binary":
            return base64.b64decode(text, validate=True)
        if base in _INTEGER_TYPES:
            return int(text)
        if base in ("Float", "Double", "ApplicationTime"):
            return float(text)
        if base == "Boolean":
            return parse_bool(text)
        if base == "SystemTime":
            return parse_datetime(text)
    except ValueError as e:
        raise EwsError("ErrorInvalidExtendedPropertyValue",
                       f"The value {text!r} is not valid for an extended property of type {ptype}.") from e
    return text


def parse_item(el: etree._Element, directory: Directory, tz_context: str | None = None) -> ItemFields:
    """Read a t:CalendarItem (CreateItem) into typed values; times without offset use StartTimeZone."""
    out = ItemFields()
    start_tz = tz_context
    for c in el:
        if _local(c) in ("StartTimeZone", "MeetingTimeZone") and c.get("Id"):
            start_tz = c.get("Id")
    for c in el:
        name = _local(c)
        text = (c.text or "").strip()
        if name == "MimeContent":  # first in the schema's order: the explicit properties after it win
            out.mime = _parse_mime(text, directory, tz_context)
            out.values.update(out.mime.values)
        elif name == "Subject":
            out.values["subject"] = c.text or ""
        elif name == "Body":
            out.values["body"] = c.text or ""
            out.values["body_type"] = c.get("BodyType", "HTML")
        elif name == "Sensitivity":
            out.values["sensitivity"] = text
        elif name == "Importance":
            out.values["importance"] = text
        elif name == "Categories":
            out.values["categories"] = tuple((s.text or "") for s in c)
        elif name == "ReminderIsSet":
            out.values["reminder_set"] = parse_bool(text)
        elif name == "ReminderMinutesBeforeStart":
            out.values["reminder"] = int(text)
        elif name == "ExtendedProperty":
            key, value = ext_from_xml(c)
            out.ext[key] = value
        elif name == "UID":
            out.values["uid"] = text
        elif name in ("Start", "End"):
            out.values[name.lower()] = parse_datetime(text, zone(start_tz) if start_tz else None)
        elif name == "IsAllDayEvent":
            out.values["all_day"] = parse_bool(text)
        elif name == "LegacyFreeBusyStatus":
            out.values["free_busy"] = text
        elif name == "Location":
            out.values["location"] = c.text or ""
        elif name == "IsResponseRequested":
            out.values["response_requested"] = parse_bool(text, True)
        elif name in ("RequiredAttendees", "OptionalAttendees", "Resources"):
            which = {"RequiredAttendees": "required", "OptionalAttendees": "optional", "Resources": "resources"}[name]
            out.values[which] = parse_attendees(c, directory)
        elif name == "Recurrence":
            out.values["recurrence"] = parse_recurrence(c)
        elif name in ("StartTimeZone", "MeetingTimeZone"):
            out.values["tz"] = c.get("Id") or "UTC"
        elif name == "EndTimeZone":
            out.values["end_tz"] = c.get("Id") or "UTC"  # one zone per item is modelled: the start's
        elif name == "NetShowUrl":
            out.values["online_url"] = text
        elif name == "ItemClass":
            out.values["item_class"] = text
    return out


def _parse_mime(text: str, directory: Directory, tz_context: str | None) -> Imported:
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as e:
        raise EwsError("ErrorMimeContentInvalid", "The MimeContent is not base64.") from e
    imported = from_ics(data, tz_context)
    for kind, address, name in imported.attendees:
        imported.values[kind] = (*imported.values.get(kind, ()), Attendee(directory.person(address, name)))
    return imported


def all_day_bounds(start: datetime, end: datetime, tz: str) -> tuple[datetime, datetime]:
    """Exchange pushes all-day items out to the surrounding midnights of the creating time zone."""
    z = zone(tz)
    ls, le = start.astimezone(z), end.astimezone(z)
    s = datetime(ls.year, ls.month, ls.day, tzinfo=z)
    e = datetime(le.year, le.month, le.day, tzinfo=z)
    if e < le or e <= s:
        e = e + timedelta(days=1) if e < le else s + timedelta(days=1)
    return s.astimezone(UTC), e.astimezone(UTC)


__all__ = ["TNS", "ExtKey", "Shape", "View", "all_day_bounds", "ext_key", "parse_item", "render"]
