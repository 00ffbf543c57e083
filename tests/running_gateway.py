"""One running gateway (init_app, EWS over HTTP + NTLM to the simulator, SQLite on disk, the local API through
aiohttp's test client) and what its consumers and operators see: the outbox, GET /v1/rooms, /metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.app import GATEWAY, Gateway, GatewayOptions, init_app
from gateway.model import EVENT_TYPES
from gateway.simulator.calendar import Recurrence
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.sources.ews.source import EwsSettings
from gateway.store.apikeys import ApiKeys
from gateway.store.sqlite import SqliteStore
from gateway.sync.coordinator import SyncSettings
from tests.conftest import SimFixture, eventually

ROOM1, ROOM2, ROOM3 = "room1@contoso.com", "room2@contoso.com", "room3@contoso.com"
CREATED, UPDATED, DELETED = EVENT_TYPES["created"], EVENT_TYPES["updated"], EVENT_TYPES["deleted"]
ROOM_STATE = EVENT_TYPES["room_state"]


def iso(t: datetime) -> str:
    """RFC 3339 in UTC, as commands carry times."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def slot(days: int, hour: int = 9, hours: float = 1) -> tuple[datetime, datetime]:
    """A whole-hour slot ``days`` from now (UTC)."""
    start = (datetime.now(UTC) + timedelta(days=days)).replace(hour=hour, minute=0, second=0, microsecond=0)
    return start, start + timedelta(hours=hours)


def soon(hours: float = 26) -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=hours)


def appointment(ews: SimFixture, room: str, subject: str, start: datetime, *, minutes: int = 30,
                notify: bool = True, recurrence: Recurrence | None = None) -> str:
    """An appointment in the room's own calendar (a room panel booking); returns its UID."""
    return ews.call(lambda: appointment_on_loop(ews, room, subject, start, minutes=minutes, notify=notify,
                                         recurrence=recurrence))


def appointment_on_loop(ews: SimFixture, room: str, subject: str, start: datetime, *, minutes: int = 30,
                 notify: bool = True, recurrence: Recurrence | None = None) -> str:
    """On the simulator's loop. ``notify=False`` stores the item the way a lost notification looks to a client:
    it is there (SyncFolderItems and CalendarView show it) but no subscription hears of it."""
    mb = ews.sim.directory.get(room)
    values: dict[str, Any] = {"start": start, "end": start + timedelta(minutes=minutes), "subject": subject}
    if recurrence is not None:
        values["recurrence"] = recurrence
    if notify:
        return str(ews.sim.calendars.create(mb, values).uid)
    item = ews.sim.calendars.new_item(mb, **values)
    item.organizer = mb.person
    ews.sim.directory.add_item(item, notify=False)
    return str(item.uid)


class Gw:
    """One running gateway and what its consumers see."""

    def __init__(self, ews: SimFixture, client: Any) -> None:
        self.ews = ews
        self.client = client
        self.gw: Gateway = client.app[GATEWAY]

    def events(self, room: str | None = None, type_: str | None = None) -> list[Any]:
        return [e.event for e in self.gw.store.outbox_after(0, 100_000)
                if (room is None or e.event.room == room) and (type_ is None or e.event.type == type_)]

    def states(self, room: str) -> list[str]:
        """The room.state_changed events of a room, in order."""
        return [e.data["state"] for e in self.events(room, ROOM_STATE)]

    def imported(self, *rooms: str) -> bool:
        """Every room has announced the end of its import (syncing, then verified)."""
        return all(self.states(r)[-2:] == ["syncing", "verified"] for r in rooms)

    def state(self, room: str) -> str:
        return self.gw.coordinator.workers[room].state

    async def rooms(self) -> dict[str, dict[str, Any]]:
        resp = await self.client.get("/v1/rooms")
        assert resp.status == 200
        return {r["email"]: r for r in (await resp.json())["rooms"]}

    async def metrics(self) -> str:
        return str(await (await self.client.get("/metrics")).text())

    async def metric(self, name: str, **labels: str) -> float:
        """One sample's value from /metrics (0 when absent)."""
        want = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
        for line in (await self.metrics()).splitlines():
            if line.startswith(name + want + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def ews_requests(self) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in (await self.metrics()).splitlines()
                   if line.startswith("gateway_ews_requests_total{"))

    async def settled(self, *rooms: str) -> None:
        await settled(self.gw, self.ews, rooms or None)


