"""GetServerTimeZones and GetUserAvailability (free/busy), as Exchange 2016's availability service answers them.

GetUserAvailability reads and writes times in the request's ``t:TimeZone`` (a SerializableTimeZone: bias plus a
yearly standard/daylight rule); a dateTime with an offset or Z means exactly that instant. Request-level problems
(too many mailboxes, a bad time window or merge interval) are SOAP faults, as the availability service raises
them; an unknown mailbox is an error in that mailbox's own FreeBusyResponse.
"""

from __future__ import annotations

import asyncio
import base64
import math
from datetime import UTC, datetime, timedelta, tzinfo

from lxml import etree

from gateway.simulator import ids, timezones
from gateway.simulator.calendar import Instance, zone
from gateway.simulator.mailboxes import Mailbox
from gateway.simulator.ops import Context, operation
from gateway.simulator.schema import MNS, TNS
from gateway.simulator.soap import ENS, EwsError, Responses, parse_bool, parse_datetime, sub

MAX_MAILBOXES = 100
MAX_WINDOW_DAYS = 42
DEFAULT_INTERVAL = 30
VIEWS = ("MergedOnly", "FreeBusy", "FreeBusyMerged", "Detailed", "DetailedMerged")
MERGED_VIEWS = ("MergedOnly", "FreeBusyMerged", "DetailedMerged")
DETAILED_VIEWS = ("Detailed", "DetailedMerged")
# MergedFreeBusy digits, and which status wins when events overlap a slot
DIGITS = {"Free": "0", "Tentative": "1", "Busy": "2", "OOF": "3", "WorkingElsewhere": "4", "NoData": "5"}
PRIORITY = {"Free": 0, "WorkingElsewhere": 1, "Tentative": 2, "Busy": 3, "OOF": 4}
# Exchange's default working hours (Set-MailboxCalendarConfiguration): Monday to Friday, 08:00-17:00
WORK_DAYS = "Monday Tuesday Wednesday Thursday Friday"
WORK_START, WORK_END = 8 * 60, 17 * 60


def _m(tag: str) -> str:
    return f"{{{MNS}}}{tag}"


def _t(tag: str) -> str:
    return f"{{{TNS}}}{tag}"


# -- GetServerTimeZones ----------------------------------------------------------------------------------------
def _all_zones() -> list[timezones.WindowsZone]:
    return [z for z in (timezones.definition(i) for i in timezones.known_ids()) if z is not None]


@operation("GetServerTimeZones")
async def get_server_time_zones(ctx: Context, body: etree._Element) -> etree._Element:
    full = parse_bool(body.get("ReturnFullTimeZoneData"), False)
    ids_el = body.find(_m("Ids"))
    out = Responses("GetServerTimeZones")
    if ids_el is None:
        found = await asyncio.to_thread(_all_zones)  # ~0.35 s the first time, cached after
    else:
        found = []
        for id_el in ids_el:
            ms_id = (id_el.text or "").strip()
            z = timezones.definition(ms_id)
            if z is None:
                # UNVERIFIED: the code and text Exchange gives for an unknown id.
                msg = out.error(EwsError("ErrorTimeZone", f"The specified time zone isn't valid: {ms_id}"))
                sub(msg, "m:TimeZoneDefinitions")  # required by the schema even in an error
                return out.root
            found.append(z)
    msg = out.success()
    defs = sub(msg, "m:TimeZoneDefinitions")
    for z in found:
        timezones.write_definition(defs, z, full=full)
    return out.root


# -- GetUserAvailability ---------------------------------------------------------------------------------------
def _fault(code: str, text: str) -> EwsError:
    return EwsError(code, text, fault=True)


def _request_zone(ctx: Context, body: etree._Element) -> tzinfo:
    tz_el = body.find(_t("TimeZone"))
    if tz_el is not None:
        return timezones.SerializableZone.parse(tz_el).tzinfo()
    if ctx.tz_context:
        return zone(ctx.tz_context)
    return UTC


