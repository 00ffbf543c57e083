"""The gateway's NotificationInbox (gateway/relay/inbox.py) fed by the real tunnel from the real hub over TLS: the
URLs from welcome, Graph's posts to the hub arriving at listeners as Pokes with the exact body, connected() and
on_connected following the tunnel through drops and a hub restart, listeners that raise, and the wiring that hands
every source the inbox."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from gateway.app import INBOX, GatewayOptions, start_gateway, stop_gateway
from gateway.config import RelayConfig
from gateway.errors import ProtocolError
from gateway.model import Command, CommandResult, failed
from gateway.observability.metrics import Metrics
from gateway.ports import FeedSettings, OpenedSource, Poke, SourceSpec
from gateway.relay import protocol
from gateway.relay.enroll import enroll
from gateway.relay.inbox import RelayInbox
from gateway.relay.tunnel import Tunnel
from gateway.security.identity import GatewayIdentity
from gateway.security.vault import Vault
from gateway.sources.memory import MemoryKind, MemorySource
from gateway.sources.registry import default_registry
from gateway.store import SqliteStore
from tests.conftest import eventually
from tests.graph_helpers import event, tomorrow
from tests.hub_fixtures import Hub

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("customer")]  # every gateway here enrolls for CUSTOMER

BODY: dict[str, Any] = {"value": [{
    "subscriptionId": "0f5e6c3a-7a1e-4c7b-8f0e-2d6b7e9a1c55", "clientState": "room1-secret-state",
    "changeType": "created", "resource": "Users/room1@contoso.com/Events/AAMkADc=",
    "resourceData": {"@odata.type": "#Microsoft.Graph.Event", "id": "AAMkADc="},
    "tenantId": "84bd8158-6d4d-4958-8b9f-9d6445542f95", "ünïcode": "Besprechungsraum ☕"}]}
LIFECYCLE: dict[str, Any] = {"value": [{"subscriptionId": "0f5e6c3a-7a1e-4c7b-8f0e-2d6b7e9a1c55",
                                        "clientState": "room1-secret-state",
                                        "lifecycleEvent": "reauthorizationRequired"}]}


class NoCommands:
    async def execute(self, cmd: Command) -> CommandResult:
        return failed(cmd.key, "exchange_unavailable", "no Exchange in this test", retryable=True)


@dataclass
class Listener:
    pokes: list[Poke] = field(default_factory=list)
    states: list[bool] = field(default_factory=list)

    def poke(self, p: Poke) -> None:
        self.pokes.append(p)

    def connected(self, up: bool) -> None:
        self.states.append(up)


async def enrolled(hub: Hub, vault: Vault, pki: Any) -> GatewayIdentity:
    return await enroll(hub.url, await hub.token(), vault=vault, relay=RelayConfig(ca_bundle=pki.ca_file),
                        name="poked-gateway")


@pytest.fixture
async def tunnel(hub: Hub, vault: Vault, pki: Any, tmp_path: Path) -> AsyncIterator[Callable[[RelayInbox], Tunnel]]:
    store = SqliteStore(tmp_path / "gateway" / "gateway.db")
    identity = await enrolled(hub, vault, pki)
    started: list[tuple[Tunnel, asyncio.Task[None]]] = []

    def start(inbox: RelayInbox) -> Tunnel:
        settings = RelayConfig(enabled=True, hub_url=identity.hub_url, ca_bundle=pki.ca_file,
                               reconnect_max_seconds=1.0)
        t = Tunnel(settings, identity, store, NoCommands(), rng=random.Random(3), inbox=inbox)
        started.append((t, asyncio.create_task(t.run())))
        return t

    yield start
    for t, task in started:
        await t.close()
        assert task.done()
    store.close()


async def graph_post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    """Graph's delivery: a JSON POST without any key."""
    async with http.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}) as resp:
        return resp.status


def pokes(registry: CollectorRegistry, kind: str) -> float:
    return registry.get_sample_value("gateway_relay_pokes_total", {"kind": kind}) or 0.0


