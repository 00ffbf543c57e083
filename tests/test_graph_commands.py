"""Booking commands in a hybrid estate, end to end: the local API, the command service and the routed writer, an
on-premise source (EWS) and an Exchange Online source (Graph over HTTPS with msal) against one simulated
organisation. The same commands and results on both sides, an organiser on the other side from the room included."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.app import GATEWAY, GatewayOptions, init_app
from gateway.config import CommandsConfig
from gateway.model import EVENT_TYPES
from gateway.ports import SourceSpec
from gateway.simulator.control import Control
from gateway.simulator.seed import ORGANIZER_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from gateway.sources.ews.source import EwsSettings
from gateway.sources.graph.settings import GraphSettings
from gateway.store.apikeys import ApiKeys
from gateway.store.sqlite import SqliteStore
from gateway.sync.coordinator import SyncSettings
from tests.conftest import GraphSim, eventually
from tests.running_gateway import iso, slot

pytestmark = pytest.mark.e2e

ROOM1, ROOM2, ROOM3, ROOM4 = (f"room{i}@contoso.com" for i in range(1, 5))  # 1, 2 on premises; 3, 4 online
ALICE, CAROL = "alice@contoso.com", "carol@contoso.com"  # alice on premises, carol online
CREATED, DELETED = EVENT_TYPES["created"], EVENT_TYPES["deleted"]
_keys = itertools.count(1)


class Env:
    def __init__(self, g: GraphSim, app: Any, client: Any) -> None:
        self.g = g
        self.gw = app[GATEWAY]
        self.client = client

    def published(self, room: str) -> dict[str, dict[str, Any]]:
        live: dict[str, dict[str, Any]] = {}
        for e in self.gw.store.outbox_after(0, 100_000):
            if e.event.room != room or "booking" not in e.event.type:
                continue
            if e.event.type == DELETED:
                live.pop(e.event.data["id"], None)
            else:
                live[e.event.data["id"]] = e.event.data
        return live

    async def command(self, **doc: Any) -> dict[str, Any]:
        resp = await self.client.post("/v1/commands", json={"key": f"graph-{next(_keys)}", **doc})
        payload = await resp.json()
        return dict(payload.get("result", payload))


@pytest.fixture
async def env(graph_sim_factory: Any, tmp_path: Path, aiohttp_client: Any) -> AsyncIterator[Env]:
    g = graph_sim_factory(SimulatorConfig(rba_delay=0.05))
    graph = GraphSettings(tenant_id=g.tenant_id, client_id=g.client_id, credential="client_secret",
                          authority_host=g.authority.rsplit("/", 1)[0], graph_url=g.graph_url, ca_bundle=g.ca_bundle,
                          poll_interval_seconds=0.5)
    options = GatewayOptions(
        sources=(SourceSpec("onprem", "ews", EwsSettings(ews_url=g.ews_url, username=f"CONTOSO\\{ORGANIZER_ACCOUNT}",
                                                         max_workers=4), SERVICE_PASSWORD, rooms=(ROOM1, ROOM2)),
                 SourceSpec("online", "graph", graph, g.client_secret, rooms=(ROOM3, ROOM4))),
        sync=SyncSettings(debounce_seconds=0.1, retry_seconds=0.3, reconcile_seconds=3600.0),
        store_path=tmp_path / "gateway.sqlite", feed="streaming", stream_timeout_minutes=1,
        commands=CommandsConfig(attendant_timeout_seconds=15.0))
    store = SqliteStore(options.store_path)
    try:
        key = ApiKeys(store).create("tests", ["read", "book"])
    finally:
        store.close()
    app = init_app(options)
    client = await aiohttp_client(app, headers={"Authorization": f"Bearer {key}"})
    e = Env(g, app, client)
    await eventually(lambda: all(w.state == "verified" for w in e.gw.coordinator.workers.values())
                     and len(e.gw.coordinator.workers) == 4, what="every room verified")
    yield e


async def test_an_online_organiser_books_an_online_room_and_cancels_it(env: Env) -> None:
    start, end = slot(2, 9)
    result = await env.command(type="create", room=ROOM3, start=iso(start), end=iso(end), subject="Planning",
                               organizer={"email": CAROL, "name": "Carol"})
    assert result["status"] == "accepted", result
    booking_id = result["booking_id"]
    await eventually(lambda: booking_id in env.published(ROOM3), what="the booking published")
    published = env.published(ROOM3)[booking_id]
    assert (published["start"], published["end"], published["origin"]) == (iso(start), iso(end), "gateway")
    cancelled = await env.command(type="cancel", room=ROOM3, booking_id=booking_id)
    assert cancelled["status"] == "accepted", cancelled
    await eventually(lambda: booking_id not in env.published(ROOM3), what="the booking gone")


async def test_an_appointment_in_an_online_room_is_moved_and_released(env: Env) -> None:
    start, end = slot(2, 11)
    result = await env.command(type="create", room=ROOM4, start=iso(start), end=iso(end),
                               booker={"name": "Lobby display"})
    assert result["status"] == "accepted", result
    booking_id = result["booking_id"]
    await eventually(lambda: booking_id in env.published(ROOM4), what="the appointment published")
    assert env.published(ROOM4)[booking_id]["origin"] == "gateway"
    later, later_end = slot(2, 15)
    moved = await env.command(type="update", room=ROOM4, booking_id=booking_id, start=iso(later), end=iso(later_end))
    assert moved["status"] == "accepted", moved
    await eventually(lambda: env.published(ROOM4).get(booking_id, {}).get("start") == iso(later),
                     what="the appointment moved")
    # The room is taken now: a second appointment over it is declined as a conflict, not written.
    clash = await env.command(type="create", room=ROOM4, start=iso(later), end=iso(later_end),
                              booker={"name": "Someone else"})
    assert (clash["status"], clash.get("reason")) == ("declined", "conflict"), clash
    released = await env.command(type="cancel", room=ROOM4, booking_id=booking_id)
    assert released["status"] == "accepted", released
    await eventually(lambda: booking_id not in env.published(ROOM4), what="the appointment gone")


@pytest.mark.parametrize(("organizer", "room"), [(ALICE, ROOM3), (CAROL, ROOM1)],
                         ids=["on-premise organiser, online room", "online organiser, on-premise room"])
async def test_an_organiser_on_the_other_side_books_the_room(env: Env, organizer: str, room: str) -> None:
    start, end = slot(3, 10)
    result = await env.command(type="create", room=room, start=iso(start), end=iso(end), subject="Across",
                               organizer={"email": organizer})
    assert result["status"] == "accepted", result
    await eventually(lambda: result["booking_id"] in env.published(room), what="the booking published")
    cancelled = await env.command(type="cancel", room=room, booking_id=result["booking_id"])
    assert cancelled["status"] == "accepted", cancelled
    await eventually(lambda: result["booking_id"] not in env.published(room), what="the booking gone")


async def test_an_online_room_declines_a_meeting_with_its_own_copy(env: Env) -> None:
    start, end = slot(4, 9)
    uid = env.g.call(lambda: Control.of(env.g.sim).create_meeting(organizer=CAROL, rooms=[ROOM3], subject="Review",
                                                                 start=start, end=end).uid)
    booking = await eventually(lambda: next((b for b in env.published(ROOM3).values() if b["uid"] == uid), None),
                               what="the meeting published")
    result = await env.command(type="decline", room=ROOM3, booking_id=booking["id"], message="Closed for cleaning")
    assert result["status"] == "accepted", result
    await eventually(lambda: booking["id"] not in env.published(ROOM3), what="the declined booking gone")
    assert not env.g.call(lambda: Control.of(env.g.sim).meeting_state(uid))["cancelled"]  # the organiser's stays


async def test_availability_spans_both_sides(env: Env) -> None:
    start, end = slot(5, 9)
    for room in (ROOM1, ROOM3):
        made = await env.command(type="create", room=room, start=iso(start), end=iso(end), booker={"name": "Desk"})
        assert made["status"] == "accepted", made
    result = await env.command(type="availability", rooms=[ROOM1, ROOM3, ROOM4], start=iso(start - timedelta(hours=1)),
                               end=iso(end + timedelta(hours=1)))
    assert result["status"] == "accepted", result
    rooms = result["data"]["rooms"]
    assert [(b["start"], b["end"]) for b in rooms[ROOM3]] == [(iso(start), iso(end))]
    assert [(b["start"], b["end"]) for b in rooms[ROOM1]] == [(iso(start), iso(end))]
    assert rooms[ROOM4] == []
