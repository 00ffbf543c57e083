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
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog
from exchangelib import errors as xerr

from gateway.errors import GatewayError
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
                 retry_seconds: float = 5.0, metrics: Any = None) -> None:
        self.source = source
        self.connection_timeout = connection_timeout
        self.group_size = max(1, min(group_size, 200))
        self.retry_seconds = retry_seconds
        self.metrics = metrics
        self._stop = threading.Event()
        self.open_streams = 0
        self.subscriptions = 0

    async def watch(self, rooms: Sequence[str], on_dirty: Dirty) -> None:
        loop = asyncio.get_running_loop()

        def dirty(room: str, why: str) -> None:
            loop.call_soon_threadsafe(on_dirty, room, why)

        pending = sorted({r.lower() for r in rooms})
        try:
            while not self._stop.is_set():
                groups = await self._subscribe(pending, dirty)
                pending = []
                # One thread per connection: exchangelib blocks for the whole life of a stream.
                with ThreadPoolExecutor(max(1, len(groups)), thread_name_prefix="ews-stream") as threads:
                    lost = await asyncio.gather(*(loop.run_in_executor(threads, self._stream, g, dirty)
                                                  for g in groups))
                for rooms_lost in lost:
                    pending.extend(rooms_lost)
                if pending:
                    await asyncio.sleep(self.retry_seconds)
        finally:
            self._stop.set()

    def stop(self) -> None:
        self._stop.set()

    async def _subscribe(self, rooms: list[str], dirty: Any) -> list[Group]:
        """Subscribe every room; group them by the server (cookie) holding their subscription."""
        by_cookie: dict[str, Group] = {}
        failed: list[str] = []

        def subscribe(room: str) -> tuple[str, str, str]:
            acct = self.source.account(room)
            acct.affinity_cookie = None  # route by the room itself, learn its server's cookie
            with map_ews_errors(room):
                sub_id = acct.calendar.subscribe_to_streaming()
            return room, sub_id, acct.affinity_cookie or ""

        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(self.source._pool, subscribe, r) for r in rooms),
                                       return_exceptions=True)
        for room, res in zip(rooms, results):
            if isinstance(res, BaseException):
                if not isinstance(res, GatewayError):
                    log.warning("streaming.subscribe_failed", room=room, error=repr(res))
                failed.append(room)
                continue
            _, sub_id, cookie = res
            group = by_cookie.setdefault(cookie, Group(cookie, []))
            group.rooms.append(room)
            group.subscriptions[sub_id] = room
            dirty(room, "subscribed")  # anything that happened before the subscription is fetched by a sync
        self.subscriptions = sum(len(g.subscriptions) for g in by_cookie.values())
        groups: list[Group] = []
        for g in by_cookie.values():
            items = sorted(g.subscriptions.items(), key=lambda kv: kv[1])
            for i in range(0, len(items), self.group_size):
                chunk = dict(items[i:i + self.group_size])
                groups.append(Group(g.cookie, sorted(chunk.values()), chunk))
        if failed:
            log.warning("streaming.rooms_without_subscription", rooms=len(failed))
            groups.append(Group("", failed, {}))  # retried on the next round
        return groups

    def _stream(self, group: Group, dirty: Any) -> list[str]:
        """Hold the group's connection open, reopening it, until a subscription is lost; return rooms to resubscribe."""
        if not group.subscriptions:
            return group.rooms
        anchor = self.source.account(group.anchor)
        anchor.affinity_cookie = group.cookie or None
        failures = 0
        while not self._stop.is_set():
            self.open_streams += 1
            try:
                for notification in anchor.calendar.get_streaming_events(
                        list(group.subscriptions), connection_timeout=self.connection_timeout):
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
                    if not group.subscriptions:
                        return gone
                    return gone + self._stream_rest(group, dirty)
                failures += 1
                self._interrupted(group, dirty, e, failures)
            except Exception as e:  # dropped connection, reset, timeout
                failures += 1
                self._interrupted(group, dirty, e, failures)
            finally:
                self.open_streams -= 1
        return []

    def _stream_rest(self, group: Group, dirty: Any) -> list[str]:
        rest = Group(group.cookie, sorted(group.subscriptions.values()), dict(group.subscriptions))
        return self._stream(rest, dirty)

    def _interrupted(self, group: Group, dirty: Any, error: Exception, failures: int) -> None:
        if failures == 1:
            log.warning("streaming.interrupted", anchor=group.anchor, error=repr(error)[:200])
        for room in group.rooms:
            dirty(room, "stream_interrupted")
        time.sleep(min(self.retry_seconds * failures, 60.0))


def _bad_ids(e: Exception) -> list[str]:
    m = _IDS.search(str(e))
    if not m:
        return []
    return [s.strip(" '\"") for s in m.group(1).split(",") if s.strip(" '\"")]


class PullFeed:
    """ChangeFeed over EWS pull subscriptions (for networks where a hanging connection does not survive)."""

    def __init__(self, source: EwsSource, *, interval: float = 10.0, timeout_minutes: int = 30) -> None:
        self.source = source
        self.interval = interval
        self.timeout_minutes = timeout_minutes

    async def watch(self, rooms: Sequence[str], on_dirty: Dirty) -> None:
        subs: dict[str, tuple[str, str]] = {}
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

        while True:
            for room in rooms:
                try:
                    if await loop.run_in_executor(self.source._pool, poll, room.lower()):
                        on_dirty(room.lower(), "pull")
                except GatewayError:
                    subs.pop(room.lower(), None)
                    on_dirty(room.lower(), "pull_interrupted")
            await asyncio.sleep(self.interval)
