"""Booking commands end to end: the whole gateway (init_app, coordinator, streaming feed, command service, SQLite)
against the EWS simulator over HTTP + NTLM, commands posted to the local API with a book-scoped key, and what the
gateway then publishes read from its outbox.

What a command writes must come back through the read path as what it is (origin gateway), must be inside what the
gateway can see and undo (the sync window), and must be published right even when the server's change feed says
nothing about it.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from exchangelib import CalendarItem
from exchangelib.items import SEND_TO_ALL_AND_SAVE_COPY

from gateway.app import GATEWAY, Gateway, GatewayOptions, init_app
from gateway.config import CommandsConfig
from gateway.model import EVENT_TYPES
from gateway.simulator.control import Control
from gateway.simulator.seed import ORGANIZER_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from gateway.sources.ews.source import EwsSettings
from gateway.store.apikeys import ApiKeys
from gateway.store.sqlite import SqliteStore
from gateway.sync.coordinator import SyncSettings
from tests.conftest import TZ, SimFixture, eventually
from tests.running_gateway import iso, slot

ROOM1, ROOM2 = "room1@contoso.com", "room2@contoso.com"
ALICE, BOB = "alice@contoso.com", "bob@contoso.com"
CREATED, DELETED = EVENT_TYPES["created"], EVENT_TYPES["deleted"]
_keys = itertools.count(1)


class Env:
    def __init__(self, ews: SimFixture, gw: Gateway, client: Any) -> None:
        self.ews = ews
        self.gw = gw
        self.client = client

    def events(self, room: str, type_: str | None = None) -> list[Any]:
        return [e.event for e in self.gw.store.outbox_after(0, 100_000)
                if e.event.room == room and "booking" in e.event.type and (type_ is None or e.event.type == type_)]

    def published(self, room: str) -> dict[str, dict[str, Any]]:
        """The room's bookings as a consumer of the events holds them now, by id."""
        live: dict[str, dict[str, Any]] = {}
        for e in self.events(room):
            if e.type == DELETED:
                live.pop(e.data["id"], None)
            else:
                live[e.data["id"]] = e.data
        return live

    async def command(self, **doc: Any) -> dict[str, Any]:
        body = {"key": f"e2e-{next(_keys)}", "room": ROOM1, **doc}
        resp = await self.client.post("/v1/commands", json=body)
        payload = await resp.json()
        assert resp.status in (200, 400, 409, 422, 429, 503), (resp.status, payload)
        return payload.get("result", payload)

    def quirk(self, **values: Any) -> None:
        def apply() -> None:
            for name, value in values.items():
                setattr(self.ews.sim.faults, name, value)
        self.ews.call(apply)


@pytest.fixture
async def env(sim_factory, tmp_path, aiohttp_client):  # type: ignore[no-untyped-def]
    ews = sim_factory(SimulatorConfig(rba_delay=0.05, stream_minute=2.0, keepalive_seconds=0.5))
    options = GatewayOptions(
        ews=EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{ORGANIZER_ACCOUNT}", default_timezone="Europe/Berlin",
                        max_workers=4),
        password=SERVICE_PASSWORD, rooms=(ROOM1, ROOM2),
        # A reconcile far away: what these tests see comes from syncs and read-backs, never from a full re-read.
        sync=SyncSettings(debounce_seconds=0.2, retry_seconds=0.3, reconcile_seconds=3600.0),
        store_path=tmp_path / "gateway.sqlite", feed="streaming", stream_timeout_minutes=1,
        commands=CommandsConfig(attendant_timeout_seconds=15.0))
    store = SqliteStore(options.store_path)
    try:
        key = ApiKeys(store).create("tests", ["read", "book"])
    finally:
        store.close()
    app = init_app(options)
    client = await aiohttp_client(app, headers={"Authorization": f"Bearer {key}"})
    e = Env(ews, app[GATEWAY], client)
    await eventually(lambda: all(w.state == "verified" for w in e.gw.coordinator.workers.values()),
                     what="rooms verified")
    await eventually(lambda: e.gw.feed is not None and e.gw.feed.subscriptions >= 2,  # type: ignore[union-attr]
                     what="subscriptions")
    return e


