"""The sync coordinator: one worker per room owns all I/O for it; push (notifications) and poll feed one path.

A room's life: verify -> import (sync state first, then the window, so nothing that changes in between is
missed) -> incremental syncs whenever the room is marked dirty (a notification, a feed reconnect, the poll
timer), each SyncFolderItems page committed together with its sync state -> a periodic full reconciliation
that repairs (and counts) any drift. The window rolls forward: every ``roll_seconds`` the slice that entered
the window is read, so long series keep producing occurrences.

A failure every room shares (errors.is_shared: refused credentials, Exchange unreachable, throttling) puts every
room into the same state, with the detail in its reason, and is logged once when it starts, as a reminder while it
lasts and once when it ends (OutageLog); the rooms then wait until Exchange is back (the source lets one call probe
it, see sources/outage.py) instead of each retrying on its own. While the change feed is down
(app.py restarts it with back-off) every room is synced every ``feed_down_poll_seconds`` and says so (``polling``).

Network calls happen outside store transactions; every store call runs on the store's single writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog

from gateway.errors import (
    AccountLocked,
    AuthError,
    GatewayError,
    HttpError,
    ImpersonationDenied,
    MailboxNotFound,
    MailboxThrottled,
    RequestFailed,
    SyncStateInvalid,
    Throttled,
    TlsError,
    Unavailable,
    UnknownHost,
    is_shared,
)
from gateway.model import ROOM_STATES, Booking, Event, Room, RoomState, Window
from gateway.ports import CalendarSource, OutboxEntry, Store
from gateway.sync import ownership, privacy
from gateway.sync.engine import Plan, Scope, plan
from gateway.sync.events import booking_event, room_event, snapshot_event

log = structlog.get_logger("gateway.sync")
T = TypeVar("T")
COMMIT_BATCH = 16  # sync steps per store transaction at most (a step waits for the batch before it)
# Rooms in their import per request slot. Between two calls a room holds no slot (its answer mapped, its plan made,
# its commit awaited): with as many rooms as slots the slots idled while every room was between calls, a fifth of
# an import's wall time. Exchange still sees at most max_concurrent_rooms requests at once.
ROOMS_PER_SLOT = 2


@dataclass(frozen=True)
class SyncSettings:
    days_back: int = 7
    days_ahead: int = 365
    debounce_seconds: float = 2.0
    poll_seconds: float = 0.0  # 0: rely on notifications (plus reconciliation)
    reconcile_seconds: float = 3600.0
    roll_seconds: float = 900.0
    retry_seconds: float = 30.0  # after a transient failure
    auth_retry_seconds: float = 300.0  # after an auth failure (stop-and-ask, but notice fixed credentials)
    max_concurrent_rooms: int = 8
    feed_down_poll_seconds: float = 60.0  # while the change feed is down, every room is synced this often
    outage_remind_seconds: float = 300.0  # while a failure every room shares lasts, the log says so this often
    throttled_quiet_seconds: float = 10.0  # throttling has ended once nothing was throttled for this long
    # Rooms may change owner (several replicas): an import into an empty snapshot is framed by room.snapshot
    # begin/end events, so consumers drop what was deleted while the room changed hands (sync/ownership.py).
    announce_snapshots: bool = False


class OutageLog:
    """A failure every room shares, as the log tells it: once when it starts (refused credentials as an error,
    exchange.auth_failed; anything else a warning, exchange.outage_started), a reminder every ``remind_seconds``
    while it lasts, once when it ends (info). Under throttling some requests pass and others are refused: it has
    ended only once nothing was throttled for ``quiet_seconds``."""

    def __init__(self, remind_seconds: float, quiet_seconds: float,
                 clock: Callable[[], float] = time.monotonic, *, source: str | None = None) -> None:
        self.remind_seconds = remind_seconds
        self._where: dict[str, Any] = {} if source is None else {"source": source}  # whose failure it is
        self.quiet_seconds = quiet_seconds
        self.clock = clock
        self.failure: GatewayError | None = None
        self.since = self.last = self.reminded = 0.0
        self.ended_at = 0.0  # time.monotonic() when the last outage ended (not the clock above: see is_over)

    def failed(self, e: GatewayError) -> None:
        now = self.clock()
        current, self.failure, self.last = self.failure, e, now
        if current is not None and current.key == e.key:
            if now - self.reminded >= self.remind_seconds:
                self.reminded = now
                log.warning("exchange.outage_continues", key=e.key, reason=_reason(e), remedy=e.remedy,
                            seconds=round(now - self.since, 1), **self._where)
            return
        self.since = self.reminded = now
        fields: dict[str, Any] = {"key": e.key, "reason": _reason(e), "remedy": e.remedy, **self._where}
        if current is not None:
            fields["previous"] = current.key
        if _refused(e):
            log.error("exchange.auth_failed", **fields)
        else:
            log.warning("exchange.outage_started", **fields)

    def is_over(self, e: GatewayError) -> bool:
        """``e`` is a copy of a failure that the outage gate held back before an outage ended that this log has
        heard end since (sources/outage.py, held): the call it refused may go now. A room's held copy and the
        probe's answer cross between threads, and the answer can be heard first; logged, the copy would start
        a second outage that is not there."""
        held_at = getattr(e, "held_at", None)
        return self.failure is None and held_at is not None and held_at < self.ended_at

    def answered(self) -> None:
        failure = self.failure
        if failure is None:
            return
        now = self.clock()
        if isinstance(failure, Throttled) and now - self.last < self.quiet_seconds:
            return
        self.failure = None
        self.ended_at = time.monotonic()
        event = "exchange.auth_restored" if _refused(failure) else "exchange.outage_ended"
        log.info(event, key=failure.key, seconds=round(now - self.since, 1), **self._where)


class RoomWorker:
    def __init__(self, coordinator: Coordinator, email: str) -> None:
        self.c = coordinator
        self.email = email.lower()
        self.dirty = asyncio.Event()
        self.dirty_since: float | None = None
        self.reasons: set[str] = set()
        self.reread: set[str] = set()  # meetings the next sync reads back whatever SyncFolderItems says (commands)
        self.state = "pending"
        self.last_success: float | None = None
        self.horizon: datetime | None = None
        self.empty_reads = 0
        self.task: asyncio.Task[None] | None = None
        self.stored: Room | None = None  # the room's row in the store (name, capacity, zone), kept in step

    def mark_dirty(self, why: str, uids: Iterable[str] = ()) -> None:
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()
        self.reasons.add(why)
        self.reread.update(uids)
        self.dirty.set()

    def take_marks(self) -> tuple[float | None, frozenset[str]]:
        """The marks so far, cleared: since when the room has been dirty, and the meetings to read back. Taken once
        the first call's slot is ours, not before waiting for it: a mark made meanwhile is read by that call, and a
        sync after it for the mark would find nothing (a call a room)."""
        since, reread = self.dirty_since, frozenset(self.reread)
        self.dirty.clear()
        self.dirty_since = None
        self.reasons.clear()
        self.reread = set()
        return since, reread


class Coordinator:
    def __init__(self, source: CalendarSource, store: Store, settings: SyncSettings | None = None, *,
                 policy: Callable[[str], privacy.PrivacyPolicy] | None = None, metrics: Any = None,
                 clock: Callable[[], datetime] | None = None, source_name: str = "urn:exchange-gateway",
                 group: Callable[[str], str | None] | None = None) -> None:
        self.source = source
        # The source a room's calls go to (a failure every room shares is shared by the rooms of one source).
        self.group: Callable[[str], str | None] = group or (lambda room: None)
        self.store = store
        self.settings = settings or SyncSettings()
        self.policy = policy or (lambda room: privacy.PrivacyPolicy())
        self.metrics = metrics
        self.now = clock or (lambda: datetime.now(UTC))
        self.source_name = source_name
        self.workers: dict[str, RoomWorker] = {}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store")
        self._steps: list[tuple[str, dict[str, Any], asyncio.Future[list[OutboxEntry]]]] = []  # to commit
        self._committing: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(self.settings.max_concurrent_rooms)
        # Rooms between verification and the end of their import: a verified room imports at once (its calls would
        # otherwise queue behind every other room's verification, and nothing imports until all are verified).
        self._starting = asyncio.Semaphore(ROOMS_PER_SLOT * self.settings.max_concurrent_rooms)
        self.listeners: list[Callable[[list[OutboxEntry]], None]] = []  # told after each commit (SSE wake-up)
        self._outages: dict[str | None, tuple[OutageLog, asyncio.Event]] = {}  # by source (group)
        self.feed_down: dict[str, str] = {}  # room -> why its change feed is down (it polls meanwhile)

    # -- life cycle -----------------------------------------------------------------------------------------
    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, lambda: fn(*args, **kwargs))

    async def commit(self, room: str, **step: Any) -> list[OutboxEntry]:
        """Commit one sync step of ``room`` (Store.commit_sync's arguments). The steps that arrive while the store
        writes share its next transaction, each still whole or not at all (Store.commit_syncs): an import of many
        rooms commits a room every few milliseconds, and a transaction apiece cost 40% of a room-state step's CPU
        and a tenth of a room's import commit."""
        done: asyncio.Future[list[OutboxEntry]] = asyncio.get_running_loop().create_future()
        self._steps.append((room, step, done))
        if self._committing is None or self._committing.done():
            self._committing = asyncio.get_running_loop().create_task(self._commit_steps())
        return await done

    async def _commit_steps(self) -> None:
        while self._steps:
            # (a step whose caller was cancelled before it was written is dropped, as an unstarted write was)
            batch = [s for s in self._steps[:COMMIT_BATCH] if not s[2].cancelled()]
            del self._steps[:COMMIT_BATCH]
            if not batch:
                continue
            try:
                outcomes = await self.db(self.store.commit_syncs, [(room, step) for room, step, _ in batch])
            except asyncio.CancelledError:
                for _, _, done in batch + self._steps:
                    done.cancel()
                self._steps.clear()
                raise
            except Exception as e:  # the transaction failed: every step of it
                outcomes = [e] * len(batch)
            for (_, _, done), outcome in zip(batch, outcomes, strict=True):
                if done.done():
                    continue
                if isinstance(outcome, BaseException):
                    done.set_exception(outcome)
                else:
                    done.set_result(outcome)

    async def start(self, rooms: Sequence[str]) -> None:
        """Sync the rooms this gateway owns; a stored room it no longer owns is released (gateway/sync/ownership.py:
        dropped without events, since a room that moved to another source or replica is not gone)."""
        stored = {r.email: r for r in await self.db(self.store.rooms)}
        wanted = {r.lower() for r in rooms}
        for gone in sorted(set(stored) - wanted):
            dropped = await self.db(ownership.release, self.store, gone)
            log.info("room.released", room=gone, bookings=dropped)
        for email in sorted(wanted):  # (a room not stored yet has its row made: no lookup per room later)
            self.add_room(email).stored = stored.get(email) or Room(email)

    def add_room(self, email: str) -> RoomWorker:
        worker = self.workers.get(email.lower())
        if worker is None:
            worker = RoomWorker(self, email)
            self.workers[worker.email] = worker
            worker.task = asyncio.get_running_loop().create_task(self._run_room(worker), name=f"room:{email}")
        return worker

    async def remove_room(self, email: str) -> None:
        """Stop syncing a room this gateway no longer owns and release it (gateway/sync/ownership.py)."""
        worker = self.workers.pop(email.lower(), None)
        if worker is not None and worker.task is not None:
            worker.task.cancel()
            await asyncio.gather(worker.task, return_exceptions=True)
        if await self.db(self.store.room, email.lower()) is not None:  # (never verified: nothing kept)
            dropped = await self.db(ownership.release, self.store, email.lower())
            log.info("room.released", room=email.lower(), bookings=dropped)

    async def stop(self) -> None:
        tasks = [w.task for w in self.workers.values() if w.task]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._committing is not None:  # the steps being written are written (the cancelled rooms' others not)
            await asyncio.gather(self._committing, return_exceptions=True)
        self._writer.shutdown(wait=True)

    def mark_dirty(self, room: str, why: str = "notification", uids: Iterable[str] = ()) -> None:
        """Sync the room soon; ``uids``: meetings to read back in that sync even if SyncFolderItems does not
        report them (what a command just changed: a server may apply a change without a sync-visible trace)."""
        worker = self.workers.get(room.lower())
        if worker is not None:
            worker.mark_dirty(why, uids)

    def window(self) -> Window:
        now = self.now()
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return Window(day - timedelta(days=self.settings.days_back), now + timedelta(days=self.settings.days_ahead))

    # -- one room -------------------------------------------------------------------------------------------
    async def _run_room(self, w: RoomWorker) -> None:
        s = self.settings
        while True:
            try:
                if await self.db(self.store.sync_state, w.email) is None:
                    async with self._starting:
                        # Never imported: the import's first call asks what verification asks (the mailbox, the
                        # right to read it, its calendar) and fails the same way (tests/test_source_contract.py):
                        # it verifies the room, one call less per room.
                        await self.import_room(w, verified=False)
                    repair = False
                else:
                    # A restart may have missed anything: a sync from the stored state catches up (its first call
                    # fails as the verification would: it verifies the room, one call less per room, and it takes
                    # the marks of the room's new subscription), then one full read repairs whatever else. The
                    # sync needs no turn (it holds little; the request slots pace it); the full read waits its turn
                    # among the rooms' imports and full reads (_starting) in the room's loop, which syncs the
                    # room's changes meanwhile. So after a restart every room catches up first, and a change in
                    # the last room waits for a sync, not for every room's full read.
                    repair = not await self.sync_changes(w, verify=True)
                await self._loop(w, repair=repair)
            except asyncio.CancelledError:
                raise
            except GatewayError as e:
                shared = is_shared(e)
                if shared and self._outage(self.group(w.email))[0].is_over(e):
                    continue  # held back by an outage that has ended since: the room goes on now
                await self._set_state(w, room_state(e).value, _reason(e), shared=shared,
                                      remedy=e.remedy if e.own_remedy else None)
                if shared:
                    # Every room meets the same answer: wait until a room (or the feed) finds Exchange back.
                    outage, ok = self._outage(self.group(w.email))
                    outage.failed(e)
                    ok.clear()
                    await self._exchange_back(ok, _shared_delay(e, s))
                    continue
                self.exchange_recovered(self.group(w.email))  # Exchange got as far as judging the room itself
                await asyncio.sleep(s.auth_retry_seconds if isinstance(e, AuthError) else s.retry_seconds)
            except Exception:
                log.exception("sync.room_failed", room=w.email)
                await self._set_state(w, "exchange_error", "unexpected error; see the logs")
                await asyncio.sleep(s.retry_seconds)

    def _outage(self, group: str | None) -> tuple[OutageLog, asyncio.Event]:
        """The outage log of one source and the event its rooms wait for (set while no shared failure lasts)."""
        found = self._outages.get(group)
        if found is None:
            ok = asyncio.Event()
            ok.set()
            found = self._outages[group] = (OutageLog(self.settings.outage_remind_seconds,
                                                      self.settings.throttled_quiet_seconds, source=group), ok)
        return found

    @staticmethod
    async def _exchange_back(ok: asyncio.Event, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await ok.wait()

    def exchange_recovered(self, group: str | None = None) -> None:
        """The source (``group``) answered again: its rooms waiting behind a shared failure retry now."""
        outage, ok = self._outage(group)
        outage.answered()
        ok.set()

    async def _verify(self, w: RoomWorker) -> None:
        async with self._slots:
            await self.source.verify(w.email)
        await self._verified(w)

    async def _verified(self, w: RoomWorker) -> None:
        """Exchange answered for the room itself: its source is back, and the room is in sync unless it says so."""
        self.exchange_recovered(self.group(w.email))
        if w.state not in ("verified", "polling", "suspect_empty"):
            await self._in_sync(w)

    async def _in_sync(self, w: RoomWorker) -> None:
        """The room is in sync: ``verified``, or ``polling`` while its change feed is down."""
        await self._set_state(w, *self._in_sync_state(w))

    def _in_sync_state(self, w: RoomWorker) -> tuple[str, str]:
        down = self.feed_down.get(w.email)
        return ("verified", "") if down is None else ("polling", down)

    # -- the change feed ---------------------------------------------------------------------------------------
    async def feed_stopped(self, why: str, rooms: Iterable[str] | None = None) -> None:
        """The change feed of ``rooms`` (None: every room) is down (it is restarted with back-off): sync each of them
        every ``feed_down_poll_seconds`` meanwhile, and say so in the rooms' state."""
        reason = f"change feed down ({why}); polling every {self.settings.feed_down_poll_seconds:g} s"
        for w in self._workers(rooms):
            self.feed_down[w.email] = reason
            if w.state in ("verified", "polling"):
                await self._set_state(w, "polling", reason)
            w.mark_dirty("feed_down")  # wake the room's loop: it polls from now on, and this sync finds any gap

    async def feed_running(self, rooms: Iterable[str] | None = None) -> None:
        """The change feed of ``rooms`` (None: every room) runs again: notifications drive the syncs; a sync of
        every room repairs the gap."""
        for w in self._workers(rooms):
            if self.feed_down.pop(w.email, None) is None:
                continue
            if w.state == "polling":
                await self._set_state(w, "verified", "")
            w.mark_dirty("feed_running")

    def _workers(self, rooms: Iterable[str] | None) -> list[RoomWorker]:
        if rooms is None:
            return list(self.workers.values())
        return [w for w in (self.workers.get(r.lower()) for r in rooms) if w is not None]

    async def _loop(self, w: RoomWorker, *, repair: bool = False) -> None:
        """The room in sync: a sync when it is marked dirty (or polled), a reconciliation and a roll of the window
        when due. ``repair``: a full read is owed (after a restart); it is made once its turn among the rooms'
        imports and full reads comes (_starting), and until then the room's changes are synced as they come."""
        s = self.settings
        last_reconcile = time.monotonic()
        last_roll = time.monotonic()
        turn: asyncio.Task[bool] | None = None  # the owed full read's place in the queue for _starting
        try:
            while True:
                timeouts = [s.reconcile_seconds - (time.monotonic() - last_reconcile),
                            s.roll_seconds - (time.monotonic() - last_roll)]
                poll = s.poll_seconds
                if w.email in self.feed_down:
                    poll = min(poll, s.feed_down_poll_seconds) if poll > 0 else s.feed_down_poll_seconds
                if poll > 0:
                    timeouts.append(poll)
                if repair and turn is None:
                    turn = asyncio.get_running_loop().create_task(self._starting.acquire())
                try:
                    # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives just as the room
                    # is marked dirty (a feed reconnecting while the gateway stops), and stop() then waits forever.
                    async with asyncio.timeout(max(0.05, min(timeouts))):
                        if turn is None:
                            await w.dirty.wait()
                        else:
                            await _first_of(w.dirty.wait(), turn)
                except TimeoutError:
                    pass
                if turn is not None and turn.done():
                    got, turn = _granted(turn), None
                    if got:  # (a turn cancelled from outside is asked for again)
                        try:
                            await self.reconcile(w, snapshot=True)
                        finally:
                            self._starting.release()
                        repair = False
                        last_reconcile = last_roll = time.monotonic()
                if w.dirty.is_set():
                    await asyncio.sleep(s.debounce_seconds)  # one user action is several events
                    await self.sync_changes(w)
                elif poll > 0:
                    await self.sync_changes(w)
                if time.monotonic() - last_reconcile >= s.reconcile_seconds:
                    await self.reconcile(w)
                    last_reconcile = last_roll = time.monotonic()
                elif time.monotonic() - last_roll >= s.roll_seconds:
                    await self.roll(w)
                    last_roll = time.monotonic()
        finally:
            if turn is not None:  # (a failure or a stop while the full read waited its turn: give the turn back)
                if not turn.done():
                    turn.cancel()  # (Semaphore.acquire hands on a turn it was given when cancelled)
                elif _granted(turn):
                    self._starting.release()

    async def import_room(self, w: RoomWorker, verified: bool = True) -> None:
        """First connection: take the sync state first, then read the whole window. ``verified``: False when the
        first SyncFolderItems is the room's verification (the room is ``syncing`` once it answered)."""
        if verified:
            await self._set_state(w, "syncing", "")
        state: str | None = None
        items: dict[str, str] = {}
        first = True
        while True:
            async with self._slots:
                if first:  # (what marked the room until now, its new subscription above all, is read by the import)
                    w.take_marks()
                    first = False
                page = await self.source.changes(w.email, state, detailed=False)
            if not verified:
                verified = True
                self.exchange_recovered(self.group(w.email))  # (as _verify: Exchange judged the room itself)
                await self._set_state(w, "syncing", "")
            state = page.sync_state
            items.update(page.item_uids)
            if not page.more:
                break
        # The sync state, taken before the window is read, is stored with what the read finds and the room's new
        # state, in one step (there were three, each with its share of a transaction): a failure or a crash before
        # it leaves the room to be imported again.
        await self.reconcile(w, drift=False, snapshot=True, taken=(state, items))

    async def sync_changes(self, w: RoomWorker, *, verify: bool = False) -> bool:
        """Incremental: SyncFolderItems pages from the stored state; changed meetings re-read over the window.
        ``verify``: the first SyncFolderItems is the room's verification. Returns True when the stored state had
        expired and the room was imported anew instead (a whole window read)."""
        started: float | None = None
        reread: frozenset[str] = frozenset()
        first = True
        while True:
            state = await self.db(self.store.sync_state, w.email)
            try:
                async with self._slots:
                    if first:
                        started, reread = w.take_marks()
                    page = await self.source.changes(w.email, state)
            except SyncStateInvalid:
                log.warning("sync.state_invalid", room=w.email)
                await self.commit(w.email, upserts=(), deletes=(), events=(), clear_sync_state=True)
                async with self._starting:  # (an import takes its turn: Exchange may expire every room's state)
                    await self.import_room(w)
                return True
            if first:
                first = False
                if verify:
                    await self._verified(w)
            uids = set(page.changed_uids) | reread
            if page.deleted_item_ids:
                uids |= await self.db(self.store.uids_for_items, w.email, page.deleted_item_ids)
            window = self.window()
            observed: list[Booking] = list(page.bookings)
            # Series need their instances expanded; a meeting whose item is gone has nothing left to read.
            to_read = frozenset((page.changed_uids | reread) - page.complete_uids)
            reread = frozenset()  # read back once, with the first page
            if to_read:
                async with self._slots:
                    observed += await self.source.read_meetings(w.email, window, to_read)
            scope = Scope(window, frozenset(uids))
            # Only the meetings in scope: what the plan compares, and a sync then costs what changed, not the room.
            result = plan(await self.db(self.store.known, w.email, scope.uids), self._private(w.email, observed),
                          scope, self.now())
            await self._commit(w, result, sync_state=page.sync_state, item_uids=page.item_uids,
                               removed_items=page.deleted_item_ids, started=started)
            if not page.more:
                break
        w.last_success = time.monotonic()
        return False

    async def reconcile(self, w: RoomWorker, *, drift: bool = True, snapshot: bool = False,
                        taken: tuple[str | None, dict[str, str]] | None = None) -> Plan:
        """Compare the full window with what we hold; repair and count any difference. ``snapshot``: an import (or
        the first read after a start); into an empty snapshot of a room that may have changed owner, its events
        are framed as the room's complete window (settings.announce_snapshots). ``taken``: an import's sync state
        and item map, stored with what the read finds, and the room is in sync after."""
        window = self.window()
        async with self._slots:
            observed = await self.source.read_window(w.email, window)
        known = await self.db(self.store.known, w.email)
        result = plan(known, self._private(w.email, observed), Scope(window), self.now(),
                      empty_confirmed=w.empty_reads >= 1)
        sync_state, item_uids = taken if taken is not None else (None, None)
        if result.held_back:
            w.empty_reads += 1
            if taken is not None:  # (the import's sync state is the room's, whatever its read found)
                await self.commit(w.email, upserts=(), deletes=(), events=(), item_uids=item_uids,
                                  sync_state=sync_state)
            await self._set_state(w, "suspect_empty", result.reason)
            log.warning("sync.held_back", room=w.email, reason=result.reason)
            return result
        w.empty_reads = 0
        frame = snapshot and not known and self.settings.announce_snapshots
        settle = taken is not None or w.state == "suspect_empty"
        await self._commit(w, result, window=window if frame else None, read=window, sync_state=sync_state,
                           item_uids=item_uids, settle=settle)
        w.horizon = window.end
        w.last_success = time.monotonic()
        if drift and result.changes and self.metrics is not None:
            self.metrics.reconcile_drift(w.email, result.changes)
        if drift and result.changes:
            log.info("sync.drift_repaired", room=w.email, created=len(result.created),
                     updated=len(result.updated), deleted=len(result.deleted))
        return result

    async def roll(self, w: RoomWorker) -> None:
        """Read the slice of time that entered the window since the last read."""
        window = self.window()
        if w.horizon is None or window.end <= w.horizon:
            return
        part = Window(w.horizon, window.end)
        async with self._slots:
            observed = await self.source.read_window(w.email, part)
        observed = [b for b in observed if b.start >= part.start]
        known = {k: v for k, v in (await self.db(self.store.known, w.email)).items() if v.start >= part.start}
        result = plan(known, self._private(w.email, observed), Scope(part), self.now(), empty_confirmed=True)
        await self._commit(w, result)
        w.horizon = window.end

    # -- helpers --------------------------------------------------------------------------------------------
    def _private(self, room: str, bookings: list[Booking]) -> list[Booking]:
        policy = self.policy(room)
        return [privacy.apply(b, policy) for b in bookings]

    async def _commit(self, w: RoomWorker, result: Plan, *, sync_state: str | None = None,
                      item_uids: dict[str, str] | None = None, removed_items: frozenset[str] = frozenset(),
                      started: float | None = None, window: Window | None = None,
                      read: Window | None = None, settle: bool = False) -> None:
        """``window``: the plan is the room's complete window, framed by room.snapshot begin and end. ``read``: the
        plan is a complete read of that window, which confirms every booking there at once (the store keeps one
        row for the room instead of rewriting each booking's). ``settle``: the room is in sync once this is
        stored, and its new state is stored (and announced, after its bookings) with it."""
        now = self.now()  # one step, one time (each event's own clock reading cost more than the event)
        events = self.events(result, now)
        if window is not None:
            events = [snapshot_event(w.email, "begin", window, time=now, source=self.source_name), *events,
                      snapshot_event(w.email, "end", window, time=self.now(), source=self.source_name)]
        state = self._in_sync_state(w) if settle else None
        change = None if state is None else await self._stage_state(w, *state)
        room_row = None
        if change is not None and change[1] is not None:
            room_row = change[1]
            events = [*events, self._room_event(room_row)]
        entries = await self.commit(
            w.email, upserts=result.created + result.updated, deletes=[b.id for b in result.deleted], events=events,
            confirmed=() if read is not None else [b.id for b in result.confirmed], confirmed_at=now,
            confirmed_window=read, item_uids=item_uids,
            removed_items=removed_items, sync_state=sync_state, room_row=room_row)
        if state is not None and change is not None:
            self._stated(w, *state, previous=change[0], announced=room_row is not None)
        if entries:
            if self.metrics is not None and started is not None:
                self.metrics.change_latency(time.monotonic() - started)
            log.info("sync.committed", room=w.email, created=len(result.created), updated=len(result.updated),
                     deleted=len(result.deleted))
            for listener in self.listeners:
                listener(entries)

    def events(self, result: Plan, at: datetime) -> list[Event]:
        """The booking events of a plan, as of ``at``."""
        events = [self._event("created", b, at=at) for b in result.created]
        events += [self._event("updated", b, at=at) for b in result.updated]
        events += [self._event("deleted", b, reason="removed_from_exchange", at=at) for b in result.deleted]
        return events

    def _event(self, kind: str, b: Booking, reason: str | None = None, *, at: datetime | None = None) -> Event:
        return booking_event(kind, b, time=at or self.now(), source=self.source_name, reason=reason)

    def _room_event(self, room: Room) -> Event:
        return room_event(room, time=self.now(), source=self.source_name)

    async def _set_state(self, w: RoomWorker, state: str, reason: str, *, shared: bool = False,
                         remedy: str | None = None) -> None:
        """Record, announce and log a room's state when it (or its reason) changes. ``shared``: the cause is a
        failure every room shares, logged once by the source, so the room's own line is only info."""
        change = await self._stage_state(w, state, reason, remedy)
        if change is None:
            return
        previous, room = change
        if room is not None:
            entries = await self.commit(w.email, upserts=(), deletes=(), events=[self._room_event(room)],
                                        room_row=room)
            for listener in self.listeners:
                listener(entries)
        self._stated(w, state, reason, previous=previous, announced=room is not None, shared=shared)

    async def _stage_state(self, w: RoomWorker, state: str, reason: str,
                           remedy: str | None = None) -> tuple[str, Room | None] | None:
        """The worker takes the room's new state at once (a state set meanwhile compares with it); None: no change.
        Else the state before, and the room's row to store and announce (None: nothing to announce)."""
        if state == w.state and (w.stored is None or w.stored.reason == reason):
            return None
        previous, w.state = w.state, state
        if w.stored is None:  # a worker made outside start() (sync-once): look its row up once
            w.stored = await self.db(self.store.room, w.email) or Room(w.email)
        room = replace(w.stored, state=RoomState(state), reason=reason, remedy=remedy or ROOM_STATES.get(state, ""))
        # A restart that finds the room as the store left it has nothing to announce (an event a room on every
        # restart told consumers what they hold already).
        if previous != "pending" or room != w.stored:
            w.stored = room
            return previous, room
        return previous, None

    def _stated(self, w: RoomWorker, state: str, reason: str, *, previous: str, announced: bool,
                shared: bool = False) -> None:
        """Log and count a room's state once it is stored."""
        if announced:
            quiet = shared or state in ("verified", "syncing", "polling") or state == previous
            (log.info if quiet else log.warning)("room.state", room=w.email, state=state, previous=previous,
                                                 reason=reason)
        if self.metrics is not None:
            self.metrics.room_state(w.email, state)


async def _first_of(wait: Coroutine[Any, Any, Any], task: asyncio.Task[Any]) -> None:
    """Until ``wait`` ends or ``task`` is done, whichever comes first; ``wait`` is dropped then, ``task`` never."""
    waiting = asyncio.ensure_future(wait)
    try:
        await asyncio.wait((waiting, task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()


def _granted(turn: asyncio.Task[Any]) -> bool:
    """Whether a finished wait for a turn got it (was neither cancelled nor failed): then it must be given back."""
    return not turn.cancelled() and turn.exception() is None


# The state a failure puts a room in, by the error's class; the nearest class in its ancestry decides.
_ROOM_STATE_OF: dict[type[GatewayError], RoomState] = {
    AuthError: RoomState.AUTH_REQUIRED,
    AccountLocked: RoomState.ACCOUNT_LOCKED,
    ImpersonationDenied: RoomState.IMPERSONATION_DENIED,
    MailboxNotFound: RoomState.MAILBOX_NOT_FOUND,
    Throttled: RoomState.THROTTLED,
    MailboxThrottled: RoomState.THROTTLED,
    Unavailable: RoomState.CANNOT_CONNECT,
    RequestFailed: RoomState.EXCHANGE_ERROR,
    UnknownHost: RoomState.UNKNOWN_HOST,
    TlsError: RoomState.TLS_ERROR,
    HttpError: RoomState.HTTP_ERROR,
}


def room_state(e: GatewayError) -> RoomState:
    """The state a room is in after ``e``; a failure the table does not name is the server's error for the room."""
    for cls in type(e).__mro__:
        state = _ROOM_STATE_OF.get(cls)
        if state is not None:
            return state
    return RoomState.EXCHANGE_ERROR


def _reason(e: GatewayError) -> str:
    """The error's own words (with the detail: the host, the status, the address), without its remedy (the room
    carries that separately)."""
    return str(e.args[0]) if e.args else e.key


def _refused(e: GatewayError) -> bool:
    return type(e) is AuthError


def _shared_delay(e: GatewayError, s: SyncSettings) -> float:
    if isinstance(e, Throttled):
        return max(e.back_off or s.retry_seconds, 1.0)
    return s.auth_retry_seconds if isinstance(e, AuthError) else s.retry_seconds