async def start(aiohttp_client: Any, ews: SimFixture, store: Path, rooms: tuple[str, ...], *,
                feed: str = "streaming", password: str = SERVICE_PASSWORD,
                clock: Callable[[], datetime] | None = None, pull_interval: float = 10.0, feed_retry: float = 5.0,
                url: str | None = None, ews_settings: dict[str, Any] | None = None,
                options: dict[str, Any] | None = None, **sync: Any) -> Gw:
    settings = {"debounce_seconds": 0.1, "retry_seconds": 0.3, "auth_retry_seconds": 1.0, **sync}
    gateway_options = GatewayOptions(
        ews=EwsSettings(ews_url=url or ews.url, username=f"CONTOSO\\{SERVICE_ACCOUNT}",
                        default_timezone="Europe/Berlin", max_workers=4,
                        **{"outage_retry_seconds": 0.2, "outage_max_retry_seconds": 0.5, **(ews_settings or {})}),
        password=password, rooms=rooms, sync=SyncSettings(**settings), store_path=store, feed=feed,
        stream_timeout_minutes=1, pull_interval_seconds=pull_interval, feed_retry_seconds=feed_retry, clock=clock,
        **(options or {}))
    return Gw(ews, await aiohttp_client(init_app(gateway_options), headers=api_key(store)))


def api_key(store: Path) -> dict[str, str]:
    """The header of a new key with the scopes a consumer and an operator use (as `gateway api-keys create`)."""
    s = SqliteStore(store)
    try:
        return {"Authorization": f"Bearer {ApiKeys(s).create('tests', ['read', 'metrics'])}"}
    finally:
        s.close()


def _syncs(coordinator: Any) -> dict[str, Counter[str]]:
    """Per room, the incremental syncs running now and those done (counted from the first call on this coordinator):
    the coordinator's loop looks its sync_changes up on the instance, so a wrapper there sees each one."""
    tracker: dict[str, Counter[str]] | None = getattr(coordinator, "_tests_syncs", None)
    if tracker is None:
        tracker = {"running": Counter(), "done": Counter()}
        original = coordinator.sync_changes

        async def sync_changes(w: Any) -> None:
            tracker["running"][w.email] += 1
            try:
                await original(w)
            finally:
                tracker["running"][w.email] -= 1
                tracker["done"][w.email] += 1
        coordinator.sync_changes = sync_changes
        coordinator._tests_syncs = tracker
    return tracker


async def settled(gateway: Gateway, ews: SimFixture, rooms: Iterable[str] | None = None,
                  timeout: float = 30.0) -> None:
    """Wait until the gateway holds every change the simulator has made to these rooms' calendars (default: all its
    rooms, which must be healthy): its change feed listens to each of them, the booking attendant has nothing left
    to decide, and then a sync of each room asked for here has run to its end, with no other running, no room
    marked dirty, and the stored SyncFolderItems state covering the calendar's newest change (a sync commits its
    events in the same transaction). An assertion that nothing (more) happened, made after this, stands on evidence
    that a sync after the change has run, not on a quiet period.

    The syncs of a room run one after another, so once the one asked for here has ended, any that was under way
    before it (a catch-up after a subscription, say, that could still pick up a change a test makes next) has too."""
    names = tuple(rooms or gateway.coordinator.workers)
    syncs = _syncs(gateway.coordinator)

    async def ready() -> bool:
        feed = gateway.feed
        if feed is not None and getattr(feed, "subscriptions", len(names)) < len(names):  # then a sync follows
            return False
        return bool(ews.call(lambda: ews.sim.attendant.idle.is_set()))
    what = ", ".join(names)
    await eventually(ready, timeout, what=f"the change feed of {what} and the attendant")
    before = {room: syncs["done"][room] for room in names}
    for room in names:
        gateway.coordinator.mark_dirty(room, "test")

    def done() -> bool:
        workers = gateway.coordinator.workers
        return all(syncs["done"][r] > before[r] and not syncs["running"][r] and not workers[r].dirty.is_set()
                   and ews.covers(r, gateway.store.sync_state(r)) for r in names)
    await eventually(done, timeout, what=f"a sync of {what} that holds every change")
