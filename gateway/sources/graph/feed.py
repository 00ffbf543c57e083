"""GraphFeed: how a Graph source hears that a room changed (a ChangeFeed). Notifications only ever mark a room
dirty; the room's delta says what changed.

- With a notification inbox (the relay's tunnel to the hub; ``SourceSpec.inbox``): one subscription per room on
  ``users/{room}/events`` with the hub's URLs as ``notificationUrl`` and ``lifecycleNotificationUrl`` (the hub
  answers Graph's validation and delivers within Graph's deadlines, then forwards each notification over the
  tunnel), and a random ``clientState`` per subscription, kept in memory and checked on every poke: a poke that
  names no subscription of ours or the wrong clientState is dropped and costs nothing. A genuine poke marks its
  room dirty at most once per ``min_poke_interval`` (a later one within it is folded into one trailing mark).
  Subscriptions are renewed at ``renew_at`` (55 %) of the lifetime Graph *granted* (read from the answer, never
  assumed). Lifecycle events: ``reauthorizationRequired`` -> reauthorize; ``subscriptionRemoved`` -> a new
  subscription and a delta; ``missed`` -> a delta.
- Without an inbox, while its tunnel is down, or for a room whose subscription could not be made: delta polling
  every ``poll_interval_seconds``, each room in its own turn (spread over the interval, not all at once). When the
  tunnel comes back every room is marked dirty (what happened meanwhile is found by the delta) and subscriptions
  resume.
- Each room's mode (``notifications`` or ``polling``) shows in ``modes()`` (metrics: ``gateway_graph_rooms``), and
  each change of the counts is one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from gateway.errors import GatewayError, NotFound
from gateway.ports import FEED_POLLING, Dirty, NotificationInbox, Poke
from gateway.sources.graph.client import GraphClient
from gateway.sources.graph.mapping import parse_time

log = structlog.get_logger("gateway.sources.graph")


@dataclass
class Subscription:
    room: str
    id: str
    client_state: str = ""
    expires: datetime | None = None
    renew_at: float = 0.0  # monotonic


class GraphFeed:
    def __init__(self, client: GraphClient, inbox: NotificationInbox | None, *, poll_interval: float,
                 lifetime_minutes: int = 4200, renew_at: float = 0.55, min_poke_interval: float = 0.5,
                 retry_seconds: float = 60.0, on_poke: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.inbox = inbox
        self.poll_interval = poll_interval
        self.lifetime_minutes = lifetime_minutes  # asked for; Graph grants what it grants
        self.renew_fraction = renew_at
        self.min_poke_interval = min_poke_interval
        self.retry_seconds = retry_seconds
        self.on_poke = on_poke or (lambda outcome: None)
        self.clock = clock
        self.rooms: list[str] = []
        self.subscriptions: dict[str, Subscription] = {}  # by room
        self._by_id: dict[str, Subscription] = {}
        self._retry_at: dict[str, float] = {}  # room -> when a failed subscription is tried again
        self._dirty: dict[str, str] = {}  # room -> why, to be told to the coordinator
        self._on_dirty: Dirty | None = None  # the coordinator's, while watching
        self._last_poke: dict[str, float] = {}
        self._trailing: set[str] = set()
        self._todo: dict[str, str] = {}  # subscription id -> lifecycle work (reauthorize, recreate)
        self._wake = asyncio.Event()
        self._connected = False
        self._logged: tuple[int, int] | None = None
        self._failing: dict[tuple[str, str], set[str]] = {}  # (what, error key) -> rooms: logged once, not per room
        self._told_polling: set[str] = set()  # rooms the coordinator was told are polled (their state says so)

    # -- state ---------------------------------------------------------------------------------------------
    def _urls(self) -> tuple[str, str] | None:
        """The hub's URLs while notifications can arrive (None until the hub has told them, and while the tunnel
        is down)."""
        if self.inbox is None or not self._connected:
            return None
        return self.inbox.urls()

    def modes(self) -> dict[str, str]:
        """Each room's mode: notifications (its subscription live and the tunnel up) or polling."""
        live = self._urls() is not None
        return {r: "notifications" if live and r in self.subscriptions else "polling" for r in self.rooms}

    def _log_modes(self) -> None:
        modes = list(self.modes().values())
        counts = (modes.count("notifications"), modes.count("polling"))
        if counts != self._logged:
            self._logged = counts
            log.info("graph.rooms_mode", notifications=counts[0], polling=counts[1], connected=self._connected)

    def _failed(self, what: str, room: str, e: GatewayError) -> None:
        """One log line when a kind of failure starts (the first room it meets), not one per room and retry."""
        rooms = self._failing.setdefault((what, e.key), set())
        if not rooms:
            log.warning(f"graph.{what}_failed", room=room, key=e.key, reason=str(e.args[0]) if e.args else "",
                        remedy=e.remedy)
        rooms.add(room)

    def _succeeded(self, what: str, room: str) -> None:
        for (done, key), rooms in list(self._failing.items()):
            if done == what and room in rooms:
                rooms.discard(room)
                if not rooms:
                    del self._failing[(done, key)]
                    log.info(f"graph.{what}_recovered", key=key)

    # -- from the inbox (on the event loop) ------------------------------------------------------------------
    def poke(self, p: Poke) -> None:
        items = p.body.get("value") if isinstance(p.body, dict) else None
        for n in items if isinstance(items, list) else ():
            if not isinstance(n, dict):
                continue
            sub = self._by_id.get(str(n.get("subscriptionId") or ""))
            if sub is None:
                self.on_poke("unknown_subscription")
                continue
            if not hmac.compare_digest(str(n.get("clientState") or ""), sub.client_state):
                self.on_poke("bad_client_state")
                log.warning("graph.notification_refused", room=sub.room, why="client_state")
                continue
            event = n.get("lifecycleEvent")
            if event:
                self.on_poke("lifecycle")
                log.info("graph.lifecycle", room=sub.room, lifecycle_event=str(event)[:40])
                if event == "reauthorizationRequired":
                    self._todo[sub.id] = "reauthorize"
                elif event == "subscriptionRemoved":
                    self._todo[sub.id] = "recreate"
                    self._mark(sub.room, "subscription_removed")
                else:  # missed (or one Graph adds later): whatever it was, a delta finds it
                    self._mark(sub.room, f"lifecycle_{str(event)[:20]}")
                self._wake.set()
                continue
            self._poked(sub.room)

    def _poked(self, room: str) -> None:
        now = self.clock()
        last = self._last_poke.get(room)
        if last is not None and now - last < self.min_poke_interval:
            self.on_poke("rate_limited")
            if room not in self._trailing:  # one mark at the end of the interval covers every poke within it
                self._trailing.add(room)
                asyncio.get_running_loop().call_later(self.min_poke_interval - (now - last), self._trail, room)
            return
        self.on_poke("accepted")
        self._last_poke[room] = now
        self._mark(room, "notification")

    def _trail(self, room: str) -> None:
        self._trailing.discard(room)
        self._last_poke[room] = self.clock()
        self._mark(room, "notification")

    def connected(self, up: bool) -> None:
        if up == self._connected:
            return
        self._connected = up
        for room in self.rooms:
            if room not in self.subscriptions:
                continue  # (subscribed, or told polling, when it is tried)
            if up:  # its notifications arrive again; what happened meanwhile is found by a delta
                self._told_polling.discard(room)
                self._state(room, "subscribed")
            else:
                self._polling(room, "the tunnel to the hub is down")
        self._wake.set()

    def _mark(self, room: str, why: str) -> None:
        self._dirty.setdefault(room, why)
        self._wake.set()

    def _state(self, room: str, why: str) -> None:
        """A change of how the room hears of changes (it implies a sync): the newest one is told."""
        self._dirty[room] = why
        self._wake.set()

    def _polling(self, room: str, why: str) -> None:
        if room not in self._told_polling:
            self._told_polling.add(room)
            self._state(room, FEED_POLLING + why)

    # -- the loop --------------------------------------------------------------------------------------------
    async def _tell(self) -> None:
        """Tell the coordinator of the rooms marked so far."""
        dirty, self._dirty = self._dirty, {}
        if self._on_dirty is None:
            return
        for room, why in dirty.items():
            told = self._on_dirty(room, why)
            if inspect.isawaitable(told):
                await told

    async def watch(self, rooms: Sequence[str], on_dirty: Dirty) -> None:
        self.rooms = sorted({r.lower() for r in rooms})
        self._on_dirty = on_dirty
        stop: Callable[[], None] = lambda: None  # noqa: E731
        if self.inbox is not None:  # its URLs may come later (the hub's first welcome): asked on every round
            stop = self.inbox.listen(self.poke, self.connected)
            self._connected = self.inbox.connected()
        # Each polled room in its turn, spread over the interval (not every room's delta at once, a burst that
        # queues behind itself): room -> when it is polled next. Rooms due within one tick are polled together.
        start, count = self.clock(), max(1, len(self.rooms))
        turn = {r: start + self.poll_interval * (i + 1) / count for i, r in enumerate(self.rooms)}
        tick = self.poll_interval / 20
        subscribed_to: tuple[str, str] | None = None
        try:
            while True:
                self._wake.clear()
                urls = self._urls()
                if urls is not None and urls != subscribed_to and self.subscriptions:
                    # The hub gave other URLs: subscriptions to the old ones would never reach us.
                    for sub in list(self.subscriptions.values()):
                        self._drop(sub)
                if urls is not None:
                    subscribed_to = urls
                    await self._maintain(urls)
                now = self.clock()
                polled = [room for room, mode in self.modes().items() if mode == "polling"]
                for room in polled:
                    at = turn.setdefault(room, now + self.poll_interval)
                    if at <= now:
                        self._dirty.setdefault(room, "poll")
                        turn[room] = now + self.poll_interval - (now - at) % self.poll_interval  # keeps its turn
                self._log_modes()
                await self._tell()
                wait = max(tick, min((turn[r] for r in polled), default=now + self.poll_interval) - self.clock())
                if urls is not None:
                    due = [s.renew_at for s in self.subscriptions.values()] + list(self._retry_at.values())
                    if due:
                        wait = min(wait, min(due) - self.clock())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.01, wait)):
                        await self._wake.wait()
        finally:
            stop()
            await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        """Best effort, when the feed ends: remove its subscriptions (else Graph delivers to the hub until they
        lapse, up to days later, pokes the gateway drops as unknown)."""
        subs, self.subscriptions, self._by_id = list(self.subscriptions.values()), {}, {}
        if not subs:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3):
                await asyncio.gather(*(self.client.call("DELETE", f"/subscriptions/{sub.id}", mailbox=sub.room,
                                                        operation="unsubscribe", item=True) for sub in subs),
                                     return_exceptions=True)

    async def _maintain(self, urls: tuple[str, str]) -> None:
        """Subscriptions for rooms without one (those due), renewals due, lifecycle work asked for."""
        now = self.clock()
        work: list[Any] = []
        for sub_id, what in list(self._todo.items()):
            sub = self._by_id.get(sub_id)
            self._todo.pop(sub_id, None)
            if sub is None:
                continue
            if what == "reauthorize":
                work.append(self._reauthorize(sub, urls))
            else:
                self._drop(sub)
                work.append(self._subscribe(sub.room, urls))
        for sub in list(self.subscriptions.values()):
            if sub.renew_at <= now:
                work.append(self._renew(sub, urls))
        for room in self.rooms:
            if room not in self.subscriptions and self._retry_at.get(room, 0.0) <= now:
                work.append(self._subscribe(room, urls))
        if work:
            gate = asyncio.Semaphore(8)

            async def one(job: Any) -> None:
                async with gate:
                    await job
                # A room's new subscription is told at once, not after every room's: a room whose import has not
                # sent its first call yet answers the mark with the import (Coordinator.import_room), a sync less.
                await self._tell()
            await asyncio.gather(*(one(j) for j in work))

    def _granted(self, sub: Subscription, body: dict[str, Any]) -> None:
        expires = parse_time(body.get("expirationDateTime"))
        now = datetime.now(UTC)
        if expires is None or expires <= now:
            expires = now + timedelta(minutes=45)  # Graph's floor; renewing early is harmless
        sub.expires = expires
        sub.renew_at = self.clock() + (expires - now).total_seconds() * self.renew_fraction

    def _drop(self, sub: Subscription) -> None:
        self.subscriptions.pop(sub.room, None)
        self._by_id.pop(sub.id, None)

    async def _subscribe(self, room: str, urls: tuple[str, str]) -> None:
        state = secrets.token_urlsafe(48)  # 64 characters; Graph allows 128
        expires = datetime.now(UTC) + timedelta(minutes=self.lifetime_minutes)
        body = {"changeType": "created,updated,deleted", "notificationUrl": urls[0],
                "lifecycleNotificationUrl": urls[1], "resource": f"users/{room}/events",
                "expirationDateTime": expires.strftime("%Y-%m-%dT%H:%M:%S.0000000Z"), "clientState": state}
        try:
            answer = await self.client.call("POST", "/subscriptions", mailbox=room, operation="subscribe", body=body)
        except GatewayError as e:
            self._retry_at[room] = self.clock() + self.retry_seconds
            self._failed("subscribe", room, e)
            self._polling(room, f"Graph would not subscribe it ({e.key})")
            return
        sub_id = str(answer.body.get("id") or "")
        if not sub_id:
            self._retry_at[room] = self.clock() + self.retry_seconds
            return
        self._retry_at.pop(room, None)
        self._succeeded("subscribe", room)
        sub = Subscription(room, sub_id, state)
        self._granted(sub, answer.body)
        self.subscriptions[room] = sub
        self._by_id[sub_id] = sub
        self._told_polling.discard(room)
        self._state(room, "subscribed")  # anything between the last delta and the subscription is found now

    async def _renew(self, sub: Subscription, urls: tuple[str, str]) -> None:
        expires = datetime.now(UTC) + timedelta(minutes=self.lifetime_minutes)
        try:
            answer = await self.client.call(
                "PATCH", f"/subscriptions/{sub.id}", mailbox=sub.room, operation="renewSubscription", item=True,
                body={"expirationDateTime": expires.strftime("%Y-%m-%dT%H:%M:%S.0000000Z")})
        except NotFound:  # it lapsed or was removed: a new one, and a delta for what fell between
            self._drop(sub)
            await self._subscribe(sub.room, urls)
            return
        except GatewayError as e:
            sub.renew_at = self.clock() + self.retry_seconds
            self._failed("renew", sub.room, e)
            return
        self._succeeded("renew", sub.room)
        self._granted(sub, answer.body)

    async def _reauthorize(self, sub: Subscription, urls: tuple[str, str]) -> None:
        try:
            await self.client.call("POST", f"/subscriptions/{sub.id}/reauthorize", mailbox=sub.room,
                                   operation="reauthorizeSubscription", item=True)
        except NotFound:
            self._drop(sub)
            await self._subscribe(sub.room, urls)
            return
        except GatewayError as e:
            self._failed("reauthorize", sub.room, e)
        await self._renew(sub, urls)  # reauthorizing does not extend it; a renewal does both


async def check_subscription(client: GraphClient, room: str, urls: tuple[str, str]) -> None:
    """What `gateway doctor` asks: a subscription for the room with the hub's URLs can be made (Graph validates both
    URLs through the hub, so this proves the notification path too) and is removed at once."""
    expires = datetime.now(UTC) + timedelta(minutes=45)
    body = {"changeType": "created,updated,deleted", "notificationUrl": urls[0], "lifecycleNotificationUrl": urls[1],
            "resource": f"users/{room}/events", "clientState": secrets.token_urlsafe(32),
            "expirationDateTime": expires.strftime("%Y-%m-%dT%H:%M:%S.0000000Z")}
    answer = await client.call("POST", "/subscriptions", mailbox=room, operation="subscribe", body=body)
    sub_id = str(answer.body.get("id") or "")
    if sub_id:
        with contextlib.suppress(GatewayError):
            await client.call("DELETE", f"/subscriptions/{sub_id}", mailbox=room, operation="unsubscribe", item=True)
