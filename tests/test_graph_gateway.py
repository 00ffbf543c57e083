"""A gateway with a hybrid estate: an on-premise source (EWS) and an Exchange Online source (Graph, msal over HTTPS)
against one simulated organisation, no relay (so the Graph rooms are polled). One stream, one meeting id, the same
booking ids on both sides; an expired delta token, a throttling storm, an access policy and an expired secret each
lead where they should."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.app import GatewayOptions, init_app
from gateway.model import EVENT_TYPES, booking_id_for, meeting_id_for
from gateway.ports import SourceSpec
from gateway.simulator.control import Control
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from gateway.sources.ews.source import EwsSettings
from gateway.sources.graph.settings import GraphSettings
from gateway.sync.coordinator import SyncSettings
from tests.conftest import GraphSim, eventually
from tests.graph_stub import SECRET, Stub, serve_stub
from tests.graph_stub import settings as stub_settings
from tests.running_gateway import CREATED, Gw, api_key

pytestmark = pytest.mark.e2e

ROOM1, ROOM2, ROOM3, ROOM4 = (f"room{i}@contoso.com" for i in range(1, 5))  # 1, 2 on premises; 3, 4 online
ALICE, CAROL = "alice@contoso.com", "carol@contoso.com"  # alice on premises, carol online


def soon(hours: float = 26) -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=hours)


def graph_settings(g: GraphSim, **kw: Any) -> GraphSettings:
    return GraphSettings(tenant_id=g.tenant_id, client_id=g.client_id, credential="client_secret",
                         authority_host=g.authority.rsplit("/", 1)[0], graph_url=g.graph_url, ca_bundle=g.ca_bundle,
                         poll_interval_seconds=0.5, outage_retry_seconds=0.2, outage_max_retry_seconds=0.5,
                         auth_retry_seconds=1.0, auth_max_retry_seconds=1.0, back_off=0.1, **kw)


@pytest.fixture
async def hybrid(graph_sim_factory: Any, tmp_path: Path, aiohttp_client: Any,
                 ) -> AsyncIterator[Callable[..., Any]]:
    async def start(before: Callable[[GraphSim], None] = lambda g: None, **kw: Any) -> Gw:
        g = graph_sim_factory(SimulatorConfig(rba_delay=0.05))
        before(g)
        store = tmp_path / "gateway.sqlite"
        options = GatewayOptions(
            sources=(SourceSpec("onprem", "ews", EwsSettings(ews_url=g.ews_url,
                                                             username=f"CONTOSO\\{SERVICE_ACCOUNT}", max_workers=4),
                                SERVICE_PASSWORD, rooms=(ROOM1, ROOM2)),
                     SourceSpec("online", "graph", graph_settings(g, **kw), g.client_secret, rooms=(ROOM3, ROOM4))),
            sync=SyncSettings(debounce_seconds=0.1, retry_seconds=0.3, auth_retry_seconds=1.0),
            store_path=store, feed="streaming", stream_timeout_minutes=1, feed_retry_seconds=0.3)
        return Gw(g, await aiohttp_client(init_app(options), headers=api_key(store)))
    yield start


def meeting(g: GraphSim, organizer: str, rooms: list[str], subject: str, start: datetime) -> str:
    uid = g.call(lambda: Control.of(g.sim).create_meeting(organizer=organizer, rooms=rooms, subject=subject,
                                                         start=start, end=start + timedelta(minutes=30)).uid)
    assert g.call(lambda: Control.of(g.sim).settle()), "the booking attendant never answered"
    return str(uid)


def created(gw: Gw, room: str, uid: str) -> list[Any]:
    return [e for e in gw.events(room, CREATED) if e.data["uid"] == uid]


async def test_a_hybrid_meeting_is_one_meeting_with_the_same_booking_ids_on_both_sides(hybrid: Any) -> None:
    gw = await hybrid()
    await eventually(lambda: gw.imported(ROOM1, ROOM2, ROOM3, ROOM4), what="every room imported")
    uid = meeting(gw.ews, ALICE, [ROOM1, ROOM3], "Across the estate", soon())
    await eventually(lambda: created(gw, ROOM1, uid) and created(gw, ROOM3, uid), timeout=30,
                     what="the meeting in both rooms")
    [onprem], [online] = created(gw, ROOM1, uid), created(gw, ROOM3, uid)
    assert onprem.data["meeting_id"] == online.data["meeting_id"] == meeting_id_for(uid)
    assert (onprem.data["id"], online.data["id"]) == (booking_id_for(ROOM1, uid, None),
                                                      booking_id_for(ROOM3, uid, None))
    assert (onprem.data["start"], onprem.data["end"]) == (online.data["start"], online.data["end"])
    # ... and organised online, booked on premises, the same.
    other = meeting(gw.ews, CAROL, [ROOM2, ROOM4], "The other way round", soon(28))
    await eventually(lambda: created(gw, ROOM2, other) and created(gw, ROOM4, other), timeout=30,
                     what="the online organiser's meeting in both rooms")
    rooms = await gw.rooms()
    assert all(rooms[r]["state"] == "verified" for r in (ROOM1, ROOM2, ROOM3, ROOM4))
    for room, source in ((ROOM1, "onprem"), (ROOM2, "onprem"), (ROOM3, "online"), (ROOM4, "online")):
        assert await gw.metric("gateway_room_source_info", room=room, source=source) == 1


async def test_without_a_relay_the_online_rooms_are_polled_and_say_so(hybrid: Any) -> None:
    gw = await hybrid()
    await eventually(lambda: gw.imported(ROOM3, ROOM4), what="the online rooms imported")
    uid = meeting(gw.ews, CAROL, [ROOM4], "Polled", soon())
    await eventually(lambda: created(gw, ROOM4, uid), timeout=20, what="the meeting found by polling")
    assert await gw.metric("gateway_graph_rooms", mode="polling") == 2
    assert await gw.metric("gateway_graph_rooms", mode="notifications") == 0
    assert gw.state(ROOM3) == gw.state(ROOM4) == "verified"  # no relay: polling is how these rooms work


async def test_an_expired_delta_token_means_a_fresh_import_never_silence(hybrid: Any) -> None:
    gw = await hybrid()
    await eventually(lambda: gw.imported(ROOM3), what="room3 imported")
    with capture_logs() as logs:
        status, body = gw.ews.control("POST", "/graph/delta/expire", {"mailbox": ROOM3})
        assert status == 200 and body["expired"] >= 1
        uid = meeting(gw.ews, CAROL, [ROOM3], "After the token expired", soon())
        await eventually(lambda: created(gw, ROOM3, uid), timeout=20, what="the meeting after a fresh import")
    assert any(e["event"] == "sync.state_invalid" and e.get("room") == ROOM3 for e in logs)


async def test_a_throttling_storm_is_waited_out(hybrid: Any) -> None:
    gw = await hybrid()
    await eventually(lambda: gw.imported(ROOM3, ROOM4), what="the online rooms imported")
    status, _ = gw.ews.control("POST", "/graph/throttle", {"seconds": 3, "retry_after": 1})
    assert status == 200
    uid = meeting(gw.ews, CAROL, [ROOM3, ROOM4], "During the storm", soon())
    await eventually(lambda: created(gw, ROOM3, uid) and created(gw, ROOM4, uid), timeout=30,
                     what="the meeting after the storm")
    _, state = gw.ews.control("GET", "/graph")
    assert state["throttled"] > 0  # the storm did meet the gateway's requests
    assert await gw.metric("gateway_graph_throttled_total") > 0


async def test_a_room_an_access_policy_keeps_out_says_so_next_to_healthy_ones(hybrid: Any) -> None:
    def policy(g: GraphSim) -> None:
        status, _ = g.control("PUT", "/graph/access-policy", {"mailboxes": [ROOM3]})
        assert status == 200
    gw = await hybrid(policy)
    await eventually(lambda: gw.imported(ROOM3), what="room3 imported")
    await eventually(lambda: gw.state(ROOM4) == "impersonation_denied", what="room4 refused")
    rooms = await gw.rooms()
    assert "access policy" in rooms[ROOM4]["reason"] and "New-ApplicationAccessPolicy" in rooms[ROOM4]["remedy"]
    uid = meeting(gw.ews, CAROL, [ROOM3], "Still synced", soon())
    await eventually(lambda: created(gw, ROOM3, uid), timeout=20, what="room3 still syncs")


async def test_an_expired_client_secret_is_auth_required_and_logged_once(hybrid: Any) -> None:
    def expire(g: GraphSim) -> None:
        status, _ = g.control("POST", "/graph/credentials", {"secret_expired": True})
        assert status == 200
    with capture_logs() as logs:
        gw = await hybrid(expire)
        await eventually(lambda: gw.state(ROOM3) == "auth_required" and gw.state(ROOM4) == "auth_required",
                         what="the online rooms auth_required")
        await eventually(lambda: gw.imported(ROOM1, ROOM2), what="the on-premise rooms unaffected")
    assert [e["event"] for e in logs].count("graph.auth_refused") == 1
    assert gw.ews.client_secret not in repr(logs)
    rooms = await gw.rooms()
    assert "expired" in rooms[ROOM3]["reason"] and "gateway credentials set" in rooms[ROOM3]["remedy"]
    assert "Entra ID" in rooms[ROOM3]["remedy"] or "app registration" in rooms[ROOM3]["remedy"]


async def test_a_change_costs_at_most_three_graph_calls(graph_sim_factory: Any) -> None:
    """What the coordinator asks of a Graph source for one change, counted: a delta page, the new meeting's global
    object id, and a read of a series' instances (a single meeting is complete in its delta entry)."""
    from gateway.model import Window
    from gateway.sources.graph.auth import TokenSource
    from gateway.sources.graph.client import GraphClient
    from gateway.sources.graph.source import GraphSource

    g = graph_sim_factory(SimulatorConfig(rba_delay=0.05))
    calls: list[str] = []
    settings = graph_settings(g)
    source = GraphSource(settings, GraphClient(settings, TokenSource(settings, g.client_secret),
                                               on_call=lambda operation, status: calls.append(operation)))
    window = Window(soon(-48), soon(24 * 60))
    state: str | None = None

    async def sync() -> set[str]:
        nonlocal state
        changed: set[str] = set()
        while True:
            page = await source.changes(ROOM3, state)
            state = page.sync_state
            changed |= page.changed_uids
            if page.changed_uids - page.complete_uids:
                await source.read_meetings(ROOM3, window, frozenset(page.changed_uids - page.complete_uids))
            if not page.more:
                return changed
    try:
        await sync()
        await source.read_window(ROOM3, window)
        for what, organised in (("a new meeting", lambda: meeting(g, CAROL, [ROOM3], "New", soon())),
                                ("a new series", lambda: str(g.call(lambda: Control.of(g.sim).create_meeting(
                                    organizer=CAROL, rooms=[ROOM3], subject="Weekly", start=soon(30),
                                    end=soon(30) + timedelta(minutes=30),
                                    recurrence={"pattern": "weekly", "count": 4}).uid)))):
            uid = organised()
            assert g.call(lambda: Control.of(g.sim).settle())
            calls.clear()
            assert uid in await sync()
            assert len(calls) <= 3, (what, calls)
        # Three new meetings in one page: their global object ids in one $batch, their bookings in the page.
        several = [meeting(g, CAROL, [ROOM3], f"One of three {k}", soon(40 + k)) for k in range(3)]
        calls.clear()
        assert set(several) <= await sync()
        assert sorted(calls) == ["batch:getEvent", "delta"], calls
        calls.clear()
        g.call(lambda: Control.of(g.sim).move(uid, soon(31), soon(31) + timedelta(minutes=30),
                                              occurrence=soon(30) + timedelta(weeks=1)))
        assert g.call(lambda: Control.of(g.sim).settle())
        assert uid in await sync()
        assert len(calls) <= 3, ("a moved occurrence", calls)
    finally:
        await source.close()


