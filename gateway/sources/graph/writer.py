"""GraphWriter: booking commands written into Exchange Online through Graph (a CalendarWriter), with the same
commands and results as the ews writer (exchange-semantics.md §6.3):

- a directory user's meeting: an event in the organizer's calendar, the room a resource attendee (Graph sends the
  invitations); the room's answer is read from the organizer's copy, where Exchange records it;
- anyone else's booking: an appointment in the room's own calendar (the command service checks conflicts first);
- idempotency: ``transactionId`` (derived from the command key, so a retried POST makes nothing new) and the command
  key stamped on the event as an extended property, which ``find_by_key`` filters on after a crash;
- decline as the room with the room's own copy (the organizer's event id is another mailbox's: 404);
- availability through ``getSchedule``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import structlog

from gateway.errors import NotFound, ProtocolError, RoomIsOrganizer
from gateway.model import Command, Person
from gateway.ports import Busy, RoomAnswer, Written
from gateway.sources.graph.client import GraphClient
from gateway.sources.graph.mapping import COMMAND_KEY_PROPERTY, EXPAND, TRANSACTION_PREFIX, event_uid, parse_time
from gateway.sources.graph.source import GraphSource

log = structlog.get_logger("gateway.sources.graph")

DEFAULT_SUBJECT = "Booked"
_NAMESPACE = uuid.UUID("6f1c9a52-3c1e-4d55-9a8e-0d6f3f7f2a10")  # transactionIds of this gateway's commands
_ANSWERS = {"accepted": "accepted", "tentativelyAccepted": "tentative", "declined": "declined"}
_BUSY = {"busy": "busy", "tentative": "tentative", "oof": "oof", "workingElsewhere": "busy"}


def transaction_id(key: str) -> str:
    """The command's transactionId: the same for every retry of one command key."""
    return TRANSACTION_PREFIX + str(uuid.uuid5(_NAMESPACE, key))


