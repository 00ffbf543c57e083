"""Several replicas sharing the rooms (issue 11): each syncs the rooms that rendezvous-hash to its ordinal, the hub
routes a room's command to its owner (or nowhere), a replica's local API points at (or forwards to) the owner of a
room it does not sync, and a change of the replica count hands rooms over without a deletion."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway.app import GATEWAY, Gateway, GatewayOptions, init_app, start_gateway, stop_gateway
from gateway.config import RelayConfig
from gateway.model import EVENT_TYPES
from gateway.ports import FeedSettings, OpenedSource, SourceSpec
from gateway.relay import protocol
from gateway.relay.enroll import enroll
from gateway.security.vault import Vault, parse_key
from gateway.sharding import Shard, owner
from gateway.sources.memory import MemoryKind, MemorySource
from gateway.sources.registry import SourceRegistry, default_registry
from gateway.store.apikeys import ApiKeys
from gateway.store.sqlite import SqliteStore
from gateway.sync.coordinator import SyncSettings
from tests.conftest import VAULT_KEY, eventually, free_port
from tests.fake_gateway import T0, create_command
from tests.hub_fixtures import Vendor
from tests.running_gateway import appointment, soon

ROOT = Path(__file__).resolve().parents[1]

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


async def test_while_the_count_changes_the_hub_follows_the_newest_replicas_count(vendor: Vendor, http: Any,
                                                                                   hub: Any) -> None:
    key = await vendor.customer()
    old = await replicas(vendor, http, hub, 3, ordinals=range(2))  # 0/3 and 1/3, still running the old count
    new = await replicas(vendor, http, hub, 2, ordinals=range(1))  # 0/2: the first pod restarted with the new count
    room = next(r for r in ROOMS if owner(r, 3) == 2 and owner(r, 2) == 0)  # moves from replica 2 to 0
    call = asyncio.create_task(vendor.call("POST", "/v1/customers/contoso/commands", token=key,
                                           body=create_command("cmd-moved", room=room)))
    msg = await new[0].recv()
    assert msg["type"] == "command" and msg["command"]["room"] == room
    await new[0].send("result", result={"key": "cmd-moved", "status": "accepted", "booking_id": "b" * 32,
                                        "uid": "u-1"})
    assert (await call)[0] == 200
    # Replica 1 of the new count is not up yet: its room waits (503), the old-count replica 1 is not asked.
    room1 = next(r for r in ROOMS if owner(r, 2) == 1)
    status, doc = await vendor.call("POST", "/v1/customers/contoso/commands", token=key,
                                    body=create_command("cmd-wait", room=room1))
    assert status == 503 and "(ordinal 1 of 2) is not connected" in doc["message"]
    assert not any('"type":"command"' in m for link in old.values() for m in link.received)


async def test_a_malformed_replica_in_hello_is_refused(vendor: Vendor, http: Any, hub: Any) -> None:
    await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url, replica=(3, 3))
    assert link.welcome["type"] == "error" and link.welcome["code"] == "bad_message"
    assert "0 <= ordinal < count" in link.welcome["message"]
    assert protocol.hello_replica({"replica": {"ordinal": 1, "count": 3}}) == (1, 3)


# -- replicas over one organisation (in-memory source), in this process -------------------------------------------
NOW = datetime(2030, 1, 7, 8, tzinfo=UTC)
FAST = SyncSettings(debounce_seconds=0.0, retry_seconds=0.05, auth_retry_seconds=0.2)
CREATED, DELETED = EVENT_TYPES["created"], EVENT_TYPES["deleted"]


def organisation() -> MemorySource:
    """Six rooms, a meeting in each."""
    source = MemorySource(now=NOW)
    source.add_person("alice@contoso.com")
    for n, room in enumerate(ROOMS):
        source.add_room(room)
        source.book("alice@contoso.com", [room], NOW + timedelta(hours=n + 1), NOW + timedelta(hours=n + 2), room)
    return source


def shared() -> SourceRegistry:
    """The memory kind, but one replica stopping does not close the organisation the others read."""
    class Shared(MemoryKind):
        def open(self, spec: SourceSpec, feed: FeedSettings) -> OpenedSource:
            opened = super().open(spec, feed)

            async def keep_open() -> None:
                pass
            opened.close = keep_open
            return opened
    return default_registry().with_kind("memory", Shared)


def replica_options(tmp_path: Path, source: MemorySource, ordinal: int, count: int, **kw: Any) -> GatewayOptions:
    return GatewayOptions(sources=(SourceSpec("hq", "memory", source, rooms=tuple(ROOMS)),), sync=FAST,
                          store_path=tmp_path / f"replica-{ordinal}.sqlite", clock=lambda: NOW,
                          shard=Shard(ordinal, count), replicated=True, **kw)


def owned(ordinal: int, count: int) -> set[str]:
    return {r for r in ROOMS if owner(r, count) == ordinal}


def outbox(gw: Gateway, kind: str) -> list[str]:
    """The rooms of the outbox's events of ``kind``, in order."""
    return [e.event.room for e in gw.store.outbox_after(0, 10_000) if e.event.type == kind]


