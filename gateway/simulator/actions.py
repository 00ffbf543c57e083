"""What people (and clients) do to calendars, with Exchange's meeting semantics.

Both the EWS operations and the control API go through here, so a meeting created from a test's control call
and one created by a client's CreateItem travel the same path: the organizer's copy is saved, invitations go
to attendees (people get a tentative copy at once; rooms hear from their booking attendant later), responses
flow back to the organizer's copy, and cancellations reach every copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway.simulator.calendar import Attendee, CalendarItem, Modified, Person, goid_for_uid
from gateway.simulator.itemxml import all_day_bounds
from gateway.simulator.mailboxes import Directory, Folder, Mailbox
from gateway.simulator.messages import SUBJECT_PREFIX, MeetingMessage
from gateway.simulator.soap import EwsError

if TYPE_CHECKING:
    from gateway.simulator.server import Simulator

CONTENT_FIELDS = ("subject", "body", "body_type", "location", "start", "end", "all_day", "tz", "sensitivity",
                  "importance", "categories", "online_url", "recurrence")
SEND_VALUES = ("SendToNone", "SendOnlyToAll", "SendOnlyToChanged", "SendToAllAndSaveCopy",
               "SendToChangedAndSaveCopy")


def sends(mode: str | None) -> bool:
    return bool(mode) and mode != "SendToNone"


@dataclass
class Invitation:
    """A meeting message on its way to an attendee: a snapshot of the organizer's item at send time."""

    kind: str  # request, cancel
    snapshot: CalendarItem
    organizer_mailbox: Mailbox | None  # None for an organizer outside the organisation
    original_start: datetime | None = None  # for a message about one occurrence


