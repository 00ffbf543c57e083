"""EwsWriter: booking commands into Exchange through EWS (ports.CalendarWriter; design.md §5,
exchange-semantics.md §3-§5).

- A directory user's booking is a meeting in their calendar (impersonated) with the room as a Resource and the
  invitations sent (SendToAllAndSaveCopy: without it the room never hears of the meeting). Whether the room took
  it is the booking attendant's answer, read later wherever Exchange shows it (``room_answer``): the organizer's
  copy, the room's MeetingResponse in the organizer's Inbox, the room's own copy.
- Anyone else's booking is an appointment (no attendees) in the room's own calendar.
- Every item carries the command's idempotency key as a named property (PublicStrings
  "ExchangeGatewayCommandKey"), so ``find_by_key`` tells after a crash whether a write happened.
- The gateway sets the meeting's UID itself (mapping.gateway_uid): Exchange keeps it in the meeting's
  (Clean)GlobalObjectId on every copy, which is where the sync reads a booking's uid (mapping.element_uid), so the
  uid is known without reading the item back, and the room's copy shows the booking as the gateway's (origin).
- Calls stay few: create is one CreateItem, a poll of the room's answer one GetItem once the organizer's copy
  has it (two more reads while it has not). Folders are named by their distinguished ids, so a new organizer
  costs no GetFolder round trips.

Everything blocking runs in the EwsSource's pool and every exchangelib error goes through its map_ews_errors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from typing import Any, TypeVar

import structlog
from exchangelib import CalendarItem, EWSDateTime, EWSTimeZone
from exchangelib import errors as xerr
from exchangelib.extended_properties import ExtendedProperty
from exchangelib.fields import FieldPath
from exchangelib.items import (
    ALL_OCCURRENCES,
    AUTO_RESOLVE,
    MOVE_TO_DELETED_ITEMS,
    SAVE_ONLY,
    SEND_AND_SAVE_COPY,
    SEND_TO_ALL_AND_SAVE_COPY,
    SEND_TO_NONE,
    CancelCalendarItem,
    DeclineItem,
    Message,
)
from exchangelib.properties import (
    Attendee,
    Body,
    DaylightTime,
    DistinguishedFolderId,
    FreeBusyViewOptions,
    ItemId,
    Mailbox,
    MailboxData,
    OccurrenceItemId,
    ReferenceItemId,
    StandardTime,
    TimeWindow,
    TimeZone,
)
from exchangelib.protocol import Protocol
from exchangelib.services import CreateItem, DeleteItem, GetUserAvailability, UpdateItem
from exchangelib.util import create_element
from lxml import etree

from gateway.errors import NotFound, PreconditionFailed, RoomIsOrganizer, RoomUnknown
from gateway.model import Command, Person
from gateway.ports import Busy, RoomAnswer, Written
from gateway.sources.ews import responses
from gateway.sources.ews.mapping import (
    COMMAND_KEY_PROPERTY,
    TNS,
    element_uid,
    gateway_uid,
    item_id,
    register_properties,
)
from gateway.sources.ews.series import INSTANCE, MASTER
from gateway.sources.ews.source import EwsSource, _RawFindItem, _RawGetItem

log = structlog.get_logger("gateway.sources.ews.writer")
T = TypeVar("T")

AVAILABILITY_MAX_MAILBOXES = 100  # GetUserAvailability: at most 100 identities per request ...
AVAILABILITY_MAX_DAYS = 42  # ... and a time window of at most 42 days
MIN_MERGE_MINUTES = 5  # MergedFreeBusyIntervalInMinutes must be 5..1440 and not longer than the window
DEFAULT_SUBJECT = "Booked"

_ANSWERS = {"Accept": "accepted", "Tentative": "tentative", "Decline": "declined"}  # everything else: pending
_RESPONSE_CLASSES = {"IPM.Schedule.Meeting.Resp.Pos": "accepted", "IPM.Schedule.Meeting.Resp.Tent": "tentative",
                     "IPM.Schedule.Meeting.Resp.Neg": "declined"}
# Where a server has no answer to give (no such folder, no rights, a restriction it does not support), that piece
# of evidence is missing; throttling and outages still raise.
_NO_EVIDENCE = (xerr.ErrorAccessDenied, xerr.ErrorImpersonateUserDenied, xerr.ErrorNonExistentMailbox,
                xerr.ErrorFolderNotFound, xerr.ErrorInvalidOperation, xerr.ErrorInvalidRestriction,
                xerr.ErrorInvalidPropertyRequest)
_FREE_BUSY = {"Busy": "busy", "Tentative": "tentative", "OOF": "oof", "WorkingElsewhere": "busy", "NoData": "busy"}
_T = {name: f"{{{TNS}}}{name}" for name in (
    "Resources", "RequiredAttendees", "OptionalAttendees", "Attendee", "Mailbox", "EmailAddress", "ResponseType",
    "ItemId", "Start", "End", "OriginalStart",
    "LegacyFreeBusyStatus", "IsCancelled", "MyResponseType", "IsMeeting", "ExtendedProperty", "ExtendedFieldURI",
    "Value", "ItemClass", "DateTimeReceived", "From", "Sender", "Body", "TextBody", "LastModifiedTime")}
# The request's time zone for GetUserAvailability: UTC, built here rather than asked of the server with
# GetServerTimeZones (exchangelib's way), which costs a call and which some EWS servers do not implement. Bias 0 and
# two transitions that change nothing: the values exchangelib derives from Exchange's own "UTC" definition.
UTC_AVAILABILITY_ZONE = TimeZone(
    bias=0,
    standard_time=StandardTime(bias=0, time=dtime(0), occurrence=1, iso_month=1, weekday="Monday"),
    daylight_time=DaylightTime(bias=0, time=dtime(0), occurrence=5, iso_month=12, weekday="Sunday"))
_CLEAN_GOID_URI = {"DistinguishedPropertySetId": "Meeting", "PropertyId": "35", "PropertyType": "Binary"}
_SEQUENCE_URI = {"DistinguishedPropertySetId": "Appointment", "PropertyId": "33281", "PropertyType": "Integer"}
_COMMAND_KEY_URI = {"DistinguishedPropertySetId": "PublicStrings", "PropertyName": COMMAND_KEY_PROPERTY,
                    "PropertyType": "String"}


class AppointmentSequence(ExtendedProperty):
    """PidLidAppointmentSequence: the meeting's version, on the meeting and on every response to it, so an answer to
    an earlier version (before a move) is told from the answer to this one."""

    distinguished_property_set_id = "Appointment"
    property_id = 0x8201
    property_type = "Integer"


def register_command_key() -> None:
    """Teach exchangelib the gateway's properties (class-global, so once per process)."""
    register_properties()
    if "gateway_appointment_sequence" not in {f.name for f in CalendarItem.FIELDS}:
        CalendarItem.register("gateway_appointment_sequence", AppointmentSequence)


