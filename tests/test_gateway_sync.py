"""End to end: people change room calendars in the simulated Exchange; the gateway turns every change into
exactly the expected booking events (EWS over HTTP + NTLM, streaming notifications, SQLite on disk)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from exchangelib import CalendarItem, EWSDate, EWSDateTime, EWSTimeZone
from exchangelib.items import SEND_TO_ALL_AND_SAVE_COPY
from exchangelib.recurrence import Recurrence, WeeklyPattern
from structlog.testing import capture_logs

from gateway.app import GATEWAY, Gateway, GatewayOptions, init_app
from gateway.model import EVENT_TYPES
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from gateway.sources.ews.source import EwsSettings
from gateway.store.apikeys import ApiKeys
from gateway.store.sqlite import SqliteStore
from gateway.sync.coordinator import SyncSettings
from tests.conftest import TZ, SimFixture, eventually
from tests.openapi_validation import conforms
from tests.running_gateway import settled

ROOMS = ("room1@contoso.com", "room2@contoso.com", "room3@contoso.com")
CREATED, UPDATED, DELETED = EVENT_TYPES["created"], EVENT_TYPES["updated"], EVENT_TYPES["deleted"]


class Env:
    def __init__(self, ews: SimFixture, gw: Gateway) -> None:
        self.ews = ews
        self.gw = gw

    def events(self, room: str | None = None) -> list[Any]:
        entries = self.gw.store.outbox_after(0, 100_000)
        return [e.event for e in entries if room is None or e.event.room == room]

    def booking_events(self, room: str | None = None) -> list[Any]:
        return [e for e in self.events(room) if "booking" in e.type]

    def of_type(self, type_: str, room: str | None = None) -> list[Any]:
        return [e for e in self.booking_events(room) if e.type == type_]

    async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def settled(self, room: str = ROOMS[0]) -> None:
        """Every room's calendar is synced, none is dirty, the attendant is idle (running_gateway.settled)."""
        await settled(self.gw, self.ews, ROOMS)


@pytest.fixture
async def env(sim_factory, tmp_path, aiohttp_client):  # type: ignore[no-untyped-def]
    ews = sim_factory(SimulatorConfig(rba_delay=0.05, stream_minute=2.0, keepalive_seconds=0.5))
    options = GatewayOptions(
        ews=EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{SERVICE_ACCOUNT}", default_timezone="Europe/Berlin",
                        max_workers=4),
        password=SERVICE_PASSWORD, rooms=ROOMS,
        sync=SyncSettings(debounce_seconds=0.2, retry_seconds=0.3, auth_retry_seconds=1.0),
        store_path=tmp_path / "gateway.sqlite", feed="streaming", stream_timeout_minutes=1,
        feed_retry_seconds=0.3)  # a lost subscription is made again at once, not after the default 5 s
    store = SqliteStore(options.store_path)  # a key for the API client, made the way `gateway api-keys` does
    try:
        key = ApiKeys(store).create("tests", ["read", "metrics"])
    finally:
        store.close()
    app = init_app(options)
    client = await aiohttp_client(app, headers={"Authorization": f"Bearer {key}"})
    env = Env(ews, app[GATEWAY])
    env.client = client  # type: ignore[attr-defined]
    await eventually(lambda: all(w.state == "verified" for w in env.gw.coordinator.workers.values()),
                     what="rooms verified")
    await eventually(lambda: env.gw.feed is not None and env.gw.feed.subscriptions >= len(ROOMS),  # type: ignore[union-attr]
                     what="subscriptions")
    return env


def start_in(days: int, hour: int = 10) -> EWSDateTime:
    now = EWSDateTime.now(TZ)
    return now.replace(hour=hour, minute=0, second=0, microsecond=0) + timedelta(days=days)


