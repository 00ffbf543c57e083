"""Several replicas sharing the rooms (issue 11): each syncs the rooms that rendezvous-hash to its ordinal, the hub
routes a room's command to its owner (or nowhere), a replica's local API points at (or forwards to) the owner of a
room it does not sync, and a change of the replica count hands rooms over without a deletion."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.relay import protocol
from gateway.sharding import owner
from tests.fake_gateway import T0, create_command
from tests.hub_fixtures import Vendor

pytestmark = pytest.mark.e2e

ROOMS = [f"room{i}@contoso.com" for i in range(1, 7)]


def room_of(ordinal: int, count: int = 3) -> str:
    return next(r for r in ROOMS if owner(r, count) == ordinal)


async def replicas(vendor: Vendor, http: Any, hub: Any, count: int = 3, *,
                   ordinals: range | None = None) -> dict[int, Any]:
    links = {}
    for ordinal in ordinals if ordinals is not None else range(count):
        gw = await vendor.gateway()
        link = await gw.connect(http, hub.url, replica=(ordinal, count))
        assert link.welcome["type"] == "welcome", link.welcome
        links[ordinal] = link
    return links


# -- the hub routes by owner ---------------------------------------------------------------------------------------
async def test_the_hub_routes_a_command_to_the_replica_that_owns_its_room(vendor: Vendor, http: Any, hub: Any) -> None:
    key = await vendor.customer()
    links = await replicas(vendor, http, hub)
    for ordinal in (2, 0, 1):
        room = room_of(ordinal)
        body = create_command(f"cmd-{ordinal}", room=room)
        call = asyncio.create_task(vendor.call("POST", "/v1/customers/contoso/commands", token=key, body=body))
        msg = await links[ordinal].recv()
        assert msg["type"] == "command" and msg["command"]["room"] == room
        await links[ordinal].send("result", result={"key": f"cmd-{ordinal}", "status": "accepted",
                                                    "booking_id": "b" * 32, "uid": "u-1"})
        status, doc = await call
        assert (status, doc["status"]) == (200, "accepted")
    for link in links.values():  # each replica was asked its own room's command, no other
        assert sum('"type":"command"' in m for m in link.received) == 1


async def test_a_command_for_an_offline_owner_is_refused_never_sent_to_another_replica(vendor: Vendor, http: Any,
                                                                                       hub: Any) -> None:
    key = await vendor.customer()
    links = await replicas(vendor, http, hub, ordinals=range(2))  # replica 2 of 3 is not connected
    room = room_of(2)
    status, doc = await vendor.call("POST", "/v1/customers/contoso/commands", token=key,
                                    body=create_command("cmd-x", room=room))
    assert status == 503 and doc["reason"] == "gateway_offline" and doc["retryable"] is True
    assert f"{room} (ordinal 2 of 3) is not connected" in doc["message"]
    for link in links.values():
        assert not any('"type":"command"' in m for m in link.received)


async def test_availability_over_rooms_of_several_replicas_is_refused_with_the_groups(vendor: Vendor, http: Any,
                                                                                     hub: Any) -> None:
    key = await vendor.customer()
    links = await replicas(vendor, http, hub)  # held: a link that is collected closes
    rooms = [room_of(0), room_of(1)]
    body = {"key": "avail-1", "type": "availability", "rooms": rooms, "start": f"{T0:%Y-%m-%dT%H:%M:%SZ}",
            "end": f"{T0.replace(hour=17):%Y-%m-%dT%H:%M:%SZ}"}
    status, doc = await vendor.call("POST", "/v1/customers/contoso/commands", token=key, body=body)
    assert status == 400 and doc["reason"] == "invalid_command"
    assert f"replica 0: {rooms[0]}; replica 1: {rooms[1]}" in doc["message"]
    assert "send one availability command per replica's rooms" in doc["message"]
    assert not any('"type":"command"' in m for link in links.values() for m in link.received)


async def test_a_malformed_replica_in_hello_is_refused(vendor: Vendor, http: Any, hub: Any) -> None:
    await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url, replica=(3, 3))
    assert link.welcome["type"] == "error" and link.welcome["code"] == "bad_message"
    assert "0 <= ordinal < count" in link.welcome["message"]
    assert protocol.hello_replica({"replica": {"ordinal": 1, "count": 3}}) == (1, 3)