async def test_each_replica_syncs_only_the_rooms_it_owns(tmp_path: Path) -> None:
    source, registry = organisation(), shared()
    gws = [await start_gateway(replica_options(tmp_path, source, k, 3), registry=registry) for k in range(3)]
    try:
        for k, gw in enumerate(gws):
            mine = owned(k, 3)
            assert set(gw.rooms) == mine
            await eventually(partial(lambda g, n: len(outbox(g, CREATED)) == n, gw, len(mine)),
                             what=f"replica {k} imported its rooms")
            assert set(outbox(gw, CREATED)) == mine
        assert sorted(r for gw in gws for r in outbox(gw, CREATED)) == sorted(ROOMS)  # each room once
        # A change reaches the owner's outbox only.
        room = sorted(owned(1, 3))[0]
        source.book("alice@contoso.com", [room], NOW + timedelta(days=1), NOW + timedelta(days=1, hours=1), "later")
        await eventually(lambda: outbox(gws[1], CREATED).count(room) == 2, what="the owner synced the change")
        assert [outbox(gw, CREATED).count(room) for gw in (gws[0], gws[2])] == [0, 0]
    finally:
        for gw in gws:
            await stop_gateway(gw)


async def test_a_count_change_hands_rooms_over_without_a_deletion(tmp_path: Path) -> None:
    source, registry = organisation(), shared()
    moving = owned(0, 2) - owned(0, 3)  # ordinal 2's rooms that 0 takes while there are 2 replicas
    assert moving and owned(0, 3) <= owned(0, 2)

    async def run(count: int, imported: int) -> list[str]:
        gw = await start_gateway(replica_options(tmp_path, source, 0, count), registry=registry)
        try:
            await eventually(lambda: len(outbox(gw, CREATED)) == imported, what=f"{imported} imports in all")
            assert set(gw.rooms) == owned(0, count)
            assert {r.email for r in gw.store.rooms()} == owned(0, count)
            return outbox(gw, DELETED)
        finally:
            await stop_gateway(gw)

    # Replica 2 of 3 syncs the moving rooms first: their sequences there.
    old = await start_gateway(replica_options(tmp_path, source, 2, 3), registry=registry)
    try:
        await eventually(lambda: set(outbox(old, CREATED)) == owned(2, 3), what="replica 2 imported its rooms")
        before = {e.event.room: e.room_seq for e in old.store.outbox_after(0, 10_000)}
    finally:
        await stop_gateway(old)

    assert await run(3, len(owned(0, 3))) == []
    assert await run(2, len(owned(0, 2))) == []  # scaled down: it imports the rooms it gains, and only them
    store = SqliteStore(tmp_path / "replica-0.sqlite")
    try:  # a moved room's sequence rose across the change of owner: consumers keep its order
        after = {e.event.room: e.room_seq for e in reversed(store.outbox_after(0, 10_000))}
    finally:
        store.close()
    assert all(after[room] > before[room] for room in moving), (before, after)
    assert await run(3, len(owned(0, 2))) == []  # scaled up: it releases them silently (the new owner imports)
    store = SqliteStore(tmp_path / "replica-0.sqlite")
    try:
        assert not any(store.bookings(room) for room in moving)  # nothing kept of a room it no longer syncs
    finally:
        store.close()
    assert await run(2, len(owned(0, 2)) + len(moving)) == []  # and back: imported again, consumers upsert by id


