"""The hub's public Graph webhook routes, over TLS on loopback: a small aiohttp client plays Microsoft Graph (the
validation handshake, deliveries, forgeries) and a FakeGateway holds the tunnel the notifications go down."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from gateway.errors import ConfigError
from gateway.hub import cli as hubcli
from gateway.relay import protocol
from tests.conftest import eventually
from tests.fake_gateway import FakeGateway, Link
from tests.hub_fixtures import Hub, Vendor

pytestmark = pytest.mark.hub

NOTIFICATION: dict[str, Any] = {"value": [{
    "subscriptionId": "7f105c7d-2dc5-4530-97cd-4e7ae6534c07", "clientState": "chosen-by-the-gateway",
    "changeType": "updated", "resource": "Users/room1@contoso.com/Events/AAMkAGUw",
    "subscriptionExpirationDateTime": "2026-12-09T18:23:45.9356913Z",
    "resourceData": {"@odata.type": "#Microsoft.Graph.Event", "id": "AAMkAGUw"},
    "tenantId": "84bd8158-6d4d-4958-8b9f-9d6445542f95"}]}
MISSED: dict[str, Any] = {"value": [{"subscriptionId": "7f105c7d-2dc5-4530-97cd-4e7ae6534c07",
                                     "clientState": "chosen-by-the-gateway", "lifecycleEvent": "missed",
                                     "resource": "Users/room1@contoso.com/Events"}]}


def outcome(hub: Hub, name: str) -> float:
    value = hub.hub.metrics.registry.get_sample_value("gateway_hub_graph_notifications_total", {"outcome": name})
    return float(value or 0.0)


async def graph_post(http: aiohttp.ClientSession, url: str, body: Any = None, *, raw: bytes | None = None,
                     params: str = "") -> tuple[int, str, aiohttp.ClientResponse]:
    """A post as Graph makes it: no Authorization header, JSON (or, for the handshake, empty text/plain)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    hdrs = {"Content-Type": "application/json" if body is not None else "text/plain"}
    async with http.post(url + params, data=data, headers=hdrs) as resp:
        return resp.status, await resp.text(), resp


async def gateway_urls(http: aiohttp.ClientSession, hub: Hub, gw: FakeGateway) -> tuple[Link, str, str]:
    link = await gw.connect(http, hub.url)
    assert link.welcome["type"] == "welcome", link.welcome
    urls = link.welcome["notifications"]
    return link, urls["url"], urls["lifecycle_url"]


@pytest.fixture
async def gw(vendor: Vendor) -> FakeGateway:
    await vendor.customer()
    return await vendor.gateway()


# -- the URLs ----------------------------------------------------------------------------------------------------
async def test_welcome_carries_unguessable_urls_stable_across_reconnects_and_a_hub_restart(http, hub, vendor, gw):
    link, url, lifecycle_url = await gateway_urls(http, hub, gw)
    assert url.startswith(hub.url + "/v1/graph/") and url.endswith("/notifications")
    route = url.removeprefix(hub.url + "/v1/graph/").removesuffix("/notifications")
    assert lifecycle_url == f"{hub.url}/v1/graph/{route}/lifecycle"
    assert len(route) >= 32 and gw.gateway_id is not None and gw.gateway_id not in route
    other = await vendor.gateway()
    other_link, other_url, _ = await gateway_urls(http, hub, other)
    assert other_url != url  # per gateway
    await other_link.close()
    await link.close()

    again, url2, lifecycle2 = await gateway_urls(http, hub, gw)
    assert (url2, lifecycle2) == (url, lifecycle_url)
    await again.close()
    await hub.stop()
    await hub.start()
    after, url3, lifecycle3 = await gateway_urls(http, hub, gw)
    assert (url3, lifecycle3) == (url, lifecycle_url)
    await after.close()