def _local(value: datetime, tz: tzinfo) -> str:
    return value.astimezone(tz).strftime("%Y-%m-%dT%H:%M:%S")


def _events(mailbox: Mailbox, start: datetime, end: datetime) -> list[Instance]:
    """Calendar instances overlapping the window that make the mailbox anything but free."""
    found: list[Instance] = []
    for item in list(mailbox.calendar.items.values()):
        for inst in item.instances(start, end):
            if inst.free_busy in ("Free", "NoData"):
                continue
            found.append(inst)
    found.sort(key=lambda i: (i.start, i.end))
    return found


def merged_free_busy(events: list[Instance], start: datetime, end: datetime, interval: int) -> str:
    """One digit per ``interval`` minutes from ``start``: the strongest status of the events touching the slot."""
    step = timedelta(minutes=interval)
    slots = math.ceil((end - start) / step)
    out = []
    for n in range(slots):
        s, e = start + n * step, start + (n + 1) * step
        best = "Free"
        for ev in events:
            if ev.start < e and ev.end > s and PRIORITY.get(ev.free_busy, 0) > PRIORITY[best]:
                best = ev.free_busy
        out.append(DIGITS[best])
    return "".join(out)


def _details_id(inst: Instance) -> str:
    """A hex entry id, as Exchange reports it (not an EWS ItemId)."""
    raw = base64.b64decode(ids.item_id(inst.item.mailbox.idx, inst.item.iid))
    return raw.hex().upper() + (f"{inst.index:08X}" if inst.index else "")


def _write_view(parent: etree._Element, ctx: Context, mailbox: Mailbox, view: str, start: datetime,
                end: datetime, interval: int, tz: tzinfo) -> None:
    fbv = sub(parent, "m:FreeBusyView")
    sub(fbv, "t:FreeBusyViewType", view)
    events = _events(mailbox, start, end)
    if view in MERGED_VIEWS:
        sub(fbv, "t:MergedFreeBusy", merged_free_busy(events, start, end, interval))
    if view != "MergedOnly":
        arr = sub(fbv, "t:CalendarEventArray")
        owner = ctx.mailbox is mailbox
        for inst in events:
            ev = sub(arr, "t:CalendarEvent")
            sub(ev, "t:StartTime", _local(inst.start, tz))
            sub(ev, "t:EndTime", _local(inst.end, tz))
            sub(ev, "t:BusyType", inst.free_busy)
            if view in DETAILED_VIEWS:
                item = inst.item
                private = item.sensitivity == "Private"
                det = sub(ev, "t:CalendarEventDetails")
                if not private or owner:
                    sub(det, "t:ID", _details_id(inst))
                    sub(det, "t:Subject", inst.subject)
                    if inst.location:
                        sub(det, "t:Location", inst.location)
                sub(det, "t:IsMeeting", item.is_meeting)
                sub(det, "t:IsRecurring", item.recurrence is not None)
                sub(det, "t:IsException", inst.item_type == "Exception")
                sub(det, "t:IsReminderSet", item.reminder is not None)
                sub(det, "t:IsPrivate", private)
    hours = sub(fbv, "t:WorkingHours")
    wz = timezones.definition(mailbox.working_tz) or timezones.definition("UTC")
    assert wz is not None
    wz.serializable(start.astimezone(UTC).year).write(hours, "t:TimeZone")
    periods = sub(hours, "t:WorkingPeriodArray")
    period = sub(periods, "t:WorkingPeriod")
    sub(period, "t:DayOfWeek", WORK_DAYS)
    sub(period, "t:StartTimeInMinutes", WORK_START)
    sub(period, "t:EndTimeInMinutes", WORK_END)