async def test_an_import_reads_each_event_once_the_delta_round_then_only_the_global_object_ids(
        graph_sim_factory: Any) -> None:
    """An import walks the delta round (for its token) and then reads the window: that read takes the events from
    the round just walked and asks calendarView only for their global object ids (no event crosses the wire twice),
    and gives the bookings a full read gives. A later read of the window (a reconcile) reads it afresh."""
    from gateway.model import Window
    from gateway.sources.graph.auth import TokenSource
    from gateway.sources.graph.client import GraphClient
    from gateway.sources.graph.source import GraphSource

    g = graph_sim_factory(SimulatorConfig(rba_delay=0.05))
    inside = {meeting(g, CAROL, [ROOM3], "A single", soon()),
              str(g.call(lambda: Control.of(g.sim).create_meeting(
                  organizer=CAROL, rooms=[ROOM3], subject="Weekly", start=soon(30),
                  end=soon(30) + timedelta(minutes=30), recurrence={"pattern": "weekly", "count": 4}).uid)),
              str(g.call(lambda: Control.of(g.sim).create_meeting(
                  organizer=CAROL, rooms=[ROOM3], subject="All day", start=soon(72), end=soon(72), all_day=True,
                  tz="America/New_York").uid))}
    # A meeting outside the window read, inside the delta token's: in the round, not in the import.
    later = meeting(g, CAROL, [ROOM3], "Later", soon(24 * 90))
    assert g.call(lambda: Control.of(g.sim).settle())
    calls: list[str] = []
    settings = graph_settings(g, page_size=2)
    source = GraphSource(settings, GraphClient(settings, TokenSource(settings, g.client_secret),
                                               on_call=lambda operation, status: calls.append(operation)))
    fresh = GraphSource(settings, GraphClient(settings, TokenSource(settings, g.client_secret)))
    window = Window(soon(-48), soon(24 * 60))
    try:
        state: str | None = None
        while True:
            page = await source.changes(ROOM3, state, detailed=False)
            state = page.sync_state
            if not page.more:
                break
        assert set(calls) == {"delta"} and len(calls) > 2, calls
        calls.clear()
        imported = await source.read_window(ROOM3, window)
        assert calls and set(calls) == {"calendarViewIds"}, calls
        full = await fresh.read_window(ROOM3, window)
        assert {b.uid for b in full} >= inside and later not in {b.uid for b in full}
        assert sorted(imported, key=lambda b: b.id) == sorted(full, key=lambda b: b.id)
        calls.clear()
        again = await source.read_window(ROOM3, window)
        assert set(calls) == {"calendarView"}, calls
        assert sorted(again, key=lambda b: b.id) == sorted(full, key=lambda b: b.id)
    finally:
        await source.close()
        await fresh.close()


