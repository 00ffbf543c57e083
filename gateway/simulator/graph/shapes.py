"""Graph v1.0 JSON shapes of what the simulator holds: events (singles, series masters, occurrences, exceptions),
rooms and room lists. Pure functions over the organisation's state; the names and enumerations are those of
Microsoft's v1.0 metadata (event, dateTimeTimeZone, attendee, responseStatus, patternedRecurrence, room, roomList).
"""

from __future__ import annotations

import base64
import re
import struct
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from gateway.simulator.calendar import CalendarItem, Instance, Person, Recurrence, ms_id_for, zone
from gateway.simulator.graph import ids
from gateway.simulator.mailboxes import Mailbox

CLEAN_GOID_PROPERTY = "Binary {6ED8DA90-450B-101B-98DA-00AA003F1305} Id 0x23"
RESPONSE = {"Organizer": "organizer", "Accept": "accepted", "Tentative": "tentativelyAccepted",
            "Decline": "declined", "NoResponseReceived": "notResponded", "Unknown": "none", "": "none"}
SHOW_AS = {"Free": "free", "Tentative": "tentative", "Busy": "busy", "OOF": "oof",
           "WorkingElsewhere": "workingElsewhere", "NoData": "unknown"}
SHOW_AS_IN = {v: k for k, v in SHOW_AS.items()}
TYPE = {"Single": "singleInstance", "Occurrence": "occurrence", "Exception": "exception"}
_ZERO = "0001-01-01T00:00:00Z"


def time_zone(name: str | None) -> tuple[ZoneInfo, str]:
    """The zone a ``Prefer: outlook.timezone`` (Windows or IANA name) asks for, and the name to echo; UTC else."""
    if not name or name.upper() == "UTC":
        return ZoneInfo("UTC"), "UTC"
    tz = zone(name)
    if str(tz) == "UTC" and ms_id_for(name) == "UTC" and name not in ("Etc/UTC", "GMT Standard Time"):
        return ZoneInfo("UTC"), "UTC"  # a name Graph would not know either
    return tz, name


def date_time_tz(value: datetime, tz: ZoneInfo, tz_name: str) -> dict[str, str]:
    return {"dateTime": value.astimezone(tz).strftime("%Y-%m-%dT%H:%M:%S.0000000"), "timeZone": tz_name}


def all_day_tz(value: datetime, item_tz: str, tz_name: str) -> dict[str, str]:
    """All-day bounds are midnight in the *requested* zone whatever the creator's zone (as Graph answers)."""
    day = value.astimezone(zone(item_tz)).date()
    return {"dateTime": f"{day.isoformat()}T00:00:00.0000000", "timeZone": tz_name}


def instant(value: datetime | None) -> str:
    """An Edm.DateTimeOffset as Graph prints created/modified times."""
    if value is None:
        return _ZERO
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond * 10:07d}Z"


def email(person: Person) -> dict[str, Any]:
    return {"emailAddress": {"name": person.name, "address": person.email}}


def instance_goid(goid: bytes, original_start: datetime | None) -> bytes:
    """A GlobalObjectId: the clean one with the instance's date in bytes 16..19 (year, month, day), as Exchange
    makes the id of one occurrence; the clean id (zeros there) names the whole meeting."""
    if original_start is None or len(goid) < 20:
        return goid
    d = original_start.astimezone(UTC).date()
    return goid[:16] + struct.pack(">HBB", d.year, d.month, d.day) + goid[20:]


def clean_goid_property(goid: bytes) -> dict[str, str]:
    return {"id": CLEAN_GOID_PROPERTY, "value": base64.b64encode(goid).decode()}


def _body_preview(body: str | None) -> str:
    text = re.sub(r"<[^>]+>", " ", body or "")
    return re.sub(r"\s+", " ", text).strip()[:255]