# -- 8: the horizon ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("year", [2099, 9998])
async def test_a_booking_beyond_the_sync_window_is_declined_and_never_written(env: Env, year: int):
    start = datetime(year, 6, 1, 9, tzinfo=UTC)
    result = await env.command(type="create", start=iso(start), end=iso(start + timedelta(hours=1)),
                               booker={"name": "Lobby display"})
    assert (result["status"], result["reason"]) == ("declined", "outside_sync_window"), result
    result = await env.command(type="create", start=iso(start), end=iso(start + timedelta(hours=1)),
                               organizer={"email": ALICE, "name": "Alice"})
    assert (result["status"], result["reason"]) == ("declined", "outside_sync_window"), result
    items = env.ews.call(lambda: [i.start.year for mb in (ROOM1, ALICE)
                                  for i in env.ews.sim.directory.get(mb).calendar.items.values()])
    assert year not in items


async def test_the_end_of_time_is_an_invalid_command_not_an_internal_error(env: Env):
    result = await env.command(type="create", start="9999-12-31T23:00:00-01:00", end="9999-12-31T23:30:00-01:00",
                               booker={"name": "Lobby display"})
    assert (result["status"], result["reason"]) == ("failed", "invalid_command"), result


# -- 14: what the gateway made is published as the gateway's --------------------------------------------------------
async def test_bookings_the_gateway_made_are_published_with_origin_gateway(env: Env):
    s1, e1 = slot(2, 9)
    s2, e2 = slot(2, 11)
    s3, e3 = slot(2, 14)
    meeting = await env.command(type="create", start=iso(s1), end=iso(e1), subject="Planning",
                                organizer={"email": ALICE, "name": "Alice"})
    appointment = await env.command(type="create", start=iso(s2), end=iso(e2), booker={"name": "Lobby display"})
    assert meeting["status"] == appointment["status"] == "accepted", (meeting, appointment)

    def outlook() -> None:  # Bob books the room in Outlook
        acct = env.ews.organizer(BOB)
        CalendarItem(account=acct, folder=acct.calendar, subject="Bob's review", resources=[ROOM1],
                     start=s3.astimezone(TZ), end=e3.astimezone(TZ)).save(
            send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    await asyncio.to_thread(outlook)

    await eventually(lambda: len(env.published(ROOM1)) == 3, what="three bookings published")
    published = env.published(ROOM1)
    origins = {(b["start"], b["origin"]) for b in published.values()}
    assert origins == {(iso(s1), "gateway"), (iso(s2), "gateway"), (iso(s3), "exchange")}
    assert published[meeting["booking_id"]]["origin"] == "gateway"
    assert published[appointment["booking_id"]]["origin"] == "gateway"
    # Every event of the gateway's bookings said so, from the first one on.
    for e in env.events(ROOM1):
        if e.data["id"] in (meeting["booking_id"], appointment["booking_id"]):
            assert e.data["origin"] == "gateway", e.data


# -- 18: after a command, the gateway reads back what it changed ---------------------------------------------------
async def test_a_decline_the_server_applies_without_a_sync_change_is_published_at_once(env: Env):
    start, end = slot(3, 10)
    item = env.ews.call(lambda: Control.of(env.ews.sim).create_meeting(
        organizer=BOB, rooms=[ROOM1], start=iso(start), end=iso(end), subject="Bob's review"))
    published = await eventually(lambda: env.published(ROOM1) or None, what="Bob's booking published")
    (booking_id,) = published
    env.quirk(quiet_declines=True)  # the server declines in place: SyncFolderItems will report nothing
    result = await env.command(type="decline", booking_id=booking_id, message="Closed for cleaning")
    assert result["status"] == "accepted", result
    state = env.ews.call(lambda: Control.of(env.ews.sim).meeting_state(item.uid))
    assert not state["cancelled"]
    await eventually(lambda: booking_id not in env.published(ROOM1), timeout=10,
                     what="the declined booking withdrawn without waiting for a reconcile")
    (deleted,) = env.events(ROOM1, DELETED)
    assert deleted.data["id"] == booking_id