async def test_a_meeting_there_before_the_import_is_seen_cancelled_without_waiting_for_a_reconcile(
        hybrid: Any) -> None:
    """An import takes the delta token without reading each event's global object id; a later removal of one of
    its instances still names its meeting (from the window's read), so the cancellation is published at once."""
    start = soon(50)
    single: list[str] = []
    series: list[str] = []

    def existing(g: GraphSim) -> None:
        single.append(meeting(g, CAROL, [ROOM3], "Was there first", start))
        series.append(str(g.call(lambda: Control.of(g.sim).create_meeting(
            organizer=CAROL, rooms=[ROOM3], subject="Weekly, there first", start=start + timedelta(hours=2),
            end=start + timedelta(hours=2, minutes=30), recurrence={"pattern": "weekly", "count": 3}).uid)))
        assert g.call(lambda: Control.of(g.sim).settle())
    gw = await hybrid(existing)
    await eventually(lambda: gw.imported(ROOM3), what="room3 imported")
    assert created(gw, ROOM3, single[0]) and len(created(gw, ROOM3, series[0])) == 3

    def live(uid: str) -> set[str]:
        ids: set[str] = set()
        for e in gw.events(ROOM3):
            if e.data.get("uid") == uid:
                (ids.discard if e.type == EVENT_TYPES["deleted"] or e.data.get("cancelled") else ids.add)(
                    e.data["id"])
        return ids
    gw.ews.call(lambda: Control.of(gw.ews.sim).cancel(single[0]))
    gw.ews.call(lambda: Control.of(gw.ews.sim).cancel(series[0], occurrence=start + timedelta(hours=2, weeks=1)))
    await eventually(lambda: not live(single[0]) and len(live(series[0])) == 2, timeout=20,
                     what="the cancellations published by the next delta (polled every 0.5 s)")


