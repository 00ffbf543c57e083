"""The application skeleton (gateway/app.py): sources built through the registry and each room routed to its own,
parts started in order and released when one fails, readiness derived from the parts' states. In-memory sources,
built by the same factory as EWS ones, keep these tests free of waiting for a network; one test runs over EWS."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway import service
from gateway.app import COORDINATOR, GATEWAY, STORE, Gateway, GatewayOptions, init_app, start_gateway, stop_gateway
from gateway.config import RelayConfig
from gateway.errors import AuthError, ConfigError, Unavailable, Unreachable
from gateway.model import EVENT_TYPES
from gateway.observability.metrics import Metrics
from gateway.ports import FeedSettings, OpenedSource, SourceSpec
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.sources.ews.source import EwsSettings, EwsSource
from gateway.sources.memory import MemoryKind, MemorySource
from gateway.sources.registry import SourceRegistry, default_registry
from gateway.store.apikeys import ApiKeys
from gateway.store.sqlite import SqliteStore
from gateway.sync.coordinator import SyncSettings
from tests.conftest import SimFixture, eventually, free_port

NOW = datetime(2030, 1, 7, 8, tzinfo=UTC)
ROOM1, ROOM2, ROOM3, ROOM4 = (f"room{i}@contoso.com" for i in range(1, 5))
CREATED = EVENT_TYPES["created"]
FAST = SyncSettings(debounce_seconds=0.0, retry_seconds=0.05, auth_retry_seconds=0.2)


def organisation(*rooms: str) -> MemorySource:
    source = MemorySource(now=NOW)
    for room in rooms:
        source.add_room(room, room.split("@")[0].title())
    source.add_person("alice@contoso.com")
    return source


def recording() -> tuple[SourceRegistry, list[str]]:
    """The registry with a memory kind that notes which sources it opened and closed, in order."""
    events: list[str] = []

    class Recording(MemoryKind):
        def open(self, spec: SourceSpec, feed: FeedSettings) -> OpenedSource:
            opened = super().open(spec, feed)
            events.append(f"open {spec.name}")
            close = opened.close

            async def closing() -> None:
                events.append(f"close {spec.name}")
                await close()
            opened.close = closing
            return opened

    return default_registry().with_kind("memory", Recording), events


def options(tmp_path: Path, *sources: SourceSpec, **kw: Any) -> GatewayOptions:
    return GatewayOptions(sources=sources, sync=FAST, store_path=tmp_path / "gateway.sqlite", feed="streaming",
                          clock=lambda: NOW, **kw)


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Any]:
    """Start a gateway from options; the client sends an API key with the read scope."""
    async def start(opts: GatewayOptions) -> Any:
        store = SqliteStore(opts.store_path)
        try:
            key = ApiKeys(store).create("tests", ["read"])
        finally:
            store.close()
        return await aiohttp_client(init_app(opts), headers={"Authorization": f"Bearer {key}"})
    yield start


# -- routing ---------------------------------------------------------------------------------------------------------
async def test_each_room_is_synced_from_the_source_that_owns_it(client: Any, tmp_path: Path) -> None:
    hq, annex = organisation(ROOM1, ROOM2), organisation(ROOM3, ROOM4)
    annex.add_room_list("rooms-annex@contoso.com", [ROOM3, ROOM4])
    hq_meeting = hq.book("alice@contoso.com", [ROOM1], NOW + timedelta(hours=2), NOW + timedelta(hours=3), "HQ")
    annex_meeting = annex.book("alice@contoso.com", [ROOM4], NOW + timedelta(hours=2), NOW + timedelta(hours=3),
                               "Annex")
    c = await client(options(tmp_path, SourceSpec("hq", "memory", hq, rooms=(ROOM1, ROOM2)),
                             SourceSpec("annex", "memory", annex, room_lists=("rooms-annex@contoso.com",))))
    gw: Gateway = c.app[GATEWAY]
    assert gw.rooms == [ROOM1, ROOM2, ROOM3, ROOM4]
    assert {name: s.rooms for name, s in gw.sources.items()} == {"hq": [ROOM1, ROOM2], "annex": [ROOM3, ROOM4]}

    def created() -> dict[str, str]:
        return {e.event.room: e.event.data["uid"] for e in gw.store.outbox_after(0, 1000) if e.event.type == CREATED}
    await eventually(lambda: len(created()) == 2, what="both meetings imported")
    assert created() == {ROOM1: hq_meeting, ROOM4: annex_meeting}
    # each room asked its own source (a room never imported is verified by its import's first changes call)
    assert hq.calls["changes"] >= 2 and annex.calls["changes"] >= 2
    assert hq.calls["verify"] == annex.calls["verify"] == 0

    # A change in one source reaches its room by that source's feed.
    later = annex.book("alice@contoso.com", [ROOM3], NOW + timedelta(hours=5), NOW + timedelta(hours=6), "Later")
    await eventually(lambda: created().get(ROOM3) == later, what="the change through the annex source's feed")


async def test_a_room_that_two_sources_list_stops_the_start_and_says_so(tmp_path: Path) -> None:
    hq, annex = organisation(ROOM1, ROOM2), organisation(ROOM2, ROOM3)
    annex.add_room_list("everything@contoso.com", [ROOM2, ROOM3])
    with pytest.raises(ConfigError) as e:
        await start_gateway(options(tmp_path, SourceSpec("hq", "memory", hq, rooms=(ROOM1, ROOM2)),
                                    SourceSpec("annex", "memory", annex, room_lists=("everything@contoso.com",))))
    assert e.value.key == "room_in_two_sources" and "source annex did not start" in str(e.value)
    assert f"the room {ROOM2} belongs to source 'hq' and to source 'annex'" in str(e.value)


# -- a failed start -----------------------------------------------------------------------------------------------
async def test_a_source_that_fails_to_start_releases_what_had_started(tmp_path: Path) -> None:
    registry, events = recording()
    hq, annex = organisation(ROOM1), organisation(ROOM2)
    annex.add_room_list("rooms-annex@contoso.com", [ROOM2])
    annex.fail(Unavailable("the directory did not answer"), times=None)
    app = init_app(options(tmp_path, SourceSpec("hq", "memory", hq, rooms=(ROOM1,)),
                           SourceSpec("annex", "memory", annex, room_lists=("rooms-annex@contoso.com",))),
                   registry=registry)
    port = free_port()
    with capture_logs() as logs, pytest.raises(Unavailable) as e:
        await service.serve(app, "127.0.0.1", port)
    assert str(e.value).startswith("source annex did not start: the directory did not answer")
    assert [(entry["part"], entry["key"]) for entry in logs if entry["event"] == "gateway.start_failed"] == [
        ("source annex", "cannot_connect")]
    assert events == ["open hq", "open annex", "close annex", "close hq"]
    assert app[STORE]._closed and not (tmp_path / "gateway.sqlite-wal").exists()
    with socket.socket() as s:  # nothing listens
        s.bind(("127.0.0.1", port))


async def test_a_tunnel_that_fails_to_start_releases_the_rooms_sources_and_store(tmp_path: Path) -> None:
    registry, events = recording()
    hq = organisation(ROOM1, ROOM2)
    relay = RelayConfig(enabled=True, hub_url="wss://hub.example/v1/tunnel")
    app = init_app(options(tmp_path, SourceSpec("hq", "memory", hq, rooms=(ROOM1, ROOM2)), relay=relay),
                   registry=registry)
    port = free_port()
    with pytest.raises(ConfigError) as e:  # relay.enabled without an enrolled identity
        await service.serve(app, "127.0.0.1", port)
    assert e.value.key == "not_enrolled" and str(e.value).startswith("the tunnel did not start: ")
    workers = app[COORDINATOR].workers
    assert sorted(workers) == [ROOM1, ROOM2] and all(w.task is not None and w.task.done() for w in workers.values())
    assert hq._watchers == []  # its feed was stopped
    assert events == ["open hq", "close hq"]
    assert app[STORE]._closed and not (tmp_path / "gateway.sqlite-wal").exists()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# -- readiness ----------------------------------------------------------------------------------------------------
async def test_a_gateway_that_owns_no_rooms_is_ready(client: Any, tmp_path: Path) -> None:
    c = await client(options(tmp_path))
    resp = await c.get("/readyz")
    assert resp.status == 200 and await resp.json() == {"ready": True, "reasons": []}
    c = await client(options(tmp_path / "2", SourceSpec("hq", "memory", organisation())))
    assert (await c.get("/readyz")).status == 200


async def test_a_broken_room_is_not_a_broken_gateway_but_a_source_without_a_room_in_sync_is(
        client: Any, tmp_path: Path) -> None:
    hq, annex = organisation(ROOM1), organisation(ROOM3)
    annex.fail(AuthError("Exchange refused the service account"), times=None)
    # ROOM2 has no mailbox in hq: a broken room beside a good one.
    c = await client(options(tmp_path, SourceSpec("hq", "memory", hq, rooms=(ROOM1, ROOM2)),
                             SourceSpec("annex", "memory", annex, rooms=(ROOM3,))))
    workers = c.app[GATEWAY].coordinator.workers
    await eventually(lambda: (workers[ROOM1].state, workers[ROOM2].state, workers[ROOM3].state) == (
        "verified", "mailbox_not_found", "auth_required"), what="the rooms' states")
    ready: list[Any] = []

    async def readyz(status: int, reasons: list[str]) -> bool:  # a room may be between "verified" and its sync's
        resp = await c.get("/readyz")                              # end: ask until it settles
        ready[:] = [resp.status, await resp.json()]
        return ready == [status, {"ready": status == 200, "reasons": reasons}]

    annex_down = ["source annex: no room in sync yet (auth_required 1)"]
    await eventually(lambda: readyz(503, annex_down), what=f"/readyz 503 {annex_down}")

    annex.heal()  # the password is fixed: the annex's room syncs again, and the gateway is ready
    await eventually(lambda: workers[ROOM3].state == "verified", what="the annex room verified")
    await eventually(lambda: readyz(200, []), what="/readyz 200 once the annex room is in sync")
    assert workers[ROOM2].state == "mailbox_not_found"


async def test_a_failure_every_room_of_one_source_shares_is_that_sources_outage_alone(client: Any,
                                                                                        tmp_path: Path) -> None:
    hq, annex = organisation(ROOM1), organisation(ROOM3)
    annex.fail(Unreachable("the annex's Exchange refused the connection"), times=None)
    # ROOM2 has no mailbox in hq: hq answers about it again and again (every retry), while the annex stays away.
    with capture_logs() as logs:
        c = await client(options(tmp_path, SourceSpec("hq", "memory", hq, rooms=(ROOM1, ROOM2)),
                                 SourceSpec("annex", "memory", annex, rooms=(ROOM3,))))
        workers = c.app[GATEWAY].coordinator.workers
        await eventually(lambda: (workers[ROOM1].state, workers[ROOM3].state) == ("verified", "cannot_connect"),
                         what="hq in sync, the annex unreachable")
        await eventually(lambda: hq.calls["changes"] >= 6, what="hq answering about ROOM2 several times")
        assert not [e for e in logs if e["event"] == "exchange.outage_ended"]  # hq's answers end no annex outage
        annex.heal()
        await eventually(lambda: workers[ROOM3].state == "verified", what="the annex back")
    started = [e for e in logs if e["event"] == "exchange.outage_started"]
    assert [(e["source"], e["key"]) for e in started] == [("annex", "cannot_connect")]
    assert [e["source"] for e in logs if e["event"] == "exchange.outage_ended"] == ["annex"]


# -- the EWS kind's metrics ----------------------------------------------------------------------------------------
async def test_each_ews_source_counts_its_own_requests_on_the_registry_it_was_given(ews: SimFixture,
                                                                                    tmp_path: Path) -> None:
    settings = EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{SERVICE_ACCOUNT}", max_workers=2)
    metrics = Metrics()
    gw = await start_gateway(GatewayOptions(ews=settings, password=SERVICE_PASSWORD, rooms=(ROOM1,), sync=FAST,
                                            store_path=tmp_path / "gateway.sqlite", feed="poll"), metrics)
    other = EwsSource(settings, SERVICE_PASSWORD)  # another source in the same process
    try:
        def requests(operation: str) -> float:
            return sum(s.value for f in metrics.registry.collect() if f.name == "gateway_ews_requests"
                       for s in f.samples if s.name == "gateway_ews_requests_total" and s.labels["operation"] ==
                       operation)
        await eventually(lambda: requests("SyncFolderItems") >= 1 and requests("FindItem") >= 1,
                         what="the import counted")
        await eventually(lambda: gw.coordinator.workers[ROOM1].last_success is not None, what="the import done")
        counted = requests("GetFolder")
        for _ in range(3):
            await other.verify(ROOM2)  # a GetFolder or two each
        assert other.calls.counts[("GetFolder", "NoError")] >= 3
        assert requests("GetFolder") == counted  # the gateway's registry counts the gateway's requests only
    finally:
        await other.close()
        await stop_gateway(gw)