register_command_key()


# -- exchangelib plumbing --------------------------------------------------------------------------------------
class _CreateItem(CreateItem):
    """CreateItem into a folder named by its distinguished id: exchangelib's own call wants a Folder object, and
    getting one costs GetFolder round trips the first time per mailbox."""

    def call(self, items: Any, folder: Any, message_disposition: str, send_meeting_invitations: str) -> Any:
        return self._elems_to_objs(self._chunked_get_elements(
            self.get_payload, items=items, folder=folder, message_disposition=message_disposition,
            send_meeting_invitations=send_meeting_invitations))


class _Restriction:
    """A ready t:IsEqualTo on an extended property as an m:Restriction. exchangelib's Q needs a field model for
    every item type of the folder, and the Inbox's message types have none for the meeting's GlobalObjectId."""

    def __init__(self, uri: dict[str, str], value: str) -> None:
        cond = create_element("t:IsEqualTo")
        cond.append(create_element("t:ExtendedFieldURI", attrs=uri))
        const = create_element("t:FieldURIOrConstant")
        const.append(create_element("t:Constant", attrs={"Value": value}))
        cond.append(const)
        self.condition = cond

    def to_xml(self, version: Any) -> Any:
        restriction = create_element("m:Restriction")
        restriction.append(copy.deepcopy(self.condition))
        return restriction


def _folder(name: str, mailbox: str) -> DistinguishedFolderId:
    return DistinguishedFolderId(id=name, mailbox=Mailbox(email_address=mailbox))


def _paths(model: Any, *names: str) -> list[FieldPath]:
    return [FieldPath(field=model.get_field_by_fieldname(n)) for n in names]


