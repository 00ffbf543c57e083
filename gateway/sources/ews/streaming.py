"""Change feeds for EWS: streaming subscriptions grouped per mailbox server, or pull subscriptions.

A notification only says that a room changed; the coordinator then syncs it. Every gap — a dropped
connection, a lost subscription (ErrorSubscriptionNotFound after a failover or an app-pool recycle), a
restart — marks the affected rooms dirty, so the next SyncFolderItems repairs it. Nothing is inferred from
the events themselves.

Grouping: each room is subscribed on its own (one Subscribe per mailbox, as Exchange requires) with
X-PreferServerAffinity; Exchange answers with an X-BackEndOverrideCookie naming the mailbox server that holds
the subscription. Rooms whose cookies match share one GetStreamingEvents connection (at most ``group_size``
ids), opened as the group's anchor (the first address alphabetically) with that cookie, so the request reaches
the server that knows every subscription in it. Each connection runs in its own thread (exchangelib blocks for
the whole connection) and is reopened as soon as it closes; ConnectionTimeout bounds how long one lasts.

Groups live independently: rooms whose subscriptions a group loses are resubscribed after a short pause while
the other groups keep streaming, and rooms that cannot be subscribed (no mailbox, no impersonation right) are
retried with a doubling back-off, so a room fixed later is picked up. When Exchange refuses the service account
itself, one room tries and the others wait: every failed logon counts towards the account's lockout threshold.
Every Subscribe and every stream's opening passes the source's outage gate (sources/outage.py), so an outage
costs one request, not one per room or per group.

The gauges tell what is true now: a stream counts as open while Exchange has answered it and it is being read,
and a subscription counts while a stream listens to it (or, for pull, while it is polled). An exception that is
not Exchange's answer (a bug, a malformed response) is not swallowed: it ends ``watch`` and the app's supervisor
logs it, falls back to polling and restarts the feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog
from exchangelib import errors as xerr
from exchangelib.services import GetStreamingEvents

from gateway.errors import GatewayError, is_shared
from gateway.ports import Dirty
from gateway.sources.ews.source import EwsSource, translate

log = structlog.get_logger("gateway.sources.ews.streaming")
_IDS = re.compile(r"subscription IDs: \[(.*?)\]")


class FeedBroken(RuntimeError):
    """Exchange's answers to the feed are not what EWS specifies: no room's notifications can be trusted, so the
    feed ends and its supervisor falls back to polling (not a GatewayError: no room is to blame)."""


@dataclass
class Group:
    cookie: str
    rooms: list[str]
    subscriptions: dict[str, str] = field(default_factory=dict)  # subscription id -> room

    @property
    def anchor(self) -> str:
        return sorted(self.rooms)[0]


class _GetStreamingEvents(GetStreamingEvents):
    """GetStreamingEvents that knows when its stream is open: Exchange answered it (HTTP 200) and its body is read
    from now on, possibly for minutes before the first notification."""

    opened = False
    closed = False
    on_open: Any = None

    def _get_response(self, payload: Any, api_version: Any) -> Any:
        response = super()._get_response(payload=payload, api_version=api_version)
        self.opened = True
        if self.on_open is not None:
            self.on_open()
        return response


class StreamingFeed:
    """ChangeFeed over EWS streaming notifications."""

    def __init__(self, source: EwsSource, *, connection_timeout: int = 10, group_size: int = 200,
                 retry_seconds: float = 5.0, max_retry_seconds: float = 300.0, metrics: Any = None) -> None:
        self.source = source
        self.connection_timeout = connection_timeout
        self.group_size = max(1, min(group_size, 200))
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.metrics = metrics
        self._stop = threading.Event()
        self._reported: frozenset[str] = frozenset()
        self._live: dict[_GetStreamingEvents, Group] = {}
        self._lock = threading.Lock()
        self.up = False  # a room has been subscribed and the feed has not failed since (gateway_ews_feed_up)

    @property
    def open_streams(self) -> int:
        """Streams open now (Exchange answered; the connection is being read)."""
        with self._lock:
            return sum(1 for svc in self._live if svc.opened and not svc.closed)

    @property
    def subscriptions(self) -> int:
        """Subscriptions an open stream listens to now."""
        with self._lock:
            return sum(len(g.subscriptions) for svc, g in self._live.items() if svc.opened and not svc.closed)

    async def watch(self, rooms: Sequence[str], on_dirty: Dirty) -> None:
        """Every group's connection lives on its own: a room whose subscription is lost is resubscribed after
        ``retry_seconds``, a room that cannot be subscribed (no mailbox, no impersonation right, refused
        credentials) after a back-off that doubles up to ``max_retry_seconds``, and neither waits for the other
        groups' connections to end."""
        loop = asyncio.get_running_loop()

        def dirty(room: str, why: str) -> None:
            if why == "subscribed":
                self.up = True
            loop.call_soon_threadsafe(on_dirty, room, why)

        wanted = sorted({r.lower() for r in rooms})
        # One thread per connection (exchangelib blocks for the whole life of a stream); a group holds a room.
        threads = ThreadPoolExecutor(max(1, len(wanted)), thread_name_prefix="ews-stream",
                                     initializer=self.source.bind_calls)  # its requests count as the source's
        running: dict[asyncio.Future[tuple[list[str], Group | None]], Group] = {}

        def open_stream(group: Group) -> None:
            self.source.make_room_for_streams(len(running) + 1)
            running[loop.run_in_executor(threads, self._stream, group, dirty)] = group

        due: list[str] = wanted  # rooms to subscribe now
        waiting: list[str] = []  # rooms to subscribe at retry_at
        refused: set[str] = set()  # rooms whose last Subscribe failed
        failures, retry_at = 0, 0.0
        try:
            while not self._stop.is_set() and (due or waiting or running):
                if waiting and time.monotonic() >= retry_at:
                    due, waiting = due + waiting, []
                if due:
                    groups, failed, failed_shared = await self._subscribe(due, dirty)
                    for g in groups:
                        open_stream(g)
                    refused = (refused - set(due)) | set(failed)
                    due = []
                    if failed:
                        failures += 1
                        retry_at = time.monotonic() + min(self.retry_seconds * 2 ** (failures - 1),
                                                          self.max_retry_seconds)
                        waiting += failed
                    elif not refused:
                        failures = 0
                    self._report(refused, failed_shared)
                wait = max(0.0, retry_at - time.monotonic()) if waiting else None
                if not running:
                    await asyncio.sleep(wait or 0.0)
                    continue
                done, _ = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    del running[fut]
                    lost, rest = fut.result()
                    if rest is not None:
                        open_stream(rest)
                    if lost:  # a pause, so that a subscription lost again at once never loops tightly
                        soon = time.monotonic() + self.retry_seconds
                        retry_at = min(retry_at, soon) if waiting else soon
                        waiting += lost
        except BaseException:
            self.up = False
            raise
        finally:
            self._stop.set()
            threads.shutdown(wait=False, cancel_futures=True)  # never block the loop; streams end on _stop

    def stop(self) -> None:
        """End every open stream now: exchangelib has no abort, so close the response under the reading thread
        (otherwise a stream lasts up to ConnectionTimeout and the process cannot exit before it ends)."""
        self._stop.set()
        with self._lock:
            live = list(self._live)
        for svc in live:
            response = getattr(svc, "_streaming_response", None)
            with contextlib.suppress(Exception):
                response.raw._connection.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
            with contextlib.suppress(Exception):
                response.close()  # type: ignore[union-attr]

    def _report(self, refused: set[str], shared: bool = False) -> None:
        """Log the rooms that cannot be subscribed when that set changes, not on every retry (only info when the
        cause is an outage every room shares: the source has logged that once)."""
        now = frozenset(refused)
        if now == self._reported:
            return
        if now:
            (log.info if shared else log.warning)(
                "streaming.rooms_without_subscription", rooms=len(now), first_retry_seconds=self.retry_seconds,
                max_retry_seconds=self.max_retry_seconds)
        else:
            log.info("streaming.rooms_subscribed_again", rooms=len(self._reported))
        self._reported = now

    async def _subscribe(self, rooms: list[str], dirty: Any) -> tuple[list[Group], list[str], bool]:
        """Subscribe every room; group them by the server (cookie) holding their subscription. Returns the groups,
        the rooms that could not be subscribed, and whether that was a failure every room shares."""
        by_cookie: dict[str, Group] = {}
        failed: list[str] = []

        def subscribe(room: str) -> tuple[str, str]:
            acct = self.source.account(room)
            acct.affinity_cookie = None  # route by the room itself, learn its server's cookie
            with self.source.guarded(room):
                sub_id = self.source.subscribe_streaming(room)
            if not sub_id:
                raise FeedBroken(f"Exchange answered Subscribe for {room} without a SubscriptionId")
            return sub_id, acct.affinity_cookie or ""

        loop = asyncio.get_running_loop()
        # Half the source's threads at most: the rest keep reading (imports, syncs) while a thousand rooms subscribe.
        at_once = asyncio.Semaphore(max(1, self.source.settings.max_workers // 2))

        async def attempt(room: str) -> tuple[str, str] | GatewayError:
            try:
                async with at_once:
                    found = await loop.run_in_executor(self.source._pool, subscribe, room)
            except GatewayError as e:
                return e  # anything else is not an answer from Exchange: the supervisor hears of it
            # Anything that happened before the subscription is fetched by a sync, marked as soon as this room's
            # subscription exists (Exchange keeps its notifications until the stream opens): a room whose import
            # had not sent its first call yet reads all of it anyway (Coordinator.import_room), one sync less.
            dirty(room, "subscribed")
            return found

        # The first room alone: when Exchange refuses the account itself or cannot be reached, every other room
        # would fail alike (and each failed logon counts towards the account's lockout threshold).
        first = await attempt(rooms[0])
        shared = isinstance(first, GatewayError) and is_shared(first)
        results = [first] * len(rooms) if shared else [
            first, *await asyncio.gather(*(attempt(r) for r in rooms[1:]))]
        for room, res in zip(rooms, results):
            if isinstance(res, GatewayError):
                failed.append(room)
                continue
            sub_id, cookie = res
            group = by_cookie.setdefault(cookie, Group(cookie, []))
            group.rooms.append(room)
            group.subscriptions[sub_id] = room
        groups: list[Group] = []
        for g in by_cookie.values():
            items = sorted(g.subscriptions.items(), key=lambda kv: kv[1])
            for i in range(0, len(items), self.group_size):
                chunk = dict(items[i:i + self.group_size])
                groups.append(Group(g.cookie, sorted(chunk.values()), chunk))
        return groups, failed, shared

    def _stream(self, group: Group, dirty: Any) -> tuple[list[str], Group | None]:
        """Hold the group's connection open, reopening it, until a subscription is lost. Returns the rooms to
        resubscribe and, when others in the group are still subscribed, the group that keeps streaming."""
        gate = self.source.gate
        failures = 0
        while not self._stop.is_set():
            anchor = self.source.account(group.anchor)  # looked up each time: new credentials make new accounts
            anchor.affinity_cookie = group.cookie or None
            svc = _GetStreamingEvents(account=anchor)
            probe = [False]
            since = gate.outages

            def opened(probe: list[bool] = probe, since: int = since) -> None:
                gate.record(probe[0], None, since)  # Exchange answered: no outage, whatever happens to the stream later
                probe[0] = False
            svc.on_open = opened
            with self._lock:
                self._live[svc] = group
            error: BaseException | None = None
            try:
                probe[0] = gate.admit()
                for notification in svc.call(subscription_ids=list(group.subscriptions),
                                             connection_timeout=self.connection_timeout):
                    room = group.subscriptions.get(notification.subscription_id)
                    if room is not None and notification.events:
                        dirty(room, "notification")
                    if self._stop.is_set():
                        break
                failures = 0
            except xerr.EWSError as e:
                bad = _bad_ids(e)
                if isinstance(e, xerr.ErrorSubscriptionNotFound | xerr.ErrorInvalidSubscription) or bad:
                    gate.record(probe[0], translate(e, group.anchor), since)  # an answer: Exchange is there
                    gone = [group.subscriptions.pop(s) for s in (bad or list(group.subscriptions))
                            if s in group.subscriptions]
                    log.info("streaming.subscriptions_lost", rooms=len(gone), anchor=group.anchor)
                    for room in group.rooms:
                        dirty(room, "stream_interrupted")
                    rest = None
                    if group.subscriptions:
                        rest = Group(group.cookie, sorted(group.subscriptions.values()), dict(group.subscriptions))
                    return gone, rest
                error = e
            except Exception as e:  # dropped connection, reset, timeout; or the gate holding an outage
                error = e
            finally:
                svc.closed = True
                with self._lock:
                    self._live.pop(svc, None)
                with contextlib.suppress(Exception):
                    svc.stop_streaming()
            if error is not None:
                failures += 1
                mapped = translate(error, group.anchor, self.source.settings.ews_url) or error
                if not svc.opened:  # opening failed; a stream that broke later says nothing about the endpoint
                    gate.record(probe[0], mapped, since)
                self._interrupted(group, dirty, mapped, failures, opened=svc.opened)
        return [], None

    def _interrupted(self, group: Group, dirty: Any, error: BaseException, failures: int, *,
                     opened: bool = False) -> None:
        if self._stop.is_set():
            return  # stop() closed the stream on purpose
        if failures == 1:
            # A stream that drops is reopened at once (load balancers cut long connections); an outage that every
            # room shares is logged once by the source. A stream that cannot be opened for its own reason warns.
            quiet = opened or is_shared(error)
            (log.info if quiet else log.warning)("streaming.interrupted", anchor=group.anchor,
                                                 error=str(error)[:200])
        for room in group.rooms:
            dirty(room, "stream_interrupted")
        self._stop.wait(min(self.retry_seconds * failures, 60.0))  # stop() ends the pause


def _bad_ids(e: Exception) -> list[str]:
    m = _IDS.search(str(e))
    if not m:
        return []
    return [s.strip(" '\"") for s in m.group(1).split(",") if s.strip(" '\"")]


class PullFeed:
    """ChangeFeed over EWS pull subscriptions (for networks where a hanging connection does not survive)."""

    def __init__(self, source: EwsSource, *, interval: float = 10.0, timeout_minutes: int = 30,
                 max_retry_seconds: float = 300.0) -> None:
        self.source = source
        self.interval = interval
        self.timeout_minutes = timeout_minutes
        self.max_retry_seconds = max_retry_seconds
        self._subs: dict[str, tuple[str, str]] = {}
        self.up = False  # a room has been subscribed and the feed has not failed since (gateway_ews_feed_up)

    @property
    def subscriptions(self) -> int:
        """Pull subscriptions being polled now."""
        return len(self._subs)

    async def watch(self, rooms: Sequence[str], on_dirty: Dirty) -> None:
        subs = self._subs
        subs.clear()
        failures: dict[str, int] = {}
        retry_at: dict[str, float] = {}  # a room that failed waits out a growing back-off
        loop = asyncio.get_running_loop()

        def poll(room: str) -> str | None:
            """Why the room is dirty now (subscribed, pull, subscription_lost), or None."""
            acct = self.source.account(room)
            with self.source.guarded(room):
                if room not in subs:
                    subs[room] = acct.calendar.subscribe_to_pull(timeout=self.timeout_minutes)
                    return "subscribed"  # anything before the subscription is fetched by a sync
                sub_id, watermark = subs[room]
                changed = False
                try:
                    for n in acct.calendar.get_events(sub_id, watermark):
                        watermark = n.events[-1].watermark if n.events else watermark
                        changed = changed or any(type(ev).__name__ != "StatusEvent" for ev in n.events)
                except (xerr.ErrorSubscriptionNotFound, xerr.ErrorInvalidSubscription, xerr.ErrorInvalidWatermark):
                    del subs[room]
                    return "subscription_lost"
                subs[room] = (sub_id, watermark)
                return "pull" if changed else None

        names = sorted({r.lower() for r in rooms})
        try:
            while True:
                for room in names:
                    if retry_at.get(room, 0.0) > time.monotonic():
                        continue
                    try:
                        why = await loop.run_in_executor(self.source._pool, poll, room)
                    except GatewayError as e:  # anything else is not Exchange's answer: the supervisor hears of it
                        subs.pop(room, None)
                        failures[room] = n = failures.get(room, 0) + 1
                        pause = min(self.interval * 2 ** n, self.max_retry_seconds)
                        on_dirty(room, "pull_interrupted")
                        if is_shared(e):  # every room would fail alike: try again later, with one room
                            retry_at.update((r, time.monotonic() + pause) for r in names)
                            break
                        retry_at[room] = time.monotonic() + pause
                        continue
                    failures.pop(room, None)
                    if why == "subscribed":
                        self.up = True
                    if why is not None:
                        on_dirty(room, why)
                await asyncio.sleep(self.interval)
        except BaseException:
            self.up = False
            raise
        finally:
            subs.clear()  # nobody polls them any more


async def check_subscription(source: EwsSource, room: str, kind: str) -> None:
    """Subscribe the room the way the feed of ``kind`` (streaming or pull) will, and unsubscribe at once: what
    `gateway doctor` does so that a feed that cannot work is found before the gateway runs."""
    def probe() -> None:
        folder = source.account(room).calendar
        with source.guarded(room):
            if kind == "pull":
                sub_id, watermark = folder.subscribe_to_pull(timeout=1)
                if not watermark:
                    raise FeedBroken(f"Exchange answered Subscribe for {room} without a Watermark")
            else:
                sub_id = folder.subscribe_to_streaming()
            if not sub_id:
                raise FeedBroken(f"Exchange answered Subscribe for {room} without a SubscriptionId")
            folder.unsubscribe(sub_id)
    await asyncio.get_running_loop().run_in_executor(source._pool, probe)
