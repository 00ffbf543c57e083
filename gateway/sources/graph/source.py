"""GraphSource: the calendars of Exchange Online rooms through Microsoft Graph (a CalendarSource).

- Reading: ``calendarView`` over the window, in UTC (``Prefer: outlook.timezone="UTC"``), immutable ids, paged by
  ``@odata.nextLink``; the meeting's CleanGlobalObjectId comes expanded with it, so a booking has the same id as
  the same meeting read through EWS.
- Changes: ``calendarView/delta``. The sync state is the whole next or delta link, behind the end of the window it
  was made for and the room (``<window end> <room> <link>``): Graph freezes the window into the token, so when the
  gateway's window has rolled past it the token is treated as expired. An expired or rejected token (``410``,
  ``syncStateNotFound``, ``resyncRequired``) is SyncStateInvalid, upon which the coordinator imports the room
  afresh: never silence.
- Delta pages carry no extended properties, so the UID of a meeting first seen in a page is read with one GET of
  its event (the series master for an occurrence), cached by id.
- An import walks the room's initial delta round (for its token), whose pages are every event of the token's window,
  then reads the window: that read takes its events from the round just walked (kept until then, by id) and asks
  calendarView only for the events' ids and global object ids, so no event crosses the wire twice. The events are
  those of the token's moment: whatever changed since is in the token's next round. Any other read of the window, or
  the round's token used for changes, drops what was kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import structlog

from gateway.errors import NotFound, SyncStateInvalid
from gateway.model import Booking, Window
from gateway.ports import Changes, RoomInfo
from gateway.sources.graph.client import Answer, GraphClient
from gateway.sources.graph.mapping import (
    EXPAND,
    Shared,
    booking_from_event,
    event_uid,
    in_window,
    listed,
    parse_time,
)
from gateway.sources.graph.settings import GraphSettings

log = structlog.get_logger("gateway.sources.graph")


ROUND_KEPT_SECONDS = 120.0  # how long a finished initial round waits for the window's read that follows it
IDS = "id,seriesMasterId"  # what the import's calendarView asks for besides the global object id


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Round:
    """A room's initial delta round: its window, the state it continues from, its events by id so far."""

    window: Window
    next: str
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: float | None = None  # monotonic time of its last page


