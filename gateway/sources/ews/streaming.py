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

from gateway.errors import AuthError, GatewayError
from gateway.ports import Dirty
from gateway.sources.ews.source import EwsSource, map_ews_errors

log = structlog.get_logger("gateway.sources.ews.streaming")
_IDS = re.compile(r"subscription IDs: \[(.*?)\]")


@dataclass
class Group:
    cookie: str
    rooms: list[str]
    subscriptions: dict[str, str] = field(default_factory=dict)  # subscription id -> room

    @property
    def anchor(self) -> str:
        return sorted(self.rooms)[0]


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
        self._live: set[GetStreamingEvents] = set()
        self._lock = threading.Lock()
        self.open_streams = 0
        self.subscriptions = 0

    async def watch(self, rooms: Sequence[str], on_dirty: Dirty) -> None:
        """Every group's connection lives on its own: a room whose subscription is lost is resubscribed after
        ``retry_seconds``, a room that cannot be subscribed (no mailbox, no impersonation right, refused
        credentials) after a back-off that doubles up to ``max_retry_seconds``, and neither waits for the other
        groups' connections to end."""
        loop = asyncio.get_running_loop()

        def dirty(room: str, why: str) -> None:
            loop.call_soon_threadsafe(on_dirty, room, why)

        wanted = sorted({r.lower() for r in rooms})
        # One thread per connection (exchangelib blocks for the whole life of a stream); a group holds a room.
        threads = ThreadPoolExecutor(max(1, len(wanted)), thread_name_prefix="ews-stream",
                                     initializer=self.source.bind_calls)  # its requests count as the source's
        running: dict[asyncio.Future[tuple[list[str], Group | None]], Group] = {}

        def open_stream(group: Group) -> None:
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
                    groups, failed = await self._subscribe(due, dirty)
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
                    self._report(refused)
                self.subscriptions = sum(len(g.subscriptions) for g in running.values())
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

    def _report(self, refused: set[str]) -> None:
        """Log the rooms that cannot be subscribed when that set changes, not on every retry."""
        now = frozenset(refused)
        if now == self._reported:
            return
        if now:
            log.warning("streaming.rooms_without_subscription", rooms=len(now), first_retry_seconds=self.retry_seconds,
                        max_retry_seconds=self.max_retry_seconds)
        else:
            log.info("streaming.rooms_subscribed_again", rooms=len(self._reported))
        self._reported = now

    async def _subscribe(self, rooms: list[str], dirty: Any) -> tuple[list[Group], list[str]]:
        """Subscribe every room; group them by the server (cookie) holding their subscription. Returns the groups
        and the rooms that could not be subscribed."""
        by_cookie: dict[str, Group] = {}
        failed: list[str] = []

        def subscribe(room: str) -> tuple[str, str]:
            acct = self.source.account(room)
            acct.affinity_cookie = None  # route by the room itself, learn its server's cookie
            with map_ews_errors(room):
                sub_id = acct.calendar.subscribe_to_streaming()
            return sub_id, acct.affinity_cookie or ""

        loop = asyncio.get_running_loop()

        async def attempt(room: str) -> tuple[str, str] | Exception:
            try:
                return await loop.run_in_executor(self.source._pool, subscribe, room)
            except Exception as e:
                return e

        # The first room alone: when Exchange refuses the account itself, every other logon would fail as well
        # (and count towards the account's lockout threshold).
        first = await attempt(rooms[0])
        results = [first] * len(rooms) if _credentials_refused(first) else [
            first, *await asyncio.gather(*(attempt(r) for r in rooms[1:]))]
        for room, res in zip(rooms, results):
            if isinstance(res, Exception):
                if not isinstance(res, GatewayError):
                    log.warning("streaming.subscribe_failed", room=room, error=repr(res))
                failed.append(room)
                continue
            sub_id, cookie = res
            group = by_cookie.setdefault(cookie, Group(cookie, []))
            group.rooms.append(room)
            group.subscriptions[sub_id] = room
            dirty(room, "subscribed")  # anything that happened before the subscription is fetched by a sync
        groups: list[Group] = []
        for g in by_cookie.values():
            items = sorted(g.subscriptions.items(), key=lambda kv: kv[1])
            for i in range(0, len(items), self.group_size):
                chunk = dict(items[i:i + self.group_size])
                groups.append(Group(g.cookie, sorted(chunk.values()), chunk))
        return groups, failed

    def _stream(self, group: Group, dirty: Any) -> tuple[list[str], Group | None]:
        """Hold the group's connection open, reopening it, until a subscription is lost. Returns the rooms to
        resubscribe and, when others in the group are still subscribed, the group that keeps streaming."""
        anchor = self.source.account(group.anchor)
        anchor.affinity_cookie = group.cookie or None
        failures = 0
        while not self._stop.is_set():
            self.open_streams += 1
            svc = GetStreamingEvents(account=anchor)
            with self._lock:
                self._live.add(svc)
            try:
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
                    gone = [group.subscriptions.pop(s) for s in (bad or list(group.subscriptions))
                            if s in group.subscriptions]
                    log.info("streaming.subscriptions_lost", rooms=len(gone), anchor=group.anchor)
                    for room in group.rooms:
                        dirty(room, "stream_interrupted")
                    rest = None
                    if group.subscriptions:
                        rest = Group(group.cookie, sorted(group.subscriptions.values()), dict(group.subscriptions))
                    return gone, rest
                failures += 1
                self._interrupted(group, dirty, e, failures)
            except Exception as e:  # dropped connection, reset, timeout
                failures += 1
                self._interrupted(group, dirty, e, failures)
            finally:
                self.open_streams -= 1
                with self._lock:
                    self._live.discard(svc)
                with contextlib.suppress(Exception):
                    svc.stop_streaming()
        return [], None

    def _interrupted(self, group: Group, dirty: Any, error: Exception, failures: int) -> None:
        if self._stop.is_set():
            return  # stop() closed the stream on purpose
        if failures == 1:
            log.warning("streaming.interrupted", anchor=group.anchor, error=repr(error)[:200])
        for room in group.rooms:
            dirty(room, "stream_interrupted")
        self._stop.wait(min(self.retry_seconds * failures, 60.0))  # stop() ends the pause


