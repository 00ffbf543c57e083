"""The command service: booking commands from the cloud (or the local API) executed into Exchange.

Commands arrive validated (relay.protocol.parse_command). Here they pass policy and the rate limit, the
idempotency journal, and are executed through a ``CalendarWriter`` (design.md §5, exchange-semantics.md §4):

- create with an organizer (a directory user): a meeting in the organizer's calendar with the room as a
  resource; the result waits for the room's booking attendant. If the service account may not impersonate the
  organizer, the booking falls back to the room-calendar path with the organizer as the booker.
- create without one (an external booker, a room display): an appointment in the room's calendar. Exchange
  checks nothing there, so the gateway does: under a per-room lock it checks, writes, and checks again (a
  writer outside the gateway may have raced it), withdrawing its own appointment if it lost.
- update and cancel touch only what the gateway created (the journal knows each meeting it made); decline
  frees the room from anything, leaving the organizer's meeting intact.
- With a directory, the organizer is checked again when their meeting is moved: only someone create would book a
  meeting for (enabled, in the booking group) moves it. Cancel is never refused for the organizer's sake (it only
  frees the room: a leaver's meeting must not hold it); decline acts as the room; an appointment in the room's
  calendar was booked for no directory user (external, or the impersonation fallback) and moves as the room's own.

Idempotency: every write command holds its key's lock and a journal row. A retried key gets the stored result;
a key found ``started`` (crash, timeout, reconnect) continues from the write it recorded, or asks Exchange
whether the write happened (the key is stamped on the item) before writing at most once more.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import structlog

from gateway.commands.locks import KeyedLocks
from gateway.commands.organizers import OrganizerCheck
from gateway.commands.policy import Policy, RateLimiter
from gateway.config import CommandsConfig
from gateway.errors import (
    AuthError,
    GatewayError,
    ImpersonationDenied,
    MailboxNotFound,
    NotFound,
    PreconditionFailed,
    RoomIsOrganizer,
    RoomUnknown,
    TransientError,
)
from gateway.model import (
    DECLINE_REASONS,
    Booking,
    Command,
    CommandResult,
    Window,
    accepted,
    booking_id_for,
    declined,
    failed,
)
from gateway.observability.metrics import Metrics
from gateway.ports import Busy, CalendarWriter, Store, Written
from gateway.store.journal import CommandJournal, JournalEntry

log = structlog.get_logger(__name__)

BookingLookup = Callable[[str, str], Booking | None]  # (room, booking id) -> the booking; blocking, run in a thread
# (room, meetings the command changed) -> sync the room soon and read those meetings back whatever SyncFolderItems
# says: a server may apply a write (a decline) without a change the sync would see.
Resync = Callable[[str, frozenset[str]], Awaitable[None] | None]

POLL_INTERVAL = 0.15  # seconds between the first looks at the room's answer ...
POLL_MAX_INTERVAL = 1.0  # ... growing to this: an unanswered poll reads three places in Exchange
WRITE_TYPES = ("create", "update", "cancel", "decline")

DECLINE_TEXT = {
    "conflict": "the room is already booked at that time",
    "outside_booking_window": "the room does not accept bookings that far ahead",
    "too_long": "the booking is longer than the room allows",
    "recurring_not_allowed": "the room does not accept recurring meetings",
    "not_permitted": "the room's booking policy does not allow this booking",
    "room_unknown": "the gateway does not sync this room",
    "outside_sync_window": "the booking lies outside the gateway's sync window",
    "organizer_not_permitted": "the organisation's directory does not let this organizer book through the cloud",
}
FALLBACK_NOTE = ("the gateway may not act for the organizer in Exchange, so the booking was made in the room's "
                 "calendar with the organizer as booker (no invitation was sent)")
EXTERNAL_NOTE = ("the organisation's directory does not list the organizer as an enabled user, so the booking was "
                 "made in the room's calendar with the organizer as booker (no invitation was sent)")
NO_MAILBOX_NOTE = ("the organizer has no mailbox in this Exchange, so the booking was made in the room's calendar "
                   "with the organizer as booker (no invitation was sent)")


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Run:
    """One execution of a write command."""

    cmd: Command
    room: str
    entry: JournalEntry | None  # the started row this run recovers (None: a new command)
    keep: bool = False  # on failure, keep the row 'started': a write may have happened, a retry continues it
    wrote: bool = False  # a write returned: resync the room
    stale: bool = False  # the snapshot knows something Exchange no longer has: resync the room
    uids: set[str] = field(default_factory=set)  # the meetings the command touched: read back after it
    organizer_miss: GatewayError | None = None  # recovery: what Exchange said of the organizer's mailbox

    @property
    def recorded(self) -> Written | None:
        return self.entry.written if self.entry else None


class CommandService:
    """Implements ports.CommandHandler."""

    def __init__(self, writer: CalendarWriter, store: Store, journal: CommandJournal,
                 settings: CommandsConfig, *, rooms: Callable[[], Collection[str]], resync: Resync,
                 booking_lookup: BookingLookup | None = None, metrics: Metrics | None = None,
                 window: Callable[[], Window] | None = None, clock: Callable[[], float] = time.monotonic,
                 poll_interval: float = POLL_INTERVAL, organizers: OrganizerCheck | None = None) -> None:
        self._writer = writer
        self._store = store
        self._journal = journal
        self._settings = settings
        self._policy = Policy(settings)
        self._limiter = RateLimiter(settings.rate_per_minute, settings.burst, clock=clock)
        self._rooms_of = rooms
        self._resync_room = resync
        self._lookup = booking_lookup or store.booking
        self._metrics = metrics
        self._window = window  # the coordinator's sync window: what the gateway can see (and so undo)
        self._clock = clock
        self._poll = poll_interval
        self._organizers = organizers  # the directory's word on organizers (None: no directory, trust the cloud)
        self._keys = KeyedLocks()
        self._room_locks = KeyedLocks()

    # -- the port -------------------------------------------------------------------------------------------
    async def execute(self, cmd: Command) -> CommandResult:
        """Every outcome is a CommandResult; nothing raises for a bad or failed command."""
        began = self._clock()
        try:
            result = await self._dispatch(cmd)
        except TransientError as e:  # the journal's store was busy or full: nothing was decided, retry
            log.warning("command.store_unavailable", key=cmd.key, type=cmd.type, error=e.key)
            result = failed(cmd.key, "internal", f"the gateway's store is unavailable ({e.key}); retry the same key",
                            retryable=True)
        except Exception:
            log.exception("command.internal_error", key=cmd.key, type=cmd.type)
            result = failed(cmd.key, "internal", "an unexpected error; the gateway logged it", retryable=False)
        seconds = max(0.0, self._clock() - began)
        if self._metrics is not None:
            self._metrics.command(cmd.type, result.status, result.reason, seconds)
        log.info("command.done", key=cmd.key, type=cmd.type, room=cmd.room, status=result.status,
                 reason=result.reason, ms=round(seconds * 1000))
        return result

    async def _dispatch(self, cmd: Command) -> CommandResult:
        if not self._settings.enabled:
            return declined(cmd, "not_permitted", "booking commands are disabled on this gateway")
        if not self._limiter.try_acquire():
            return failed(cmd.key, "rate_limited", f"too many commands; retry in {self._limiter.retry_after():.0f} s",
                          retryable=True)
        if cmd.type == "availability":
            return await self._availability(cmd)
        room = (cmd.room or "").lower()
        if cmd.type == "resync":
            if room not in self._synced():
                return declined(cmd, "room_unknown", DECLINE_TEXT["room_unknown"])
            await self._call_resync(room, frozenset())
            return accepted(cmd, "the room is being read again from Exchange")
        if cmd.type not in WRITE_TYPES:
            return failed(cmd.key, "unsupported_command", f"unknown command type {cmd.type!r}", retryable=False)
        return await self._write(cmd, room)

    # -- the journal around every write -----------------------------------------------------------------------
    async def _write(self, cmd: Command, room: str) -> CommandResult:
        async with self._keys.hold(cmd.key):  # a second execution of this key waits, then sees the first's row
            entry = await asyncio.to_thread(self._journal.begin, cmd)
            if entry is not None:
                if entry.request_hash != cmd.request_hash():
                    return failed(cmd.key, "idempotency_conflict",
                                  "this key was used before for a different request; use a new key", retryable=False)
                if entry.state == "done" and entry.result is not None:
                    return entry.result
                log.info("command.recovering", key=cmd.key, type=cmd.type, room=room,
                         written=entry.written is not None)
            # A recovered create may have written even without a record; only Exchange can say (_find_previous).
            keep = entry is not None and (cmd.type == "create" or entry.written is not None)
            run = _Run(cmd, room, entry, keep=keep)
            handler = {"create": self._create, "update": self._update, "cancel": self._cancel,
                       "decline": self._decline}[cmd.type]
            try:
                result = await handler(run)
            except GatewayError as e:
                result = self._failure(run, e)
            except OverflowError:  # a time near year 9999 that a conversion or a view around it cannot hold
                result = failed(cmd.key, "invalid_command", "a date in the command lies beyond what the gateway "
                                "can represent; send a date inside the sync window", retryable=False)
            except Exception:
                log.exception("command.internal_error", key=cmd.key, type=cmd.type)
                result = failed(cmd.key, "internal", "an unexpected error; the gateway logged it", retryable=False)
            if run.wrote or run.stale:
                await self._call_resync(room, frozenset(run.uids), quiet=True)
            if result.status in ("accepted", "declined"):
                await asyncio.to_thread(self._journal.finish, cmd.key, result)
            elif not run.keep:
                await asyncio.to_thread(self._journal.forget, cmd.key)
            return result

    def _failure(self, run: _Run, e: GatewayError) -> CommandResult:
        key = run.cmd.key
        if isinstance(e, TransientError):
            return failed(key, "exchange_unavailable",
                          f"Exchange is unavailable or throttling ({e.key}); retry the same key later", retryable=True)
        if isinstance(e, AuthError | NotFound) and run.entry is None and not run.wrote:
            run.keep = False  # Exchange refused before anything was written
        if isinstance(e, NotFound):
            run.stale = True
            return failed(key, "not_found", "the booking or its mailbox no longer exists in Exchange",
                          retryable=False)
        if isinstance(e, AuthError):
            return failed(key, "exchange_auth", f"Exchange refused the gateway ({e.key}): {e.remedy}",
                          retryable=False)
        if isinstance(e, PreconditionFailed):
            run.stale = True
            return failed(key, "exchange_unavailable", "the item changed in Exchange while the command ran; retry "
                          "the same key", retryable=True)
        log.error("command.error", key=key, type=run.cmd.type, error=e.key)
        return failed(key, "internal", f"the gateway could not complete the command ({e.key})", retryable=False)

    async def _record(self, run: _Run, written: Written) -> None:
        run.keep = True
        run.wrote = True
        run.uids.add(written.uid)
        await asyncio.to_thread(self._journal.record_write, run.cmd.key, written)

    # -- policy ---------------------------------------------------------------------------------------------
    def _synced(self) -> set[str]:
        return {r.lower() for r in self._rooms_of()}

    def _refusal(self, cmd: Command, room: str) -> CommandResult | None:
        synced = self._synced()
        if room not in synced:
            return declined(cmd, "room_unknown", DECLINE_TEXT["room_unknown"])
        if not self._policy.writable(room, synced):
            return declined(cmd, "not_permitted", "the gateway's policy does not let commands write to this room")
        if cmd.start is not None and cmd.end is not None and self._window is not None:
            window = self._window()
            if cmd.start < window.start or cmd.end > window.end:
                return declined(cmd, "outside_sync_window", f"the booking must lie inside the gateway's sync window "
                                f"({_iso(window.start)} to {_iso(window.end)}, set by rooms.days_back and "
                                "rooms.days_ahead): outside it the gateway could neither see nor cancel it")
        if cmd.start is not None and cmd.end is not None and self._policy.too_long(cmd.start, cmd.end):
            limit = self._settings.max_duration_minutes
            return declined(cmd, "too_long", f"the booking is longer than the gateway allows ({limit} minutes)")
        return None

    # -- create -----------------------------------------------------------------------------------------------
    async def _create(self, run: _Run) -> CommandResult:
        cmd, room = run.cmd, run.room
        written = run.recorded
        if written is None:
            refusal = self._refusal(cmd, room)
            if refusal is not None:
                return refusal
            if run.entry is not None:
                written = await self._find_previous(run)
                if written is None:
                    run.keep = False  # Exchange has nothing with this key: the write never happened
                else:
                    await self._record(run, written)
        if written is not None:  # continue what an earlier execution of this key wrote
            if written.mailbox.lower() == room:
                note = await self._room_calendar_note(run)
                async with self._room_locks.hold(room):
                    return await self._confirm_appointment(run, written, note)
            return await self._await_answer(run, written, created=True)
        if cmd.organizer is not None and cmd.organizer.email and self._organizers is not None:
            verdict = await self._organizers.verdict(cmd.organizer.email)
            if verdict.action == "refuse":
                log.info("command.organizer_refused", key=cmd.key, room=room)
                return declined(cmd, "organizer_not_permitted", verdict.why)
            if verdict.action == "external":
                log.info("command.organizer_external", key=cmd.key, room=room)
                as_booker = replace(cmd, organizer=None, booker=cmd.organizer, attendees=())
                return await self._create_appointment(run, as_booker, EXTERNAL_NOTE)
        if cmd.organizer is not None and cmd.organizer.email:
            run.keep = True
            try:
                written = await self._writer.create_meeting(cmd.organizer.email, room, cmd)
            except (ImpersonationDenied, MailboxNotFound) as e:
                log.info("command.organizer_fallback", key=cmd.key, room=room, why=e.key)
                as_booker = replace(cmd, organizer=None, booker=cmd.organizer, attendees=())
                note = FALLBACK_NOTE if isinstance(e, ImpersonationDenied) else NO_MAILBOX_NOTE
                return await self._create_appointment(run, as_booker, note)
            await self._record(run, written)
            return await self._await_answer(run, written, created=True)
        return await self._create_appointment(run, cmd, "")

    async def _find_previous(self, run: _Run) -> Written | None:
        """Did an earlier execution of this key write before it was interrupted? Exchange knows (the key is on
        the item): the organizer's calendar first, then the room's (the fallback path)."""
        cmd, room = run.cmd, run.room
        assert cmd.start is not None and cmd.end is not None
        mailboxes = [cmd.organizer.email] if cmd.organizer and cmd.organizer.email else []
        for mailbox in [*mailboxes, room]:
            try:
                found = await self._writer.find_by_key(mailbox, cmd.key, cmd.start, cmd.end)
            except (ImpersonationDenied, NotFound) as e:
                if mailbox == room:
                    raise
                run.organizer_miss = e
                continue
            if found is not None:
                return found
        return None

    async def _room_calendar_note(self, run: _Run) -> str:
        """The note a create that ended in the room's calendar answered with the first time, for a retry that
        continues it: why the organizer became the booker (the directory's word, or what Exchange said of their
        mailbox; asked again, as the journal keeps the write, not the reason)."""
        cmd = run.cmd
        if cmd.organizer is None or not cmd.organizer.email:
            return ""
        if self._organizers is not None:
            try:
                if (await self._organizers.verdict(cmd.organizer.email)).action == "external":
                    return EXTERNAL_NOTE
            except GatewayError:  # the booking is made: the note is not worth failing its confirmation for
                pass
        miss = run.organizer_miss
        if miss is None and cmd.start is not None and cmd.end is not None:
            try:
                await self._writer.find_by_key(cmd.organizer.email, cmd.key, cmd.start, cmd.end)
            except (ImpersonationDenied, NotFound) as e:
                miss = e
            except GatewayError:
                pass
        return NO_MAILBOX_NOTE if isinstance(miss, NotFound) else FALLBACK_NOTE

    async def _create_appointment(self, run: _Run, cmd: Command, note: str) -> CommandResult:
        assert cmd.start is not None and cmd.end is not None
        async with self._room_locks.hold(run.room):
            if await self._overlapping(run.room, cmd.start, cmd.end, exclude=None):
                return declined(run.cmd, "conflict", DECLINE_TEXT["conflict"])
            run.keep = True
            written = await self._writer.create_appointment(run.room, cmd)
            await self._record(run, written)
            return await self._confirm_appointment(run, written, note)

    async def _confirm_appointment(self, run: _Run, written: Written, note: str) -> CommandResult:
        """The check after the write: a writer outside the gateway may have booked the slot at the same time."""
        cmd = run.cmd
        assert cmd.start is not None and cmd.end is not None
        if await self._overlapping(run.room, cmd.start, cmd.end, exclude=written.uid):
            await self._writer.delete_appointment(written)
            log.info("command.race_lost", key=cmd.key, room=run.room)
            return declined(cmd, "conflict", "another booking took the room at the same moment; the gateway "
                                             "withdrew its own")
        return accepted(cmd, note or "booked in the room's calendar", uid=written.uid,
                        booking_id=booking_id_for(run.room, written.uid, None))

    async def _await_answer(self, run: _Run, written: Written, *, created: bool) -> CommandResult:
        """Wait for the room's booking attendant (it runs asynchronously in Exchange) up to the timeout."""
        cmd = run.cmd
        assert cmd.start is not None and cmd.end is not None
        deadline = self._clock() + self._settings.attendant_timeout_seconds
        delay = self._poll
        while True:
            answer = await self._writer.room_answer(written, run.room)
            if answer.outcome in ("accepted", "tentative", "declined"):
                break
            if self._clock() >= deadline:
                return failed(cmd.key, "attendant_timeout",
                              f"the room's booking attendant has not answered within "
                              f"{self._settings.attendant_timeout_seconds:g} s; retry the same key to learn its "
                              "answer (nothing is booked twice)", retryable=True)
            await asyncio.sleep(min(delay, max(0.0, deadline - self._clock())))
            delay = min(delay * 1.5, max(self._poll, POLL_MAX_INTERVAL))
        booking_id = booking_id_for(run.room, written.uid, None)
        if answer.outcome == "accepted":
            return accepted(cmd, "the room accepted", uid=written.uid, booking_id=booking_id)
        if answer.outcome == "tentative":
            return accepted(cmd, "the room holds the meeting tentatively: it awaits a delegate's approval",
                            uid=written.uid, booking_id=booking_id)
        reason = answer.reason if answer.reason in DECLINE_REASONS else None
        if reason is None:  # the attendant gave no code: tell a clash from a policy refusal ourselves
            clash = await self._overlapping(run.room, cmd.start, cmd.end, exclude=written.uid)
            reason = "conflict" if clash else "not_permitted"
        text = DECLINE_TEXT[reason]
        if created:
            text += await self._withdraw(run, written)
        else:
            text = f"the room declined the new time: {text}"
        return declined(cmd, reason, text)

    async def _withdraw(self, run: _Run, written: Written) -> str:
        """A declined create leaves no meeting behind: the organizer asked for this room, not for a meeting."""
        try:
            await self._writer.cancel_meeting(written)
        except GatewayError as e:
            log.warning("command.withdraw_failed", key=run.cmd.key, room=run.room, error=e.key)
            return "; the meeting is still in the organizer's calendar"
        return "; the meeting was withdrawn"

    async def _overlapping(self, room: str, start: datetime, end: datetime, *, exclude: str | None) -> list[Busy]:
        busy = await self._writer.busy(room, start, end)
        return [b for b in busy if b.status != "free" and b.start < end and b.end > start
                and (exclude is None or b.uid != exclude)]

    # -- update, cancel, decline ------------------------------------------------------------------------------
    async def _booking(self, run: _Run) -> Booking | None:
        assert run.cmd.booking_id is not None
        booking = await asyncio.to_thread(self._lookup, run.room, run.cmd.booking_id)
        if booking is not None:
            run.uids.add(booking.uid)
        return booking

    async def _origin(self, run: _Run, booking: Booking) -> JournalEntry | None:
        """The create command that made this booking, if the gateway made it (in this room)."""
        origin = await asyncio.to_thread(self._journal.by_uid, booking.uid)
        if origin is None or origin.written is None or (origin.room or "").lower() != run.room:
            return None
        return origin

    def _unknown_booking(self, run: _Run) -> CommandResult:
        return failed(run.cmd.key, "not_found", "the gateway knows no such booking in this room (any more)",
                      retryable=False)

    def _not_ours(self, run: _Run) -> CommandResult:
        return failed(run.cmd.key, "not_created_by_gateway", "the gateway did not create this booking, so it only "
                      "declines it (as the room); it never changes or cancels other people's meetings",
                      retryable=False)

    async def _update(self, run: _Run) -> CommandResult:
        cmd, room = run.cmd, run.room
        assert cmd.start is not None and cmd.end is not None
        found = await self._ours(run)
        if isinstance(found, CommandResult):
            return found
        booking, origin = found
        target = origin.written
        assert target is not None
        moved = run.recorded  # an interrupted update of this key already moved it
        if target.mailbox.lower() != room:  # a meeting: the room's attendant decides again
            if moved is None:
                refusal = await self._organizer_may_move(run, target.mailbox)
                if refusal is not None:
                    return refusal
                moved = await self._writer.move(target, cmd.start, cmd.end, notify=True)
                await self._moved(run, origin, moved)
            result = await self._await_answer(run, moved, created=False)
            if result.status == "declined":
                result = replace(result, message=result.message + await self._restore(run, moved, booking))
            return result
        async with self._room_locks.hold(room):
            if moved is None:
                if await self._overlapping(room, cmd.start, cmd.end, exclude=booking.uid):
                    return declined(cmd, "conflict", DECLINE_TEXT["conflict"])
                moved = await self._writer.move(target, cmd.start, cmd.end, notify=False)
                await self._moved(run, origin, moved)
            if await self._overlapping(room, cmd.start, cmd.end, exclude=booking.uid):
                await self._writer.move(moved, booking.start, booking.end, notify=False)
                log.info("command.race_lost", key=cmd.key, room=room)
                return declined(cmd, "conflict", "another booking took the room at the same moment; the booking "
                                                 "keeps its previous time")
        return accepted(cmd, "moved", uid=booking.uid, booking_id=booking.id)

    async def _organizer_may_move(self, run: _Run, organizer: str) -> CommandResult | None:
        """A meeting moves in its organizer's calendar: only while the directory still lets them book as create
        does (enabled, in the booking group). Anything else refuses, "external" too: the meeting cannot become a
        room-calendar booking, and the gateway does not act in the calendar of someone the directory disowns."""
        if self._organizers is None:
            return None
        verdict = await self._organizers.verdict(organizer)
        if verdict.action == "meeting":
            return None
        log.info("command.organizer_refused", key=run.cmd.key, room=run.room)
        why = verdict.why or (f"the organizer {organizer} is no longer an enabled user in the organisation's "
                              "directory")
        return declined(run.cmd, "organizer_not_permitted", f"the meeting keeps its time: {why}. Its organizer may "
                        "no longer move it through the cloud; cancelling it (which frees the room) is still possible")

    async def _ours(self, run: _Run) -> tuple[Booking, JournalEntry] | CommandResult:
        """The booking a command names and the journal entry of the create that made it, or the refusal."""
        refusal = self._refusal(run.cmd, run.room)
        if refusal is not None:
            return refusal
        booking = await self._booking(run)
        if booking is None:
            return self._unknown_booking(run)
        origin = await self._origin(run, booking)
        if origin is None or origin.written is None:
            return self._not_ours(run)
        return booking, origin

    async def _restore(self, run: _Run, moved: Written, booking: Booking) -> str:
        """The room refused the new time: put the meeting back where the room had accepted it, rather than leave
        the organizer with a meeting that lost its room."""
        try:
            await self._writer.move(moved, booking.start, booking.end, notify=True)
        except GatewayError as e:
            log.warning("command.restore_failed", key=run.cmd.key, room=run.room, error=e.key)
            return "; the meeting keeps the new time without the room"
        return "; the meeting goes back to its previous time and the room is asked again"

    async def _moved(self, run: _Run, origin: JournalEntry, moved: Written) -> None:
        await self._record(run, moved)
        if origin.item_id != moved.item_id:  # later commands on this booking must find the item where it is now
            await asyncio.to_thread(self._journal.record_write, origin.key, moved)

    async def _cancel(self, run: _Run) -> CommandResult:
        cmd, room = run.cmd, run.room
        found = await self._ours(run)
        if isinstance(found, CommandResult):
            return found
        booking, origin = found
        written = origin.written
        assert written is not None
        try:
            if written.mailbox.lower() == room:
                await self._writer.delete_appointment(written)
            else:
                await self._writer.cancel_meeting(written)
        except NotFound:
            if run.entry is None:
                raise
            # an earlier execution of this key got as far as Exchange: the cancellation happened
        run.wrote = True
        return accepted(cmd, "cancelled", uid=booking.uid, booking_id=booking.id)

    async def _decline(self, run: _Run) -> CommandResult:
        cmd, room = run.cmd, run.room
        refusal = self._refusal(cmd, room)
        if refusal is not None:
            return refusal
        booking = await self._booking(run)
        if booking is None:
            return self._unknown_booking(run)
        origin = await self._origin(run, booking)
        own = origin.written if origin is not None else None
        try:
            if own is not None and own.mailbox.lower() == room:
                await self._writer.delete_appointment(own)  # the gateway's own appointment: nobody to tell
            else:
                try:
                    await self._writer.decline_as_room(room, booking.uid, booking.original_start, booking.start,
                                                       cmd.message)
                except RoomIsOrganizer:
                    refused = await self._delete_room_appointment(run, booking)
                    if refused is not None:
                        return refused
        except NotFound:
            if run.entry is None:
                raise
        run.wrote = True
        return accepted(cmd, "the room declined the booking", uid=booking.uid, booking_id=booking.id)

    async def _delete_room_appointment(self, run: _Run, booking: Booking) -> CommandResult | None:
        """The room organizes this item (an appointment made in its own calendar by someone else): there is
        nobody to decline to, and the gateway never deletes what it did not create (design.md §5)."""
        del booking
        return failed(run.cmd.key, "not_created_by_gateway", "this booking was made directly in the room's "
                      "calendar, so there is no organizer to decline to, and the gateway never deletes what it did "
                      "not create; remove it in Exchange", retryable=False)

    # -- read-only commands ------------------------------------------------------------------------------------
    async def _availability(self, cmd: Command) -> CommandResult:
        assert cmd.start is not None and cmd.end is not None
        rooms = [r.lower() for r in cmd.rooms]
        unknown = sorted(set(rooms) - self._synced())
        if unknown:
            return declined(cmd, "room_unknown", f"the gateway does not sync {', '.join(unknown)}")
        try:
            found = await self._writer.availability(rooms, cmd.start, cmd.end)
        except RoomUnknown:
            return declined(cmd, "room_unknown", "Exchange has no mailbox for one of the rooms")
        except GatewayError as e:
            return self._failure(_Run(cmd, "", None), e)
        lowered = {room.lower(): busy for room, busy in found.items()}
        data = {room: [{"start": _iso(b.start), "end": _iso(b.end), "status": b.status}
                       for b in sorted(lowered.get(room, []), key=lambda b: (b.start, b.end))] for room in rooms}
        return accepted(cmd, data={"rooms": data})

    async def _call_resync(self, room: str, uids: frozenset[str], *, quiet: bool = False) -> None:
        """Let the change flow back through the normal read path now rather than at the next notification, the
        meetings the command changed read back even if SyncFolderItems reports nothing (design.md §2)."""
        try:
            pending = self._resync_room(room, uids)
            if inspect.isawaitable(pending):
                await pending
        except Exception as e:
            if not quiet:
                raise
            log.warning("command.resync_failed", room=room, error=type(e).__name__)