@pytest.fixture
async def stub(pki: Any) -> AsyncIterator[Stub]:
    async for s in serve_stub(pki):
        yield s


async def test_graph_and_its_token_endpoint_are_reached_through_the_environments_proxy(
        stub: Stub, pki: Any, http_proxy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = http_proxy.url.replace("http://", f"http://{http_proxy.username}:{http_proxy.password}@")
    monkeypatch.setenv("HTTPS_PROXY", proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    from gateway.sources.graph.auth import TokenSource
    from gateway.sources.graph.client import GraphClient

    s = stub_settings(stub, pki)
    c = GraphClient(s, TokenSource(s, SECRET))
    try:
        await c.call("GET", c.user(ROOM1) + "/calendar", mailbox=ROOM1, operation="getCalendar")
    finally:
        await c.close()
    assert stub.token_requests == 1 and len(stub.seen) == 1
    assert http_proxy.connects(stub.base.removeprefix("https://")) >= 2  # msal's requests and the Graph call


async def test_a_room_throttled_past_its_retries_says_so_and_comes_back(hybrid: Any) -> None:
    gw = await hybrid(max_retry_after=0.5)  # a Retry-After longer than this is the room's to wait, not the request's
    await eventually(lambda: gw.imported(ROOM3, ROOM4), what="the online rooms imported")
    status, _ = gw.ews.control("POST", "/graph/throttle", {"seconds": 3, "retry_after": 2})
    assert status == 200
    async def throttled() -> bool:
        row = (await gw.rooms())[ROOM3]
        return row["state"] == "throttled" and "another app may share" in row["remedy"]
    await eventually(throttled, what="room3 throttled, with its remedy (it is polled every 0.5 s)")
    assert gw.state(ROOM1) == "verified"  # the other side is not held up
    uid = meeting(gw.ews, CAROL, [ROOM3], "After the throttling", soon())
    await eventually(lambda: created(gw, ROOM3, uid), timeout=30, what="the meeting after the storm")
    await eventually(lambda: gw.state(ROOM3) == "verified", what="room3 verified again")
