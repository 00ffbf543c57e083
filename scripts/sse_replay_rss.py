#!/usr/bin/env python3
"""How much memory the local API holds while many SSE clients replay the outbox at once.

Starts the local API (gateway.api.Api on a SQLite store holding EVENTS booking events) in a child process, then
CLIENTS clients read GET /v1/events from the start, all at once, to the last event. Prints the child's resident
memory before, at its peak (VmHWM) and a few seconds after the clients left. Numbers only; nothing asserts.

    .venv/bin/python scripts/sse_replay_rss.py --clients 200 --events 515
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp


def rss(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) / 1024
    return out


# -- the child: the API on a filled store ------------------------------------------------------------------------
def serve(directory: Path, events: int) -> None:
    from aiohttp import web

    from gateway.api import Api, EventHub
    from gateway.model import EVENT_TYPES, Attendee, Booking, Event, Person, Room, to_json
    from gateway.observability.metrics import Metrics
    from gateway.store.apikeys import ApiKeys
    from gateway.store.sqlite import SqliteStore

    store = SqliteStore(directory / "gateway.sqlite")
    room = "room1@contoso.com"
    store.upsert_room(Room(room, state="verified"))
    t0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=1)
    people = tuple(Attendee(f"person{i}@contoso.com", f"Person {i}", "required", "accepted") for i in range(5))
    for first in range(0, events, 100):
        bookings = [Booking(room=room, uid=f"uid-{i:06d}-" + "x" * 40, start=t0 + timedelta(minutes=30 * i),
                            end=t0 + timedelta(minutes=30 * i + 25), subject=f"Quarterly planning {i}",
                            organizer=Person("alice@contoso.com", "Alice"), attendees=people,
                            timezone="Europe/Berlin")
                    for i in range(first, min(events, first + 100))]
        store.commit_sync(room, upserts=bookings, deletes=(), events=[
            Event(id=f"ev-{i}-{b.uid}", type=EVENT_TYPES["created"], room=room, subject=b.id, time=t0,
                  data=to_json(b)) for i, b in enumerate(bookings, start=first)])
    key = ApiKeys(store).create("bench", ["read"])
    api = Api(store, Metrics(), EventHub(), room_states=lambda: {}, ready=lambda: True, keys=ApiKeys(store))

    async def main() -> None:
        runner = web.AppRunner(api.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(json.dumps({"port": port, "key": key, "last": store.last_seq()}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# -- the parent: the clients and the numbers ---------------------------------------------------------------------
async def replay(url: str, key: str, last: int) -> int:
    seen = 0
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http, \
            http.get(url, headers={"Authorization": f"Bearer {key}"}) as resp:
        async for line in resp.content:
            if line.startswith(b"id: "):
                seen += 1
                if int(line[4:]) >= last:
                    break
    return seen


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        child = subprocess.Popen([sys.executable, __file__, "--serve", tmp, "--events", str(args.events)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            info = json.loads(child.stdout.readline())
            url = f"http://127.0.0.1:{info['port']}/v1/events"
            await replay(url, info["key"], info["last"])  # warm up: first request, connections, caches
            before = rss(child.pid)
            started = time.monotonic()
            counts = await asyncio.gather(*(replay(url, info["key"], info["last"]) for _ in range(args.clients)))
            seconds = time.monotonic() - started
            during = rss(child.pid)
            await asyncio.sleep(args.settle)
            after = rss(child.pid)
        finally:
            child.terminate()
            child.wait(10)
    return {"clients": args.clients, "events": info["last"], "delivered": sum(counts),
            "complete": all(c == info["last"] for c in counts), "seconds": round(seconds, 2),
            "rss_before_mb": round(before["VmRSS"], 1), "rss_peak_mb": round(during["VmHWM"], 1),
            "rss_after_mb": round(after["VmRSS"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--events", type=int, default=515)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait before the last reading")
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve), args.events)
        return
    print(json.dumps(asyncio.run(measure(args))))


if __name__ == "__main__":
    main()