# -- through the tunnel ------------------------------------------------------------------------------------------
async def test_graph_posts_to_the_hub_reach_the_listener_with_the_exact_body(hub, http, tunnel):
    registry = CollectorRegistry()
    inbox = RelayInbox(registry)
    heard = Listener()
    inbox.listen(heard.poke, heard.connected)
    assert inbox.urls() is None and not inbox.connected()  # before the first welcome: poll
    t = tunnel(inbox)
    await eventually(inbox.connected, what="the tunnel up")
    assert heard.states == [True]
    urls = inbox.urls()
    assert urls is not None
    route = await hub.hub.write(hub.hub.store.graph_route, t.identity.gateway_id)  # the one the hub minted
    assert urls == (f"{hub.url}/v1/graph/{route}/notifications", f"{hub.url}/v1/graph/{route}/lifecycle")

    assert await graph_post(http, urls[0], BODY) == 202
    await eventually(lambda: len(heard.pokes) == 1, what="the notification at the listener")
    assert heard.pokes[0].body == BODY and heard.pokes[0].lifecycle is False
    assert await graph_post(http, urls[1], LIFECYCLE) == 202
    await eventually(lambda: len(heard.pokes) == 2, what="the lifecycle event at the listener")
    assert heard.pokes[1].body == LIFECYCLE and heard.pokes[1].lifecycle is True
    assert heard.pokes[0].received_at <= heard.pokes[1].received_at
    assert (pokes(registry, "notification"), pokes(registry, "lifecycle")) == (1, 1)


async def test_connected_follows_the_tunnel_through_a_drop_and_a_hub_restart_and_the_urls_stay(hub, http, tunnel):
    inbox = RelayInbox()
    heard = Listener()
    inbox.listen(heard.poke, heard.connected)
    t = tunnel(inbox)
    await eventually(inbox.connected, what="the tunnel up")
    urls = inbox.urls()

    await hub.session(t.identity.gateway_id).ws.close(code=1011, message=b"test drop")
    await eventually(lambda: heard.states == [True, False, True], what="down and up again")
    assert inbox.urls() == urls

    await hub.stop()
    await eventually(lambda: not inbox.connected(), what="down with the hub")
    assert heard.states[-1] is False and inbox.urls() == urls  # the hub keeps them: a subscription stays valid
    await hub.start()
    await eventually(inbox.connected, timeout=30, what="up again after the hub's restart")
    assert heard.states == [True, False, True, False, True]
    assert inbox.urls() == urls
    assert await graph_post(http, urls[0], BODY) == 202  # and pokes arrive again
    await eventually(lambda: len(heard.pokes) == 1, what="a poke after the restart")


async def test_a_listener_that_raises_is_logged_and_neither_the_others_nor_the_tunnel_notice(hub, http, tunnel):
    inbox = RelayInbox()

    def broken(_: Any) -> None:
        raise RuntimeError("a bug in a source")

    inbox.listen(broken, broken)
    heard = Listener()
    inbox.listen(heard.poke, heard.connected)
    with capture_logs() as logs:
        t = tunnel(inbox)
        await eventually(inbox.connected, what="the tunnel up")
        session = hub.session(t.identity.gateway_id)
        urls = inbox.urls()
        assert urls is not None
        for _ in range(3):
            assert await graph_post(http, urls[0], BODY) == 202
        await eventually(lambda: len(heard.pokes) == 3, what="three pokes at the healthy listener")
    failures = [e for e in logs if e["event"] == "relay.inbox_listener_failed"]
    assert [e["call"] for e in failures] == ["connected", "poke", "poke", "poke"]
    assert t.state == "connected" and hub.session(t.identity.gateway_id) is session  # the same session


async def test_a_listener_that_stopped_listening_hears_nothing_more(hub, http, tunnel):
    inbox = RelayInbox()
    heard, gone = Listener(), Listener()
    inbox.listen(heard.poke, heard.connected)
    stop = inbox.listen(gone.poke, gone.connected)
    tunnel(inbox)
    await eventually(inbox.connected, what="the tunnel up")
    stop()
    stop()  # twice is harmless
    urls = inbox.urls()
    assert urls is not None
    assert await graph_post(http, urls[0], BODY) == 202
    await eventually(lambda: len(heard.pokes) == 1, what="the poke at the listener still listening")
    assert gone.pokes == [] and gone.states == [True]


