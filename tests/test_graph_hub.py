"""Exchange Online rooms hearing of changes through the real hub, end to end: the gateway enrolled at the reference
hub with its relay enabled, a Graph source subscribing each room with the hub's URLs (from the tunnel's welcome),
the simulator's Graph side validating them at the hub and delivering there, the hub forwarding each notification
down the tunnel, and the room's delta bringing the change into the stream."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.app import GatewayOptions, start_gateway, stop_gateway
from gateway.config import RelayConfig
from gateway.model import EVENT_TYPES
from gateway.observability.metrics import Metrics
from gateway.ports import SourceSpec
from gateway.relay.enroll import enroll
from gateway.simulator.control import Control
from gateway.simulator.server import SimulatorConfig
from gateway.sources.graph.settings import GraphSettings
from gateway.sync.coordinator import SyncSettings
from tests.conftest import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("customer")]  # the gateway enrolls for the hub's customer

ROOM3, ROOM4, CAROL = "room3@contoso.com", "room4@contoso.com", "carol@contoso.com"


async def start(g: Any, hub: Any, vault: Any, pki: Any, tmp_path: Path, metrics: Metrics,
                poll_interval: float) -> Any:
    status, _ = g.control("PATCH", "/graph/subscriptions", {"notify_ca_bundle": str(pki.ca_file)})
    assert status == 200  # Graph verifies the hub's certificate
    identity = await enroll(hub.url, await hub.token(), vault=vault, relay=RelayConfig(ca_bundle=pki.ca_file),
                            name="hybrid-gateway")
    relay = RelayConfig(enabled=True, hub_url=identity.hub_url, ca_bundle=pki.ca_file, reconnect_max_seconds=1.0)
    settings = GraphSettings(tenant_id=g.tenant_id, client_id=g.client_id, credential="client_secret",
                             authority_host=g.authority.rsplit("/", 1)[0], graph_url=g.graph_url,
                             ca_bundle=g.ca_bundle, poll_interval_seconds=poll_interval)
    return await start_gateway(GatewayOptions(
        sources=(SourceSpec("online", "graph", settings, g.client_secret, rooms=(ROOM3, ROOM4)),),
        sync=SyncSettings(debounce_seconds=0.1, retry_seconds=0.3, reconcile_seconds=3600.0),
        store_path=tmp_path / "gateway.sqlite", relay=relay, identity=identity), metrics)


def subscribed(g: Any, hub: Any) -> list[dict[str, Any]]:
    return [s for s in g.control("GET", "/graph/subscriptions")[1]["subscriptions"]
            if s["notification_url"].startswith(hub.url)]


def booked(g: Any, room: str, subject: str) -> str:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=26)
    return str(g.call(lambda: Control.of(g.sim).create_meeting(organizer=CAROL, rooms=[room], subject=subject,
                                                              start=start, end=start + timedelta(minutes=30)).uid))


def published(gw: Any, uid: str) -> bool:
    return any(e.event.type == EVENT_TYPES["created"] and e.event.data["uid"] == uid
               for e in gw.store.outbox_after(0, 100_000))


def rooms(metrics: Metrics, mode: str) -> float:
    return metrics.registry.get_sample_value("gateway_graph_rooms", {"mode": mode}) or 0.0


async def test_an_online_room_hears_of_a_change_through_the_real_hub(graph_sim_factory: Any, hub: Any, vault: Any,
                                                                      pki: Any, tmp_path: Path) -> None:
    g = graph_sim_factory(SimulatorConfig(rba_delay=0.05))
    metrics = Metrics()
    gw = await start(g, hub, vault, pki, tmp_path, metrics, poll_interval=3600)  # only a notification is in time
    try:
        await eventually(lambda: len(subscribed(g, hub)) == 2, timeout=30, what="both rooms subscribed at the hub")
        # the feed counts a room once Graph's answer to its subscription is in (just after the hub saw it)
        await eventually(lambda: rooms(metrics, "notifications") == 2, what="both rooms hearing of changes")
        uid = booked(g, ROOM3, "Via the hub")
        await eventually(lambda: published(gw, uid), timeout=30, what="the meeting in the stream, through the hub")
        assert (metrics.registry.get_sample_value("gateway_graph_notifications_total", {"outcome": "accepted"})
                or 0) >= 1
    finally:
        await stop_gateway(gw)


async def test_the_hub_down_means_polling_and_back_means_notifications(graph_sim_factory: Any, hub: Any,
                                                                       vault: Any, pki: Any, tmp_path: Path) -> None:
    g = graph_sim_factory(SimulatorConfig(rba_delay=0.05))
    metrics = Metrics()
    gw = await start(g, hub, vault, pki, tmp_path, metrics, poll_interval=1.0)
    try:
        await eventually(lambda: len(subscribed(g, hub)) == 2, timeout=30, what="both rooms subscribed at the hub")
        await hub.stop()
        await eventually(lambda: rooms(metrics, "polling") == 2, timeout=30, what="polling while the hub is down")
        await eventually(lambda: {gw.coordinator.workers[r].state for r in (ROOM3, ROOM4)} == {"polling"},
                         what="the rooms say they are polled")
        uid = booked(g, ROOM4, "While the hub was down")
        await eventually(lambda: published(gw, uid), timeout=30, what="the meeting found by polling")
        await hub.start()
        await eventually(lambda: rooms(metrics, "notifications") == 2, timeout=30, what="notifications again")
        await eventually(lambda: {gw.coordinator.workers[r].state for r in (ROOM3, ROOM4)} == {"verified"},
                         what="the rooms verified again")
        uid = booked(g, ROOM3, "With the hub back")
        await eventually(lambda: published(gw, uid), timeout=30, what="the meeting after the hub came back")
    finally:
        await stop_gateway(gw)
