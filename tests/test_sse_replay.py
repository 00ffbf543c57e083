"""The event streams (SSE) of the local API and of the hub, over real sockets: where a client may resume from (an id
past the end means the server's store was reset or restored, and both servers say so the same way), and replay in
small pages, so many clients catching up at once hold little memory (scripts/sse_replay_rss.py measures it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from gateway import api as api_module
from gateway.api import Api, EventHub
from gateway.hub import server as hub_module
from gateway.model import EVENT_TYPES, Booking, Event, Room, to_json
from gateway.observability.metrics import Metrics
from gateway.relay import protocol
from gateway.store.apikeys import ApiKeys
from gateway.store.sqlite import SqliteStore
from tests.fake_gateway import Link, cloud_event, items
from tests.hub_fixtures import Hub, Vendor

ROOM = "room1@contoso.com"
T0 = datetime(2031, 3, 10, 8, 0, tzinfo=UTC)
THIRTY_DIGITS = "1" * 30


def fill(store: SqliteStore, n: int) -> int:
    """``n`` more booking events in one room, written as sync steps write them; the last seq."""
    last = done = store.last_seq()
    for first in range(done, done + n, 100):
        bookings = [Booking(room=ROOM, uid=f"uid-{i}", start=T0 + timedelta(minutes=i),
                            end=T0 + timedelta(minutes=i + 30), subject=f"Meeting {i}")
                    for i in range(first, min(done + n, first + 100))]
        entries = store.commit_sync(ROOM, upserts=bookings, deletes=(), events=[
            Event(id=f"ev-{b.uid}", type=EVENT_TYPES["created"], room=ROOM, subject=b.id, time=T0, data=to_json(b))
            for b in bookings])
        last = entries[-1].seq
    return last


async def read_ids(resp: aiohttp.ClientResponse, until: int) -> list[int]:
    """The ids of a stream's events until ``until`` arrived."""
    ids: list[int] = []
    async with asyncio.timeout(20):
        while not ids or ids[-1] < until:
            line = (await resp.content.readline()).decode()
            if line.startswith("id: "):
                ids.append(int(line[4:]))
    return ids


# -- the local API -------------------------------------------------------------------------------------------------
class Local:
    def __init__(self, client: Any, store: SqliteStore, auth: dict[str, str]) -> None:
        self.client, self.store, self.auth = client, store, auth

    def get(self, last_event_id: str | None = None, query: str = "") -> Any:
        headers = dict(self.auth)
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        return self.client.get("/v1/events" + query, headers=headers)


@pytest.fixture
def local(tmp_path: Path, aiohttp_client: Any) -> Callable[..., Any]:
    opened: list[tuple[Api, SqliteStore]] = []

    async def start(name: str = "g.sqlite") -> Local:
        store = SqliteStore(tmp_path / name)
        store.upsert_room(Room(ROOM, state="verified"))
        keys = ApiKeys(store)
        api = Api(store, Metrics(), EventHub(), room_states=lambda: {}, ready=lambda: True, keys=keys)
        opened.append((api, store))
        client = await aiohttp_client(api.app())
        return Local(client, store, {"Authorization": f"Bearer {keys.create('reader', ['read'])}"})

    yield start
    for api, store in opened:
        api.close()
        store.close()


async def test_the_local_stream_refuses_a_resume_point_past_its_end(local) -> None:
    gw = await local()
    last = fill(gw.store, 5)
    async with gw.get(str(last)) as resp:  # the last id itself: nothing missed, the stream opens
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    async with gw.get(str(last + 1)) as resp:
        assert resp.status == 409 and resp.headers["Content-Type"].startswith("application/problem+json")
        doc = await resp.json()
    assert doc["error"] == "last_event_id_ahead" and doc["last_event_id"] == last
    assert f"Last-Event-ID {last + 1} is beyond the last event of this stream ({last})" in doc["message"]
    async with gw.get(query=f"?after={last + 100}") as resp:
        assert resp.status == 409

    # the gateway's store was reset (a new data volume): the client's position belongs to the old one
    reset = await local("reset.sqlite")
    fill(reset.store, 2)
    async with reset.get(str(last)) as resp:
        assert resp.status == 409 and (await resp.json())["last_event_id"] == 2
    fill(reset.store, 1)
    async with reset.get("2") as resp:
        assert await read_ids(resp, 3) == [3]

    # pruned events keep their ids: resuming from one still works
    gw.store.prune(timedelta(0), acked_only=False)
    async with gw.get(str(last)) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("value", [THIRTY_DIGITS, "x", "-1", "1.5", "\u0663", str(protocol.MAX_SEQ + 1)])
