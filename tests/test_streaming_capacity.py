"""Rooms that come from room lists are only known once the lists are read, after the EWS source sized its session
pool: the streams they need must still fit beside the reads (an exhausted exchangelib pool waits forever)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from exchangelib import CalendarItem, EWSDateTime
from exchangelib.items import SEND_TO_ALL_AND_SAVE_COPY

from gateway.app import GATEWAY, GatewayOptions, init_app
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from gateway.simulator.server import SimulatorConfig
from gateway.sources.ews.source import EwsSettings
from gateway.sync.coordinator import SyncSettings
from tests.conftest import TZ, SimFixture, eventually

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