async def test_a_malformed_notification_is_answered_with_an_error_and_reaches_no_listener(hub, tunnel):
    inbox = RelayInbox()
    heard = Listener()
    inbox.listen(heard.poke, heard.connected)
    t = tunnel(inbox)
    await eventually(inbox.connected, what="the tunnel up")
    session = hub.session(t.identity.gateway_id)
    with capture_logs() as logs:
        for bad in ({"lifecycle": "yes", "body": BODY}, {"lifecycle": False, "body": [1]},
                    {"lifecycle": False, "body": {"value": {}}}, {"lifecycle": True}):
            await session.send(protocol.encode("notification", **bad))
        await session.send(protocol.encode("notification", lifecycle=False, body=BODY))  # then a good one
        await eventually(lambda: len(heard.pokes) == 1, what="the good notification")
    assert heard.pokes[0].body == BODY
    refused = [e for e in logs if e["event"] == "tunnel.bad_message"]
    assert len(refused) == 4 and {e["type"] for e in refused} == {"notification"}
    assert hub.session(t.identity.gateway_id) is session


# -- the wiring --------------------------------------------------------------------------------------------------
def recording_registry(seen: dict[str, SourceSpec]) -> Any:
    class Recording(MemoryKind):
        def open(self, spec: SourceSpec, feed: FeedSettings) -> OpenedSource:
            seen[spec.name] = spec
            return super().open(spec, feed)
    return default_registry().with_kind("memory", Recording)


def memory_options(tmp_path: Path, **kw: Any) -> GatewayOptions:
    org = MemorySource()
    org.add_room("room1@contoso.com")
    return GatewayOptions(sources=(SourceSpec("online", "memory", org, rooms=("room1@contoso.com",)),),
                          store_path=tmp_path / "gateway.sqlite", **kw)


async def test_every_source_gets_the_tunnels_inbox_when_the_relay_is_enabled(hub, http, vault, pki, tmp_path):
    identity = await enrolled(hub, vault, pki)
    relay = RelayConfig(enabled=True, hub_url=identity.hub_url, ca_bundle=pki.ca_file, reconnect_max_seconds=1.0)
    seen: dict[str, SourceSpec] = {}
    metrics = Metrics()
    gw = await start_gateway(memory_options(tmp_path, relay=relay, identity=identity), metrics,
                             registry=recording_registry(seen))
    try:
        assert gw.runner is not None
        inbox = seen["online"].inbox
        assert isinstance(inbox, RelayInbox) and inbox is gw.runner.app[INBOX] and gw.tunnel is not None
        assert gw.tunnel.inbox is inbox
        await eventually(inbox.connected, what="the gateway's tunnel up")
        heard = Listener()
        inbox.listen(heard.poke, heard.connected)
        urls = inbox.urls()
        assert urls is not None
        assert await graph_post(http, urls[1], LIFECYCLE) == 202
        await eventually(lambda: len(heard.pokes) == 1, what="the poke through the running gateway")
        assert metrics.registry.get_sample_value("gateway_relay_pokes_total", {"kind": "lifecycle"}) == 1
    finally:
        await stop_gateway(gw)


async def test_without_the_relay_sources_get_no_inbox(tmp_path):
    seen: dict[str, SourceSpec] = {}
    gw = await start_gateway(memory_options(tmp_path), registry=recording_registry(seen))
    try:
        assert gw.runner is not None
        assert seen["online"].inbox is None and gw.runner.app[INBOX] is None
    finally:
        await stop_gateway(gw)


async def test_a_hub_that_sends_unusable_urls_is_still_used_and_the_sources_poll(hub, tunnel, monkeypatch):
    from gateway.hub import tunnels as hub_tunnels

    monkeypatch.setattr(hub_tunnels, "graph_urls", lambda base, route: {"url": "http://plain.example/n"})
    inbox = RelayInbox()
    with capture_logs() as logs:
        t = tunnel(inbox)
        await eventually(inbox.connected, what="the tunnel up all the same")
    assert inbox.urls() is None and t.state == "connected"
    assert [e["error"] for e in logs if e["event"] == "tunnel.bad_notification_urls"] == [
        "welcome.notifications must be {url, lifecycle_url}, two https:// URLs of at most 2048 characters"]