class Calendars:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    @property
    def directory(self) -> Directory:
        return self.sim.directory

    # -- helpers -------------------------------------------------------------------------------------
    def new_item(self, mailbox: Mailbox, folder: Folder | None = None, **values: Any) -> CalendarItem:
        d = self.directory
        item = CalendarItem(d.new_iid(), mailbox, folder or mailbox.calendar, start=values.pop("start"),
                            end=values.pop("end"), tz=values.pop("tz", "UTC"), goid=values.pop("goid", None))
        apply_values(item, values)
        return item

    def snapshot(self, item: CalendarItem) -> CalendarItem:
        snap = CalendarItem(0, item.mailbox, item.folder, start=item.start, end=item.end, tz=item.tz, goid=item.goid)
        copy_content(item, snap)
        snap.organizer = item.organizer
        snap.required = tuple(a.copy() for a in item.required)
        snap.optional = tuple(a.copy() for a in item.optional)
        snap.resources = tuple(a.copy() for a in item.resources)
        snap.meeting_seq = item.meeting_seq
        snap.is_cancelled = item.is_cancelled
        return snap

    def copy_for(self, mailbox: Mailbox, goid: bytes) -> CalendarItem | None:
        iid = mailbox.calendar.by_goid.get(goid)
        return self.directory.item(iid) if iid is not None else None

    # -- organizer actions ---------------------------------------------------------------------------
    def create(self, mailbox: Mailbox, values: dict[str, Any], ext: dict[Any, Any] | None = None,
               send: str = "SendToNone", folder: Folder | None = None) -> CalendarItem:
        """CreateItem of a calendar item: an appointment, or a meeting when it has attendees."""
        values = dict(values)
        if "start" not in values or "end" not in values:
            raise EwsError("ErrorInvalidRequest", "A calendar item needs Start and End.")
        uid = values.pop("uid", None)
        if uid:
            values["goid"] = goid_for_uid(uid)
        values.setdefault("tz", "UTC")
        values.pop("end_tz", None)
        if values["end"] < values["start"]:
            raise EwsError("ErrorCalendarEndDateIsEarlierThanStartDate", "The end date is earlier than the start.")
        if values.get("all_day"):
            values["start"], values["end"] = all_day_bounds(values["start"], values["end"], values["tz"])
        rec = values.get("recurrence")
        if rec is not None:
            _align_series_start(values, rec)
        item = self.new_item(mailbox, folder, **values)
        if ext:
            item.ext = dict(ext)
        has_attendees = bool(item.required or item.optional or item.resources)
        item.organizer = mailbox.person
        faults = self.sim.faults
        if faults.room_as_required and item.resources:
            rooms = tuple(a for a in item.resources
                          if (mb := self.directory.find(a.person.email)) is not None and mb.kind == "room")
            item.required += rooms
            item.resources = tuple(a for a in item.resources if a not in rooms)
        if has_attendees:
            item.is_meeting = True
            item.my_response = "Organizer"
            for a in item.attendees():
                a.response = "" if faults.no_response_type else "Unknown"  # "": rendered without ResponseType
        self.directory.add_item(item)
        if has_attendees and sends(send):
            item.request_sent = True
            self.invite(item, list(item.attendees()))
        return item

    def invite(self, item: CalendarItem, attendees: list[Attendee], original_start: datetime | None = None) -> None:
        snap = self.snapshot(item)
        for a in attendees:
            target = self.directory.find(a.person.email)
            if target is None or target is item.mailbox:
                continue
            self.deliver(target, Invitation("request", snap, item.mailbox, original_start))

    def update(self, item: CalendarItem, values: dict[str, Any], send: str = "SendToAllAndSaveCopy",
               removed: list[Attendee] | None = None) -> None:
        """The organizer changes the series or single item (UpdateItem on the master or the item)."""
        changed_time = any(k in values and values[k] != getattr(item, k) for k in ("start", "end", "location",
                                                                                     "recurrence"))
        old_attendees = {a.person.email for a in item.attendees()}
        if values.get("all_day", item.all_day) and ("start" in values or "end" in values or "all_day" in values):
            values["start"], values["end"] = all_day_bounds(values.get("start", item.start),
                                                            values.get("end", item.end), values.get("tz", item.tz))
        if values.get("end", item.end) < values.get("start", item.start):
            raise EwsError("ErrorCalendarEndDateIsEarlierThanStartDate", "The end date is earlier than the start.")
        if "recurrence" in values and values["recurrence"] is not None:
            _align_series_start(values, values["recurrence"])
            item.exceptions, item.deleted = None, None  # a new pattern drops the old exceptions, as in Outlook
        apply_values(item, values)
        if item.organizer is None:
            item.organizer = item.mailbox.person
        if item.required or item.optional or item.resources:
            item.is_meeting = True
        if changed_time:
            item.meeting_seq += 1
            for a in item.attendees():
                if a.person.email in old_attendees:
                    a.response = "Unknown"  # a moved meeting asks everyone again
        self.directory.touch(item)
        if item.is_meeting and sends(send) and item.my_response == "Organizer":
            item.request_sent = True
            self.invite(item, list(item.attendees()))
            gone = [Attendee(self.directory.person(e)) for e in old_attendees
                    - {a.person.email for a in item.attendees()}]
            self._send_cancel(item, gone + (removed or []))

    def update_occurrence(self, master: CalendarItem, original: datetime, values: dict[str, Any],
                          send: str = "SendToAllAndSaveCopy") -> Modified:
        exc = self.modify_instance(master, original, values)
        master.meeting_seq += 1
        self.directory.touch(master)
        if master.is_meeting and sends(send) and master.my_response == "Organizer":
            self.invite(master, list(master.attendees()), original)
        return exc

    def modify_instance(self, master: CalendarItem, original: datetime, values: dict[str, Any]) -> Modified:
        if master.exceptions is None:
            master.exceptions = {}
        exc = master.exceptions.get(original)
        if exc is None:
            exc = Modified(self.directory.new_iid(), original, original, master.occurrence_end(original))
            master.exceptions[original] = exc
        else:
            exc.version += 1
        for key in ("start", "end", "subject", "location", "body", "free_busy"):
            if key in values:
                setattr(exc, key, values[key])
        if exc.end < exc.start:
            raise EwsError("ErrorCalendarEndDateIsEarlierThanStartDate", "The end date is earlier than the start.")
        exc.modified = datetime.now(UTC)
        return exc

    def delete_occurrence(self, master: CalendarItem, original: datetime, send: str = "SendToAllAndSaveCopy") -> None:
        remove_instance(master, original)
        self.directory.touch(master)
        if master.is_meeting and sends(send) and master.my_response == "Organizer":
            snap = self.snapshot(master)
            for a in master.attendees():
                target = self.directory.find(a.person.email)
                if target is not None and target is not master.mailbox:
                    self.deliver(target, Invitation("cancel", snap, master.mailbox, original))

    def cancel(self, item: CalendarItem, send: bool = True, delete_type: str = "MoveToDeletedItems") -> None:
        """The organizer cancels: its copy goes, every attendee hears."""
        if item.is_meeting and item.my_response != "Organizer":
            raise EwsError("ErrorCalendarIsNotOrganizer", "The user is not the organizer of this meeting.")
        if send and item.is_meeting:
            self._send_cancel(item, list(item.attendees()))
        self.directory.remove_item(item, delete_type)

    def _send_cancel(self, item: CalendarItem, attendees: list[Attendee]) -> None:
        if not attendees:
            return
        snap = self.snapshot(item)
        snap.is_cancelled = True
        for a in attendees:
            target = self.directory.find(a.person.email)
            if target is not None and target is not item.mailbox:
                self.deliver(target, Invitation("cancel", snap, item.mailbox))

    # -- attendee actions ----------------------------------------------------------------------------
    def respond(self, item: CalendarItem, response: str, original: datetime | None = None, send: bool = True, *,
                body: str | None = None, body_type: str = "Text", save_copy: bool = False) -> None:
        """Accept, Tentative or Decline an attendee's copy (the whole series, or one occurrence).

        With ``send`` the organizer gets a MeetingResponse (carrying ``body``) and its calendar attendant records
        the answer; ``save_copy`` (SendAndSaveCopy) also keeps the sent response in the attendee's Sent Items.
        """
        if item.my_response == "Organizer":
            code = "ErrorCalendarIsOrganizerForDecline" if response == "Decline" else \
                "ErrorCalendarIsOrganizerForAccept" if response == "Accept" else "ErrorCalendarIsOrganizerForTentative"
            raise EwsError(code, "The organizer cannot respond to their own meeting.")
        if item.is_cancelled:
            raise EwsError(f"ErrorCalendarIsCancelledFor{response}", "The meeting was cancelled.")
        meeting = self.snapshot(item)
        if response == "Decline" and self.sim.faults.quiet_declines:
            # As some servers do: the copy is marked (or the occurrence dropped) where it is, and the folder's
            # sync sequence does not move, so SyncFolderItems has nothing to report.
            if original is not None:
                remove_instance(item, original)
            else:
                item.my_response, item.free_busy = "Decline", "Free"
        elif original is not None:
            if response == "Decline":
                remove_instance(item, original)
                self.directory.touch(item)
            else:
                exc = self.modify_instance(item, original, {"free_busy": "Busy" if response == "Accept"
                                                            else "Tentative"})
                exc.response = response
                self.directory.touch(item)
        else:
            item.my_response = response
            item.reply_time = datetime.now(UTC)
            if response == "Decline":
                self.directory.remove_item(item, "MoveToDeletedItems")
            else:
                item.free_busy = "Busy" if response == "Accept" else "Tentative"
                self.directory.touch(item)
        if send:
            self.record_response(item.goid, item.organizer, item.mailbox, response, original, meeting=meeting,
                                 body=body, body_type=body_type, save_copy=save_copy)

    def record_response(self, goid: bytes, organizer: Person | None, attendee: Mailbox, response: str,
                        original: datetime | None = None, *, meeting: CalendarItem | None = None,
                        body: str | None = None, body_type: str = "Text", save_copy: bool = False) -> None:
        """An attendee's answer reaches the organizer: a MeetingResponse in the Inbox (when ``meeting``, the
        answered copy, is given), and the organizer's calendar attendant writes it onto the organizer's copy."""
        if organizer is None:
            return
        org_mb = self.directory.find(organizer.email)
        org_item = self.copy_for(org_mb, goid) if org_mb is not None else None
        if meeting is not None:
            subject = SUBJECT_PREFIX[response] + (meeting.subject or "")
            if save_copy:
                sent = attendee.folders["sentitems"]
                self.directory.add_item(MeetingMessage(
                    self.directory.new_iid(), attendee, sent, response=response, sender=attendee.person,
                    recipients=(organizer,), meeting=meeting, subject=subject, body=body, body_type=body_type,
                    original_start=original))
            if org_mb is not None:
                inbox = org_mb.folders["inbox"]
                self.directory.add_item(MeetingMessage(
                    self.directory.new_iid(), org_mb, inbox, response=response, sender=attendee.person,
                    recipients=(organizer,), meeting=meeting, subject=subject, body=body, body_type=body_type,
                    original_start=original, associated_iid=org_item.iid if org_item is not None else None))
        if org_item is None or original is not None or self.sim.faults.no_response_type:
            return  # per-occurrence responses are kept in the organizer's exception table; not modelled
        for a in org_item.attendees():
            if a.person.email == attendee.smtp:
                a.response = response
                a.response_time = datetime.now(UTC)
        self.directory.touch(org_item, free_busy=False)

    def deliver(self, target: Mailbox, inv: Invitation) -> None:
        """A meeting message reaches a mailbox."""
        if target.kind == "room":
            self.sim.attendant.enqueue(target, inv)
            return
        existing = self.copy_for(target, inv.snapshot.goid)
        if inv.kind == "cancel":
            if existing is None:
                return
            if inv.original_start is not None:
                remove_instance(existing, inv.original_start)
                self.directory.touch(existing)
            else:
                existing.is_cancelled = True
                if not existing.subject.startswith("Canceled: "):
                    existing.subject = "Canceled: " + existing.subject
                existing.free_busy = "Free"
                self.directory.touch(existing)
            return
        self.place_copy(target, inv, existing, response="NoResponseReceived", free_busy="Tentative")

    def place_copy(self, target: Mailbox, inv: Invitation, existing: CalendarItem | None, *, response: str,
                   free_busy: str) -> CalendarItem:
        """Create or refresh an attendee's copy from the invitation's snapshot."""
        snap = inv.snapshot
        if inv.original_start is not None and existing is not None:
            src = (snap.exceptions or {}).get(inv.original_start)
            if src is not None:
                exc = self.modify_instance(existing, inv.original_start, {
                    "start": src.start, "end": src.end, "subject": src.subject, "location": src.location})
                exc.response = response
            self.directory.touch(existing)
            return existing
        fresh = existing is None
        item = existing or CalendarItem(self.directory.new_iid(), target, target.calendar, start=snap.start,
                                        end=snap.end, tz=snap.tz, goid=snap.goid)
        copy_content(snap, item)
        item.exceptions = {k: _copy_exception(v, self.directory.new_iid()) for k, v in
                           (snap.exceptions or {}).items()} or None
        item.deleted = set(snap.deleted) if snap.deleted else None
        item.organizer = snap.organizer
        item.required, item.optional, item.resources = snap.required, snap.optional, snap.resources
        item.is_meeting = True
        item.is_cancelled = False
        item.meeting_seq = snap.meeting_seq
        item.my_response = response
        item.free_busy = free_busy
        item.item_class = "IPM.Appointment"
        if fresh:
            self.directory.add_item(item)
        else:
            self.directory.touch(item)
        return item


