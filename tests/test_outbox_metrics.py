"""The outbox gauges tell what is pending delivery: events a hub has yet to acknowledge, and nothing at all when
no relay is configured (local SSE clients read at their own pace and never acknowledge)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.app import GATEWAY, GatewayOptions, init_app
from gateway.config import RelayConfig
from gateway.security.identity import GatewayIdentity
from gateway.security.vault import Vault, generate_key_file, read_key_file
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD, seed_bookings
from gateway.sources.ews.source import EwsSettings
from gateway.sync.coordinator import SyncSettings
from tests.conftest import SimFixture, eventually

ROOMS = ("room1@contoso.com", "room2@contoso.com")


def options(ews: SimFixture, tmp_path: Path, **kw: Any) -> GatewayOptions:
    return GatewayOptions(
        ews=EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{SERVICE_ACCOUNT}", default_timezone="Europe/Berlin",
                        max_workers=4),
        password=SERVICE_PASSWORD, rooms=ROOMS, sync=SyncSettings(debounce_seconds=0.2),
        store_path=tmp_path / "gateway.sqlite", feed="poll", **kw)


def gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


async def imported(client: Any, app: Any) -> str:
    """/metrics once every room is imported (seeded bookings are in the outbox)."""
    gw = app[GATEWAY]
    await eventually(lambda: all(w.last_success is not None for w in gw.coordinator.workers.values()),
                     timeout=30, what="rooms imported")
    assert gw.store.last_seq() > 0
    return str(await (await client.get("/metrics")).text())


async def test_without_a_relay_nothing_is_pending_delivery(sim_factory: Callable[..., SimFixture], tmp_path: Path,
                                                          aiohttp_client: Any) -> None:
    ews = sim_factory()
    ews.call(lambda: seed_bookings(ews.sim.directory, seed=3, rooms=list(ROOMS)))
    app = init_app(options(ews, tmp_path))
    client = await aiohttp_client(app)
    metrics = await imported(client, app)
    assert gauge(metrics, "gateway_outbox_depth") == 0
    assert gauge(metrics, "gateway_outbox_oldest_age_seconds") == 0


async def test_with_a_relay_the_unacknowledged_events_are_pending(sim_factory: Callable[..., SimFixture],
                                                                  tmp_path: Path, aiohttp_client: Any) -> None:
    ews = sim_factory()
    ews.call(lambda: seed_bookings(ews.sim.directory, seed=3, rooms=list(ROOMS)))
    vault = Vault(tmp_path / "credentials.vault", read_key_file(generate_key_file(tmp_path / "vault.key")))
    hub_url = "wss://127.0.0.1:9/v1/tunnel"  # nothing listens: the hub never acknowledges
    identity = GatewayIdentity.generate(vault)
    identity.enroll(gateway_id="gw_1", customer="acme", hub_url=hub_url)
    relay = RelayConfig(enabled=True, hub_url=hub_url, reconnect_max_seconds=1)
    app = init_app(options(ews, tmp_path, relay=relay, identity=identity))
    client = await aiohttp_client(app)
    await imported(client, app)
    stored = app[GATEWAY].store.last_seq()  # before the scrape: syncs may go on adding events after it
    metrics = str(await (await client.get("/metrics")).text())
    assert gauge(metrics, "gateway_outbox_depth") >= stored > 0
    assert gauge(metrics, "gateway_outbox_oldest_age_seconds") > 0
