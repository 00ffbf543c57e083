"""Rooms that come from room lists are only known once the lists are read, after the EWS source sized its session
pool: the streams they need must still fit beside the reads (an exhausted exchangelib pool waits forever)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from exchangelib import CalendarItem, EWSDateTime
from exchangelib.items import SEND_TO_ALL_AND_SAVE_COPY

from gateway.app import GATEWAY, GatewayOptions, init_app
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from gateway.sources.ews.source import EwsSettings, EwsSource
from gateway.sources.ews.streaming import StreamingFeed
from gateway.sync.coordinator import SyncSettings
from tests.conftest import TZ, SimFixture, eventually
from tests.running_gateway import ROOM1, ROOM2, ROOM3

ROOMS = 9


async def test_rooms_from_room_lists_each_get_a_stream_without_starving_the_reads(
        sim_factory: Callable[..., SimFixture], tmp_path: Path, aiohttp_client: Any) -> None:
    ews = sim_factory(SimulatorConfig(rba_delay=0.05, keepalive_seconds=0.5), rooms=ROOMS)
    options = GatewayOptions(
        ews=EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{SERVICE_ACCOUNT}", default_timezone="Europe/Berlin",
                        max_workers=2),
        password=SERVICE_PASSWORD, rooms=(), room_lists=tuple(ews.org.room_lists),
        sync=SyncSettings(debounce_seconds=0.2), store_path=tmp_path / "gateway.sqlite",
        feed="streaming", group_size=1, stream_timeout_minutes=1)  # one stream per room: 9 streams, 2 workers
    app = init_app(options)
    await aiohttp_client(app)
    gw = app[GATEWAY]
    await eventually(lambda: len(gw.coordinator.workers) == ROOMS, timeout=30, what="the lists' rooms known")
    await eventually(lambda: gw.feed is not None and gw.feed.open_streams == ROOMS,  # type: ignore[union-attr]
                     timeout=60, what="a stream open for every room")
    await eventually(lambda: all(w.last_success is not None for w in gw.coordinator.workers.values()),
                     timeout=60, what="every room imported beside the open streams")

    room = ews.org.rooms[-1]
    start = EWSDateTime.now(TZ).replace(hour=10, minute=0, second=0, microsecond=0) + timedelta(days=2)

    def book() -> None:
        acct = ews.organizer("alice@contoso.com")
        CalendarItem(account=acct, folder=acct.calendar, subject="Pool check", start=start,
                     end=start + timedelta(hours=1), resources=[room]).save(
            send_meeting_invitations=SEND_TO_ALL_AND_SAVE_COPY)
    await asyncio.get_running_loop().run_in_executor(None, book)
    # The change reaches the store only if the stream said so and a read could still get a session.
    await eventually(lambda: len(gw.store.bookings(room)) == 1, timeout=60, what="the new booking synced")


async def test_rooms_import_while_the_feed_is_still_subscribing_the_others(
        sim_factory: Callable[..., SimFixture], tmp_path: Path, aiohttp_client: Any) -> None:
    # The feed subscribed every room at once, each Subscribe a job in the source's thread pool: a room's import
    # queued behind all of them (a 1,000-room import showed nothing for its first minute).
    rooms = 16
    ews = sim_factory(SimulatorConfig(rba_delay=0.05, keepalive_seconds=0.5), rooms=rooms)  # streams notice an end
    ews.call(lambda: ews.sim.faults.latency.update({"*": 0.05, "Subscribe": 0.3}))
    options = GatewayOptions(
        ews=EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{SERVICE_ACCOUNT}", default_timezone="Europe/Berlin",
                        max_workers=4),
        password=SERVICE_PASSWORD, rooms=tuple(ews.org.rooms), sync=SyncSettings(debounce_seconds=0.2),
        store_path=tmp_path / "gateway.sqlite", feed="streaming", stream_timeout_minutes=1)
    app = init_app(options)
    await aiohttp_client(app)
    gw = app[GATEWAY]

    def subscribed() -> int:
        return int(ews.call(lambda: ews.sim.calls[("Subscribe", "NoError")]))
    await eventually(lambda: any(w.last_success is not None for w in gw.coordinator.workers.values()),
                     timeout=60, what="a first room imported")
    assert subscribed() < rooms // 2, f"the first import waited for {subscribed()} of {rooms} subscriptions"
    await eventually(lambda: subscribed() == rooms, timeout=60, what="every room subscribed")
    await eventually(lambda: all(w.last_success is not None for w in gw.coordinator.workers.values()),
                     timeout=60, what="every room imported")
    # No GetFolder: a room's import verifies it (its first SyncFolderItems), and reads and subscriptions name the
    # calendar without asking for its id.
    assert ews.call(lambda: ews.sim.calls[("GetFolder", "NoError")]) == 0
    ews.call(lambda: ews.sim.faults.latency.clear())
    await eventually(lambda: gw.feed is not None and gw.feed.subscriptions == rooms,  # type: ignore[union-attr]
                     timeout=60, what="every room's stream open (a stream still opening outlives the gateway)")


async def test_a_room_is_marked_dirty_once_its_own_subscription_exists_not_after_every_rooms(
        sim_factory: Callable[..., SimFixture]) -> None:
    # The mark asks for a sync of what happened before the subscription; an import whose first call goes out after
    # the mark reads all of that itself (Coordinator.import_room). Marked only once every room had subscribed, most
    # rooms of a large import were synced once more for nothing (1,000 rooms: 4,390 calls, 4,030 marked at once).
    ews = sim_factory(SimulatorConfig(keepalive_seconds=0.5))
    src = EwsSource(EwsSettings(ews_url=ews.url, username=f"CONTOSO\\{SERVICE_ACCOUNT}",
                                default_timezone="Europe/Berlin", max_workers=4), SERVICE_PASSWORD)
    feed = StreamingFeed(src, connection_timeout=1)
    room2_marked = threading.Event()
    room3_saw_it: list[bool] = []
    subscribe = src.subscribe_streaming

    def held(room: str) -> str | None:
        if room == ROOM3:  # (subscribed beside ROOM2, after ROOM1 alone): waits for ROOM2's mark
            room3_saw_it.append(room2_marked.wait(10))
        return subscribe(room)
    src.subscribe_streaming = held  # type: ignore[method-assign]
    marked: list[str] = []

    def on_dirty(room: str, why: str) -> None:
        if why == "subscribed":
            marked.append(room)
            if room == ROOM2:
                room2_marked.set()
    watching = asyncio.create_task(feed.watch([ROOM1, ROOM2, ROOM3], on_dirty))
    try:
        await eventually(lambda: sorted(marked) == [ROOM1, ROOM2, ROOM3], timeout=30, what="every room marked")
    finally:
        feed.stop()
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        await src.close()
    assert room3_saw_it == [True], "ROOM2 was marked only once ROOM3 had subscribed too"
    assert marked.index(ROOM2) < marked.index(ROOM3)