def _location(item_location: str | None, rooms: list[Mailbox]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    locations = [{"displayName": r.name, "locationType": "conferenceRoom", "locationUri": r.smtp,
                  "uniqueId": r.smtp, "uniqueIdType": "directory"} for r in rooms]
    if item_location and not any(loc["displayName"] == item_location for loc in locations):
        locations.insert(0, {"displayName": item_location, "locationType": "default", "uniqueId": item_location,
                             "uniqueIdType": "private"})
    first = locations[0] if locations else {"displayName": "", "locationType": "default", "uniqueIdType": "unknown",
                                            "address": {}, "coordinates": {}}
    return dict(first), locations


def recurrence_json(rec: Recurrence, item_tz: str) -> dict[str, Any]:
    kind = rec.kind[0].lower() + rec.kind[1:]
    pattern: dict[str, Any] = {"type": kind, "interval": rec.interval, "month": 0, "dayOfMonth": 0,
                               "firstDayOfWeek": rec.first_day_of_week.lower(), "index": "first"}
    if kind in ("weekly", "relativeMonthly", "relativeYearly"):
        pattern["daysOfWeek"] = [d.lower() for d in rec.days_of_week]
    if kind in ("absoluteMonthly", "absoluteYearly"):
        pattern["dayOfMonth"] = rec.day_of_month
    if kind in ("relativeMonthly", "relativeYearly"):
        pattern["index"] = rec.day_of_week_index.lower()
    if kind.endswith("Yearly"):
        from gateway.simulator.calendar import MONTHS

        pattern["month"] = MONTHS.index(rec.month) + 1
    rng: dict[str, Any] = {"type": "noEnd", "startDate": rec.start_date.isoformat(), "endDate": "0001-01-01",
                           "recurrenceTimeZone": item_tz, "numberOfOccurrences": 0}
    if rec.end_date is not None:
        rng.update(type="endDate", endDate=rec.end_date.isoformat())
    elif rec.count is not None:
        rng.update(type="numbered", numberOfOccurrences=rec.count)
    return {"pattern": pattern, "range": rng}


def event_json(mailbox: Mailbox, inst: Instance, rooms: list[Mailbox], *, tz: ZoneInfo, tz_name: str,
               transaction_id: str | None = None, master: bool = False) -> dict[str, Any]:
    """One event as ``GET /users/{id}/events/{id}`` and calendarView return it.

    ``inst`` is a single item, one instance of a series, or (``master``) the series master itself; ``rooms`` are
    the room mailboxes among its attendees, which Graph lists as conference-room locations.
    """
    item: CalendarItem = inst.item
    exc = inst.exception
    if master:
        kind, original, start, end = "seriesMaster", None, item.start, item.end
    else:
        kind, original, start, end = TYPE[inst.item_type], inst.original_start, inst.start, inst.end
    version = item.version + (exc.version if exc is not None else 0)
    response = exc.response if exc is not None and exc.response else item.my_response
    body = exc.body if exc is not None and exc.body is not None else item.body
    location, locations = _location(inst.location if not master else item.location, rooms)
    event_id = ids.event_id(mailbox.idx, item.iid, original)
    out: dict[str, Any] = {
        "@odata.etag": f'W/"{_change_key(item.iid, version)}"',
        "id": event_id,
        "createdDateTime": instant(item.created),
        "lastModifiedDateTime": instant(exc.modified if exc is not None else item.modified),
        "changeKey": _change_key(item.iid, version),
        "categories": list(item.categories),
        "transactionId": transaction_id,
        "originalStartTimeZone": item.tz,
        "originalEndTimeZone": item.tz,
        "iCalUId": instance_goid(item.goid, original).hex().upper(),
        "reminderMinutesBeforeStart": item.reminder or 0,
        "isReminderOn": item.reminder is not None,
        "hasAttachments": False,
        "subject": inst.subject if not master else item.subject,
        "bodyPreview": _body_preview(body),
        "importance": item.importance.lower(),
        "sensitivity": item.sensitivity.lower(),
        "isAllDay": item.all_day,
        "isCancelled": item.is_cancelled,
        "isOrganizer": item.my_response == "Organizer",
        "responseRequested": item.response_requested,
        "seriesMasterId": ids.event_id(mailbox.idx, item.iid) if original is not None else None,
        "showAs": SHOW_AS.get(inst.free_busy if not master else item.free_busy, "unknown"),
        "type": kind,
        "webLink": f"https://outlook.office365.com/owa/?itemid={event_id}&exvsurl=1&path=/calendar/item",
        "onlineMeetingUrl": item.online_url,
        "isOnlineMeeting": bool(item.online_url),
        "onlineMeetingProvider": "teamsForBusiness" if item.online_url else "unknown",
        "allowNewTimeProposals": True,
        "isDraft": False,
        "hideAttendees": False,
        "responseStatus": {"response": RESPONSE.get(response, "none"), "time": instant(item.reply_time)},
        "body": {"contentType": "html" if item.body_type.upper() == "HTML" else "text", "content": body or ""},
        "start": all_day_tz(start, item.tz, tz_name) if item.all_day else date_time_tz(start, tz, tz_name),
        "end": all_day_tz(end, item.tz, tz_name) if item.all_day else date_time_tz(end, tz, tz_name),
        "location": location,
        "locations": locations,
        "recurrence": recurrence_json(item.recurrence, item.tz) if master and item.recurrence else None,
        "attendees": [
            {"type": kind_, "status": {"response": RESPONSE.get(a.response, "none"),
                                       "time": instant(a.response_time)}, **email(a.person)}
            for kind_, group in (("required", item.required), ("optional", item.optional),
                                 ("resource", item.resources))
            for a in group
        ],
        "organizer": email(item.organizer or mailbox.person),
        "onlineMeeting": {"joinUrl": item.online_url} if item.online_url else None,
    }
    if original is not None:
        out["originalStart"] = original.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return out


def _change_key(iid: int, version: int) -> str:
    return base64.b64encode(b"DwAAABYAAA" + struct.pack(">II", iid, version)).decode()


def room_json(room: Mailbox) -> dict[str, Any]:
    return {
        "id": ids.object_id(room.smtp),
        "emailAddress": room.smtp,
        "displayName": room.name,
        "address": {"street": "", "city": "", "state": "", "countryOrRegion": "", "postalCode": ""},
        "geoCoordinates": None,
        "phone": "",
        "nickname": room.name,
        "label": room.name,
        "capacity": room.capacity,
        "building": room.building or None,
        "floorLabel": None if room.floor is None else str(room.floor),
        "floorNumber": room.floor,
        "isWheelchairAccessible": False,
        "bookingType": "standard",
        "tags": [],
        "audioDeviceName": None,
        "videoDeviceName": None,
        "displayDeviceName": None,
    }


def room_list_json(smtp: str, name: str) -> dict[str, Any]:
    return {"id": ids.object_id(smtp), "displayName": name, "address": None, "geoCoordinates": None, "phone": None,
            "emailAddress": smtp}