async def test_a_malformed_last_event_id_is_a_400_naming_it(local, value: str) -> None:
    gw = await local()
    fill(gw.store, 1)
    answers = []
    if value.isascii():
        async with gw.get(value) as resp:
            answers.append((resp.status, await resp.json()))
    async with gw.get(query=f"?after={quote(value)}") as resp:
        answers.append((resp.status, await resp.json()))
    for status, doc in answers:
        assert (status, doc["error"]) == (400, "invalid_last_event_id")
        assert "Last-Event-ID (or ?after=) must be the id of an event" in doc["message"]


async def test_local_replay_reads_the_outbox_in_small_pages(local, monkeypatch) -> None:
    gw = await local()
    last = fill(gw.store, 515)
    reads: list[tuple[int, int]] = []  # (limit asked for, rows materialised)
    real = gw.store.outbox_texts_after

    def spy(seq: int, limit: int = 500) -> Any:
        rows = real(seq, limit)
        reads.append((limit, len(rows)))
        return rows

    monkeypatch.setattr(gw.store, "outbox_texts_after", spy)
    async with gw.get() as resp:
        ids = await read_ids(resp, last)
    assert ids == list(range(1, last + 1))
    assert reads and all(limit <= api_module.SSE_PAGE for limit, _ in reads)
    assert max(rows for _, rows in reads) == api_module.SSE_PAGE <= 100
    assert len(reads) >= last // api_module.SSE_PAGE


# -- the hub -------------------------------------------------------------------------------------------------------
async def hub_with_events(http: aiohttp.ClientSession, hub: Hub, n: int) -> tuple[str, Link]:
    vendor = Vendor(http, hub.url)
    key = await vendor.customer()
    gw = await vendor.gateway()
    link = await gw.connect(http, hub.url)
    for first in range(1, n + 1, protocol.MAX_BATCH):
        count = min(protocol.MAX_BATCH, n + 1 - first)
        events = [cloud_event("created", f"u{first + i}", room_seq=first + i) for i in range(count)]
        assert (await link.events(items(events, first_seq=first)))["seq"] == first + count - 1
    return key, link


def hub_stream(http: aiohttp.ClientSession, hub: Hub, key: str, last_event_id: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return http.get(hub.url + "/v1/customers/contoso/events", headers=headers)


async def test_the_hub_refuses_a_resume_point_past_its_end_as_the_local_api_does(http, hub, local) -> None:
    key, link = await hub_with_events(http, hub, 5)
    async with hub_stream(http, hub, key, "5") as resp:
        assert resp.status == 200
    async with hub_stream(http, hub, key, "6") as resp:
        assert resp.status == 409
        at_hub = await resp.json()
    async with hub_stream(http, hub, key, THIRTY_DIGITS) as resp:
        assert (resp.status, (await resp.json())["error"]) == (400, "invalid_last_event_id")
    await link.close()

    gw = await local()
    fill(gw.store, 5)
    async with gw.get("6") as resp:
        at_gateway = await resp.json()
    assert at_hub == at_gateway
    assert {k: at_hub[k] for k in ("error", "message", "last_event_id")} == protocol.event_id_ahead(6, 5)
    assert (at_hub["status"], at_hub["detail"]) == (409, at_hub["message"])  # RFC 9457 problem details
    assert at_hub["type"].endswith("/last_event_id_ahead") and at_hub["title"]


async def test_hub_replay_reads_its_store_in_small_pages(http, hub, monkeypatch) -> None:
    key, link = await hub_with_events(http, hub, 515)
    store = hub.hub.store
    reads: list[tuple[int, int]] = []
    real = store.events_after

    def spy(customer: str, after: int, limit: int = 500) -> Any:
        rows = real(customer, after, limit)
        reads.append((limit, len(rows)))
        return rows

    monkeypatch.setattr(store, "events_after", spy)
    async with hub_stream(http, hub, key) as resp:
        ids = await read_ids(resp, 515)
    assert ids == list(range(1, 516))
    assert reads and all(limit <= hub_module.SSE_PAGE for limit, _ in reads)
    assert max(rows for _, rows in reads) == hub_module.SSE_PAGE <= 100
    await link.close()


def test_resume_positions_parse_strictly() -> None:
    assert protocol.parse_event_id("0") == 0 and protocol.parse_event_id(" 42 ") == 42
    assert protocol.parse_event_id(str(protocol.MAX_SEQ)) == protocol.MAX_SEQ
    for bad in ("", "+1", "1e3", "0x10", THIRTY_DIGITS):
        with pytest.raises(Exception) as e:
            protocol.parse_event_id(bad)
        assert getattr(e.value, "key", None) == "invalid_last_event_id"
    assert json.dumps(protocol.event_id_ahead(7, 3))  # a JSON document