class GraphSource:
    def __init__(self, settings: GraphSettings, client: GraphClient, *,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.client = client
        self.now = now
        self.prefer = {"Prefer": f'outlook.timezone="UTC", IdType="ImmutableId", '
                                 f'odata.maxpagesize={settings.page_size}'}
        # An entry of ids is a tenth of an event's size or less: pages ten times as long weigh the same.
        self._prefer_ids = {"Prefer": f'outlook.timezone="UTC", IdType="ImmutableId", '
                                      f'odata.maxpagesize={settings.page_size * 10}'}
        self._uid_of: dict[str, dict[str, str]] = {}  # room -> event id (instance or series master) -> meeting UID
        # room -> meeting UID -> (the meeting's event id, whether it is a series master): a changed meeting is read
        # by itself (GET, or a series' instances) rather than with the whole window
        self._event_of: dict[str, dict[str, tuple[str, bool]]] = {}
        self._reading: dict[tuple[str, str], asyncio.Future[str | None]] = {}  # (room, event id) -> its UID read
        self._reported: dict[str, set[str]] = {}  # room -> instance ids reported in change pages
        self._rounds: dict[str, _Round] = {}  # room -> its initial delta round, until the import's read takes it
        # UIDs of meetings the writer made in this process: their rooms' copies carry no mark of it. (A room's own
        # appointment carries the writer's transactionId; after a restart a meeting's copies read as Exchange's.)
        self.ours: set[str] = set()

    async def close(self) -> None:
        await self.client.close()

    # -- plumbing --------------------------------------------------------------------------------------------
    async def _pages(self, room: str, path: str, operation: str, params: dict[str, str] | None = None,
                     headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
        return await self.client.pages(path, mailbox=room, operation=operation, params=params,
                                       headers=headers or self.prefer)

    async def view(self, room: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """The room's instances overlapping [start, end) (occurrences expanded), with their CleanGlobalObjectId."""
        return await self._pages(room, f"{self.client.user(room)}/calendarView", "calendarView",
                                 {"startDateTime": _iso(start), "endDateTime": _iso(end), "$expand": EXPAND})

    def _known_uid(self, room: str, event: dict[str, Any]) -> str | None:
        """The meeting UID of an instance without a request: from the event itself or the cache (None: read it)."""
        cache = self._uid_of.setdefault(room, {})
        ident = str(event.get("id") or "")
        master = str(event.get("seriesMasterId") or "") or ident
        found = event_uid(event) or cache.get(ident) or cache.get(master)
        if found is not None:
            self._learn(room, event, ident, master, found)
        return found

    def _learn(self, room: str, event: dict[str, Any], ident: str, master: str, found: str) -> None:
        cache = self._uid_of.setdefault(room, {})
        for key in (ident, master):
            if key:
                cache[key] = found
        series = event.get("type") in ("occurrence", "exception", "seriesMaster") or master != ident
        if master:
            self._event_of.setdefault(room, {})[found] = (master, series)

    async def uid(self, room: str, event: dict[str, Any]) -> str | None:
        """The meeting UID of an instance: from the event, the cache, or one GET of its event (or series master)."""
        found = self._known_uid(room, event)
        if found is not None:
            return found
        ident = str(event.get("id") or "")
        master = str(event.get("seriesMasterId") or "") or ident
        if not master:
            return None
        # The instances of one series share one read (a page may hold many of them, asked for at once).
        pending = self._reading.get((room, master))
        if pending is None:
            pending = self._reading[(room, master)] = asyncio.ensure_future(self._read_uid(room, master))
            pending.add_done_callback(lambda _: self._reading.pop((room, master), None))
        found = await asyncio.shield(pending)
        if found is not None:
            self._learn(room, event, ident, master, found)
        return found

    async def _read_uids(self, room: str, events: list[dict[str, Any]]) -> None:
        """The global object ids of the new meetings of a page, in $batch envelopes when there are several (one
        request, not one per meeting); what is left (a failed member) is read one by one afterwards."""
        cache = self._uid_of.setdefault(room, {})
        masters = sorted({m for e in events if not event_uid(e)
                          for m in [str(e.get("seriesMasterId") or "") or str(e.get("id") or "")]
                          if m and m not in cache and str(e.get("id")) not in cache})
        if len(masters) < 2:
            return
        answers = await self.client.batch(
            [f"{self.client.user(room)}/events/{quote(m, safe='')}?$select=id&$expand={EXPAND}" for m in masters],
            mailbox=room, operation="getEvent")
        for master, answer in zip(masters, answers):
            if isinstance(answer, Answer):
                found = event_uid(answer.body)
                if found is not None:
                    cache[master] = found

    async def _read_uid(self, room: str, master: str) -> str | None:
        try:
            answer = await self.client.call(
                "GET", f"{self.client.user(room)}/events/{quote(master, safe='')}", mailbox=room,
                operation="getEvent", params={"$select": "id", "$expand": EXPAND}, headers=self.prefer, item=True)
        except NotFound:
            return None  # gone meanwhile: the next page says so
        found = event_uid(answer.body)
        if found is None:
            log.warning("graph.no_global_object_id", room=room, event=master)
        return found

    async def _bookings(self, room: str, events: list[dict[str, Any]], uids: frozenset[str] | None = None,
                        within: Window | None = None) -> list[Booking]:
        """``within``: only the bookings calendarView over that window lists (events of a wider delta round)."""
        # Known UIDs at once; a task only for each event whose UID must be read.
        found = [self._known_uid(room, e) for e in events]
        missing = [i for i, uid in enumerate(found)
                   if uid is None and (within is None or in_window(events[i], within.start, within.end))]
        if missing:
            for i, uid in zip(missing, await asyncio.gather(*(self.uid(room, events[i]) for i in missing))):
                found[i] = uid
        out: list[Booking] = []
        seen: set[tuple[str, datetime | None]] = set()
        shared: Shared = {}
        for e, uid in zip(events, found):
            if uid is None or (uids is not None and uid not in uids):
                continue
            b = booking_from_event(e, room, uid, ours=uid in self.ours, shared=shared)
            if b is None or (b.uid, b.original_start) in seen:
                continue
            if within is not None and not listed(b.start, b.end, b.series_id is not None and not b.is_exception,
                                                 within.start, within.end):
                continue
            seen.add((b.uid, b.original_start))
            out.append(b)
        return out

    # -- CalendarSource --------------------------------------------------------------------------------------
    async def verify(self, room: str) -> RoomInfo:
        # One event of its calendar: what every read needs (an access policy or a missing mailbox answers here).
        await self.client.call("GET", f"{self.client.user(room)}/events", mailbox=room, operation="events",
                               params={"$select": "id", "$top": "1"})
        return RoomInfo(room.lower())

    async def read_window(self, room: str, window: Window) -> list[Booking]:
        room = room.lower()
        kept = self._rounds.pop(room, None)
        if kept is not None and kept.done is not None and time.monotonic() - kept.done < ROUND_KEPT_SECONDS \
                and kept.window.start <= window.start and window.end <= kept.window.end:
            return await self._from_round(room, kept, window)
        return await self._bookings(room, await self.view(room, window.start, window.end))

    async def _from_round(self, room: str, kept: _Round, window: Window) -> list[Booking]:
        """The window's bookings from the events of the round just walked; calendarView over the window gives only
        each instance's id and global object id (what a delta page lacks)."""
        decoded: dict[str, str | None] = {}  # the instances of a series carry one global object id
        cache = self._uid_of.setdefault(room, {})
        for e in await self._pages(room, f"{self.client.user(room)}/calendarView", "calendarViewIds",
                                   {"startDateTime": _iso(window.start), "endDateTime": _iso(window.end),
                                    "$select": IDS, "$expand": EXPAND}, headers=self._prefer_ids):
            props = e.get("singleValueExtendedProperties")
            key = str(props) if props else ""
            uid = decoded[key] if key in decoded else decoded.setdefault(key, event_uid(e))
            if uid is not None and e.get("id"):
                cache[str(e["id"])] = uid
        events = sorted(kept.events.values(), key=lambda e: str((e.get("start") or {}).get("dateTime") or ""))
        return await self._bookings(room, events, within=window)  # in calendarView's order

    async def read_meetings(self, room: str, window: Window, uids: frozenset[str]) -> list[Booking]:
        """Each meeting by itself when its event is known (one GET, or a series' instances in the window: a few
        calls per change whatever the room holds); otherwise the window's view, filtered."""
        room = room.lower()
        known = self._event_of.get(room, {})
        if not uids or any(u not in known for u in uids):
            return await self._bookings(room, await self.view(room, window.start, window.end), uids)
        found = await asyncio.gather(*(self._meeting(room, known[u], window) for u in sorted(uids)))
        return await self._bookings(room, [e for events in found for e in events], uids)

    async def _meeting(self, room: str, event: tuple[str, bool], window: Window) -> list[dict[str, Any]]:
        ident, series = event
        path = f"{self.client.user(room)}/events/{quote(ident, safe='')}"
        try:
            if not series:
                answer = await self.client.call("GET", path, mailbox=room, operation="getEvent", headers=self.prefer,
                                                params={"$expand": EXPAND}, item=True)
                single = answer.body
                if single.get("type") != "seriesMaster":
                    start, end = parse_time(single.get("start")), parse_time(single.get("end"))
                    overlaps = start is not None and end is not None and start < window.end and end > window.start
                    return [single] if overlaps else []
            return await self._pages(room, f"{path}/instances", "instances",
                                     {"startDateTime": _iso(window.start), "endDateTime": _iso(window.end),
                                      "$expand": EXPAND})
        except NotFound:
            return []  # gone: the meeting has no bookings left

    def delta_window(self) -> Window:
        s = self.settings
        day = self.now().replace(hour=0, minute=0, second=0, microsecond=0)
        return Window(day - timedelta(days=s.days_back), day + timedelta(days=s.days_ahead + s.slack_days))

    def _link(self, room: str, sync_state: str | None) -> tuple[str, str]:
        """(window end, link) to continue from; SyncStateInvalid for a token not of this room, or whose window the
        sync window has outgrown. A new token (``sync_state`` None) starts the room's initial round."""
        if sync_state is None:
            w = self.delta_window()
            query = urlencode({"startDateTime": _iso(w.start), "endDateTime": _iso(w.end)})
            link = self.client.url(f"{self.client.user(room)}/calendarView/delta?{query}")
            now = time.monotonic()
            for other, r in list(self._rounds.items()):  # rounds whose read never came (a room removed meanwhile)
                if r.done is not None and now - r.done >= ROUND_KEPT_SECONDS:
                    del self._rounds[other]
            self._rounds[room] = _Round(w, f"{_iso(w.end)} {room} {link}")
            return _iso(w.end), link
        end, owner, link = [*sync_state.split(" ", 2), "", ""][:3]
        try:
            until = datetime.fromisoformat(end.replace("Z", "+00:00"))
        except ValueError:
            raise SyncStateInvalid(f"not a Graph delta token for {room}") from None
        # Graph may write the mailbox into its links otherwise than asked (an object id): the room is kept apart.
        parts, base = urlsplit(link), urlsplit(self.client.url("/"))
        if owner != room.lower() or (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
            raise SyncStateInvalid(f"the delta token is not one of {room}")
        if self.now() + timedelta(days=self.settings.days_ahead) > until:
            raise SyncStateInvalid(f"the delta token of {room} covers a window the sync window has rolled past",
                                   remedy="nothing to do: the room is imported afresh with a new token")
        return end, link

    async def changes(self, room: str, sync_state: str | None, detailed: bool = True) -> Changes:
        room = room.lower()
        end, link = self._link(room, sync_state)
        kept = self._rounds.get(room)
        if kept is not None and (kept.done is not None or kept.next != (sync_state or kept.next)):
            del self._rounds[room]  # changes since a round, or another round: what it kept is no longer the room's
            kept = None
        if sync_state is None:
            self._reported[room] = set()
        answer = await self.client.call("GET", link, mailbox=room, operation="delta", headers=self.prefer,
                                        delta=True)
        events = [e for e in answer.body.get("value") or () if isinstance(e, dict) and e.get("id")]
        removed = [str(e["id"]) for e in events if "@removed" in e]
        present = [e for e in events if "@removed" not in e]
        cache = self._uid_of.setdefault(room, {})
        if detailed:
            await self._read_uids(room, present)
            found = await asyncio.gather(*(self.uid(room, e) for e in present))
        else:  # an import reads the window next (which fills the cache); no GET per event now
            found = [cache.get(str(e["id"])) or cache.get(str(e.get("seriesMasterId") or "")) for e in present]
        item_uids = {str(e["id"]): uid for e, uid in zip(present, found) if uid}
        # A single meeting's delta entry is the whole event, as calendarView gives it: its booking needs no read.
        # (A series' instances are read together, so a change to one is seen with the others.)
        singles: dict[str, Booking] = {}
        series = {uid for e, uid in zip(present, found) if uid and e.get("type") != "singleInstance"}
        if detailed:
            for e, uid in zip(present, found):
                if uid and uid not in series and e.get("type") == "singleInstance":
                    b = booking_from_event(e, room, uid, ours=uid in self.ours)
                    if b is not None and uid not in singles:
                        singles[uid] = b
                    elif b is not None:
                        series.add(uid)  # the same meeting twice in a page: read the slow, thorough way
            singles = {u: b for u, b in singles.items() if u not in series}
        reported = self._reported.get(room)
        # A removal of an instance never reported nor read is of one created and removed between two rounds; after
        # a restart (nothing reported yet) every removal is passed on, and the store ignores the ones it never held.
        deleted = {i for i in removed if reported is None or i in reported or i in cache}
        # The meeting of a removed instance is read again (it may be gone, or only its instance, or moved out of the
        # token's window): the store cannot map instances an import saw only in the window's view.
        gone = {cache[i] for i in removed if i in cache}
        if reported is not None:
            reported -= set(removed)
            reported |= {str(e["id"]) for e in present}
        for i in removed:
            cache.pop(i, None)
        following = answer.body.get("@odata.nextLink")
        final = answer.body.get("@odata.deltaLink")
        if not following and not final:
            raise SyncStateInvalid(f"Graph's delta page for {room} had neither a next nor a delta link")
        if kept is not None:
            for i in removed:
                kept.events.pop(i, None)
            kept.events.update((str(e["id"]), e) for e in present)
            kept.next = f"{end} {room} {following or final}"
            if not following:
                kept.done = time.monotonic()
        return Changes(frozenset(item_uids.values()) | frozenset(gone), frozenset(deleted), item_uids,
                       f"{end} {room} {following or final}", more=bool(following), complete_uids=frozenset(singles),
                       bookings=tuple(singles.values()))

    # -- what `gateway doctor` asks besides --------------------------------------------------------------------
    async def check_sync(self, room: str) -> None:
        """One delta page of the room: what every sync of the room needs."""
        await self.changes(room, None, detailed=False)