@asynccontextmanager
async def served(options: GatewayOptions, host: str, port: int, registry: SourceRegistry) -> AsyncIterator[Gateway]:
    runner = web.AppRunner(init_app(options, registry=registry), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield runner.app[GATEWAY]
    finally:
        await runner.cleanup()


async def test_a_replica_points_at_the_owner_and_forwards_commands_to_it(tmp_path: Path) -> None:
    source, registry = organisation(), shared()
    port = free_port()
    template = f"http://127.0.0.1{{ordinal}}:{port}"  # replica 0 on 127.0.0.10, replica 1 on 127.0.0.11
    key = _same_key_on_both(tmp_path)
    here, there = sorted(owned(0, 2))[0], sorted(owned(1, 2))[0]
    async with served(replica_options(tmp_path, source, 0, 2, peer_url=template), "127.0.0.10", port, registry), \
            served(replica_options(tmp_path, source, 1, 2, peer_url=template), "127.0.0.11", port, registry) as gw1, \
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        base = f"http://127.0.0.10:{port}"
        async with http.get(f"{base}/v1/rooms") as resp:
            doc = await resp.json()
        assert {r["email"] for r in doc["rooms"]} == owned(0, 2)
        assert {r["email"]: r["owner"] for r in doc["elsewhere"]} == {
            r: {"ordinal": 1, "url": f"http://127.0.0.11:{port}"} for r in owned(1, 2)}
        async with http.get(f"{base}/v1/rooms/{there}/bookings") as resp:
            assert resp.status == 421
            problem = await resp.json()
        assert problem["error"] == "misdirected" and problem["owner"] == {"ordinal": 1,
                                                                           "url": f"http://127.0.0.11:{port}"}
        assert f"room {there} is synced by replica 1 at http://127.0.0.11:{port}" in problem["detail"]
        async with http.get(f"{base}/v1/rooms/{here}/bookings") as resp:
            assert resp.status == 200

        # A command for the other replica's room runs there, with the caller's key.
        await eventually(lambda: gw1.coordinator.workers[there].state == "verified", what="the owner in sync")
        with capture_logs() as logs:
            async with http.post(f"{base}/v1/commands",
                                 json={"key": "resync-1", "type": "resync", "room": there}) as resp:
                assert resp.status == 200 and resp.headers["X-Gateway-Replica"] == "1"
                assert (await resp.json())["status"] == "accepted"
        # Replica 0 forwarded it; the one that ran it (api.command) was replica 1, the only one that may.
        assert [(e["event"], e.get("replica")) for e in logs if e.get("key") == "resync-1"] == [
            ("command.done", None), ("api.command", None), ("api.command_forwarded", 1)]

        # Rooms of both replicas in one command: refused with each room's owner.
        async with http.post(f"{base}/v1/commands", json={
                "key": "avail-1", "type": "availability", "rooms": [here, there],
                "start": "2030-01-07T09:00:00Z", "end": "2030-01-07T17:00:00Z"}) as resp:
            assert resp.status == 421
            assert (await resp.json())["owners"][there]["ordinal"] == 1


async def test_without_a_peer_url_a_command_for_another_replicas_room_is_refused_with_a_pointer(
        tmp_path: Path) -> None:
    source, registry = organisation(), shared()
    port = free_port()
    key = _same_key_on_both(tmp_path)
    there = sorted(owned(1, 2))[0]
    async with served(replica_options(tmp_path, source, 0, 2), "127.0.0.1", port, registry), \
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        async with http.post(f"http://127.0.0.1:{port}/v1/commands",
                             json={"key": "resync-2", "type": "resync", "room": there}) as resp:
            assert resp.status == 421
            doc = await resp.json()
        assert doc["owner"] == {"ordinal": 1, "url": None}
        assert "send the command to it there" in doc["detail"]


def _same_key_on_both(tmp_path: Path) -> str:
    """One API key valid on replicas 0 and 1 (each has its own store)."""
    first = SqliteStore(tmp_path / "replica-0.sqlite")
    try:
        key = ApiKeys(first).create("tests", ["read", "book"])
    finally:
        first.close()
    SqliteStore(tmp_path / "replica-1.sqlite").close()
    db = sqlite3.connect(tmp_path / "replica-1.sqlite")
    try:
        db.execute("ATTACH DATABASE ? AS first", (str(tmp_path / "replica-0.sqlite"),))
        db.execute("INSERT INTO api_keys SELECT * FROM first.api_keys")
        db.commit()
    finally:
        db.close()
    return key


# -- three gateway processes, one Exchange, one hub: scaled, killed, and the hub's view against Exchange's --------
SIM_ROOMS = [f"room{i}@contoso.com" for i in range(1, 6)]  # the simulator's standard organisation


class Replica:
    """One replica's identity and store, started as its own process (tests/gateway_proc.py) with a count."""

    def __init__(self, ordinal: int, spec: dict[str, Any]) -> None:
        self.ordinal = ordinal
        self.spec = spec
        self.gateway_id = ""
        self.proc: subprocess.Popen[str] | None = None

    def start(self, count: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "GATEWAY_PROC": json.dumps({**self.spec,
                                                                                 "shard": [self.ordinal, count]})}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.gateway_proc", "--relay"], env=env, cwd=ROOT,
                                     text=True, stdout=subprocess.DEVNULL)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def test_three_replicas_scaled_killed_and_restarted_keep_the_hubs_view_equal_to_exchange(
        sim_factory: Any, hub: Any, customer: str, pki: Any, tmp_path: Path) -> None:
    ews = sim_factory()
    truth: dict[tuple[str, datetime], str] = {}  # (room, start) -> subject: what Exchange holds, as we made it

    gone: set[tuple[str, datetime]] = set()  # deleted in Exchange: a booking.deleted for these is no error

    def book(room: str, n: int) -> datetime:
        start = soon(30 + 2 * n)
        appointment(ews, room, f"{room.split('@')[0]} #{n}", start)
        truth[(room, start)] = room
        return start

    def unbook(room: str, start: datetime) -> None:
        def on_loop() -> None:
            calendar = ews.sim.directory.get(room).folders["calendar"]
            ews.sim.directory.remove_item(next(i for i in calendar.items.values() if i.start == start))
        ews.call(on_loop)
        del truth[(room, start)]
        gone.add((room, start))

    first = {room: book(room, n) for n, room in enumerate(SIM_ROOMS)}
    replicas_: list[Replica] = []
    for k in range(3):
        vault = Vault(tmp_path / f"vault-{k}", parse_key(VAULT_KEY, "test key"))
        relay = RelayConfig(enabled=True, ca_bundle=pki.ca_file, heartbeat_seconds=5, reconnect_max_seconds=1)
        identity = await enroll(hub.url, await hub.token(), vault=vault, relay=relay, name=f"gateway-{k}")
        replica = Replica(k, {"ews_url": ews.url, "store": str(tmp_path / f"store-{k}.sqlite"), "rooms": SIM_ROOMS,
                              "vault": str(vault.path), "vault_key": VAULT_KEY, "hub_url": identity.hub_url,
                              "ca": str(pki.ca_file)})
        replica.gateway_id = identity.gateway_id
        replicas_.append(replica)

    async def hub_view() -> dict[tuple[str, datetime], int]:
        seen: Counter[tuple[str, datetime]] = Counter()
        for room in SIM_ROOMS:
            for doc in await hub.hub.read(hub.hub.store.bookings, customer, room, soon(-48), soon(24 * 30)):
                seen[(room, datetime.fromisoformat(doc["start"].replace("Z", "+00:00")))] += 1
        return dict(seen)

    async def converged(what: str) -> None:
        await eventually(lambda: _equal(hub_view, truth), 90, f"the hub's view equals Exchange's ({what})")
        deleted = [(d["room"], datetime.fromisoformat(d["start"].replace("Z", "+00:00")))
                   for d in (json.loads(e.body)["data"] for e in await hub.hub.read(
                       hub.hub.store.events_after, customer, 0, 100_000) if e.type == DELETED)]
        assert set(deleted) <= gone, f"a spurious booking.deleted ({what})"

    async def connected(*ks: int) -> None:
        await eventually(lambda: all(hub.session(replicas_[k].gateway_id) is not None for k in ks), 60,
                         f"replicas {ks} connected")

    try:
        for r in replicas_:
            r.start(3)
        await connected(0, 1, 2)
        await converged("three replicas")

        for r in replicas_:  # scaled to 2: every replica restarts with the new count, replica 2 goes away
            r.stop()
        book("room4@contoso.com", 10)  # room4 moves from replica 2 to 0 meanwhile: its new owner imports it
        # ... and one of its bookings is deleted while nobody syncs it: the new owner's import is framed by
        # room.snapshot begin/end, and the hub drops what the import did not announce again
        unbook("room4@contoso.com", first["room4@contoso.com"])
        for r in replicas_[:2]:
            r.start(2)
        await connected(0, 1)
        await converged("scaled to two")

        book("room4@contoso.com", 11)  # synced by its owner of now, replica 0
        await converged("a change while two")
        for r in replicas_[:2]:  # and back to 3: replica 2 comes back with its old store, and catches up
            r.stop()
        for r in replicas_:
            r.start(3)
        await connected(0, 1, 2)
        await converged("back to three")

        replicas_[1].stop(signal.SIGKILL)  # killed; a change to its room meanwhile; restarted
        book("room2@contoso.com", 12)
        replicas_[1].start(3)
        await connected(1)
        await converged("replica 1 killed and restarted")

        # A command through the hub lands at room4's owner (replica 2) and in Exchange.
        key = await hub.hub.write(hub.hub.store.issue_api_key, customer)
        start = soon(24 * 5)
        cmd = {"key": "replica-cmd-1", "type": "create", "room": "room4@contoso.com",
               "start": f"{start:%Y-%m-%dT%H:%M:%SZ}", "end": f"{start + timedelta(minutes=30):%Y-%m-%dT%H:%M:%SZ}",
               "subject": "Through the hub", "booker": {"name": "Kiosk"}}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.client_context())) as http, \
                http.post(f"{hub.url}/v1/customers/{customer}/commands", json=cmd,
                          headers={"Authorization": f"Bearer {key}"}) as resp:
            result = await resp.json()
        assert result["status"] == "accepted", result
        truth[("room4@contoso.com", start)] = "room4@contoso.com"
        await converged("a command routed to the owner")
    finally:
        for r in replicas_:
            r.stop()


async def _equal(view: Any, truth: dict[tuple[str, datetime], str]) -> bool:
    seen = await view()
    return seen == dict.fromkeys(truth, 1)  # every booking once: none lost, none twice