def _credentials_refused(e: object) -> bool:
    """Exchange refused the service account's own logon (a plain AuthError), not a right on one mailbox."""
    return type(e) is AuthError and e.key == AuthError.key


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

    async def watch(self, rooms: Sequence[str], on_dirty: Dirty) -> None:
        subs: dict[str, tuple[str, str]] = {}
        failures: dict[str, int] = {}
        retry_at: dict[str, float] = {}  # a room that failed waits out a growing back-off
        loop = asyncio.get_running_loop()

        def poll(room: str) -> bool:
            acct = self.source.account(room)
            with map_ews_errors(room):
                if room not in subs:
                    subs[room] = acct.calendar.subscribe_to_pull(timeout=self.timeout_minutes)
                    return True
                sub_id, watermark = subs[room]
                changed = False
                try:
                    for n in acct.calendar.get_events(sub_id, watermark):
                        watermark = n.events[-1].watermark if n.events else watermark
                        changed = changed or any(type(ev).__name__ != "StatusEvent" for ev in n.events)
                except (xerr.ErrorSubscriptionNotFound, xerr.ErrorInvalidSubscription, xerr.ErrorInvalidWatermark):
                    del subs[room]
                    return True
                subs[room] = (sub_id, watermark)
                return changed

        names = sorted({r.lower() for r in rooms})
        while True:
            for room in names:
                if retry_at.get(room, 0.0) > time.monotonic():
                    continue
                try:
                    changed = await loop.run_in_executor(self.source._pool, poll, room)
                except GatewayError as e:
                    subs.pop(room, None)
                    failures[room] = n = failures.get(room, 0) + 1
                    pause = min(self.interval * 2 ** n, self.max_retry_seconds)
                    on_dirty(room, "pull_interrupted")
                    if _credentials_refused(e):  # every room would fail alike: try again later, with one room
                        retry_at.update((r, time.monotonic() + pause) for r in names)
                        break
                    retry_at[room] = time.monotonic() + pause
                    continue
                failures.pop(room, None)
                if changed:
                    on_dirty(room, "pull")
            await asyncio.sleep(self.interval)