def _when(value: datetime) -> dict[str, str]:
    return {"dateTime": value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.0000000"), "timeZone": "UTC"}


def _name(person: Person | None) -> str | None:
    return (person.name or person.email) if person is not None else None


def booker_text(booker: Person | None) -> str:
    """The body of a room appointment: who booked it (the item's organizer is the room itself)."""
    if booker is None or not (booker.name or booker.email):
        return "Booked through the booking gateway."
    who = f"{booker.name} <{booker.email}>" if booker.name and booker.email else (booker.name or booker.email)
    return f"Booked by {who} through the booking gateway."


class GraphWriter:
    def __init__(self, source: GraphSource) -> None:
        self.source = source
        self.client: GraphClient = source.client

    async def _call(self, method: str, path: str, mailbox: str, operation: str, **kw: Any) -> dict[str, Any]:
        answer = await self.client.call(method, path, mailbox=mailbox, operation=operation,
                                        headers=self.source.prefer, **kw)
        return answer.body

    def _event(self, mailbox: str, ident: str) -> str:
        return f"{self.client.user(mailbox)}/events/{quote(ident, safe='')}"

    async def _written(self, mailbox: str, created: dict[str, Any]) -> Written:
        ident = str(created.get("id") or "")
        if not ident:
            raise ProtocolError(f"Graph created an event in {mailbox} but named no id")
        uid = event_uid(created) or await self.source.uid(mailbox, {"id": ident})
        if uid is None:
            raise ProtocolError(f"Graph's event {ident} in {mailbox} has no global object id")
        self.source.ours.add(uid)
        return Written(mailbox, ident, uid, str(created.get("changeKey") or ""))

    def _body(self, cmd: Command, subject: str) -> dict[str, Any]:
        assert cmd.start is not None and cmd.end is not None
        return {"subject": subject, "start": _when(cmd.start), "end": _when(cmd.end), "showAs": "busy",
                "transactionId": transaction_id(cmd.key),
                "singleValueExtendedProperties": [{"id": COMMAND_KEY_PROPERTY, "value": cmd.key}]}

    # -- creating ------------------------------------------------------------------------------------------
    async def create_meeting(self, organizer: str, room: str, cmd: Command) -> Written:
        organizer, room = organizer.lower(), room.lower()
        body = self._body(cmd, cmd.subject or _name(cmd.organizer) or DEFAULT_SUBJECT)
        body["location"] = {"displayName": room, "locationEmailAddress": room}
        body["attendees"] = [{"emailAddress": {"address": room}, "type": "resource"}] + [
            {"emailAddress": {"address": p.email, **({"name": p.name} if p.name else {})}, "type": "required"}
            for p in cmd.attendees if p.email and p.email.lower() not in (organizer, room)]
        created = await self._call("POST", f"{self.client.user(organizer)}/events", organizer, "createEvent",
                                   body=body)
        written = await self._written(organizer, created)
        log.info("writer.meeting_created", organizer=organizer, room=room, uid=written.uid, key=cmd.key)
        return written

    async def create_appointment(self, room: str, cmd: Command) -> Written:
        room = room.lower()
        booker = cmd.booker or cmd.organizer
        body = self._body(cmd, cmd.subject or _name(booker) or DEFAULT_SUBJECT)
        body["body"] = {"contentType": "text", "content": booker_text(booker)}
        body["location"] = {"displayName": room}
        created = await self._call("POST", f"{self.client.user(room)}/events", room, "createEvent", body=body)
        written = await self._written(room, created)
        log.info("writer.appointment_created", room=room, uid=written.uid, key=cmd.key)
        return written

    async def find_by_key(self, mailbox: str, key: str, start: datetime, end: datetime) -> Written | None:
        mailbox = mailbox.lower()
        value = key.replace("'", "''")
        flt = f"singleValueExtendedProperties/Any(ep: ep/id eq '{COMMAND_KEY_PROPERTY}' and ep/value eq '{value}')"
        found = await self._call("GET", f"{self.client.user(mailbox)}/events", mailbox, "findByKey",
                                 params={"$filter": flt, "$expand": EXPAND, "$top": "10"})
        for event in found.get("value") or ():
            if isinstance(event, dict) and event.get("id"):
                return await self._written(mailbox, event)
        return None

    # -- the booking attendant's answer ---------------------------------------------------------------------
    async def room_answer(self, written: Written, room: str) -> RoomAnswer:
        """The room as an attendee of the organizer's event, where Exchange records its answer."""
        room = room.lower()
        event = await self._call("GET", self._event(written.mailbox, written.item_id), written.mailbox,
                                 "roomAnswer", params={"$select": "attendees,isCancelled"}, item=True)
        for a in event.get("attendees") or ():
            address = str(((a or {}).get("emailAddress") or {}).get("address") or "").lower()
            if address == room:
                outcome = _ANSWERS.get(str(((a.get("status") or {}).get("response")) or ""))
                return RoomAnswer(outcome) if outcome else RoomAnswer("pending")
        return RoomAnswer("pending")

    # -- reading the room ------------------------------------------------------------------------------------
    async def busy(self, room: str, start: datetime, end: datetime) -> list[Busy]:
        room = room.lower()
        events = await self.source.view(room, start, end)
        out: list[Busy] = []
        for e in events:
            status = _BUSY.get(str(e.get("showAs") or "busy"))
            if status is None or e.get("isCancelled") or (e.get("responseStatus") or {}).get("response") == \
                    "declined":
                continue
            s, f = parse_time(e.get("start")), parse_time(e.get("end"))
            if s is not None and f is not None and s < end and f > start:
                out.append(Busy(s, f, await self.source.uid(room, e), status))
        return sorted(out, key=lambda b: b.start)

    async def availability(self, rooms: Sequence[str], start: datetime, end: datetime) -> dict[str, list[Busy]]:
        if not rooms:
            return {}
        asker = rooms[0].lower()
        body = {"schedules": [r.lower() for r in rooms], "startTime": _when(start), "endTime": _when(end),
                "availabilityViewInterval": 30}
        answer = await self._call("POST", f"{self.client.user(asker)}/calendar/getSchedule", asker, "getSchedule",
                                  body=body)
        out: dict[str, list[Busy]] = {}
        for schedule in answer.get("value") or ():
            room = str(schedule.get("scheduleId") or "").lower()
            if not room or schedule.get("error"):
                continue
            busy = []
            for item in schedule.get("scheduleItems") or ():
                status = _BUSY.get(str(item.get("status") or ""))
                s, f = parse_time(item.get("start")), parse_time(item.get("end"))
                if status and s is not None and f is not None:
                    busy.append(Busy(s, f, None, status))
            out[room] = busy
        return out

    # -- changing what the gateway wrote ---------------------------------------------------------------------
    async def move(self, written: Written, start: datetime, end: datetime, *, notify: bool) -> Written:
        # Graph sends the organizer's update to the attendees itself; ``notify`` cannot hold it back.
        moved = await self._call("PATCH", self._event(written.mailbox, written.item_id), written.mailbox,
                                 "updateEvent", body={"start": _when(start), "end": _when(end)}, item=True)
        log.info("writer.moved", mailbox=written.mailbox, uid=written.uid)
        return Written(written.mailbox, str(moved.get("id") or written.item_id), written.uid,
                       str(moved.get("changeKey") or written.change_key))

    async def cancel_meeting(self, written: Written) -> None:
        await self._call("POST", self._event(written.mailbox, written.item_id) + "/cancel", written.mailbox,
                         "cancelEvent", body={"comment": ""}, item=True)
        log.info("writer.meeting_cancelled", organizer=written.mailbox, uid=written.uid)

    async def delete_appointment(self, written: Written) -> None:
        await self._call("DELETE", self._event(written.mailbox, written.item_id), written.mailbox, "deleteEvent",
                         item=True)
        log.info("writer.appointment_deleted", room=written.mailbox, uid=written.uid)

    async def decline_as_room(self, room: str, uid: str, original_start: datetime | None, start: datetime,
                              message: str | None) -> None:
        """Decline with the room's own copy (its id, not the organizer's), the response sent to the organizer."""
        room = room.lower()
        near = timedelta(minutes=1)
        copy = None
        for e in await self.source.view(room, start - near, start + near):
            if await self.source.uid(room, e) != uid:
                continue
            if original_start is not None and parse_time(e.get("originalStart")) != original_start:
                continue
            copy = e
            break
        if copy is None:
            raise NotFound(f"{room} holds no copy of {uid} at {start.isoformat()}")
        if copy.get("isOrganizer") or (copy.get("responseStatus") or {}).get("response") == "organizer":
            raise RoomIsOrganizer(f"{room} is the organizer of {uid}: an appointment is deleted, not declined")
        await self._call("POST", self._event(room, str(copy["id"])) + "/decline", room, "declineEvent",
                         body={"comment": message or "", "sendResponse": True}, item=True)
        log.info("writer.declined_as_room", room=room, uid=uid,
                 occurrence=original_start.isoformat() if original_start else None)