def book(ews: SimFixture, subject: str, rooms: list[str], start: EWSDateTime, hours: float = 1,
         organizer: str = "alice@contoso.com", **kw: Any) -> CalendarItem:
    acct = ews.organizer(organizer)
    item = CalendarItem(account=acct, folder=acct.calendar, subject=subject, start=start,
                        end=start + timedelta(hours=hours), resources=rooms, **kw)
    item.save(send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    return item


async def test_single_meeting_created_moved_extended_cancelled(env: Env):
    room = ROOMS[0]
    item = await env.blocking(book, env.ews, "Q3 review", [room], start_in(2))
    created = await eventually(lambda: env.of_type(CREATED, room), what="created event")
    assert len(created) == 1
    data = created[0].data
    assert data["room"] == room and data["subject"] == "Alice Anders" and data["subject_is_organizer_name"]
    assert data["organizer"]["email"] == "alice@contoso.com" and data["response"] == "accepted"

    def move() -> None:
        item.refresh()
        item.start += timedelta(hours=2)
        item.end += timedelta(hours=3)  # moved and extended
        item.save(update_fields=["start", "end"], send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    await env.blocking(move)
    updated = await eventually(lambda: env.of_type(UPDATED, room), what="updated event")
    await env.settled(room)
    updated = env.of_type(UPDATED, room)
    assert updated[-1].data["id"] == data["id"]
    assert updated[-1].data["end"] > data["end"]

    await env.blocking(lambda: (item.refresh(), item.cancel()))
    deleted = await eventually(lambda: env.of_type(DELETED, room), what="deleted event")
    await env.settled(room)
    assert len(env.of_type(DELETED, room)) == 1 and deleted[0].data["id"] == data["id"]
    assert len(env.of_type(CREATED, room)) == 1
    assert env.gw.store.bookings(room) == []


async def test_recurring_series_with_modified_and_deleted_occurrences(env: Env):
    room = ROOMS[1]
    first = start_in(3, hour=9)

    def create() -> CalendarItem:
        acct = env.ews.organizer("bob@contoso.com")
        item = CalendarItem(account=acct, folder=acct.calendar, subject="Weekly sync", start=first,
                            end=first + timedelta(minutes=30), resources=[room],
                            recurrence=Recurrence(pattern=WeeklyPattern(interval=1, weekdays=[first.isoweekday()]),
                                                  start=first.date(), number=4))
        item.save(send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
        return item
    series = await env.blocking(create)
    await eventually(lambda: len(env.of_type(CREATED, room)) == 4, what="four occurrences")
    await env.settled(room)
    ids = {e.data["id"] for e in env.of_type(CREATED, room)}
    assert len(ids) == 4 and all(e.data["series_id"] for e in env.of_type(CREATED, room))

    def change() -> None:
        series.refresh()
        occ = series.occurrence(2)
        occ.refresh()
        occ.start += timedelta(hours=1)
        occ.end += timedelta(hours=1)
        occ.save(update_fields=["start", "end"], send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
        series.refresh()
        series.occurrence(3).delete(send_meeting_cancellations=SEND_TO_ALL_AND_SAVE_COPY)
    await env.blocking(change)
    await eventually(lambda: env.of_type(DELETED, room) and env.of_type(UPDATED, room), what="series changes")
    await env.settled(room)
    updated, deleted = env.of_type(UPDATED, room), env.of_type(DELETED, room)
    assert len(updated) == 1 and updated[0].data["is_exception"] and updated[0].data["id"] in ids
    assert len(deleted) == 1 and deleted[0].data["id"] in ids and deleted[0].data["id"] != updated[0].data["id"]
    plain = datetime.fromtimestamp(first.timestamp(), UTC)
    assert len(env.gw.store.bookings(room, plain - timedelta(days=1), plain + timedelta(days=60))) == 3


async def test_one_meeting_with_two_rooms_is_two_bookings_of_one_meeting(env: Env):
    await env.blocking(book, env.ews, "All hands", [ROOMS[0], ROOMS[2]], start_in(4))
    await eventually(lambda: env.of_type(CREATED, ROOMS[0]) and env.of_type(CREATED, ROOMS[2]),
                     what="both rooms")
    a, b = env.of_type(CREATED, ROOMS[0])[0].data, env.of_type(CREATED, ROOMS[2])[0].data
    assert a["meeting_id"] == b["meeting_id"] and a["uid"] == b["uid"] and a["id"] != b["id"]


async def test_a_private_meeting_booked_in_outlook_leaves_as_private(env: Env):  # config to SSE: test_privacy.py
    room = ROOMS[2]
    env.ews.call(lambda: env.ews.sim.directory.get(room).processing.update(
        {"remove_private_property": False, "delete_subject": False, "add_organizer_to_subject": False}))
    await env.blocking(lambda: book(env.ews, "Layoffs planning", [room], start_in(5), 1, "carol@contoso.com",
                                    sensitivity="Private"))
    created = await eventually(lambda: env.of_type(CREATED, room), what="private booking")
    data = created[0].data
    assert data["sensitivity"] == "private" and data["subject"] == "Private" and data["organizer"] is None
    raw = env.gw.store.outbox_after(0, 1000)
    assert all("Layoffs" not in str(e.event.data) for e in raw)


async def test_all_day_event_across_time_zones(env: Env):
    room = ROOMS[0]
    pacific = EWSTimeZone("America/Los_Angeles")
    day = (EWSDateTime.now(TZ) + timedelta(days=10)).date()

    def create() -> None:
        acct = env.ews.organizer("dave@contoso.com")
        CalendarItem(account=acct, folder=acct.calendar, subject="Offsite", is_all_day=True,
                     start=EWSDate(day.year, day.month, day.day), end=EWSDate(day.year, day.month, day.day),
                     resources=[room], _start_timezone=pacific, _end_timezone=pacific,
                     ).save(send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    await env.blocking(create)
    created = await eventually(lambda: [e for e in env.of_type(CREATED, room) if e.data["all_day"]],
                               what="all-day booking")
    data = created[0].data
    assert data["start_date"] == day.isoformat() and data["end_date"] == (day + timedelta(days=1)).isoformat()
    assert data["timezone"] == "America/Los_Angeles"


async def test_change_key_only_change_sends_nothing(env: Env):
    room = ROOMS[0]
    await env.blocking(book, env.ews, "Stable", [room], start_in(6))
    await eventually(lambda: env.of_type(CREATED, room), what="created")
    await env.settled(room)
    before = len(env.booking_events())

    def touch() -> None:
        d = env.ews.sim.directory
        for item in list(d.get(room).calendar.items.values()):
            d.touch(item)  # new ChangeKey, same content: Exchange re-stamping an item
    synced_before = env.gw.store.sync_state(room)
    env.ews.call(touch)
    await env.settled(room)  # the gateway has synced the new change keys, in a sync after the touch ...
    assert env.gw.store.sync_state(room) != synced_before
    assert len(env.booking_events()) == before  # ... and sent nothing for them


async def test_events_stream_over_sse_and_resume_with_last_event_id(env: Env):
    room = ROOMS[1]
    await env.blocking(book, env.ews, "SSE", [room], start_in(7))
    await eventually(lambda: env.of_type(CREATED, room), what="created")
    client = env.client  # type: ignore[attr-defined]

    async def read_events(headers: dict[str, str]) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        async with client.get("/v1/events", headers=headers) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            current: dict[str, str] = {}
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith(("id:", "event:", "data:")):
                    k, _, v = line.partition(":")
                    current[k] = v.strip()
                elif line == "" and "id" in current:
                    out.append((int(current["id"]), current["event"]))
                    current = {}
                    if out[-1][0] >= env.gw.store.last_seq():
                        break
        return out
    everything = await asyncio.wait_for(read_events({}), 10)
    assert [s for s, _ in everything] == sorted(s for s, _ in everything)
    middle = everything[len(everything) // 2][0]
    rest = await asyncio.wait_for(read_events({"Last-Event-ID": str(middle)}), 10)
    assert rest == [e for e in everything if e[0] > middle]


async def test_rooms_bookings_health_and_metrics_endpoints(env: Env):
    room = ROOMS[0]
    await env.blocking(book, env.ews, "API", [room], start_in(8))
    await eventually(lambda: env.of_type(CREATED, room), what="created")
    client = env.client  # type: ignore[attr-defined]
    anonymous = await client.get("/v1/rooms", headers={"Authorization": ""})
    assert anonymous.status == 401 and (await anonymous.json())["error"] == "missing_api_key"
    listing = await (await client.get("/v1/rooms")).json()
    conforms(listing, "/v1/rooms", "get", 200)
    rooms = listing["rooms"]
    assert {r["email"] for r in rooms} == set(ROOMS) and all(r["state"] == "verified" for r in rooms)
    start = (EWSDateTime.now(TZ) + timedelta(days=7)).strftime("%Y-%m-%dT00:00:00Z")
    end = (EWSDateTime.now(TZ) + timedelta(days=10)).strftime("%Y-%m-%dT00:00:00Z")
    resp = await client.get(f"/v1/rooms/{room}/bookings", params={"start": start, "end": end})
    assert resp.status == 200
    listed = await resp.json()
    assert [b["subject"] for b in listed["bookings"]] == ["Alice Anders"]
    conforms(listed, "/v1/rooms/{room}/bookings", "get", 200)  # real Exchange data, as documented
    bad = await client.get(f"/v1/rooms/{room}/bookings", params={"start": "yesterday"})
    assert bad.status == 400 and "ISO 8601" in (await bad.json())["message"]
    assert (await client.get("/v1/rooms/nowhere@contoso.com/bookings")).status == 404
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    metrics = await (await client.get("/metrics")).text()
    for name in ("gateway_rooms{state=\"verified\"} 3.0", "gateway_ews_requests_total", "gateway_outbox_depth",
                 "gateway_room_last_sync_age_seconds", "gateway_sync_change_to_outbox_seconds_bucket",
                 "gateway_ews_subscriptions"):
        assert name in metrics, name
    spec = await (await client.get("/openapi.json")).json()
    assert "/v1/events" in spec["paths"]


def exactly_once(env: Env) -> Counter[tuple[str, str]]:
    """(booking id, event type) counts: a created or deleted event twice for one booking is a duplicate."""
    return Counter((e.data["id"], e.type) for e in env.booking_events() if e.type in (CREATED, DELETED))


async def test_changes_survive_subscription_loss_restart_and_stream_resets(env: Env):
    room = ROOMS[0]
    env.ews.call(lambda: env.ews.sim.notifications.expire(None))
    await env.blocking(book, env.ews, "After expiry", [room], start_in(9))
    await eventually(lambda: [e for e in env.of_type(CREATED, room)], timeout=30, what="event after expiry")
    env.ews.call(lambda: env.ews.sim.restart())
    await env.blocking(book, env.ews, "After restart", [room], start_in(9, hour=14))
    await eventually(lambda: len(env.of_type(CREATED, room)) == 2, timeout=30, what="event after restart")
    env.ews.call(lambda: env.ews.sim.notifications.reset_streams())
    await env.blocking(book, env.ews, "After reset", [room], start_in(9, hour=16))
    await eventually(lambda: len(env.of_type(CREATED, room)) == 3, timeout=30, what="event after reset")
    await env.settled(room)
    assert max(exactly_once(env).values()) == 1


async def test_invalid_sync_state_leads_to_a_resync_without_duplicates(env: Env):
    room = ROOMS[1]
    await env.blocking(book, env.ews, "Before", [room], start_in(11))
    await eventually(lambda: env.of_type(CREATED, room), what="created")
    await env.settled(room)
    env.gw.store.commit_sync(room, upserts=(), deletes=(), events=(), sync_state="AAAAbm90LWEtc3RhdGU=")
    await env.blocking(book, env.ews, "After", [room], start_in(11, hour=15))
    await eventually(lambda: len(env.of_type(CREATED, room)) == 2, timeout=30, what="resync")
    await env.settled(room)
    assert max(exactly_once(env).values()) == 1


async def test_throttling_storm_loses_nothing(env: Env):
    room = ROOMS[2]
    env.ews.call(lambda: (setattr(env.ews.sim.throttle, "max_concurrent", 1),
                          setattr(env.ews.sim.throttle, "back_off_ms", 300),
                          env.ews.sim.faults.latency.update({"SyncFolderItems": 0.2, "FindItem": 0.2,
                                                             "GetItem": 0.2})))
    with capture_logs() as logs:
        for i in range(3):  # every room changes at once, so their syncs compete for a budget of one request
            await env.blocking(book, env.ews, f"Storm {i}", list(ROOMS), start_in(12, hour=8 + 2 * i))
        await eventually(lambda: all(len(env.of_type(CREATED, r)) == 3 for r in ROOMS), timeout=60,
                         what="every booking despite throttling")
    # Under throttling some requests pass and some are refused: that is one episode in the log, not one per answer.
    assert len([e for e in logs if e["event"] == "exchange.outage_started"]) == 1
    assert not [e for e in logs if e["event"] == "room.state" and e["log_level"] != "info"]
    env.ews.call(lambda: (setattr(env.ews.sim.throttle, "max_concurrent", 27), env.ews.sim.faults.clear()))
    await env.settled(room)
    assert env.ews.call(lambda: env.ews.sim.throttle.busy_answers) > 0
    assert max(exactly_once(env).values()) == 1