# -- the validation handshake ------------------------------------------------------------------------------------
async def test_validation_answers_the_decoded_token_on_both_urls_with_the_gateway_offline_and_connected(
        http, hub, gw):
    link, url, lifecycle_url = await gateway_urls(http, hub, gw)
    token = "Validation: Testing client application reachability for subscription Request-Id: 5a1c+ü/&="
    for target in (url, lifecycle_url):  # connected
        status, text, resp = await graph_post(http, target, params="?validationToken=" + quote(token, safe=""))
        assert (status, text, resp.content_type) == (200, token, "text/plain")
    await link.close()
    await eventually(lambda: hub.session(gw.gateway_id) is None, what="the hub to notice the closed tunnel")
    for target in (url, lifecycle_url):  # not connected: the gateway is mid-request creating the subscription
        status, text, resp = await graph_post(http, target, params="?validationToken=" + quote(token, safe=""))
        assert (status, text, resp.content_type) == (200, token, "text/plain")
    assert outcome(hub, "validation") == 4


async def test_a_validation_token_too_long_or_empty_is_refused(http, hub, gw):
    link, url, _ = await gateway_urls(http, hub, gw)
    status, text, _ = await graph_post(http, url, params="?validationToken=" + "x" * 1025)
    assert status == 400 and json.loads(text)["error"] == "invalid_validation_token"
    status, _, _ = await graph_post(http, url, params="?validationToken=")
    assert status == 400
    await link.close()


# -- deliveries --------------------------------------------------------------------------------------------------
async def test_a_delivery_is_answered_202_and_arrives_at_the_connected_gateway_unchanged(http, hub, gw):
    link, url, lifecycle_url = await gateway_urls(http, hub, gw)
    status, _, _ = await graph_post(http, url, NOTIFICATION)
    assert status == 202
    msg = await link.recv()
    assert msg == {"type": "notification", "lifecycle": False, "body": NOTIFICATION}
    status, _, _ = await graph_post(http, lifecycle_url, MISSED)
    assert status == 202
    assert await link.recv() == {"type": "notification", "lifecycle": True, "body": MISSED}
    await eventually(lambda: outcome(hub, "forwarded") == 2, what="two forwarded")
    await link.close()


async def test_a_delivery_for_an_offline_gateway_is_accepted_dropped_and_counted(http, hub, gw):
    link, url, _ = await gateway_urls(http, hub, gw)
    await link.close()
    await eventually(lambda: hub.session(gw.gateway_id) is None, what="the hub to notice the closed tunnel")
    status, _, _ = await graph_post(http, url, NOTIFICATION)
    assert status == 202
    assert outcome(hub, "dropped_offline") == 1 and outcome(hub, "forwarded") == 0
    again = await gw.connect(http, hub.url)  # nothing was queued for it: the gateway catches up by delta
    await again.send("ack", seq=0)  # a gateway does not send ack: the hub's error is the next frame, not a notification
    assert (await again.recv())["type"] == "error"
    await again.close()


async def test_an_unknown_route_or_a_revoked_gateways_route_is_404(http, hub, vendor, gw):
    link, url, _ = await gateway_urls(http, hub, gw)
    for bad in (f"{hub.url}/v1/graph/{'A' * 32}/notifications", f"{hub.url}/v1/graph/short/lifecycle",
                f"{hub.url}/v1/graph/{'A' * 32}/notifications?validationToken=abc"):
        status, text, _ = await graph_post(http, bad, NOTIFICATION)
        assert status == 404 and json.loads(text)["error"] == "unknown_route"
    await vendor.call("POST", f"/admin/v1/gateways/{gw.gateway_id}/revoke")
    await link.closed()
    status, _, _ = await graph_post(http, url, params="?validationToken=abc")
    assert status == 404
    assert outcome(hub, "unknown_route") == 4