def _raise_first(results: Iterable[Any]) -> list[Any]:
    out = list(results)
    for r in out:
        if isinstance(r, Exception):
            raise r
    return out


def _time(el: etree._Element, name: str) -> datetime | None:
    text = el.findtext(_T[name])
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC) if text else None


def _ext_value(el: etree._Element, uri: dict[str, str]) -> str | None:
    """The value of the extended property ``uri`` names, on a raw item element."""
    for prop in el.iterchildren(_T["ExtendedProperty"]):
        u = prop.find(_T["ExtendedFieldURI"])
        if u is None or u.get("DistinguishedPropertySetId") != uri["DistinguishedPropertySetId"]:
            continue
        if "PropertyName" in uri and u.get("PropertyName") == uri["PropertyName"]:
            return prop.findtext(_T["Value"])
        if "PropertyId" in uri and u.get("PropertyId") in (uri["PropertyId"], hex(int(uri["PropertyId"]))):
            return prop.findtext(_T["Value"])
    return None


def _address(el: etree._Element | None) -> str:
    if el is None:
        return ""
    return (el.findtext(f"{_T['Mailbox']}/{_T['EmailAddress']}") or "").lower()


def _room_response(el: etree._Element, room: str) -> str | None:
    """The room's ResponseType on an organizer's item, wherever it is listed (Resources, as Outlook and the gateway
    put it, or among the required or optional attendees, as some servers do); a final answer wins over "Unknown".
    None: the room is not listed, or listed without a ResponseType."""
    answers = []
    for group in ("Resources", "RequiredAttendees", "OptionalAttendees"):
        container = el.find(_T[group])
        for a in container.iterchildren(_T["Attendee"]) if container is not None else ():
            if _address(a) == room.lower() and a.findtext(_T["ResponseType"]):
                answers.append(a.findtext(_T["ResponseType"]))
    final = [a for a in answers if a in _ANSWERS]
    return final[0] if final else (answers[0] if answers else None)


def _utc(value: datetime) -> datetime:
    return datetime.fromtimestamp(value.timestamp(), UTC)


def _pieces(start: datetime, end: datetime, step: timedelta) -> list[tuple[datetime, datetime]]:
    out = []
    cursor = start
    while cursor < end:
        out.append((cursor, min(end, cursor + step)))
        cursor += step
    return out


def _name(person: Person | None) -> str | None:
    return (person.name or person.email) if person is not None else None