def apply_values(item: CalendarItem, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if key == "reminder_set":
            if not value:
                item.reminder = None
            continue
        if key in ("required", "optional", "resources"):
            value = tuple(a.copy() for a in value)
        if not hasattr(item, key):
            raise EwsError("ErrorInvalidPropertySet", f"The property {key} cannot be set on a calendar item.")
        setattr(item, key, value)


def copy_content(src: CalendarItem, dst: CalendarItem) -> None:
    for key in CONTENT_FIELDS:
        setattr(dst, key, getattr(src, key))
    if src.recurrence is not None:
        dst.exceptions = dict(src.exceptions) if src.exceptions else None
        dst.deleted = set(src.deleted) if src.deleted else None


def _copy_exception(src: Modified, iid: int) -> Modified:
    exc = Modified(iid, src.original_start, src.start, src.end)
    exc.subject, exc.location, exc.body, exc.free_busy = src.subject, src.location, src.body, src.free_busy
    return exc


def remove_instance(master: CalendarItem, original: datetime) -> None:
    if master.recurrence is None:
        raise EwsError("ErrorCalendarOccurrenceIndexIsOutOfRecurrenceRange", "The item is not a recurring master.")
    if master.deleted is None:
        master.deleted = set()
    master.deleted.add(original)
    if master.exceptions:
        master.exceptions.pop(original, None)


def _align_series_start(values: dict[str, Any], rec: Any) -> None:
    """Exchange moves a series' Start/End onto its first occurrence (the pattern wins over the given date)."""
    from datetime import datetime as _dt
    from datetime import time as _time

    from gateway.simulator.calendar import zone

    tz = zone(values.get("tz"))
    start, end = values["start"], values["end"]
    local = start.astimezone(tz)
    rec.start_date = rec.start_date or local.date()
    first = next(iter(rec.local_dates()), None)
    if first is None:
        raise EwsError("ErrorRecurrenceHasNoOccurrence", "The recurrence pattern has no occurrences.")
    new_start = _dt.combine(first, _time(local.hour, local.minute, local.second), tzinfo=tz).astimezone(UTC)
    values["start"], values["end"] = new_start, new_start + (end - start)