async def test_oversize_is_413_and_what_is_not_a_notification_is_400(http, hub, gw):
    link, url, _ = await gateway_urls(http, hub, gw)
    big = {"value": [{"pad": "x" * protocol.MAX_NOTIFICATION_BYTES}]}
    status, text, _ = await graph_post(http, url, big)
    assert status == 413 and json.loads(text)["error"] == "too_large"

    async def chunks() -> Any:  # no Content-Length: the cap holds while reading
        for _ in range(5):
            yield b"x" * (protocol.MAX_NOTIFICATION_BYTES // 4)

    async with http.post(url, data=chunks(), headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
    for raw in (b"not json", b"[1, 2]", b'{"value": "no list"}', b"{}", b"[" * 100 + b"]" * 100):
        status, text, _ = await graph_post(http, url, raw=raw)
        assert status == 400 and json.loads(text)["error"] == "invalid_notification", raw
    assert outcome(hub, "invalid") == 7
    assert outcome(hub, "forwarded") == 0
    await link.send("ack", seq=0)  # nothing was forwarded: the next frame is the hub's answer to this
    assert (await link.recv())["type"] == "error"
    await link.close()


async def test_a_flood_on_one_route_is_rate_limited_and_counted(http, hub_settings, pki):
    flood = Hub(replace(hub_settings, graph_rate=0.5, graph_burst=3))
    await flood.start()
    try:
        vendor = Vendor(http, flood.url)
        await vendor.customer()
        gw = await vendor.gateway()
        link, url, _ = await gateway_urls(http, flood, gw)
        answers = [await graph_post(http, url, NOTIFICATION) for _ in range(6)]
        assert [a[0] for a in answers] == [202, 202, 202, 429, 429, 429]
        assert int(answers[3][2].headers["Retry-After"]) >= 1
        assert json.loads(answers[3][1])["error"] == "rate_limited"
        for _ in range(3):
            assert (await link.recv())["type"] == "notification"
        assert outcome(flood, "rate_limited") == 3
        await eventually(lambda: outcome(flood, "forwarded") == 3, what="three forwarded")
        # the validation handshake is never rate limited: a subscription can always be created
        status, _, _ = await graph_post(http, url, params="?validationToken=abc")
        assert status == 200
        await link.close()
    finally:
        await flood.stop()


async def test_the_routes_need_no_key_and_are_in_the_openapi_document(http, hub):
    async with http.get(hub.url + "/openapi.json") as resp:
        doc = await resp.json()
    for kind in ("notifications", "lifecycle"):
        op = doc["paths"][f"/v1/graph/{{route}}/{kind}"]["post"]
        assert not op.get("security"), op  # Graph cannot authenticate
        assert {"200", "202", "404", "413", "429"} <= set(op["responses"])


async def test_parallel_posts_are_all_accepted_and_forwarded(http, hub, gw):
    link, url, _ = await gateway_urls(http, hub, gw)
    answers = await asyncio.gather(*(graph_post(http, url, NOTIFICATION) for _ in range(20)))
    assert {a[0] for a in answers} == {202}
    got = [await link.recv() for _ in range(20)]
    assert all(m["type"] == "notification" for m in got)
    await link.close()


# -- settings ----------------------------------------------------------------------------------------------------
def test_the_rate_limit_is_a_setting_and_a_flag_checked_before_the_hub_starts(hub_settings):
    parser = argparse.ArgumentParser(prog="gateway")
    hubcli.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["hub", "serve", "--graph-rate", "5", "--graph-burst", "50"])
    assert (args.graph_rate, args.graph_burst) == (5.0, 50)
    defaults = parser.parse_args(["hub", "serve"])
    assert (defaults.graph_rate, defaults.graph_burst) == (hub_settings.graph_rate, hub_settings.graph_burst)
    for bad in ({"graph_rate": 0}, {"graph_burst": 0}, {"graph_burst": 2.5}):
        with pytest.raises(ConfigError) as e:
            replace(hub_settings, **bad).validate()
        assert e.value.key == "invalid_hub_setting" and "graph_" in str(e.value)


async def test_graph_is_answered_while_the_tunnel_is_stuck(http, hub, gw):
    link, url, _ = await gateway_urls(http, hub, gw)
    session = hub.session(gw.gateway_id)
    stuck, send = asyncio.Event(), session.send

    async def stalled(text: str) -> None:  # a tunnel whose TCP window is shut: every send waits
        await stuck.wait()
        await send(text)

    session.send = stalled
    async with asyncio.timeout(20):  # were Graph made to wait on the tunnel, this would never be answered
        answers = await asyncio.gather(*(graph_post(http, url, NOTIFICATION) for _ in range(10)))
    assert [a[0] for a in answers] == [202] * 10
    assert outcome(hub, "forwarded") == 0
    stuck.set()  # the tunnel moves again: everything accepted arrives
    got = [await link.recv() for _ in range(10)]
    assert all(m == {"type": "notification", "lifecycle": False, "body": NOTIFICATION} for m in got)
    await eventually(lambda: outcome(hub, "forwarded") == 10, what="all ten forwarded")
    await link.close()
