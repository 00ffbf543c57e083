"""The gateway's tunnel against the real reference hub, over TLS on loopback: enrollment, ordered delivery with
acknowledgements into the real outbox, resume after drops and a hub restart, commands, key rotation, revocation,
certificate checks and a real CONNECT proxy (tinyproxy)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.api import EventHub
from gateway.config import RelayConfig
from gateway.hub.server import FRAME_HARD_LIMIT
from gateway.model import EVENT_TYPES, Booking, Command, CommandResult, Event, Room, accepted, failed, to_json
from gateway.observability.metrics import Metrics
from gateway.relay import enroll as enroll_cli
from gateway.relay import protocol
from gateway.relay.enroll import enroll
from gateway.relay.tunnel import Tunnel
from gateway.relay.window import encode_event, frames
from gateway.security.identity import GatewayIdentity
from gateway.security.vault import Vault, parse_key
from gateway.store import SqliteStore
from tests.conftest import VAULT_KEY, eventually
from tests.hub_fixtures import ADMIN, CUSTOMER, Hub

pytestmark = pytest.mark.usefixtures("customer")  # every gateway here enrolls for CUSTOMER

T0 = datetime(2031, 3, 10, 8, 0, tzinfo=UTC)
ROOMS = ("room1@contoso.com", "room2@contoso.com", "room3@contoso.com")


# -- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "gateway" / "gateway.db")
    for room in ROOMS:
        s.upsert_room(Room(room))
    yield s
    s.close()


class Commands:
    """A CommandHandler that records what it ran; the real one (gateway.commands) has its own tests."""

    def __init__(self) -> None:
        self.seen: list[Command] = []

    async def execute(self, cmd: Command) -> CommandResult:
        self.seen.append(cmd)
        if cmd.type == "resync":
            return accepted(cmd, f"resync of {cmd.room} started")
        return failed(cmd.key, "exchange_unavailable", "the test handler has no Exchange", retryable=True)


def fill(store: SqliteStore, n: int, start: int = 0) -> int:
    """``n`` booking events spread over the rooms in batches (as sync steps would write them); the last seq."""
    last = 0
    for b0 in range(start, start + n, 250):
        room = ROOMS[(b0 // 250) % len(ROOMS)]
        bookings = [Booking(room=room, uid=f"uid-{i}", start=T0 + timedelta(minutes=i),
                            end=T0 + timedelta(minutes=i + 30), subject=f"Meeting {i}")
                    for i in range(b0, min(start + n, b0 + 250))]
        entries = store.commit_sync(room, upserts=bookings, deletes=(), events=[
            Event(id=f"ev-{b.uid}", type=EVENT_TYPES["created"], room=room, subject=b.id, time=T0, data=to_json(b))
            for b in bookings])
        last = entries[-1].seq
    return last


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def outbox_ids(store: SqliteStore) -> list[str]:
    return [e.event.id for e in store.outbox_after(0, limit=1_000_000)]


async def enrolled(hub: Hub, vault: Vault, pki: Any) -> GatewayIdentity:
    return await enroll(hub.url, await hub.token(), vault=vault, relay=RelayConfig(ca_bundle=pki.ca_file),
                        name="test-gateway")


class Running:
    def __init__(self, tunnel: Tunnel, task: asyncio.Task[None]) -> None:
        self.tunnel = tunnel
        self.task = task

    async def connected(self) -> None:
        await eventually(lambda: self.tunnel.state == "connected", what="the tunnel to connect")


@pytest.fixture
async def tunnels() -> AsyncIterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(identity: GatewayIdentity, store: SqliteStore, **kw: Any) -> Running:
        settings = kw.pop("settings", None) or RelayConfig(enabled=True, hub_url=identity.hub_url,
                                                           ca_bundle=kw.pop("ca_bundle"), reconnect_max_seconds=1.0)
        tunnel = Tunnel(settings, identity, store, kw.pop("commands", None) or Commands(),
                        rng=random.Random(7), **kw)
        running = Running(tunnel, asyncio.create_task(tunnel.run()))
        started.append(running)
        return running

    yield start
    for r in started:
        await r.tunnel.close()
        assert r.task.done()


# -- delivery ----------------------------------------------------------------------------------------------------
async def test_events_arrive_in_order_and_acknowledgements_reach_the_outbox(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    last = fill(store, 4500)  # more than the window (2000) and many batches (500)
    events = EventHub()
    metrics = Metrics()
    t = tunnels(identity, store, ca_bundle=pki.ca_file, notifier=events, metrics=metrics)

    await eventually(lambda: store.acked() == last, what="every event acknowledged into the store")
    assert await hub.count() == 4500
    assert await hub.event_ids() == outbox_ids(store)  # the outbox order, nothing twice
    assert store.outbox_stats()[0] == 0
    status = t.tunnel.status()
    assert status["state"] == "connected" and status["acked_seq"] == last and status["last_error"] is None
    assert sample(metrics, "gateway_tunnel_connected") == 1
    assert sample(metrics, "gateway_tunnel_acked_sequence") == last
    assert sample(metrics, "gateway_tunnel_connects_total", outcome="connected") == 1

    # caught up, it waits for the notifier; a new sync step is relayed promptly
    more = fill(store, 10, start=10_000)
    events.notify()
    await eventually(lambda: store.acked() == more, what="the new events acknowledged")
    assert (await hub.event_ids())[-10:] == [f"ev-uid-{i}" for i in range(10_000, 10_010)]
    per_room = [json.loads(e.body) for e in await hub.hub.read(hub.hub.store.events_after, CUSTOMER, 0, 10_000)]
    for room in ROOMS:  # each room's events carry its own increasing sequence
        seqs = [int(e["sequence"]) for e in per_room if e["partitionkey"] == room]
        assert seqs == list(range(1, len(seqs) + 1))


async def test_drops_mid_stream_and_a_hub_restart_lose_and_duplicate_nothing(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    last = fill(store, 6000)  # three windows (2000) of events
    metrics = Metrics()
    t = tunnels(identity, store, ca_bundle=pki.ca_file, metrics=metrics)

    dropped: Any = None

    def new_session() -> Any:  # not the one just dropped, which the hub may hold until it notices the close
        current = hub.session(identity.gateway_id)
        return current if current is not dropped else None
    for threshold in (1000, 2000):  # the hub drops the tunnel while events are in flight
        # (the count may pass the second threshold before the gateway has reconnected: wait for its session too)
        session = await eventually(lambda n=threshold: _count_now(hub) >= n and new_session(),
                                   what=f"{threshold} events at the hub, the gateway connected")
        await session.ws.close(code=1011, message=b"test drop")
        dropped = session
    await eventually(lambda: _count_now(hub) >= 3000 and new_session(), what="3000 events at the hub, reconnected")
    await hub.stop()  # and the hub restarts on the same port and data
    await hub.start()

    await eventually(lambda: store.acked() == last, timeout=60, what="every event acknowledged after the drops")
    ids = await hub.event_ids()
    assert len(ids) == len(set(ids)) == 6000
    assert ids == outbox_ids(store)
    assert sample(metrics, "gateway_tunnel_connects_total", outcome="connected") >= 4
    assert sample(metrics, "gateway_tunnel_events_sent_total") >= 6000  # resends included
    await t.connected()


def _count_now(hub: Hub) -> int:
    return hub.hub.store.event_count(CUSTOMER) if hub.running is not None else 0


async def test_the_hubs_ack_is_the_resume_point_even_below_the_local_one(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    last = fill(store, 300)
    store.ack(200)  # e.g. the hub was restored from a backup taken before it stored 101..200
    await hub.hub.write(hub.hub.store.reset_ack, identity.gateway_id, 100)
    metrics = Metrics()
    tunnels(identity, store, ca_bundle=pki.ca_file, metrics=metrics)
    await eventually(lambda: store.acked() == last, what="everything acknowledged")
    assert await hub.event_ids() == outbox_ids(store)[100:]  # 101.. resent although the store had 200
    assert sample(metrics, "gateway_tunnel_events_sent_total") == 200

    # the same while running: the hub comes back with an older ack; what it lacks is sent again
    await hub.hub.write(hub.hub.store.reset_ack, identity.gateway_id, 150)
    await hub.session(identity.gateway_id).ws.close()
    await eventually(lambda: sample(metrics, "gateway_tunnel_events_sent_total") == 200 + 150,
                     what="151..300 sent again")

    async def taken_back() -> bool:  # the hub's side: sent is not yet received
        return bool((await hub.hub.read(hub.hub.store.gateway, identity.gateway_id)).last_seq == last)
    await eventually(taken_back, what="the hub's ack back at the last event")
    assert await hub.count() == 200  # redeliveries dropped by the hub


async def test_the_window_bounds_the_events_in_flight(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    metrics = Metrics()
    events = EventHub()
    settings = RelayConfig(enabled=True, hub_url=identity.hub_url, ca_bundle=pki.ca_file, window=60)
    t = tunnels(identity, store, settings=settings, metrics=metrics, notifier=events)
    await t.connected()
    gate = threading.Event()
    blocked = asyncio.ensure_future(hub.hub.write(gate.wait))  # the hub's one writer is busy: no acks
    try:
        last = fill(store, 500)
        events.notify()
        await eventually(lambda: t.tunnel.status()["in_flight"] == 60, what="a full window")
        assert sample(metrics, "gateway_tunnel_events_sent_total") == 60 and store.acked() == 0
    finally:
        gate.set()
        await blocked
    await eventually(lambda: store.acked() == last, what="the rest once acks flow")
    assert await hub.event_ids() == outbox_ids(store)


async def test_an_event_too_large_for_a_frame_is_skipped_and_does_not_stop_the_stream(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    fill(store, 2)
    huge = Booking(room=ROOMS[0], uid="uid-huge", start=T0, end=T0 + timedelta(hours=1), subject="x" * (1 << 20))
    store.commit_sync(ROOMS[0], upserts=[huge], deletes=(), events=[
        Event(id="ev-huge", type=EVENT_TYPES["created"], room=ROOMS[0], subject=huge.id, time=T0, data=to_json(huge))])
    last = fill(store, 2, start=100)
    with capture_logs() as logs:
        tunnels(identity, store, ca_bundle=pki.ca_file)
        await eventually(lambda: store.acked() == last, what="the events after the huge one")
    assert await hub.event_ids() == ["ev-uid-0", "ev-uid-1", "ev-uid-100", "ev-uid-101"]
    assert [e["event_id"] for e in logs if e["event"] == "tunnel.event_too_large"] == ["ev-huge"]


# -- identity, TLS, proxy ------------------------------------------------------------------------------------------
async def test_a_hub_certificate_from_another_ca_is_refused(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    fill(store, 5)
    metrics = Metrics()
    with capture_logs() as logs:
        t = tunnels(identity, store, ca_bundle=pki.other_ca_file, metrics=metrics)
        await eventually(lambda: sample(metrics, "gateway_tunnel_connects_total", outcome="tls_error") >= 2,
                         what="two refused attempts")
    status = t.tunnel.status()
    assert status["state"] in ("backing_off", "connecting") and "relay.ca_bundle" in status["last_error"]
    assert "certificate verify failed" in status["last_error"]
    assert hub.session(identity.gateway_id) is None and await hub.count() == 0
    warnings = [e for e in logs if e["event"] == "tunnel.connect_failed" and e["log_level"] == "warning"]
    assert len(warnings) == 1  # logged once, not once per retry

    no_bundle = RelayConfig(enabled=True, hub_url=identity.hub_url, reconnect_max_seconds=1.0)  # system store
    t2 = tunnels(identity, store, settings=no_bundle, metrics=Metrics())
    await eventually(lambda: t2.tunnel.status()["last_error"], what="a refusal")
    assert "relay.ca_bundle" in t2.tunnel.status()["last_error"] and hub.session(identity.gateway_id) is None


async def test_through_an_authenticating_http_proxy(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, http_proxy: Any,
        tunnels: Callable[..., Running]) -> None:
    relay = RelayConfig(ca_bundle=pki.ca_file, proxy_url=http_proxy.url, proxy_username=http_proxy.username)
    identity = await enroll(hub.url, await hub.token(), vault=vault, relay=relay, name="behind-a-proxy",
                            proxy_password=http_proxy.password)
    target = f"127.0.0.1:{hub.running.port}" if hub.running else ""
    assert http_proxy.connects(target) == 1  # enrollment went through the proxy

    last = fill(store, 50)
    wrong = tunnels(identity, store, settings=replace(relay, enabled=True, hub_url=identity.hub_url,
                                                      reconnect_max_seconds=1.0), proxy_password="not-it")
    await eventually(lambda: wrong.tunnel.status()["last_error"], what="the proxy's refusal")
    assert "relay.proxy_password_ref" in wrong.tunnel.status()["last_error"]
    await wrong.tunnel.close()

    tunnels(identity, store, settings=replace(relay, enabled=True, hub_url=identity.hub_url),
            proxy_password=http_proxy.password)
    await eventually(lambda: store.acked() == last, what="events through the proxy")
    assert http_proxy.connects(target) >= 2


async def test_key_rotation_does_not_interrupt_the_tunnel(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    old_key = identity.key_id
    metrics = Metrics()
    t = tunnels(identity, store, ca_bundle=pki.ca_file, metrics=metrics)
    await t.connected()
    session_id = hub.session(identity.gateway_id).id

    fill(store, 2000)
    new_key = await t.tunnel.rotate_key()
    assert new_key != old_key and identity.key_id == new_key and identity.next_key is None
    assert GatewayIdentity.load(vault).key_id == new_key  # committed to the vault
    last = fill(store, 100, start=5000)
    await eventually(lambda: store.acked() == last, what="events after the rotation")
    assert hub.session(identity.gateway_id).id == session_id  # the same connection all along
    assert sample(metrics, "gateway_tunnel_connects_total", outcome="connected") == 1

    await hub.session(identity.gateway_id).ws.close()  # the next connection answers with the new key
    await eventually(lambda: (s := hub.session(identity.gateway_id)) is not None and s.id != session_id,
                     what="a new session")
    assert hub.session(identity.gateway_id).key_id == new_key
    record = await hub.hub.read(hub.hub.store.gateway, identity.gateway_id)
    assert [k.key_id for k in record.keys if not k.retired] == [new_key]  # the old key is retired now


async def test_an_old_key_is_rotated_automatically_and_a_pending_rotation_finishes_after_a_restart(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    first = identity.key_id
    pending = identity.begin_rotation()  # as if the gateway died before the hub heard of the next key
    restarted = GatewayIdentity.load(vault)
    t = tunnels(restarted, store, ca_bundle=pki.ca_file)
    await eventually(lambda: restarted.key_id == pending.key_id, what="the pending rotation to finish")
    assert restarted.next_key is None and GatewayIdentity.load(vault).key_id == pending.key_id
    await t.tunnel.close()

    aged = tunnels(restarted, store, ca_bundle=pki.ca_file, rotate_after=timedelta(0))  # every key is too old
    await eventually(lambda: restarted.key_id not in (first, pending.key_id), what="an automatic rotation")
    await aged.connected()


async def test_gateway_rotate_key_is_picked_up_by_the_running_tunnel_without_a_reconnect(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    old = identity.key_id
    t = tunnels(identity, store, ca_bundle=pki.ca_file, rotation_check=0.1)
    await t.connected()
    session_id = hub.session(identity.gateway_id).id
    out = io.StringIO()
    env = {"GATEWAY_VAULT__PATH": str(vault.path), "GATEWAY_VAULT__KEY_ENV": "TEST_VAULT_KEY",
           "TEST_VAULT_KEY": VAULT_KEY}
    assert enroll_cli.run_rotate_cli(argparse.Namespace(), env=env, stdout=out, stderr=out) == 0, out.getvalue()
    wanted = GatewayIdentity.load(vault).next_key
    assert wanted is not None and wanted.key_id in out.getvalue()
    await eventually(lambda: identity.key_id == wanted.key_id, what="the running tunnel to switch keys")
    assert identity.next_key is None and GatewayIdentity.load(vault).key_id == wanted.key_id != old
    assert hub.session(identity.gateway_id).id == session_id  # no reconnect was needed


async def test_when_the_hub_switched_keys_before_the_gateway_committed_the_next_key_answers(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    old = identity.key_id
    nxt = identity.begin_rotation()
    store_ = hub.hub.store  # the hub took the new key and saw it used (which retires the old one) ...
    assert await hub.hub.write(store_.add_key, identity.gateway_id, protocol.unb64(nxt.public_key_b64), nxt.key_id)
    await hub.hub.write(store_.authenticated, identity.gateway_id, nxt.key_id, "test")
    restarted = GatewayIdentity.load(vault)  # ... but the gateway went down before it committed
    assert restarted.key_id == old and restarted.next_key == nxt
    with capture_logs() as logs:
        t = tunnels(restarted, store, ca_bundle=pki.ca_file)
        await t.connected()
    assert hub.session(identity.gateway_id).key_id == nxt.key_id
    assert restarted.key_id == nxt.key_id and GatewayIdentity.load(vault).key_id == nxt.key_id
    assert [e["event"] for e in logs if e["event"].startswith("tunnel.")][:2] == ["tunnel.trying_next_key",
                                                                                  "tunnel.connected"]
    assert not [e for e in logs if e["event"] == "tunnel.refused"]  # not an outage worth an error


async def test_a_revoked_gateway_is_refused_and_backs_off_long(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    metrics = Metrics()
    with capture_logs() as logs:
        t = tunnels(identity, store, ca_bundle=pki.ca_file, metrics=metrics, auth_retry_seconds=300)
        await t.connected()
        async with _admin(pki) as http, http.post(f"{hub.url}/admin/v1/gateways/{identity.gateway_id}/revoke") \
                as resp:
            assert resp.status == 200
        await eventually(lambda: t.tunnel.state == "revoked", what="the revoked state")
    assert "revoked" in t.tunnel.status()["last_error"] and hub.session(identity.gateway_id) is None
    assert sample(metrics, "gateway_tunnel_connected") == 0
    assert sample(metrics, "gateway_tunnel_connects_total", outcome="revoked") == 1
    refusals = [e for e in logs if e["event"] == "tunnel.refused"]
    assert len(refusals) == 1 and refusals[0]["log_level"] == "error"
    waits = [e["seconds"] for e in logs if e["event"] == "tunnel.backing_off" and e["state"] == "revoked"]
    assert waits and waits[-1] >= 150  # no spinning against a hub that will keep saying no


async def test_the_tunnel_logs_the_close_code_the_hub_sent(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    fill(store, 3000)  # events in flight both ways while the hub closes (more than a window of 2000)
    with capture_logs() as logs:
        t = tunnels(identity, store, ca_bundle=pki.ca_file)
        await t.connected()

        def ended() -> list[dict[str, Any]]:
            return [e for e in logs if e["event"] == "tunnel.disconnected"]

        # a frame above the hub's hard limit (no gateway code sends one: written straight onto the connection)
        session = t.tunnel._session
        assert session is not None
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await session.ws.send_str("x" * (FRAME_HARD_LIMIT + 1))
        await eventually(lambda: ended(), what="the tunnel to see the close")
        await eventually(lambda: store.acked() == 3000, what="every event after the reconnect")

        # revoked while connected
        async with _admin(pki) as http, http.post(f"{hub.url}/admin/v1/gateways/{identity.gateway_id}/revoke") \
                as resp:
            assert resp.status == 200
        await eventually(lambda: t.tunnel.state == "revoked", what="the revoked state")

    assert [e["close_code"] for e in ended()] == [1009, 4403]
    assert "too large" in ended()[0]["reason"] and "revoked" in ended()[1]["reason"]
    hub_side = [(e["close_code"], e["closed_by"]) for e in logs if e["event"] == "hub.gateway_disconnected"]
    assert hub_side == [(1009, "hub"), (4403, "hub")]
    too_large = [e for e in logs if e["event"] == "hub.frame_too_large"]
    assert len(too_large) == 1 and too_large[0]["log_level"] == "warning"
    assert not [e for e in logs if e["log_level"] == "error" and e["event"] != "tunnel.refused"]


async def test_an_unknown_gateway_is_unauthorized(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    stranger = GatewayIdentity.generate(vault)  # never enrolled at this hub
    stranger.enroll(gateway_id="gw_made_up", customer=CUSTOMER, hub_url=f"{hub.url}/v1/tunnel".replace("https", "wss"))
    t = tunnels(stranger, store, ca_bundle=pki.ca_file)
    await eventually(lambda: t.tunnel.state == "unauthorized", what="the unauthorized state")
    assert "unauthorized" in t.tunnel.status()["last_error"]


# -- commands ------------------------------------------------------------------------------------------------------
async def test_commands_get_results_and_bad_ones_never_break_the_tunnel(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    identity = await enrolled(hub, vault, pki)
    commands = Commands()
    t = tunnels(identity, store, ca_bundle=pki.ca_file, commands=commands)
    await t.connected()
    session = hub.session(identity.gateway_id)
    api_key = await hub.hub.write(hub.hub.store.issue_api_key, CUSTOMER)

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"}) as http:
        url = f"{hub.url}/v1/customers/{CUSTOMER}/commands"
        async with http.post(url, json={"key": "c-1", "type": "resync", "room": ROOMS[0]},
                             ssl=pki.client_context()) as resp:
            assert (await resp.json()) == {"key": "c-1", "status": "accepted",
                                           "message": f"resync of {ROOMS[0]} started"}

    # frames the hub itself would never send (it validates first): straight into the live session
    loop = asyncio.get_running_loop()
    answers = {k: loop.create_future() for k in ("bad-1", "bad-2")}
    session.pending.update(answers)
    past = {"key": "bad-1", "type": "create", "room": ROOMS[0], "start": "2020-01-01T09:00:00Z",
            "end": "2020-01-01T10:00:00Z"}
    await session.send(protocol.encode("command", command=past))
    await session.send(protocol.encode("command", command={"key": "bad-2", "type": "teleport"}))
    await session.send(protocol.encode("command", command={"type": "create"}))  # no key: an error message
    await session.send(protocol.encode("command", command={"key": "big", "type": "resync",
                                                           "room": "x" * (protocol.MAX_COMMAND_BYTES + 10)}))
    await session.send("{not json")
    await session.send(protocol.encode("welcome", ack=0))  # out of place
    await session.ws.send_bytes(b"\x00\x01")
    one = await asyncio.wait_for(answers["bad-1"], 10)
    two = await asyncio.wait_for(answers["bad-2"], 10)
    assert (one.status, one.reason, one.retryable) == ("failed", "invalid_command", False)
    assert "past" in one.message
    assert (two.status, two.reason) == ("failed", "unsupported_command")
    assert [c.key for c in commands.seen] == ["c-1"]  # nothing bad reached the handler

    # still the same connection, still working
    fill(store, 3)
    await eventually(lambda: store.acked() == 3, what="events after the bad frames")
    assert hub.session(identity.gateway_id) is session and t.tunnel.state == "connected"
    _, result = await hub.hub.run_command(CUSTOMER, Command(key="c-2", type="create", room=ROOMS[1],
                                                            start=T0, end=T0 + timedelta(hours=1)))
    assert (result.key, result.status, result.reason, result.retryable) == \
        ("c-2", "failed", "exchange_unavailable", True)


async def test_a_result_too_large_for_a_frame_is_answered_too_large_and_the_tunnel_stays_up(
        hub: Hub, vault: Vault, store: SqliteStore, pki: Any, tunnels: Callable[..., Running]) -> None:
    class Huge(Commands):
        async def execute(self, cmd: Command) -> CommandResult:
            self.seen.append(cmd)
            busy = [{"start": "2031-03-10T08:00:00Z", "end": "2031-03-10T08:30:00Z", "status": "busy"}] * 30_000
            return accepted(cmd, "busy times", data={"rooms": {ROOMS[0]: busy}})  # about 2 MB of JSON

    identity = await enrolled(hub, vault, pki)
    t = tunnels(identity, store, ca_bundle=pki.ca_file, commands=Huge())
    await t.connected()
    session = hub.session(identity.gateway_id)
    with capture_logs() as logs:
        status, result = await hub.hub.run_command(CUSTOMER, Command(
            key="avail-1", type="availability", rooms=(ROOMS[0],), start=T0, end=T0 + timedelta(days=42)))
    assert (status, result.status, result.reason, result.retryable) == (413, "failed", "too_large", False)
    assert "fewer rooms or a shorter range" in (result.message or "")
    assert [e["log_level"] for e in logs if e["event"] == "tunnel.result_too_large"] == ["warning"]
    assert hub.session(identity.gateway_id) is session and t.tunnel.state == "connected"


# -- enrollment ------------------------------------------------------------------------------------------------------
async def test_enroll_command_prints_the_settings_and_explains_refusals(
        hub: Hub, tmp_path: Path, pki: Any, unused_tcp_port: int) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"vault:\n  path: {tmp_path / 'data' / 'credentials.vault'}\n"
                      f"  key_file: {tmp_path / 'secrets' / 'vault.key'}\n"
                      f"relay:\n  enabled: true\n  ca_bundle: {pki.ca_file}\n")

    async def run(*argv: str) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser()
        enroll_cli.register_cli(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["enroll", "--config", str(config), *argv])
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(enroll_cli.run_cli, args, env={}, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    token = await hub.token()
    code, out, err = await run("--hub", hub.url, "--token", token, "--name", "room-gateway")
    assert code == 0, err
    tunnel_url = hub.url.replace("https://", "wss://") + protocol.TUNNEL_PATH
    assert f"hub_url: {tunnel_url}" in out and "enabled: true" in out
    assert token not in out + err
    record = (await hub.hub.read(hub.hub.store.gateways))[0]
    assert record.name == "room-gateway" and record.customer == CUSTOMER
    assert f"gateway {record.id}" in out

    code, out, err = await run("--hub", hub.url, "--token", await hub.token())
    assert code == 1 and "already enrolled" in err and "--force" in err

    code, out, err = await run("--hub", hub.url, "--token", token, "--force")  # the used token
    assert code == 2 and "expired or was already used" in err
    code, out, err = await run("--hub", hub.url, "--token", "et_never_issued", "--force")
    assert code == 2 and "does not accept this enrollment token" in err
    expired = await hub.token(ttl=timedelta(seconds=0.001))
    code, out, err = await run("--hub", hub.url, "--token", expired, "--force")
    assert code == 2 and "expired" in err
    code, out, err = await run("--hub", hub.url, "--token", await hub.token(), "--force",
                               "--ca-bundle", str(pki.other_ca_file))
    assert code == 2 and "relay.ca_bundle" in err and "certificate" in err
    code, out, err = await run("--hub", f"https://127.0.0.1:{unused_tcp_port}", "--token", "x", "--force")
    assert code == 2 and "cannot reach" in err
    code, out, err = await run("--hub", hub.url.replace("https", "http"), "--token", "x", "--force")
    assert code == 2 and "https://" in err

    identity = GatewayIdentity.load(Vault(tmp_path / "data" / "credentials.vault",
                                          parse_key((tmp_path / "secrets" / "vault.key").read_text(), "key file")))
    assert identity.gateway_id == record.id  # the refused attempts left the enrolled identity alone
    code, out, err = await run("--hub", hub.url, "--token", await hub.token(), "--force")
    assert code == 0, err
    assert GatewayIdentity.load(Vault(tmp_path / "data" / "credentials.vault", parse_key(
        (tmp_path / "secrets" / "vault.key").read_text(), "key file"))).gateway_id != record.id


# -- encoding ----------------------------------------------------------------------------------------------------
def test_batches_stay_below_the_frame_limit(store: SqliteStore) -> None:
    fill(store, 500)
    encoded = [(e.seq, encode_event(e)) for e in store.outbox_after(0, limit=500)]
    big = [(seq, frag + " " * 4000) for seq, frag in encoded]  # ~4.5 KB each: 500 of them exceed 1 MiB
    chunks = list(frames(big))
    assert len(chunks) > 1 and [s for f in chunks for s, _ in f] == [s for s, _ in big]
    for f in chunks:
        text = '{"type":"events","events":[' + ",".join(x for _, x in f) + "]}"
        assert len(text.encode()) <= protocol.MAX_MESSAGE_BYTES
    assert json.loads(encoded[0][1])["event"]["id"] == "ev-uid-0"


def _admin(pki: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"},
                                 connector=aiohttp.TCPConnector(ssl=pki.client_context()))


async def test_the_doctor_probe_reads_the_challenge_and_names_tls_and_connection_problems(hub, pki):
    from gateway.errors import GatewayError
    from gateway.relay.connection import probe

    url = hub.url.replace("https://", "wss://") + protocol.TUNNEL_PATH
    await probe(RelayConfig(enabled=True, hub_url=url, ca_bundle=pki.ca_file))
    with pytest.raises(GatewayError) as wrong_ca:
        await probe(RelayConfig(enabled=True, hub_url=url, ca_bundle=pki.other_ca_file))
    assert wrong_ca.value.key == "tls_error" and "relay.ca_bundle" in str(wrong_ca.value)
    with pytest.raises(GatewayError) as closed:
        await probe(RelayConfig(enabled=True, hub_url="wss://127.0.0.1:9/v1/tunnel", ca_bundle=pki.ca_file))
    assert closed.value.key == "cannot_connect"