def _not_found(parent: etree._Element, address: str) -> None:
    msg = sub(parent, "m:ResponseMessage", ResponseClass="Error")
    sub(msg, "m:MessageText", f"Unable to resolve e-mail address <>SMTP:{address} to an Active Directory object.")
    sub(msg, "m:ResponseCode", "ErrorMailRecipientNotFound")
    sub(msg, "m:DescriptiveLinkKey", 0)
    mx = sub(msg, "m:MessageXml")
    exc = etree.SubElement(mx, f"{{{ENS}}}ExceptionType", nsmap={"e": ENS})
    exc.text = "Microsoft.Exchange.InfoWorker.Common.Availability.MailRecipientNotFoundException"
    fbv = sub(parent, "m:FreeBusyView")
    sub(fbv, "t:FreeBusyViewType", "None")


@operation("GetUserAvailabilityRequest")
async def get_user_availability(ctx: Context, body: etree._Element) -> etree._Element:
    tz = _request_zone(ctx, body)
    array = body.find(_m("MailboxDataArray"))
    entries = [el for el in (array if array is not None else []) if el.tag == _t("MailboxData")]
    if not entries:
        raise _fault("ErrorMailboxDataArrayEmpty", "The MailboxData array is empty. Specify at least one mailbox.")
    if len(entries) > MAX_MAILBOXES:
        raise _fault("ErrorMailboxDataArrayTooBig",
                     f"There are too many target users in the EmailAddress array. The allowed size = "
                     f"{MAX_MAILBOXES}; the actual size = {len(entries)}.")
    opts = body.find(_t("FreeBusyViewOptions"))
    if opts is None:
        if body.find(_t("SuggestionsViewOptions")) is not None:
            raise _fault("ErrorInvalidRequest", "The simulator does not implement SuggestionsViewOptions.")
        raise _fault("ErrorInvalidRequest", "Specify FreeBusyViewOptions or SuggestionsViewOptions.")
    window = opts.find(_t("TimeWindow"))
    assert window is not None  # the schema requires it
    start = parse_datetime(window.findtext(_t("StartTime")) or "", tz)
    end = parse_datetime(window.findtext(_t("EndTime")) or "", tz)
    if end <= start:
        raise _fault("ErrorInvalidTimeInterval",
                     "The time duration specified for FreeBusyViewOptions.TimeWindow is invalid.")
    if end - start > timedelta(days=MAX_WINDOW_DAYS):
        raise _fault("ErrorTimeIntervalTooBig",
                     f"The requested time duration specified for FreeBusyViewOptions.TimeWindow is too long. The "
                     f"allowed limit = {MAX_WINDOW_DAYS} days; the actual limit = "
                     f"{math.ceil((end - start) / timedelta(days=1))} days.")
    interval_text = opts.findtext(_t("MergedFreeBusyIntervalInMinutes"))
    interval = int(interval_text) if interval_text else DEFAULT_INTERVAL
    if not 5 <= interval <= 1440 or timedelta(minutes=interval) > end - start:
        raise _fault("ErrorInvalidMergedFreeBusyInterval",
                     "The specified merged free/busy interval is not valid. Specify an interval that is less than "
                     "the free/busy time window and between 5 and 1440 minutes.")
    view = (opts.findtext(_t("RequestedView")) or "Detailed").strip()
    if view not in VIEWS:
        raise _fault("ErrorInvalidFreeBusyViewType", f"The requested free/busy view type {view} is not valid.")

    root = etree.Element(_m("GetUserAvailabilityResponse"), nsmap={"m": MNS, "t": TNS})
    responses = sub(root, "m:FreeBusyResponseArray")
    for entry in entries:
        fbr = sub(responses, "m:FreeBusyResponse")
        email = entry.find(_t("Email"))
        address = (email.findtext(_t("Address")) if email is not None else None) or ""
        mailbox = ctx.directory.find(address.strip())
        if mailbox is None:
            _not_found(fbr, address.strip())
            continue
        msg = sub(fbr, "m:ResponseMessage", ResponseClass="Success")
        sub(msg, "m:ResponseCode", "NoError")
        _write_view(fbr, ctx, mailbox, view, start, end, interval, tz)
    return root
