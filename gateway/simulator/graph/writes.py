"""Writing routes, with Exchange's meeting semantics (they go through gateway/simulator/actions.py, as EWS writes
do): create (``transactionId`` makes a retried POST return the first event), update, delete, cancel as the
organiser, accept/tentatively accept/decline as an attendee (a room with its own copy's id), and getSchedule.

An event with a room among its attendees sends the invitation; the room's booking attendant answers it later
whichever side the room lives on, as hybrid mail flow carries the request across.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from gateway.simulator.actions import remove_instance
from gateway.simulator.calendar import MONTHS, WEEK_INDEX, WEEKDAYS, Attendee, CalendarItem, Recurrence, ms_id_for, zone
from gateway.simulator.graph import shapes
from gateway.simulator.graph.errors import GraphError, bad_request
from gateway.simulator.graph.reads import ext_key
from gateway.simulator.graph.router import GraphRequest, GraphResponse
from gateway.simulator.mailboxes import Mailbox

if TYPE_CHECKING:
    from gateway.simulator.graph.service import GraphService

SEND = "SendToAllAndSaveCopy"
EVENT_FIELDS = frozenset({
    "subject", "body", "start", "end", "isAllDay", "location", "locations", "attendees", "sensitivity", "showAs",
    "importance", "categories", "transactionId", "singleValueExtendedProperties", "recurrence", "isReminderOn",
    "reminderMinutesBeforeStart", "responseRequested", "allowNewTimeProposals", "isOnlineMeeting",
    "onlineMeetingProvider", "hideAttendees", "originalStartTimeZone", "originalEndTimeZone",
    # read-only or computed: accepted and ignored
    "id", "createdDateTime", "lastModifiedDateTime", "changeKey", "iCalUId", "bodyPreview", "isCancelled",
    "isOrganizer", "seriesMasterId", "type", "webLink", "onlineMeetingUrl", "onlineMeeting", "organizer",
    "responseStatus", "originalStart", "hasAttachments", "isDraft",
})
STATUS_DIGIT = {"free": "0", "tentative": "1", "busy": "2", "oof": "3", "workingElsewhere": "4", "unknown": "0"}


def add_routes(graph: GraphService) -> None:
    w = Writes(graph)
    r = graph.router
    for prefix in ("/users/{user}/events", "/users/{user}/calendar/events"):
        r.add("POST", prefix, w.create)
        r.add("PATCH", prefix + "/{event}", w.update)
        r.add("DELETE", prefix + "/{event}", w.delete)
        r.add("POST", prefix + "/{event}/cancel", w.cancel)
        r.add("POST", prefix + "/{event}/decline", w.decline)
        r.add("POST", prefix + "/{event}/accept", w.accept)
        r.add("POST", prefix + "/{event}/tentativelyAccept", w.tentatively_accept)
    r.add("POST", "/users/{user}/calendar/getSchedule", w.get_schedule)


def parse_time(value: Any, what: str) -> tuple[datetime, str]:
    """A dateTimeTimeZone -> (aware UTC instant, the Windows zone id it was given in)."""
    if not isinstance(value, dict) or not isinstance(value.get("dateTime"), str):
        raise bad_request(f"{what} must be a dateTimeTimeZone: {{\"dateTime\": ..., \"timeZone\": ...}}.",
                          "ErrorInvalidRequest")
    tz_name = str(value.get("timeZone") or "UTC")
    if tz_name.upper() in ("UTC", "ETC/UTC"):
        windows = "UTC"
    elif tz_name in _windows_ids():
        windows = tz_name
    elif ms_id_for(tz_name) != "UTC":  # an IANA name Graph accepts as well
        windows = ms_id_for(tz_name)
    else:
        raise bad_request(f"A valid TimeZone value must be specified. The following TimeZone value is not "
                          f"supported: '{tz_name}'.", "TimeZoneNotSupportedException")
    text = value["dateTime"].rstrip("Z")
    if "." in text:  # Graph writes seven fraction digits; Python reads at most six
        head, _, fraction = text.partition(".")
        text = f"{head}.{fraction[:6]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as e:
        raise bad_request(f"Cannot convert the literal '{value['dateTime']}' to the expected type "
                          "'Edm.DateTime'.", "ErrorInvalidRequest") from e
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone(windows))
    return parsed.astimezone(UTC), windows


def _windows_ids() -> frozenset[str]:
    from exchangelib.winzone import MS_TIMEZONE_TO_IANA_MAP

    return frozenset(MS_TIMEZONE_TO_IANA_MAP)


def parse_recurrence(value: Any, first: date) -> Recurrence:
    if not isinstance(value, dict) or not isinstance(value.get("pattern"), dict):
        raise bad_request("recurrence must be a patternedRecurrence with a pattern and a range.", "ErrorInvalidRequest")
    pattern, rng = value["pattern"], value.get("range") or {}
    kind = str(pattern.get("type", ""))
    kinds = {"daily": "Daily", "weekly": "Weekly", "absoluteMonthly": "AbsoluteMonthly",
             "relativeMonthly": "RelativeMonthly", "absoluteYearly": "AbsoluteYearly",
             "relativeYearly": "RelativeYearly"}
    if kind not in kinds:
        raise bad_request(f"The recurrence pattern type '{kind}' is not valid.", "ErrorInvalidRequest")
    start_date = date.fromisoformat(rng["startDate"]) if rng.get("startDate") else first
    rec = Recurrence(kind=kinds[kind], interval=int(pattern.get("interval", 1) or 1), start_date=start_date)
    days = [str(d).capitalize() for d in pattern.get("daysOfWeek") or []]
    if any(d not in WEEKDAYS for d in days):
        raise bad_request(f"daysOfWeek {days} holds an invalid day.", "ErrorInvalidRequest")
    rec.days_of_week = tuple(days)
    rec.first_day_of_week = str(pattern.get("firstDayOfWeek", "sunday")).capitalize()
    rec.day_of_month = int(pattern.get("dayOfMonth") or start_date.day)
    index = str(pattern.get("index", "first")).capitalize()
    rec.day_of_week_index = index if index in WEEK_INDEX else "First"
    if pattern.get("month"):
        rec.month = MONTHS[int(pattern["month"]) - 1]
    range_type = rng.get("type", "noEnd")
    if range_type == "endDate":
        rec.end_date = date.fromisoformat(rng["endDate"])
    elif range_type == "numbered":
        rec.count = int(rng.get("numberOfOccurrences", 1))
    return rec


class Writes:
    def __init__(self, graph: GraphService) -> None:
        self.graph = graph

    @property
    def directory(self) -> Any:
        return self.graph.sim.directory

    def values(self, body: Any, *, creating: bool) -> tuple[dict[str, Any], dict[Any, Any]]:
        """An event's JSON -> (calendar values for actions.py, extended properties)."""
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON event.", "ErrorInvalidRequest")
        unknown = sorted(k for k in body if k not in EVENT_FIELDS and not k.startswith("@odata"))
        if unknown:
            raise bad_request(f"The property '{unknown[0]}' does not exist on type 'microsoft.graph.event'. Make "
                              "sure to only use property names that are defined by the type.", "RequestBodyRead")
        values: dict[str, Any] = {}
        if creating and ("start" not in body or "end" not in body):
            raise bad_request("An event needs a start and an end.", "ErrorInvalidRequest")
        if "start" in body:
            values["start"], values["tz"] = parse_time(body["start"], "start")
        if "end" in body:
            values["end"], _ = parse_time(body["end"], "end")
        if "subject" in body:
            values["subject"] = str(body["subject"] or "")
        if "body" in body:
            content = body["body"] or {}
            values["body"] = str(content.get("content") or "") or None
            values["body_type"] = "HTML" if str(content.get("contentType", "html")).lower() == "html" else "Text"
        if "isAllDay" in body:
            values["all_day"] = bool(body["isAllDay"])
        if "location" in body or "locations" in body:
            loc = body.get("location") or next(iter(body.get("locations") or []), None) or {}
            values["location"] = str(loc.get("displayName") or "") or None
        if "sensitivity" in body:
            sensitivity = str(body["sensitivity"]).capitalize()
            if sensitivity not in ("Normal", "Personal", "Private", "Confidential"):
                raise bad_request(f"The sensitivity '{body['sensitivity']}' is not valid.", "ErrorInvalidRequest")
            values["sensitivity"] = sensitivity
        if "showAs" in body:
            if body["showAs"] not in shapes.SHOW_AS_IN:
                raise bad_request(f"The showAs '{body['showAs']}' is not valid.", "ErrorInvalidRequest")
            values["free_busy"] = shapes.SHOW_AS_IN[body["showAs"]]
        if "importance" in body:
            values["importance"] = str(body["importance"]).capitalize()
        if "categories" in body:
            values["categories"] = tuple(str(c) for c in body["categories"] or ())
        if "attendees" in body:
            groups: dict[str, list[Attendee]] = {"required": [], "optional": [], "resource": []}
            for a in body["attendees"] or []:
                address = ((a or {}).get("emailAddress") or {}).get("address")
                kind = (a or {}).get("type", "required")
                if not address or kind not in groups:
                    raise bad_request("Each attendee needs an emailAddress.address and a type of required, "
                                      "optional or resource.", "ErrorInvalidRequest")
                name = (a.get("emailAddress") or {}).get("name") or ""
                groups[kind].append(Attendee(self.directory.person(str(address).lower(), name)))
            values["required"], values["optional"] = tuple(groups["required"]), tuple(groups["optional"])
            values["resources"] = tuple(groups["resource"])
        if body.get("recurrence"):
            start = values.get("start")
            first = start.astimezone(zone(values.get("tz", "UTC"))).date() if start else date.today()
            values["recurrence"] = parse_recurrence(body["recurrence"], first)
        ext: dict[Any, Any] = {}
        for prop in body.get("singleValueExtendedProperties") or []:
            if not isinstance(prop, dict) or "id" not in prop or "value" not in prop:
                raise bad_request("A singleValueExtendedProperty needs an id and a value.", "ErrorInvalidRequest")
            ext[ext_key(str(prop["id"]))] = str(prop["value"])
        return values, ext

    def _answer(self, mb: Mailbox, item: CalendarItem, req: GraphRequest, status: int = 200) -> GraphResponse:
        from gateway.simulator.calendar import Instance

        body = self.graph.reads.render(mb, Instance(item, 0, None), req, master=item.recurrence is not None)
        body = {"@odata.context": self.graph.context(f"users('{req.params['user']}')/events/$entity"), **body}
        return GraphResponse(status, body)

    # -- routes -----------------------------------------------------------------------------------------
    async def create(self, req: GraphRequest) -> GraphResponse:
        mb = self.graph.mailbox(req.params["user"])
        values, ext = self.values(req.body, creating=True)
        txid = (req.body or {}).get("transactionId")
        if txid:
            for existing in mb.calendar.items.values():
                if self.graph.transactions.get(existing) == txid:
                    return self._answer(mb, existing, req, 201)  # a retried POST: the event it made already
        has_attendees = bool(values.get("required") or values.get("optional") or values.get("resources"))
        item = self.graph.sim.calendars.create(mb, values, ext or None, send=SEND if has_attendees else "SendToNone")
        if txid:
            self.graph.transactions[item] = str(txid)
        return self._answer(mb, item, req, 201)

    async def update(self, req: GraphRequest) -> GraphResponse:
        mb = self.graph.mailbox(req.params["user"])
        item, inst = self.graph.find_event(mb, req.params["event"])
        values, ext = self.values(req.body, creating=False)
        cal = self.graph.sim.calendars
        if inst.original_start is not None:
            occurrence = {k: v for k, v in values.items() if k in ("start", "end", "subject", "location", "body",
                                                                   "free_busy")}
            cal.update_occurrence(item, inst.original_start, occurrence,
                                  send=SEND if item.my_response == "Organizer" else "SendToNone")
            body = self.graph.reads.render(mb, inst, req)
            return GraphResponse(200, body)
        if ext:
            item.ext = {**(item.ext or {}), **ext}
        if values:
            cal.update(item, values, send=SEND if item.my_response == "Organizer" else "SendToNone")
        elif ext:
            self.directory.touch(item, free_busy=False)
        return self._answer(mb, item, req)

    async def delete(self, req: GraphRequest) -> GraphResponse:
        """Deleting the organiser's meeting cancels it for every attendee, as Graph does."""
        mb = self.graph.mailbox(req.params["user"])
        item, inst = self.graph.find_event(mb, req.params["event"])
        cal = self.graph.sim.calendars
        organizer = item.my_response == "Organizer"
        if inst.original_start is not None:
            if organizer:
                cal.delete_occurrence(item, inst.original_start, send=SEND)
            else:
                remove_instance(item, inst.original_start)
                self.directory.touch(item)
        elif item.is_meeting and organizer:
            cal.cancel(item, send=True)
        else:
            self.directory.remove_item(item, "MoveToDeletedItems")
        return GraphResponse(204)

    async def cancel(self, req: GraphRequest) -> GraphResponse:
        mb = self.graph.mailbox(req.params["user"])
        item, inst = self.graph.find_event(mb, req.params["event"])
        if item.my_response != "Organizer":
            raise GraphError(400, "ErrorAccessDenied", "Your request can't be completed. You need to be an "
                                                       "organizer to cancel a meeting.")
        cal = self.graph.sim.calendars
        if inst.original_start is not None:
            cal.delete_occurrence(item, inst.original_start, send=SEND)
        else:
            cal.cancel(item, send=True)
        return GraphResponse(202)

    async def _respond(self, req: GraphRequest, response: str) -> GraphResponse:
        mb = self.graph.mailbox(req.params["user"])
        item, inst = self.graph.find_event(mb, req.params["event"])
        body = req.body if isinstance(req.body, dict) else {}
        send = bool(body.get("sendResponse", True))
        self.graph.sim.calendars.respond(item, response, inst.original_start, send=send,
                                         body=str(body["comment"]) if body.get("comment") else None)
        return GraphResponse(202)

    async def decline(self, req: GraphRequest) -> GraphResponse:
        return await self._respond(req, "Decline")

    async def accept(self, req: GraphRequest) -> GraphResponse:
        return await self._respond(req, "Accept")

    async def tentatively_accept(self, req: GraphRequest) -> GraphResponse:
        return await self._respond(req, "Tentative")

    async def get_schedule(self, req: GraphRequest) -> GraphResponse:
        self.graph.mailbox(req.params["user"])
        body = req.body if isinstance(req.body, dict) else {}
        schedules = body.get("schedules")
        if not isinstance(schedules, list) or not schedules:
            raise bad_request("schedules must list at least one e-mail address.", "ErrorInvalidRequest")
        start, _ = parse_time(body.get("startTime"), "startTime")
        end, _ = parse_time(body.get("endTime"), "endTime")
        interval = int(body.get("availabilityViewInterval", 30))
        if not 5 <= interval <= 1440 or end <= start:
            raise bad_request("availabilityViewInterval must lie between 5 and 1440 minutes and endTime after "
                              "startTime.", "ErrorInvalidRequest")
        tz_name = str((body.get("startTime") or {}).get("timeZone") or "UTC")
        tz, _ = shapes.time_zone(tz_name)
        out = []
        for address in schedules:
            mb = self.directory.find(str(address))
            if mb is None:
                out.append({"scheduleId": address, "availabilityView": "", "scheduleItems": [],
                            "error": {"message": f"The recipient {address} was not found.",
                                      "responseCode": "ErrorMailRecipientNotFound"}})
                continue
            items = []
            for item in mb.calendar.items.values():
                for inst in item.instances(start, end):
                    status = shapes.SHOW_AS.get(inst.free_busy, "unknown")
                    if status == "free" or item.is_cancelled:
                        continue
                    private = item.sensitivity in ("Private", "Confidential")
                    entry: dict[str, Any] = {"isPrivate": private, "status": status,
                                             "start": shapes.date_time_tz(inst.start, tz, tz_name),
                                             "end": shapes.date_time_tz(inst.end, tz, tz_name)}
                    if not private:
                        entry.update(subject=inst.subject, location=inst.location or "")
                    items.append((inst.start, inst.end, status, entry))
            items.sort(key=lambda x: x[0])
            view = []
            slot = start
            while slot < end:
                nxt = slot + timedelta(minutes=interval)
                digits = [STATUS_DIGIT[s] for a, b, s, _ in items if a < nxt and b > slot]
                view.append(max(digits, default="0"))
                slot = nxt
            out.append({"scheduleId": mb.smtp, "availabilityView": "".join(view),
                        "scheduleItems": [e for _, _, _, e in items],
                        "workingHours": {"daysOfWeek": ["monday", "tuesday", "wednesday", "thursday", "friday"],
                                         "startTime": "08:00:00.0000000", "endTime": "17:00:00.0000000",
                                         "timeZone": {"name": mb.working_tz}}})
        return GraphResponse(200, {"@odata.context": self.graph.context(
            "Collection(microsoft.graph.scheduleInformation)"), "value": out})
