"""The Resource Booking Attendant of room mailboxes: answers meeting messages after a delay, per room settings.

It works the way Exchange's does: messages are processed in arrival order, some time after they arrive
(``SimulatorConfig.rba_delay``); an accepted request becomes the room's copy (subject replaced by the
organizer's name, body removed, private flag cleared, under the defaults) and the organizer's copy records
the room's answer; a declined one leaves nothing in the room and a Decline on the organizer's copy. Every
answer also reaches the organizer's Inbox as a MeetingResponse whose text says why a request was declined
(messages.DECLINE_REASON_TEXT). An organizer allowed only to request (RequestInPolicy) is held tentatively.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING

import structlog

from gateway.simulator.actions import Invitation, remove_instance
from gateway.simulator.calendar import CalendarItem, zone
from gateway.simulator.mailboxes import CalendarProcessing, Mailbox
from gateway.simulator.messages import attendant_text

if TYPE_CHECKING:
    from gateway.simulator.server import Simulator

log = structlog.get_logger("gateway.simulator.attendant")

CONFLICTING = ("Busy", "OOF", "Tentative", "WorkingElsewhere")
HORIZON_INSTANCES = 1000  # instances of an endless series the attendant checks, like Exchange's finite scan


@dataclass
class Decision:
    room: str
    uid: str
    subject: str
    outcome: str  # accepted, declined, tentative, cancelled, ignored
    reason: str = ""  # conflict, outside_booking_window, too_long, recurring_not_allowed, not_permitted
    declined_instances: int = 0
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


class BookingAttendant:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.decisions: list[Decision] = []
        self.pending = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enqueue(self, room: Mailbox, inv: Invitation) -> None:
        self.pending += 1
        self.idle.clear()
        loop = asyncio.get_running_loop()
        loop.call_later(self.sim.config.rba_delay, self._run, room, inv)

    def _run(self, room: Mailbox, inv: Invitation) -> None:
        try:
            self.process(room, inv)
        except Exception:  # one bad message must not stop the attendant
            log.exception("attendant.failed", room=room.smtp)
        finally:
            self.pending -= 1
            if self.pending == 0:
                self.idle.set()

    # -- the decision --------------------------------------------------------------------------------
    def process(self, room: Mailbox, inv: Invitation) -> Decision | None:
        cal = self.sim.calendars
        snap = inv.snapshot
        settings = room.processing or CalendarProcessing()
        existing = cal.copy_for(room, snap.goid)
        if existing is not None and existing.meeting_seq > snap.meeting_seq:
            return self._record(room, snap, "ignored", "out_of_date")  # a newer request was handled already
        if settings.automate_processing == "None":
            return self._record(room, snap, "ignored", "automate_processing_none")
        if inv.kind == "cancel":
            if existing is not None:
                if inv.original_start is not None:
                    remove_instance(existing, inv.original_start)
                    self.sim.directory.touch(existing)
                else:
                    self.sim.directory.remove_item(existing, "MoveToDeletedItems")
            return self._record(room, snap, "cancelled")
        if settings.automate_processing == "AutoUpdate":
            cal.place_copy(room, inv, existing, response="NoResponseReceived", free_busy="Tentative")
            return self._record(room, snap, "tentative")
        if inv.original_start is not None and existing is not None:
            return self._process_occurrence(room, inv, existing)
        reason, declined = self.evaluate(room, settings, snap, inv.organizer_mailbox)
        if reason:
            if existing is not None:
                self.sim.directory.remove_item(existing, "MoveToDeletedItems")
            self._answer(room, settings, snap, "Decline", reason)
            return self._record(room, snap, "declined", reason)
        # In policy, but only a delegate may approve: held tentatively (TentativePendingApproval).
        pending = inv.organizer_mailbox is not None and settings.permission(inv.organizer_mailbox.smtp) == "request"
        answer = "Tentative" if pending else "Accept"
        item = cal.place_copy(room, inv, existing, response=answer, free_busy="Tentative" if pending else "Busy")
        self._apply_room_policy(item, settings)
        if item.recurrence is not None and not settings.enforce_scheduling_horizon:
            self._truncate(item, self.horizon(room, settings, datetime.now(UTC)))
        if declined:
            for original in declined:
                remove_instance(item, original)
        self.sim.directory.touch(item)
        self._answer(room, settings, snap, answer)
        return self._record(room, snap, "tentative" if pending else "accepted", declined_instances=len(declined))

    def _answer(self, room: Mailbox, settings: CalendarProcessing, snap: CalendarItem, response: str,
                reason: str = "", original: datetime | None = None) -> None:
        """The attendant's MeetingResponse to the organizer (its text names the reason of a decline)."""
        body = attendant_text(response, reason, settings.enable_response_details)
        self.sim.calendars.record_response(snap.goid, snap.organizer, room, response, original, meeting=snap,
                                           body=body)

    def _process_occurrence(self, room: Mailbox, inv: Invitation, existing: CalendarItem) -> Decision:
        """One occurrence of an accepted series moved: accept it in its new slot, or decline that instance."""
        assert inv.original_start is not None
        exc = (inv.snapshot.exceptions or {}).get(inv.original_start)
        if exc is not None and (room.processing is None or not room.processing.allow_conflicts) and \
                self._busy(room, existing.goid, exc.start, exc.end):
            remove_instance(existing, inv.original_start)
            self.sim.directory.touch(existing)
            self._answer(room, room.processing or CalendarProcessing(), inv.snapshot, "Decline", "conflict",
                         inv.original_start)
            return self._record(room, inv.snapshot, "declined", "conflict", declined_instances=1)
        item = self.sim.calendars.place_copy(room, inv, existing, response="Accept", free_busy="Busy")
        self._apply_room_policy(item, room.processing or CalendarProcessing(), master=False)
        return self._record(room, inv.snapshot, "accepted")

    def evaluate(self, room: Mailbox, s: CalendarProcessing, snap: CalendarItem,
                 organizer: Mailbox | None) -> tuple[str, list[datetime]]:
        """('' or a decline reason, occurrences to decline while accepting the series)."""
        now = datetime.now(UTC)
        if organizer is None and not s.process_external_meeting_messages:
            return "not_permitted", []
        if organizer is not None and not s.permission(organizer.smtp):
            return "not_permitted", []  # neither BookInPolicy nor RequestInPolicy (nor their All... forms)
        if snap.recurrence is not None and not s.allow_recurring_meetings:
            return "recurring_not_allowed", []
        duration = snap.end - snap.start
        if s.maximum_duration_in_minutes and duration > timedelta(minutes=s.maximum_duration_in_minutes):
            return "too_long", []
        horizon = self.horizon(room, s, now)
        instances = self._instances(snap, now, horizon)
        if snap.start > horizon:  # a single meeting, or a series whose first meeting is beyond the window
            return "outside_booking_window", []
        if snap.recurrence is not None and s.enforce_scheduling_horizon:
            rec = snap.recurrence
            if (rec.end_date is None and rec.count is None) or any(s_ > horizon for s_, _, _ in
                                                                   self._instances(snap, now, None, 2000)):
                return "outside_booking_window", []
        if s.allow_conflicts:
            return "", []
        conflicts = [orig for start, end, orig in instances if self._busy(room, snap.goid, start, end)]
        if not conflicts:
            return "", []
        if snap.recurrence is None:
            return "conflict", []
        total = max(1, len(instances))
        if len(conflicts) <= s.maximum_conflict_instances and len(conflicts) * 100 <= \
                s.conflict_percentage_allowed * total:
            return "", [c for c in conflicts if c is not None]
        return "conflict", []

    @staticmethod
    def horizon(room: Mailbox, s: CalendarProcessing, now: datetime) -> datetime:
        """The end of the booking window: BookingWindowInDays from now ("the value 0 means today")."""
        if s.booking_window_in_days > 0:
            return now + timedelta(days=s.booking_window_in_days)
        tz = zone(room.working_tz)
        tomorrow = now.astimezone(tz).date() + timedelta(days=1)
        return datetime.combine(tomorrow, time(0), tzinfo=tz).astimezone(UTC)

    @staticmethod
    def _instances(snap: CalendarItem, now: datetime, horizon: datetime | None,
                   limit: int = HORIZON_INSTANCES) -> list[tuple[datetime, datetime, datetime | None]]:
        if snap.recurrence is None:
            return [(snap.start, snap.end, None)]
        out = []
        far = horizon or datetime(9000, 1, 1, tzinfo=UTC)
        for inst in snap.instances(now - timedelta(days=1), far):
            out.append((inst.start, inst.end, inst.original_start))
            if len(out) >= limit:
                break
        return out

    def _busy(self, room: Mailbox, goid: bytes, start: datetime, end: datetime) -> bool:
        for other in room.calendar.items.values():
            if other.goid == goid or other.is_cancelled:
                continue
            for inst in other.instances(start, end):
                if inst.free_busy in CONFLICTING:
                    return True
        return False

    @staticmethod
    def _truncate(item: CalendarItem, horizon: datetime) -> None:
        """EnforceSchedulingHorizon $false: the room keeps the series only up to the booking window's end."""
        rec = item.recurrence
        assert rec is not None
        within = [original for _index, original in item.occurrence_starts(until=horizon + timedelta(seconds=1))]
        if not within or (rec.count is not None and len(within) >= rec.count):
            return
        last = within[-1]
        last_date = last.astimezone(zone(item.tz)).date()
        if rec.end_date is not None and rec.end_date <= last_date:
            return
        # A new Recurrence object: the pattern is shared with the organizer's snapshot and must not change there.
        item.recurrence = replace(rec, end_date=last_date, count=None)
        if item.exceptions:
            item.exceptions = {k: v for k, v in item.exceptions.items() if k <= last} or None
        if item.deleted:
            item.deleted = {d for d in item.deleted if d <= last} or None

    @staticmethod
    def _apply_room_policy(item: CalendarItem, s: CalendarProcessing, master: bool = True) -> None:
        organizer = item.organizer.name if item.organizer else ""
        if not master:
            pass
        elif s.delete_subject and s.add_organizer_to_subject:
            item.subject = organizer
        elif s.delete_subject:
            item.subject = ""
        elif s.add_organizer_to_subject:
            item.subject = f"{organizer} {item.subject}".strip()
        if s.delete_comments and master:
            item.body = None
        if s.remove_private_property and master:
            item.sensitivity = "Normal"
        if item.exceptions:
            for exc in item.exceptions.values():
                if s.delete_subject:
                    exc.subject = None
                if s.delete_comments:
                    exc.body = None

    def _record(self, room: Mailbox, snap: CalendarItem, outcome: str, reason: str = "",
                declined_instances: int = 0) -> Decision:
        d = Decision(room.smtp, snap.uid, snap.subject, outcome, reason, declined_instances)
        self.decisions.append(d)
        if len(self.decisions) > 10_000:
            del self.decisions[:5_000]
        log.debug("attendant.decided", room=room.smtp, outcome=outcome, reason=reason)
        return d
