"""Graph change notifications from the simulator to an HTTPS receiver that stands in for the hub."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import GraphSim, wait_for
from tests.graph_helpers import event, tomorrow


@dataclass
class Receiver:
    """What a hub does for Graph: echo validation tokens, accept notifications (or fail, as told)."""

    url: str = ""
    notifications: list[dict[str, Any]] = field(default_factory=list)
    lifecycle: list[dict[str, Any]] = field(default_factory=list)
    validations: int = 0
    mode: str = "ok"  # ok, wrong_token, slow, down
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends a slow answer
    runner: Any = None

    async def handle(self, request: web.Request) -> web.Response:
        token = request.query.get("validationToken")
        if token is not None:
            self.validations += 1
            if self.mode == "wrong_token":
                return web.Response(text=token + "x", content_type="text/plain")
            if self.mode == "slow":  # answers only once the test has seen the simulator give up
                await self.release.wait()
            return web.Response(text=token, content_type="text/plain")
        if self.mode == "down":
            return web.Response(status=503)
        body = await request.json()
        target = self.lifecycle if request.path.endswith("/lifecycle") else self.notifications
        target.extend(body["value"])
        return web.Response(status=202)


@pytest.fixture
def receiver(graph_sim: GraphSim, pki) -> Receiver:
    rec = Receiver()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.cert_file), str(pki.key_file))

    async def start() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", rec.handle)
        rec.runner = web.AppRunner(app, access_log=None)
        await rec.runner.setup()
        site = web.TCPSite(rec.runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        rec.url = f"https://localhost:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    graph_sim.call(start)
    status, _ = graph_sim.control("PATCH", "/graph/subscriptions", {"notify_ca_bundle": str(pki.ca_file)})
    assert status == 200
    yield rec
    graph_sim.call(rec.release.set)
    graph_sim.call(rec.runner.cleanup)


def subscribe(g: GraphSim, rec: Receiver, room: str, minutes: int = 4200, **extra: Any) -> tuple[int, dict]:
    expiry = (datetime.now(UTC) + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")
    status, body, _ = g.request("POST", "/subscriptions", {
        "changeType": "created,updated,deleted", "notificationUrl": f"{rec.url}/notify",
        "lifecycleNotificationUrl": f"{rec.url}/lifecycle", "resource": f"users/{room}/events",
        "expirationDateTime": expiry, "clientState": "secret-state", **extra})
    return status, body


def test_a_subscription_is_validated_on_both_urls_and_notifications_follow_changes(graph_sim, receiver):
    room, organizer = graph_sim.graph_rooms[0], graph_sim.graph_users[0]
    status, sub = subscribe(graph_sim, receiver, room)
    assert status == 201, sub
    assert receiver.validations == 2  # notificationUrl and lifecycleNotificationUrl
    granted = datetime.fromisoformat(sub["expirationDateTime"].replace("Z", "+00:00"))
    assert granted - datetime.now(UTC) <= timedelta(minutes=4230)
    graph_sim.request("POST", f"/users/{organizer}/events", event("Notify me", tomorrow(9), rooms=[room]))
    wait_for(lambda: [n for n in receiver.notifications if n["changeType"] == "created"], what="a notification")
    n = receiver.notifications[0]
    assert n["subscriptionId"] == sub["id"] and n["clientState"] == "secret-state"
    assert n["tenantId"] == graph_sim.tenant_id
    assert n["resourceData"]["@odata.type"] == "#Microsoft.Graph.Event" and n["resourceData"]["id"]
    assert set(n) >= {"subscriptionExpirationDateTime", "resource"}


def test_a_failed_validation_makes_no_subscription(graph_sim, receiver):
    receiver.mode = "wrong_token"
    status, body = subscribe(graph_sim, receiver, graph_sim.graph_rooms[0])
    assert status == 400 and body["error"]["code"] == "ValidationError"
    status, listed, _ = graph_sim.request("GET", "/subscriptions")
    assert listed["value"] == []


def test_a_validation_answer_later_than_the_deadline_makes_no_subscription(graph_sim, receiver):
    assert graph_sim.control("PATCH", "/graph/subscriptions", {"validation_timeout": 0.5})[0] == 200
    receiver.mode = "slow"
    status, body = subscribe(graph_sim, receiver, graph_sim.graph_rooms[0])
    assert status == 400 and body["error"]["code"] == "ValidationError" and "timeout" in body["error"]["message"]
    assert graph_sim.request("GET", "/subscriptions")[1]["value"] == []


def test_notifications_are_retried_until_the_receiver_is_back(graph_sim, receiver):
    room = graph_sim.graph_rooms[0]
    assert subscribe(graph_sim, receiver, room)[0] == 201
    receiver.mode = "down"
    graph_sim.request("POST", f"/users/{room}/events", event("While down", tomorrow(10)))
    wait_for(lambda: graph_sim.control("GET", "/graph/subscriptions")[1]["subscriptions"][0]["failed_attempts"],
             what="a failed delivery")
    receiver.mode = "ok"
    wait_for(lambda: receiver.notifications, what="the retried notification")


def test_renewal_is_capped_and_a_short_subscription_expires(graph_sim, receiver):
    room = graph_sim.graph_rooms[0]
    status, _ = graph_sim.control("PATCH", "/graph/subscriptions", {"max_minutes": 0.05})  # three seconds
    assert status == 200
    status, sub = subscribe(graph_sim, receiver, room, minutes=60)
    assert status == 201
    granted = datetime.fromisoformat(sub["expirationDateTime"].replace("Z", "+00:00"))
    assert granted - datetime.now(UTC) <= timedelta(seconds=3)
    later = (datetime.now(UTC) + timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, renewed, _ = graph_sim.request("PATCH", f"/subscriptions/{sub['id']}", {"expirationDateTime": later})
    assert status == 200 and renewed["expirationDateTime"] >= sub["expirationDateTime"]
    wait_for(lambda: graph_sim.request("GET", f"/subscriptions/{sub['id']}")[0] == 404, what="the expiry")


def test_lifecycle_events_reach_the_lifecycle_url(graph_sim, receiver):
    room = graph_sim.graph_rooms[0]
    _, sub = subscribe(graph_sim, receiver, room)
    status, _ = graph_sim.control("POST", f"/graph/subscriptions/{sub['id']}/lifecycle",
                                  {"event": "reauthorizationRequired"})
    assert status == 200
    wait_for(lambda: receiver.lifecycle, what="the lifecycle event")
    assert receiver.lifecycle[0]["lifecycleEvent"] == "reauthorizationRequired"
    assert receiver.lifecycle[0]["clientState"] == "secret-state"
    graph_sim.request("POST", f"/users/{room}/events", event("Lost", tomorrow(11)))
    wait_for(lambda: graph_sim.control("GET", "/graph/subscriptions")[1]["subscriptions"][0]["lost"],
             what="a change while paused")
    status, _, _ = graph_sim.request("POST", f"/subscriptions/{sub['id']}/reauthorize")
    assert status == 200
    graph_sim.request("POST", f"/users/{room}/events", event("After", tomorrow(12)))
    wait_for(lambda: receiver.notifications, what="a notification after reauthorization")
    assert len({n["resourceData"]["id"] for n in receiver.notifications}) == 1  # the paused change is lost
    graph_sim.control("POST", f"/graph/subscriptions/{sub['id']}/lifecycle", {"event": "subscriptionRemoved"})
    wait_for(lambda: len(receiver.lifecycle) == 2, what="subscriptionRemoved")
    assert graph_sim.request("GET", f"/subscriptions/{sub['id']}")[0] == 404


def test_a_notification_ca_that_cannot_be_loaded_is_refused_at_once(graph_sim, tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate")
    status, body = graph_sim.control("PATCH", "/graph/subscriptions", {"notify_ca_bundle": str(tmp_path / "junk.pem")})
    assert status == 400 and "cannot load" in body["message"]


def test_subscriptions_want_https_and_a_graph_mailbox(graph_sim, receiver):
    status, body, _ = graph_sim.request("POST", "/subscriptions", {
        "changeType": "created", "notificationUrl": "http://example.invalid/x",
        "resource": f"users/{graph_sim.graph_rooms[0]}/events",
        "expirationDateTime": (datetime.now(UTC) + timedelta(hours=1)).isoformat()})
    assert status == 400 and "HTTPS" in body["error"]["message"]
    status, body = subscribe(graph_sim, receiver, graph_sim.ews_rooms[0])
    assert status == 404 and body["error"]["code"] == "MailboxNotEnabledForRESTAPI"
