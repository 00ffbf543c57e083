"""Graph change notifications through a hub, end to end: the simulator's Graph side delivers webhooks over HTTPS to
a small stand-in for the vendor's hub (it answers the validation handshake and forwards every notification to the
gateway's NotificationInbox, as the relay does), and the Graph source's feed subscribes each room, checks the
clientState, renews, follows lifecycle events, and falls back to polling while the hub is away."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.app import GatewayOptions, init_app
from gateway.ports import SourceSpec
from gateway.simulator.control import Control
from gateway.simulator.server import SimulatorConfig
from gateway.sources.graph.settings import GraphSettings
from gateway.sync.coordinator import SyncSettings
from tests.conftest import GraphSim, eventually, free_port
from tests.graph_hub import Inbox, stand_in_hub
from tests.running_gateway import CREATED, Gw, api_key

pytestmark = pytest.mark.e2e

ROOM3, ROOM4 = "room3@contoso.com", "room4@contoso.com"
CAROL = "carol@contoso.com"


@pytest.fixture
async def hub(pki: Any) -> AsyncIterator[Inbox]:
    async for inbox in stand_in_hub(pki):
        yield inbox


@pytest.fixture
async def online(graph_sim_factory: Any, hub: Inbox, pki: Any, tmp_path: Path, aiohttp_client: Any,
                 ) -> AsyncIterator[Callable[..., Any]]:
    async def start(poll_interval: float = 3600.0, max_minutes: float | None = None) -> Gw:
        g = graph_sim_factory(SimulatorConfig(rba_delay=0.05))
        body: dict[str, Any] = {"notify_ca_bundle": str(pki.ca_file)}
        if max_minutes is not None:
            body["max_minutes"] = max_minutes
        status, _ = g.control("PATCH", "/graph/subscriptions", body)
        assert status == 200
        settings = GraphSettings(tenant_id=g.tenant_id, client_id=g.client_id, credential="client_secret",
                                 authority_host=g.authority.rsplit("/", 1)[0], graph_url=g.graph_url,
                                 ca_bundle=g.ca_bundle, poll_interval_seconds=poll_interval)
        store = tmp_path / "gateway.sqlite"
        options = GatewayOptions(
            sources=(SourceSpec("online", "graph", settings, g.client_secret, rooms=(ROOM3, ROOM4), inbox=hub),),
            sync=SyncSettings(debounce_seconds=0.1, retry_seconds=0.3, reconcile_seconds=3600.0),
            store_path=store, feed="streaming")
        gw = Gw(g, await aiohttp_client(init_app(options), headers=api_key(store)))
        await eventually(lambda: all("syncing" in gw.states(r) and gw.states(r)[-1] in ("verified", "polling")
                                     for r in (ROOM3, ROOM4)), what="the rooms imported")
        return gw
    yield start


def subscriptions(g: GraphSim) -> list[dict[str, Any]]:
    status, body = g.control("GET", "/graph/subscriptions")
    assert status == 200
    return list(body["subscriptions"])


def meeting(g: GraphSim, room: str, subject: str, hours: float = 26) -> str:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=hours)
    uid = g.call(lambda: Control.of(g.sim).create_meeting(organizer=CAROL, rooms=[room], subject=subject,
                                                         start=start, end=start + timedelta(minutes=30)).uid)
    return str(uid)


def created(gw: Gw, room: str, uid: str) -> bool:
    return any(e.data["uid"] == uid for e in gw.events(room, CREATED))


async def test_each_room_is_subscribed_through_the_hub_and_a_change_arrives_by_notification(
        online: Any, hub: Inbox) -> None:
    gw = await online()  # polling every hour: only a notification brings a change in time
    await eventually(lambda: len(subscriptions(gw.ews)) == 2, what="two subscriptions")
    subs = subscriptions(gw.ews)
    assert {s["mailbox"] for s in subs} == {ROOM3, ROOM4}
    assert all((s["notification_url"], s["lifecycle_url"]) == hub.urls() for s in subs)
    await eventually(lambda: gw.metric("gateway_graph_rooms", mode="notifications"), what="notification mode")
    assert await gw.metric("gateway_graph_rooms", mode="notifications") == 2
    uid = meeting(gw.ews, ROOM3, "Heard of")
    await eventually(lambda: created(gw, ROOM3, uid), timeout=20, what="the meeting through a notification")
    assert await gw.metric("gateway_graph_notifications_total", outcome="accepted") >= 1


async def test_a_forged_notification_costs_nothing(online: Any, hub: Inbox) -> None:
    gw = await online()
    await eventually(lambda: len(subscriptions(gw.ews)) == 2, what="two subscriptions")
    # the feed knows a subscription once it has read Graph's answer, a moment after the simulator stored it
    async def both_notified() -> bool:
        return await gw.metric("gateway_graph_rooms", mode="notifications") == 2
    await eventually(both_notified, what="notification mode")
    [sub, *_] = subscriptions(gw.ews)
    before = await gw.metric("gateway_graph_requests_total", operation="delta", status="200")
    for forged in ({"subscriptionId": sub["id"], "clientState": "guessed"}, {"subscriptionId": "not-ours"}):
        for _ in range(20):
            hub.poke({"value": [{**forged, "changeType": "updated", "resource": f"users/{ROOM3}/events/x"}]})
    assert await gw.metric("gateway_graph_notifications_total", outcome="bad_client_state") == 20
    assert await gw.metric("gateway_graph_notifications_total", outcome="unknown_subscription") == 20
    assert await gw.metric("gateway_graph_requests_total", operation="delta", status="200") == before


async def test_the_hub_away_means_polling_and_back_means_notifications(online: Any, hub: Inbox) -> None:
    gw = await online(poll_interval=1.0)
    await eventually(lambda: len(subscriptions(gw.ews)) == 2, what="two subscriptions")
    with capture_logs() as logs:
        hub.tunnel(False)
        await eventually(lambda: gw.metric("gateway_graph_rooms", mode="polling"), what="polling mode")
        assert await gw.metric("gateway_graph_rooms", mode="polling") == 2
        await eventually(lambda: gw.state(ROOM3) == gw.state(ROOM4) == "polling", what="the rooms say so")

        async def reason() -> bool:  # the row is stored a moment after the worker's state changed
            return "tunnel to the hub is down" in (await gw.rooms())[ROOM3]["reason"]
        await eventually(reason, what="the reason in the room's row")
        uid = meeting(gw.ews, ROOM4, "While the hub was away")
        await eventually(lambda: created(gw, ROOM4, uid), timeout=20, what="the meeting found by polling")
        hub.tunnel(True)
        await eventually(lambda: gw.metric("gateway_graph_rooms", mode="notifications"), what="notifications again")
        assert await gw.metric("gateway_graph_rooms", mode="notifications") == 2
        await eventually(lambda: gw.state(ROOM3) == gw.state(ROOM4) == "verified", what="the rooms verified again")
    modes = [(e["notifications"], e["polling"]) for e in logs if e["event"] == "graph.rooms_mode"]
    assert (0, 2) in modes and modes[-1] == (2, 0)


async def test_lifecycle_events_lead_to_the_right_recovery(online: Any, hub: Inbox) -> None:
    gw = await online()
    await eventually(lambda: len(subscriptions(gw.ews)) == 2, what="two subscriptions")
    first = {s["mailbox"]: s["id"] for s in subscriptions(gw.ews)}
    # subscriptionRemoved: a new subscription for the room (and a delta for what fell between)
    status, _ = gw.ews.control("POST", f"/graph/subscriptions/{first[ROOM3]}/lifecycle",
                               {"event": "subscriptionRemoved"})
    assert status == 200
    await eventually(lambda: {s["mailbox"]: s["id"] for s in subscriptions(gw.ews)}.get(ROOM3) not in
                     (None, first[ROOM3]), what="room3 subscribed afresh")
    # reauthorizationRequired: notifications wait until the gateway reauthorizes, then flow again
    status, _ = gw.ews.control("POST", f"/graph/subscriptions/{first[ROOM4]}/lifecycle",
                               {"event": "reauthorizationRequired"})
    assert status == 200
    await eventually(lambda: not next(s for s in subscriptions(gw.ews) if s["id"] == first[ROOM4])
                     ["needs_reauthorization"], what="room4's subscription reauthorized")
    uid = meeting(gw.ews, ROOM4, "After reauthorization")
    await eventually(lambda: created(gw, ROOM4, uid), timeout=20, what="room4's notifications flowing")
    # missed: a delta of the room, whatever was lost
    uid = gw.ews.call(lambda: _quiet_meeting(gw.ews, ROOM4))
    status, _ = gw.ews.control("POST", f"/graph/subscriptions/{first[ROOM4]}/lifecycle", {"event": "missed"})
    assert status == 200
    await eventually(lambda: created(gw, ROOM4, uid), timeout=20, what="the missed change found by a delta")


def _quiet_meeting(g: GraphSim, room: str) -> str:
    """An appointment stored without a change notification (what a lost delivery looks like)."""
    mb = g.sim.directory.get(room)
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=30)
    item = g.sim.calendars.new_item(mb, start=start, end=start + timedelta(minutes=30), subject="Never notified")
    item.organizer = mb.person
    g.sim.directory.add_item(item, notify=False)
    return str(item.uid)


async def test_subscriptions_are_renewed_before_the_granted_expiry(online: Any, hub: Inbox) -> None:
    gw = await online(max_minutes=0.1)  # Graph grants six seconds: renewed at about half of that
    await eventually(lambda: len(subscriptions(gw.ews)) == 2, what="two subscriptions")
    first = {s["id"]: s["expiration"] for s in subscriptions(gw.ews)}
    await eventually(lambda: all(first.get(s["id"], "~") < s["expiration"] for s in subscriptions(gw.ews))
                     and {s["id"] for s in subscriptions(gw.ews)} == set(first), timeout=15,
                     what="both subscriptions renewed (same ids, later expiry)")


async def test_the_rooms_poll_until_the_hub_tells_its_urls_then_subscribe(online: Any, hub: Inbox) -> None:
    hub.up = hub.welcomed = False  # the sources start before the tunnel's first welcome
    gw = await online()
    assert subscriptions(gw.ews) == [] and await gw.metric("gateway_graph_rooms", mode="polling") == 2
    hub.tunnel(True)
    await eventually(lambda: len(subscriptions(gw.ews)) == 2, what="both rooms subscribed after the welcome")
    await eventually(lambda: gw.metric("gateway_graph_rooms", mode="notifications"), what="notification mode")


def _feed_alone(graph_sim_factory: Any, hub: Inbox, pki: Any) -> tuple[GraphSim, Any, Any]:
    """A Graph feed on its own (no gateway around it) against a new simulator that delivers to ``hub``: the
    simulator, the client (to close) and the feed."""
    from gateway.sources.graph.auth import TokenSource
    from gateway.sources.graph.client import GraphClient
    from gateway.sources.graph.feed import GraphFeed

    g = graph_sim_factory(SimulatorConfig(rba_delay=0.05))
    status, _ = g.control("PATCH", "/graph/subscriptions", {"notify_ca_bundle": str(pki.ca_file)})
    assert status == 200
    settings = GraphSettings(tenant_id=g.tenant_id, client_id=g.client_id, credential="client_secret",
                             authority_host=g.authority.rsplit("/", 1)[0], graph_url=g.graph_url,
                             ca_bundle=g.ca_bundle)
    client = GraphClient(settings, TokenSource(settings, g.client_secret))
    return g, client, GraphFeed(client, hub, poll_interval=3600)


async def test_a_stopped_feed_removes_its_subscriptions(graph_sim_factory: Any, hub: Inbox, pki: Any) -> None:
    g, client, feed = _feed_alone(graph_sim_factory, hub, pki)
    dirty: list[tuple[str, str]] = []
    task = asyncio.get_running_loop().create_task(feed.watch([ROOM3, ROOM4], lambda room, why: dirty.append(
        (room, why))))
    try:
        await eventually(lambda: len(subscriptions(g)) == 2, what="two subscriptions")
        # the simulator records a subscription before the feed has read its answer and marked the room
        await eventually(lambda: {(room, "subscribed") for room in (ROOM3, ROOM4)} <= set(dirty),
                         what="a delta after subscribing")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()
    assert subscriptions(g) == []


async def test_a_rooms_new_subscription_is_told_at_once_not_after_every_rooms(
        graph_sim_factory: Any, hub: Inbox, pki: Any) -> None:
    # The mark asks for a delta of what happened before the subscription; an import whose first call goes out after
    # it reads all of that itself (Coordinator.import_room). Told only once every room had subscribed, the rooms
    # already importing were read once more for nothing (100 rooms: 447 Graph calls, 404 told at once).
    _, client, feed = _feed_alone(graph_sim_factory, hub, pki)
    room3_told = asyncio.Event()
    room4_saw_it: list[bool] = []
    subscribe = feed._subscribe

    async def held(room: str, urls: tuple[str, str]) -> None:
        if room == ROOM4:  # subscribed beside ROOM3: waits for ROOM3's mark
            try:
                await asyncio.wait_for(room3_told.wait(), 5)
                room4_saw_it.append(True)
            except TimeoutError:
                room4_saw_it.append(False)
        await subscribe(room, urls)
    feed._subscribe = held  # type: ignore[method-assign]
    told: list[str] = []

    def on_dirty(room: str, why: str) -> None:
        if why == "subscribed":
            told.append(room)
            if room == ROOM3:
                room3_told.set()
    task = asyncio.get_running_loop().create_task(feed.watch([ROOM3, ROOM4], on_dirty))
    try:
        await eventually(lambda: sorted(told) == [ROOM3, ROOM4], what="both rooms told")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()
    assert room4_saw_it == [True], "ROOM3's subscription was told only once ROOM4 had subscribed too"


async def test_a_hub_graph_cannot_reach_leaves_the_rooms_polling_with_one_log_line(
        online: Any, hub: Inbox) -> None:
    hub.base = f"https://127.0.0.1:{free_port()}"  # Graph's validation of these URLs fails
    with capture_logs() as logs:
        gw = await online(poll_interval=1.0)
        await eventually(lambda: gw.ews.control("GET", "/graph/subscriptions")[1]["validations"] >= 2,
                         what="both rooms' subscriptions tried")
        uid = meeting(gw.ews, ROOM3, "Found by polling")
        await eventually(lambda: created(gw, ROOM3, uid), timeout=20, what="the meeting found by polling")
    assert subscriptions(gw.ews) == [] and await gw.metric("gateway_graph_rooms", mode="polling") == 2
    await eventually(lambda: gw.state(ROOM3) == gw.state(ROOM4) == "polling", what="the rooms say they are polled")
    failed = [e for e in logs if e["event"] == "graph.subscribe_failed"]
    assert len(failed) == 1 and "validation" in failed[0]["reason"].lower()


async def test_a_flood_of_genuine_pokes_costs_one_delta_at_once_and_one_when_the_interval_ends() -> None:
    from gateway.sources.graph.feed import GraphFeed

    now = [100.0]
    feed = GraphFeed(None, None, poll_interval=3600, min_poke_interval=0.2, clock=lambda: now[0])  # type: ignore[arg-type]
    marks: list[tuple[str, float]] = []
    feed._mark = lambda room, why: marks.append((room, now[0]))  # type: ignore[method-assign]
    for _ in range(100):  # a hundred pokes for one room within the interval (Graph's, or replayed ones)
        feed._poked(ROOM3)
    assert marks == [(ROOM3, 100.0)]  # the first at once, the rest folded into one trailing delta
    now[0] = 100.2
    await eventually(lambda: len(marks) == 2, what="the trailing delta")
    assert marks[1] == (ROOM3, 100.2)
    feed._poked(ROOM4)  # another room is not held back by the first
    assert marks[-1] == (ROOM4, 100.2)


async def test_polled_rooms_are_polled_each_in_its_turn_once_per_interval_not_all_at_once() -> None:
    """Delta polling spreads the rooms over the interval: a delta of every room at the same moment is a burst that
    queues behind itself (and behind an import); each room is still polled once per interval."""
    from gateway.sources.graph.feed import GraphFeed

    now = [0.0]
    rooms = [f"room{i}@contoso.com" for i in range(10)]
    feed = GraphFeed(None, None, poll_interval=10.0, clock=lambda: now[0])  # type: ignore[arg-type]
    polls: list[tuple[str, float]] = []

    def dirty(room: str, why: str) -> None:
        if why == "poll":
            polls.append((room, now[0]))
    task = asyncio.create_task(feed.watch(rooms, dirty))
    try:
        await eventually(lambda: feed.rooms, what="the feed watching")  # its clock read at 0
        for second in range(1, 21):  # two intervals, a second at a time
            now[0] = float(second)
            feed._wake.set()
            await eventually(lambda n=second: len(polls) >= n, what=f"the room due at {second} s polled")
        assert len(polls) == 20, polls
        assert sorted(t for _, t in polls[:10]) == [float(s) for s in range(1, 11)], "one room a second"
        assert collections.Counter(room for room, _ in polls) == dict.fromkeys(rooms, 2), "each once per interval"
        assert all(t2 - t1 == 10.0 for room in rooms
                   for t1, t2 in [[t for r, t in polls if r == room]]), "each in its own turn"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