class EwsWriter:
    """A CalendarWriter for on-premise Exchange; shares the EwsSource's pool, accounts and error mapping.

    ``room_names``: the display name of a room (for the Location of what we write), or None to use its address;
    called on the event loop, so it must not block.
    """

    def __init__(self, source: EwsSource, *, room_names: Callable[[str], str | None] | None = None) -> None:
        register_command_key()
        self.source = source
        self.room_names = room_names

    # -- creating ------------------------------------------------------------------------------------------
    async def create_meeting(self, organizer: str, room: str, cmd: Command) -> Written:
        organizer, room = organizer.lower(), room.lower()
        uid, location = gateway_uid(), self._location(room)

        def create() -> Written:
            acct = self.source.account(organizer)
            item = CalendarItem(
                account=acct, subject=cmd.subject or _name(cmd.organizer) or DEFAULT_SUBJECT,
                start=self._when(cmd.start), end=self._when(cmd.end), location=location,
                resources=[_attendee(Person(room))],
                required_attendees=[_attendee(p) for p in cmd.attendees
                                    if p.email and p.email.lower() not in (organizer, room)] or None,
                legacy_free_busy_status="Busy", uid=uid, gateway_command_key=cmd.key)
            # SendToAllAndSaveCopy: with the default SendToNone the room never receives the request (bug §8.5).
            (created,) = _raise_first(_CreateItem(account=acct).call(
                items=[item], folder=_folder("calendar", organizer), message_disposition=SAVE_ONLY,
                send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY))
            return Written(organizer, created.id, uid, created.changekey or "")
        written = await self.source.run(organizer, create)
        log.info("writer.meeting_created", organizer=organizer, room=room, uid=uid, key=cmd.key)
        return written

    async def create_appointment(self, room: str, cmd: Command) -> Written:
        room = room.lower()
        uid, location = gateway_uid(), self._location(room)
        booker = cmd.booker or cmd.organizer

        def create() -> Written:
            acct = self.source.account(room)
            item = CalendarItem(
                account=acct, subject=cmd.subject or _name(booker) or DEFAULT_SUBJECT,
                start=self._when(cmd.start), end=self._when(cmd.end), location=location,
                body=Body(booker_text(booker)), legacy_free_busy_status="Busy", uid=uid,
                gateway_command_key=cmd.key)
            (created,) = _raise_first(_CreateItem(account=acct).call(
                items=[item], folder=_folder("calendar", room), message_disposition=SAVE_ONLY,
                send_meeting_invitations=SEND_TO_NONE))
            return Written(room, created.id, uid, created.changekey or "")
        written = await self.source.run(room, create)
        log.info("writer.appointment_created", room=room, uid=uid, key=cmd.key)
        return written

    async def find_by_key(self, mailbox: str, key: str, start: datetime, end: datetime) -> Written | None:
        """The item a command wrote into ``mailbox``'s calendar, found by its key alone (``start``/``end`` are
        where the command put it; a found item is the answer wherever it is now)."""
        mailbox = mailbox.lower()

        def find() -> Written | None:
            acct = self.source.account(mailbox)
            for el in _raise_first(_RawFindItem(account=acct).call(
                    folders=[_folder("calendar", mailbox)],
                    additional_fields=_paths(CalendarItem, "clean_global_object_id", "gateway_command_key"),
                    restriction=_Restriction(_COMMAND_KEY_URI, key), order_fields=None, shape="IdOnly",
                    query_string=None, depth="Shallow", calendar_view=None, max_items=10, offset=0)):
                ident, uid = item_id(el), element_uid(el)
                if ident and uid and _ext_value(el, _COMMAND_KEY_URI) in (key, None):
                    id_el = el.find(_T["ItemId"])
                    return Written(mailbox, ident, uid, id_el.get("ChangeKey", "") if id_el is not None else "")
            return None
        return await self.source.run(mailbox, find)

    # -- the booking attendant's answer ---------------------------------------------------------------------
    async def room_answer(self, written: Written, room: str) -> RoomAnswer:
        """The room's answer from every place Exchange shows it, cheapest first (exchange-semantics.md §3):

        1. the room as an attendee of the organizer's copy, in whichever group it is listed (one GetItem; the
           usual and final source on Exchange, where the organizer's calendar attendant records the answer);
        2. the room's MeetingResponse in the organizer's Inbox, for the meeting's current time (one FindItem;
           a server that gives the attendee no ResponseType, or an organizer's attendant that has not run yet);
        3. the room's own copy at that time: accepted once it holds it as accepted (one CalendarView).

        A decline adds a GetItem of the MeetingResponse for the attendant's reason.
        """
        room = room.lower()

        def read() -> RoomAnswer:
            acct = self.source.account(written.mailbox)
            (el,) = _raise_first(_RawGetItem(account=acct).call(
                items=[(written.item_id, None)],
                additional_fields=_paths(CalendarItem, "required_attendees", "optional_attendees", "resources",
                                         "start", "end", "last_modified_time", "clean_global_object_id",
                                         "gateway_appointment_sequence"),
                shape="IdOnly"))
            outcome = _ANSWERS.get(_room_response(el, room) or "")
            goid = _ext_value(el, _CLEAN_GOID_URI)
            start, end = _time(el, "Start"), _time(el, "End")
            found: list[Any] | None = None
            answered: tuple[str, str] | None = None
            if outcome is None and goid:
                found = self._inbox_responses(acct, written.mailbox, goid)
                version = _Version(start, end, _number(_ext_value(el, _SEQUENCE_URI)), _time(el, "LastModifiedTime"))
                answered = None if found is None else _newest_response(found, room, version)
                outcome = _RESPONSE_CLASSES.get(answered[1]) if answered else None
            if outcome is None and start is not None and end is not None:
                outcome = self._room_copy_answer(room, written.uid, start, end)
            if outcome is None:
                return RoomAnswer("pending")
            if outcome != "declined":
                return RoomAnswer(outcome)
            if found is None and goid:
                found = self._inbox_responses(acct, written.mailbox, goid)
            chosen = answered[0] if answered else _newest_decline(found or [], room)
            text = self._decline_text(acct, written.mailbox, room, chosen)
            return RoomAnswer("declined", responses.reason_for(text), text)
        return await self.source.run(written.mailbox, read)

    def _inbox_responses(self, acct: Any, mailbox: str, goid: str) -> list[Any] | None:
        """The MeetingResponses of one meeting in the organizer's Inbox (None: the server would not say)."""
        try:
            return _raise_first(_RawFindItem(account=acct).call(
                folders=[_folder("inbox", mailbox)],
                additional_fields=_paths(Message, "item_class", "datetime_received", "author", "sender")
                + _paths(CalendarItem, "start", "end", "gateway_appointment_sequence"),
                restriction=_Restriction(_CLEAN_GOID_URI, goid), order_fields=None, shape="IdOnly",
                query_string=None, depth="Shallow", calendar_view=None, max_items=50, offset=0))
        except _NO_EVIDENCE as e:
            log.info("writer.inbox_unreadable", mailbox=mailbox, error=type(e).__name__)
            return None

    def _room_copy_answer(self, room: str, uid: str, start: datetime, end: datetime) -> str | None:
        """"accepted" when the room's calendar holds the meeting at its time as accepted. A copy the room holds
        tentatively is no answer: the attendant places requests that way before it decides."""
        near = timedelta(minutes=1)
        try:
            view = self.source.calendar_view(room, start - near, start + near, (
                "start", "end", "is_cancelled", "my_response_type", "clean_global_object_id"))
        except _NO_EVIDENCE as e:
            log.info("writer.room_copy_unreadable", room=room, error=type(e).__name__)
            return None
        for found, el in view:
            if found != uid or el.findtext(_T["IsCancelled"]) == "true":
                continue
            if (_time(el, "Start"), _time(el, "End")) != (start, end):
                continue  # the room still holds an earlier time of the meeting
            if el.findtext(_T["MyResponseType"]) in ("Accept", None):  # None: a server that tracks no answers
                return "accepted"
        return None

    def _decline_text(self, acct: Any, mailbox: str, room: str, chosen: str | None) -> str:
        """The text of the room's decline (a MeetingResponse in the organizer's Inbox)."""
        if chosen is None:
            log.info("writer.decline_without_response", mailbox=mailbox, room=room)
            return ""
        (msg,) = _raise_first(_RawGetItem(account=acct).call(
            items=[(chosen, None)], additional_fields=_paths(Message, "body", "text_body"), shape="IdOnly"))
        return responses.plain_text(msg.findtext(_T["TextBody"]) or msg.findtext(_T["Body"]))

    # -- reading the room ------------------------------------------------------------------------------------
    async def busy(self, room: str, start: datetime, end: datetime) -> list[Busy]:
        room = room.lower()

        def read() -> list[Busy]:
            out = []
            for uid, el in self.source.calendar_view(room, start, end, (
                    "start", "end", "legacy_free_busy_status", "is_cancelled", "original_start",
                    "clean_global_object_id")):
                status = el.findtext(_T["LegacyFreeBusyStatus"]) or "Busy"
                s, e = _time(el, "Start"), _time(el, "End")
                if status == "Free" or el.findtext(_T["IsCancelled"]) == "true" or s is None or e is None:
                    continue
                if s < end and e > start:
                    out.append(Busy(s, e, uid, _FREE_BUSY.get(status, "busy")))
            return sorted(out, key=lambda b: (b.start, b.end))
        return await self.source.run(room, read)

    async def availability(self, rooms: Sequence[str], start: datetime, end: datetime) -> dict[str, list[Busy]]:
        """GetUserAvailability (free/busy), 100 rooms and 42 days per request at most."""
        wanted = list(dict.fromkeys(r.lower() for r in rooms))
        if not wanted:
            return {}

        def read() -> dict[str, list[Busy]]:
            out: dict[str, set[Busy]] = {r: set() for r in wanted}
            for i in range(0, len(wanted), AVAILABILITY_MAX_MAILBOXES):
                chunk = wanted[i:i + AVAILABILITY_MAX_MAILBOXES]
                for s, e in _pieces(start, end, timedelta(days=AVAILABILITY_MAX_DAYS)):
                    for room, busy in zip(chunk, self._free_busy(chunk, s, e)):
                        out[room].update(b for b in busy if b.start < end and b.end > start)
            return {r: sorted(v, key=lambda b: (b.start, b.end)) for r, v in out.items()}
        return await self.source.run(wanted[0] if len(wanted) == 1 else None, read)

    def _free_busy(self, rooms: list[str], start: datetime, end: datetime) -> list[list[Busy]]:
        protocol = Protocol(config=self.source.config)  # cached per configuration: the accounts' own
        utc = EWSTimeZone("UTC")
        minutes = int((end - start).total_seconds() // 60)
        if minutes < MIN_MERGE_MINUTES:  # the service refuses a window shorter than the merge interval
            end = start + timedelta(minutes=MIN_MERGE_MINUTES)
            minutes = MIN_MERGE_MINUTES
        window = TimeWindow(start=self._in_zone(start, utc), end=self._in_zone(end, utc))
        views = GetUserAvailability(protocol).call(
            tzinfo=utc,
            mailbox_data=[MailboxData(email=r, attendee_type="Room", exclude_conflicts=False) for r in rooms],
            timezone=UTC_AVAILABILITY_ZONE,
            free_busy_view_options=FreeBusyViewOptions(time_window=window,
                                                       merged_free_busy_interval=min(30, minutes),
                                                       requested_view="FreeBusy"))
        out: list[list[Busy]] = []
        for room, view in zip(rooms, views):
            if isinstance(view, (xerr.ErrorMailRecipientNotFound, xerr.ErrorNonExistentMailbox)):
                raise RoomUnknown(f"Exchange has no room {room}")
            if isinstance(view, Exception):
                raise view
            out.append([Busy(_utc(ev.start), _utc(ev.end), None, _FREE_BUSY.get(ev.busy_type, "busy"))
                        for ev in view.calendar_events or () if ev.busy_type != "Free"])
        return out

    # -- changing and removing -------------------------------------------------------------------------------
    async def move(self, written: Written, start: datetime, end: datetime, *, notify: bool) -> Written:
        """UpdateItem of start and end. AutoResolve keeps a change key made stale by the room's answer (which
        touches only the attendee's response) from failing the move; a real conflict refreshes the key once."""
        send = SEND_TO_ALL_AND_SAVE_COPY if notify else SEND_TO_NONE

        def update() -> Written:
            acct = self.source.account(written.mailbox)

            def attempt(change_key: str) -> Written:
                item = CalendarItem(account=acct, id=written.item_id, changekey=change_key,
                                    start=self._when(start), end=self._when(end))
                new_id, new_key = UpdateItem(account=acct).get(
                    items=[(item, ["start", "end"])], conflict_resolution=AUTO_RESOLVE,
                    message_disposition=SAVE_ONLY, send_meeting_invitations_or_cancellations=send,
                    suppress_read_receipts=True, expect_result=True)
                return Written(written.mailbox, new_id, written.uid, new_key or "")
            # UpdateItem needs a change key: one we do not have is read first.
            return self._with_change_key(acct, written, attempt, fresh=not written.change_key)
        moved = await self.source.run(written.mailbox, update)
        log.info("writer.moved", mailbox=written.mailbox, uid=written.uid, notify=notify)
        return moved

    async def cancel_meeting(self, written: Written) -> None:
        """CancelCalendarItem as the organizer (SendAndSaveCopy: the room and the attendees get cancellations)."""
        def cancel() -> None:
            acct = self.source.account(written.mailbox)

            def attempt(change_key: str) -> None:
                reply = CancelCalendarItem(account=acct, reference_item_id=ReferenceItemId(
                    id=written.item_id, changekey=change_key or None))
                _raise_first(_CreateItem(account=acct).call(
                    items=[reply], folder=_folder("sentitems", written.mailbox),
                    message_disposition=SEND_AND_SAVE_COPY, send_meeting_invitations=SEND_TO_NONE))
            self._with_change_key(acct, written, attempt)
        await self.source.run(written.mailbox, cancel)
        log.info("writer.meeting_cancelled", organizer=written.mailbox, uid=written.uid)

    async def delete_appointment(self, written: Written) -> None:
        def delete() -> None:
            acct = self.source.account(written.mailbox)
            _raise_first(DeleteItem(account=acct).call(
                items=[ItemId(id=written.item_id)], delete_type=MOVE_TO_DELETED_ITEMS,
                send_meeting_cancellations=SEND_TO_NONE, affected_task_occurrences=ALL_OCCURRENCES,
                suppress_read_receipts=True))
        await self.source.run(written.mailbox, delete)
        log.info("writer.appointment_deleted", room=written.mailbox, uid=written.uid)

    async def decline_as_room(self, room: str, uid: str, original_start: datetime | None, start: datetime,
                              message: str | None) -> None:
        """DeclineItem on the room's copy, sent (SendAndSaveCopy: the organizer must learn of it, bug §8.17)."""
        room = room.lower()

        def decline() -> None:
            acct = self.source.account(room)
            el = self._room_copy(room, uid, original_start, start)
            if el.findtext(_T["MyResponseType"]) == "Organizer" or el.findtext(_T["IsMeeting"]) == "false":
                raise RoomIsOrganizer(f"{room} is the organizer of {uid}: an appointment is deleted, not declined")
            ident, change_key = self._instance_id(acct, el)
            reply = DeclineItem(account=acct, reference_item_id=ReferenceItemId(id=ident, changekey=change_key),
                                body=Body(message) if message else None)
            try:
                _raise_first(_CreateItem(account=acct).call(
                    items=[reply], folder=_folder("sentitems", room), message_disposition=SEND_AND_SAVE_COPY,
                    send_meeting_invitations=SEND_TO_NONE))
            except xerr.ErrorCalendarIsOrganizerForDecline as e:
                raise RoomIsOrganizer(f"{room} is the organizer of {uid}") from e
            except xerr.ErrorCalendarIsCancelledForDecline as e:
                raise NotFound(f"the organizer cancelled {uid} already") from e
        await self.source.run(room, decline)
        log.info("writer.declined_as_room", room=room, uid=uid,
                 occurrence=original_start.isoformat() if original_start else None)

    def _room_copy(self, room: str, uid: str, original_start: datetime | None, start: datetime) -> etree._Element:
        """The room's instance of the meeting at ``start`` (and ``original_start``, for an occurrence)."""
        fields = ("start", "end", "is_cancelled", "my_response_type", "is_meeting", "original_start", "type",
                  "clean_global_object_id")
        near = timedelta(minutes=1)
        for found, el in self.source.calendar_view(room, start - near, start + near, fields):
            if found != uid or el.findtext(_T["IsCancelled"]) == "true":
                continue
            if original_start is not None and _time(el, "OriginalStart") != original_start.astimezone(UTC):
                continue
            return el
        raise NotFound(f"{room} has no meeting {uid} at {start.isoformat()}", key="not_found",
                       remedy="the booking is gone already (cancelled, declined or moved); resync the room")

    @staticmethod
    def _instance_id(acct: Any, el: etree._Element) -> tuple[str, str | None]:
        """The ItemId (and change key) of a CalendarView instance. An occurrence the gateway expanded itself
        (series.py) carries its master's id: the occurrence's own comes from a GetItem of its OccurrenceItemId,
        so that a decline of one occurrence never declines the whole series."""
        master, index = el.get(MASTER), el.get(INSTANCE)
        if master and index:
            try:
                (occ,) = _raise_first(_RawGetItem(account=acct).call(
                    items=[OccurrenceItemId(id=master, instance_index=int(index))], additional_fields=None,
                    shape="IdOnly"))
            except (xerr.ErrorCalendarOccurrenceIndexIsOutOfRecurrenceRange,
                    xerr.ErrorCalendarOccurrenceIsDeletedFromRecurrence) as e:
                raise NotFound(f"occurrence {index} of the series is gone: {e}", key="not_found") from e
            el = occ
        id_el = el.find(_T["ItemId"])
        if id_el is None or not id_el.get("Id"):
            raise PreconditionFailed("the server named no item for this occurrence", key="occurrence_unaddressable")
        return id_el.get("Id", ""), id_el.get("ChangeKey")

    # -- helpers ---------------------------------------------------------------------------------------------
    def _with_change_key(self, acct: Any, written: Written, fn: Callable[[str], T], *, fresh: bool = False) -> T:
        """``fn(change key)`` with the key we hold (or a fresh one); once more with a fresh key when Exchange says
        the item changed since (the room's answer changes the organizer's item after every write)."""
        change_key = self._change_key(acct, written.item_id) if fresh else written.change_key
        for attempt in (1, 2):
            try:
                return fn(change_key)
            except (xerr.ErrorIrresolvableConflict, xerr.ErrorStaleObject) as e:
                if attempt == 2:
                    raise PreconditionFailed(f"{written.uid} changed while the gateway wrote it: {e}",
                                             key="stale_change_key") from e
                change_key = self._change_key(acct, written.item_id)
        raise AssertionError("unreachable")

    def _change_key(self, acct: Any, ident: str) -> str:
        (el,) = _raise_first(_RawGetItem(account=acct).call(items=[(ident, None)], additional_fields=None,
                                                           shape="IdOnly"))
        id_el = el.find(_T["ItemId"])
        return id_el.get("ChangeKey", "") if id_el is not None else ""

    def _when(self, value: datetime | None) -> Any:
        if value is None:
            raise ValueError("a booking needs a start and an end")
        return self.source.ews_datetime(value)

    @staticmethod
    def _in_zone(value: datetime, tz: EWSTimeZone) -> EWSDateTime:
        return EWSDateTime.from_datetime(value.astimezone(UTC).replace(tzinfo=EWSTimeZone("UTC"))).astimezone(tz)

    def _location(self, room: str) -> str:
        name = self.room_names(room) if self.room_names is not None else None
        return name or room


def _attendee(person: Person) -> Attendee:
    return Attendee(mailbox=Mailbox(email_address=person.email, name=person.name), response_type="Unknown")


def booker_text(booker: Person | None) -> str:
    """The body of a room appointment: who booked it (the item's organizer is the room itself)."""
    if booker is None or not (booker.name or booker.email):
        return "Booked through the booking gateway."
    who = f"{booker.name} <{booker.email}>" if booker.name and booker.email else (booker.name or booker.email)
    return f"Booked by {who} through the booking gateway."


@dataclass(frozen=True)
class _Version:
    """The organizer's meeting as it is now, to tell an answer to it from an answer to an earlier version."""

    start: datetime | None
    end: datetime | None
    sequence: int | None  # PidLidAppointmentSequence: Exchange raises it with every new time
    changed: datetime | None  # the organizer's item's LastModifiedTime

    def answered_by(self, response: etree._Element) -> bool:
        when = (_time(response, "Start"), _time(response, "End"))
        if when != (None, None) and when != (self.start, self.end):
            return False  # an answer to another time
        sequence = _number(_ext_value(response, _SEQUENCE_URI))
        if sequence is not None and self.sequence is not None:
            return sequence >= self.sequence
        # Without sequence numbers: not older than the item's last change (which, as the organizer's copy has not
        # recorded the answer, is the gateway's write). Second resolution, so a move within the same second as an
        # earlier answer to the same time is not told apart.
        received = _time(response, "DateTimeReceived")
        return self.changed is None or received is None or received >= self.changed.replace(microsecond=0)


def _number(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _newest_response(found: list[Any], room: str, version: _Version) -> tuple[str, str] | None:
    """(id, item class) of the room's newest MeetingResponse to the meeting as it is now (a moved meeting is asked
    again; an answer to an earlier version does not count)."""
    best: tuple[str, str, str] | None = None
    for el in found:
        ident = item_id(el)
        item_class = el.findtext(_T["ItemClass"]) or ""
        if not ident or item_class not in _RESPONSE_CLASSES:
            continue
        if _address(el.find(_T["From"])) != room and _address(el.find(_T["Sender"])) != room:
            continue
        if not version.answered_by(el):
            continue
        rank = (el.findtext(_T["DateTimeReceived"]) or "", ident, item_class)
        if best is None or rank > best:
            best = rank
    return (best[1], best[2]) if best is not None else None


def _newest_decline(found: list[Any], room: str) -> str | None:
    """The id of the room's newest negative MeetingResponse among Inbox items of one meeting."""
    best: tuple[int, str, str] | None = None
    for el in found:
        ident = item_id(el)
        if not ident:
            continue
        item_class = el.findtext(_T["ItemClass"]) or ""
        senders = {_address(el.find(_T["From"])), _address(el.find(_T["Sender"]))} - {""}
        if senders and room not in senders:
            continue
        if item_class and not item_class.startswith("IPM.Schedule.Meeting.Resp"):
            continue
        rank = (1 if ".Neg" in item_class else 0, el.findtext(_T["DateTimeReceived"]) or "", ident)
        if best is None or rank > best:
            best = rank
    return best[2] if best is not None else None