def test_welcome_without_notifications_means_none_and_malformed_ones_are_refused():
    assert protocol.notification_urls({"type": "welcome", "ack": 0}) is None  # an older hub
    good = {"url": "https://hub.example/v1/graph/r/notifications",
            "lifecycle_url": "https://hub.example/v1/graph/r/lifecycle"}
    assert protocol.notification_urls({"notifications": good}) == (good["url"], good["lifecycle_url"])
    for bad in ("https://x", {"url": good["url"]}, {**good, "lifecycle_url": 7},
                {**good, "url": "https://" + "x" * 2048}):
        with pytest.raises(ProtocolError) as e:
            protocol.notification_urls({"notifications": bad})
        assert e.value.key == "bad_message"


# -- with the Graph simulator as Microsoft Graph -----------------------------------------------------------------
async def test_the_graph_simulators_validation_and_notifications_go_through_the_hub_to_a_listener(
        graph_sim, hub, pki, tunnel):
    status, _ = await asyncio.to_thread(graph_sim.control, "PATCH", "/graph/subscriptions",
                                        {"notify_ca_bundle": str(pki.ca_file)})  # Graph verifies the hub's TLS
    assert status == 200
    inbox = RelayInbox()
    heard = Listener()
    inbox.listen(heard.poke, heard.connected)
    tunnel(inbox)
    await eventually(inbox.connected, what="the tunnel up")
    urls = inbox.urls()
    assert urls is not None
    room, organizer = graph_sim.graph_rooms[0], graph_sim.graph_users[0]
    expiry = (datetime.now(UTC) + timedelta(minutes=4200)).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")
    status, sub, _ = await asyncio.to_thread(graph_sim.request, "POST", "/subscriptions", {
        "changeType": "created,updated,deleted", "notificationUrl": urls[0], "lifecycleNotificationUrl": urls[1],
        "resource": f"users/{room}/events", "expirationDateTime": expiry, "clientState": "chosen-by-the-gateway"})
    assert status == 201, sub  # the hub answered the validation on both URLs
    assert hub.hub.metrics.registry.get_sample_value("gateway_hub_graph_notifications_total",
                                                     {"outcome": "validation"}) == 2

    await asyncio.to_thread(graph_sim.request, "POST", f"/users/{organizer}/events",
                            event("Through the hub", tomorrow(9), rooms=[room]))

    def created() -> list[dict[str, Any]]:
        return [n for p in heard.pokes if not p.lifecycle for n in p.body["value"] if n.get("changeType") == "created"]
    await eventually(created, timeout=30, what="Graph's notification at the listener")
    n = created()[0]
    assert n["subscriptionId"] == sub["id"] and n["clientState"] == "chosen-by-the-gateway"

    status, _ = await asyncio.to_thread(graph_sim.control, "POST", f"/graph/subscriptions/{sub['id']}/lifecycle",
                                        {"event": "missed"})
    assert status == 200

    def missed() -> list[dict[str, Any]]:
        return [n for p in heard.pokes if p.lifecycle for n in p.body["value"] if n.get("lifecycleEvent") == "missed"]
    await eventually(missed, timeout=30, what="the lifecycle event at the listener")
    assert missed()[0]["subscriptionId"] == sub["id"]


async def test_a_source_given_its_own_inbox_in_code_keeps_it(tmp_path):
    own = RelayInbox()  # e.g. a test's stand-in for the hub
    seen: dict[str, SourceSpec] = {}
    opts = memory_options(tmp_path)
    opts = replace(opts, sources=tuple(replace(s, inbox=own) for s in opts.sources))
    gw = await start_gateway(opts, registry=recording_registry(seen))
    try:
        assert seen["online"].inbox is own
    finally:
        await stop_gateway(gw)
