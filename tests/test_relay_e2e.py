"""The whole relay, end to end over real sockets: the EWS simulator (HTTP + NTLM) <- the gateway (its sync, command
service and tunnel) -> TLS WebSocket, through a real CONNECT proxy (tinyproxy) -> the reference hub -> the vendor's
REST API. Booking commands go the other way and land in Exchange; their results come back explicit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway, GatewayOptions, start_gateway, stop_gateway
from gateway.config import CommandsConfig, RelayConfig
from gateway.observability.metrics import Metrics
from gateway.relay.enroll import enroll
from gateway.security.identity import GatewayIdentity
from gateway.security.vault import Vault
from gateway.simulator.control import Control
from gateway.simulator.seed import ORGANIZER_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from gateway.sources.ews.source import EwsSettings
from gateway.sources.ews.writer import register_command_key
from gateway.sync.coordinator import SyncSettings
from tests.conftest import VAULT_KEY, eventually
from tests.hub_fixtures import CUSTOMER, Hub

pytestmark = pytest.mark.usefixtures("customer")  # every gateway here enrolls for CUSTOMER

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("room1@contoso.com", "room2@contoso.com")


def slot(days: int, hour: int, minutes: int = 30) -> tuple[str, str]:
    day = (datetime.now(UTC) + timedelta(days=days)).replace(hour=hour, minute=0, second=0, microsecond=0)
    return (day.strftime("%Y-%m-%dT%H:%M:%SZ"), (day + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ"))


class Vendor:
    """The booking vendor's systems, talking to the hub's per-customer API."""

    def __init__(self, hub: Hub, pki: Any, key: str) -> None:
        self.base = f"{hub.url}/v1/customers/{CUSTOMER}"
        self.headers = {"Authorization": f"Bearer {key}"}
        self.ssl = pki.client_context()

    async def command(self, **cmd: Any) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.post(f"{self.base}/commands", json=cmd, headers=self.headers,
                                                        ssl=self.ssl) as r:
            return dict(await r.json())

    async def bookings(self, room: str) -> list[dict[str, Any]]:
        start, _ = slot(-1, 0)
        end, _ = slot(30, 0)
        async with aiohttp.ClientSession() as s, s.get(f"{self.base}/rooms/{room}/bookings",
                                                       params={"start": start, "end": end}, headers=self.headers,
                                                       ssl=self.ssl) as r:
            if r.status == 404 and (await r.json())["error"] == "room_unknown":
                return []  # no event of the room has reached the hub yet
            assert r.status == 200, await r.text()
            body = await r.json()
            return body["bookings"] if isinstance(body, dict) else body


@pytest.fixture
async def vendor(hub: Hub, pki: Any) -> Vendor:
    return Vendor(hub, pki, await hub.hub.write(hub.hub.store.issue_api_key, CUSTOMER))


async def enrolled(hub: Hub, pki: Any, vault: Vault, proxy: Any = None) -> tuple[GatewayIdentity, RelayConfig]:
    relay = RelayConfig(enabled=True, ca_bundle=pki.ca_file, heartbeat_seconds=5, reconnect_max_seconds=1,
                        proxy_url=proxy.url if proxy else None, proxy_username=proxy.username if proxy else None)
    identity = await enroll(hub.url, await hub.token(), vault=vault, relay=relay, name="e2e",
                            proxy_password=proxy.password if proxy else None)
    return identity, replace(relay, hub_url=identity.hub_url)


def options(ews: Any, store: Path, relay: RelayConfig, identity: GatewayIdentity, proxy: Any = None,
            **commands: Any) -> GatewayOptions:
    return GatewayOptions(
        # The organizer-scoped service account: meetings are made in organizers' calendars (write path a).
        ews=EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{ORGANIZER_ACCOUNT}", default_timezone="Europe/Berlin",
                        max_workers=4),
        password=SERVICE_PASSWORD, rooms=ROOMS, store_path=store, feed="streaming",
        sync=SyncSettings(debounce_seconds=0.05, retry_seconds=0.3),
        relay=relay, identity=identity, proxy_password=proxy.password if proxy else None,
        commands=CommandsConfig(attendant_timeout_seconds=20, **commands))


async def connected(hub: Hub, identity: GatewayIdentity) -> None:
    await eventually(lambda: hub.session(identity.gateway_id) is not None, 30, "the gateway's tunnel")


@pytest.fixture
async def stack(sim_factory, hub: Hub, pki: Any, tmp_path: Path, http_proxy, vault: Vault,
                ) -> AsyncIterator[tuple[Any, Gateway]]:
    ews = sim_factory(SimulatorConfig(rba_delay=0.1))
    identity, relay = await enrolled(hub, pki, vault, http_proxy)
    gw = await start_gateway(options(ews, tmp_path / "gateway.sqlite", relay, identity, http_proxy), Metrics())
    try:
        await connected(hub, identity)
        yield ews, gw
    finally:
        await stop_gateway(gw)


async def test_bookings_reach_the_vendor_and_commands_reach_exchange_through_a_proxy(stack, vendor, http_proxy,
                                                                                    hub):
    ews, _gw = stack
    assert http_proxy.connects(f"127.0.0.1:{hub.running.port}") >= 2  # enrollment and the tunnel went through it
    # A meeting booked in Outlook reaches the vendor.
    start, end = slot(2, 9)
    ews.call(lambda: Control.of(ews.sim).create_meeting(organizer="bob@contoso.com", rooms=[ROOMS[0]],
                                                        subject="Planning", start=start, end=end))
    await eventually(lambda: _has(vendor, ROOMS[0], lambda b: b["start"] == start), 30, "the Outlook booking")

    # A booking made by the vendor for a directory user: a meeting in their calendar, the room's attendant answers.
    start, end = slot(3, 10)
    result = await vendor.command(key="vendor-1", type="create", room=ROOMS[0], start=start, end=end,
                                  subject="Customer visit", organizer={"email": "alice@contoso.com"})
    assert result["status"] == "accepted", result
    booking_id = result["booking_id"]
    found = await eventually(lambda: _has(vendor, ROOMS[0], lambda b: b["id"] == booking_id), 30, "the new booking")
    assert found["organizer"]["email"] == "alice@contoso.com"

    # The same key again: the same answer, no second meeting.
    again = await vendor.command(key="vendor-1", type="create", room=ROOMS[0], start=start, end=end,
                                 subject="Customer visit", organizer={"email": "alice@contoso.com"})
    assert again == result
    # Another slot, the same key: refused.
    other = await vendor.command(key="vendor-1", type="create", room=ROOMS[0], start=slot(3, 12)[0],
                                 end=slot(3, 12)[1], organizer={"email": "alice@contoso.com"})
    assert (other["status"], other["reason"], other["retryable"]) == ("failed", "idempotency_conflict", False)

    # Cancel what the gateway made: the booking goes away at the vendor too.
    cancelled = await vendor.command(key="vendor-2", type="cancel", room=ROOMS[0], booking_id=booking_id)
    assert cancelled["status"] == "accepted", cancelled
    await eventually(lambda: _lacks(vendor, ROOMS[0], booking_id), 30, "the cancellation")


async def test_room_policy_and_attendant_declines_come_back_with_their_reason(stack, vendor):
    ews, _gw = stack
    ews.call(lambda: Control.of(ews.sim).set_room_settings(ROOMS[1], {"BookingWindowInDays": 1}))
    start, end = slot(5, 9)
    result = await vendor.command(key="far-1", type="create", room=ROOMS[1], start=start, end=end,
                                  organizer={"email": "alice@contoso.com"})
    assert (result["status"], result["reason"]) == ("declined", "outside_booking_window"), result
    unknown = await vendor.command(key="nowhere-1", type="create", room="room9@contoso.com", start=start, end=end)
    assert (unknown["status"], unknown["reason"]) == ("declined", "room_unknown")
    past = await vendor.command(key="past-1", type="create", room=ROOMS[0], start="2020-01-01T09:00:00Z",
                                end="2020-01-01T10:00:00Z")
    assert (past["status"], past["reason"], past["retryable"]) == ("failed", "invalid_command", False)
    assert "past" in past["message"]


async def test_concurrent_creates_for_one_slot_give_exactly_one_acceptance(stack, vendor):
    start, end = slot(4, 14)
    results = await asyncio.gather(*(
        vendor.command(key=f"race-{i}", type="create", room=ROOMS[1], start=start, end=end,
                       booker={"name": f"Display {i}"}) for i in range(6)))
    statuses = sorted((r["status"], r.get("reason")) for r in results)
    assert statuses == [("accepted", None)] + [("declined", "conflict")] * 5, results
    winner = next(r for r in results if r["status"] == "accepted")
    await eventually(lambda: _has(vendor, ROOMS[1], lambda b: b["id"] == winner["booking_id"]), 30, "the winner")


async def test_a_create_retried_after_the_gateway_was_killed_books_once(sim_factory, hub, vendor, pki, tmp_path,
                                                                         vault):
    # A slow attendant, so the gateway is killed after writing the meeting but before it could answer.
    ews = sim_factory(SimulatorConfig(rba_delay=4.0))
    identity, relay = await enrolled(hub, pki, vault)
    spec = {"ews_url": ews.url, "store": str(tmp_path / "gateway.sqlite"), "rooms": list(ROOMS),
            "vault": str(vault.path), "vault_key": VAULT_KEY, "hub_url": relay.hub_url, "ca": str(pki.ca_file)}
    start, end = slot(6, 11)
    cmd = {"key": "crash-1", "type": "create", "room": ROOMS[0], "start": start, "end": end, "subject": "Retried",
           "organizer": {"email": "alice@contoso.com"}}

    def written() -> list[Any]:
        register_command_key()
        return list(ews.organizer("alice@contoso.com").calendar.filter(gateway_command_key="crash-1"))

    proc = _gateway_process(spec)
    try:
        await connected(hub, identity)
        pending = asyncio.ensure_future(vendor.command(**cmd))
        await eventually(lambda: asyncio.to_thread(written), 30, "the meeting in the organizer's calendar")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        lost = await pending
        assert (lost["status"], lost["retryable"]) == ("failed", True), lost  # the tunnel went away mid-command
        await eventually(lambda: hub.session(identity.gateway_id) is None, 30, "the hub noticing")
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = _gateway_process(spec)
    try:
        await connected(hub, identity)
        retried = await vendor.command(**cmd)
        assert retried["status"] == "accepted", retried
        assert len(await asyncio.to_thread(written)) == 1
        await eventually(lambda: _has(vendor, ROOMS[0], lambda b: b["id"] == retried["booking_id"]), 30, "booking")
        assert sum(1 for b in await vendor.bookings(ROOMS[0]) if b["start"] == start) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _gateway_process(spec: dict[str, Any]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GATEWAY_PROC": json.dumps(spec)}
    return subprocess.Popen([sys.executable, "-m", "tests.gateway_proc", "--relay"], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL)


async def _has(vendor: Vendor, room: str, match: Any) -> dict[str, Any] | None:
    return next((b for b in await vendor.bookings(room) if match(b)), None)


async def _lacks(vendor: Vendor, room: str, booking_id: str) -> bool:
    return all(b["id"] != booking_id for b in await vendor.bookings(room))


async def test_an_organizer_without_a_mailbox_is_booked_in_the_room_calendar(stack, vendor):
    start, end = slot(7, 15)
    result = await vendor.command(key="ext-1", type="create", room=ROOMS[1], start=start, end=end,
                                  subject="Partner call", organizer={"email": "guest@partner.example", "name": "Guest"})
    assert result["status"] == "accepted", result
    assert "no mailbox" in result["message"]
    found = await eventually(lambda: _has(vendor, ROOMS[1], lambda b: b["id"] == result["booking_id"]), 30, "it")
    assert found["start"] == start
