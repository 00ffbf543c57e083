"""`gateway demo`: the simulator, the gateway against it, and relayed bookings live in the terminal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from aiohttp import web

from gateway.app import GATEWAY, GatewayOptions, init_app
from gateway.errors import GatewayError
from gateway.ports import OutboxEntry
from gateway.service import serve
from gateway.sources.ews.source import EwsSettings
from gateway.store.apikeys import ApiKeys
from gateway.sync.coordinator import SyncSettings

TZ = "Europe/Berlin"
IMPORT_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("demo_import_task")


def start_simulator(rooms: int, users: int, activity: float, seed: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    cmd = [sys.executable, "-m", "gateway", "simulator", "--port", "0", "--rooms", str(rooms), "--users",
           str(users), "--activity", str(activity), "--seed", str(seed), "--rba-delay", "1.0",
           "--log-level", "warning", "--log-format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        raise GatewayError("the simulator did not start", key="simulator_failed",
                           remedy=f"run `{' '.join(cmd[2:])}` by hand to see why")
    return proc, json.loads(line)


def describe(entry: OutboxEntry, tz: ZoneInfo) -> str:
    e = entry.event
    kind = e.type.rsplit(".", 2)[-2].replace("_", " ")
    room = e.room.split("@")[0]
    stamp = datetime.now(tz).strftime("%H:%M:%S")
    d = e.data or {}
    if "booking" not in e.type:
        return f"{stamp}  {room:<8} room {d.get('state', '?')}{'  (' + d['reason'] + ')' if d.get('reason') else ''}"
    when = "?"
    if d.get("all_day"):
        when = f"{d.get('start_date')} all day"
    elif d.get("start"):
        s = datetime.fromisoformat(d["start"].replace("Z", "+00:00")).astimezone(tz)
        end = datetime.fromisoformat(d["end"].replace("Z", "+00:00")).astimezone(tz)
        when = f"{s:%a %d %b %H:%M}-{end:%H:%M}"
    who = (d.get("organizer") or {}).get("email") or "hidden"
    series = "  (series)" if d.get("series_id") else ""
    return f"{stamp}  {room:<8} {kind:<8} {when:<24} {d.get('subject') or '-'!s:<28} by {who}{series}"


async def run(rooms: int = 5, users: int = 10, activity: float = 0.5, port: int = 8088, seed: int = 1,
              store: Path | None = None, out: TextIO = sys.stdout) -> int:
    print(f"Starting the Exchange simulator ({rooms} rooms with a year of bookings, {activity:g} changes/s)...",
          file=out, flush=True)
    proc, info = start_simulator(rooms, users, activity, seed)
    tmp = None
    if store is None:
        tmp = tempfile.TemporaryDirectory(prefix="gateway-demo-")
        store = Path(tmp.name) / "gateway.sqlite"
    # The organizer-scoped account, so booking commands for people become meetings in their calendars (a
    # rooms-only account works too: those bookings then go into the room's own calendar).
    sa = info["organizer_account"]
    options = GatewayOptions(
        ews=EwsSettings(ews_url=info["ews_url"], username=sa["username"], default_timezone=TZ, max_workers=4),
        password=sa["password"], rooms=tuple(r["email"] for r in info["rooms"]),
        sync=SyncSettings(debounce_seconds=0.5), store_path=store, feed="streaming", stream_timeout_minutes=5)
    app = init_app(options)
    tz = ZoneInfo(TZ)
    counts = {"created": 0, "updated": 0, "deleted": 0}
    importing = {"done": False}

    def show(entries: list[OutboxEntry]) -> None:
        for entry in entries:
            kind = entry.event.type.rsplit(".", 2)[-2]
            if kind in counts:
                counts[kind] += 1
            if importing["done"] or "booking" not in entry.event.type:
                print(describe(entry, tz), file=out, flush=True)

    async def ready(app: web.Application, bound: int) -> None:
        gw = app[GATEWAY]
        gw.coordinator.listeners.append(show)
        base = f"http://127.0.0.1:{bound}"
        # The demo's store is throw-away, so its key may be shown; a real one comes from `gateway api-keys create`.
        key = await asyncio.to_thread(ApiKeys(gw.store).create, "demo", ["read", "book", "metrics"])
        auth = f"-H 'Authorization: Bearer {key}'"
        app[IMPORT_TASK] = asyncio.get_running_loop().create_task(announce_import(gw))
        day = (datetime.now(UTC) + timedelta(days=1)).replace(hour=9, minute=0, second=0, microsecond=0)
        command = json.dumps({"key": "demo-1", "type": "create", "room": options.rooms[0],
                              "start": day.strftime("%Y-%m-%dT%H:%M:%SZ"),
                              "end": (day + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                              "subject": "Booked from the API", "organizer": {"email": info["users"][0]["email"]}})
        print(f"Gateway running. Importing the rooms' calendars...\n"
              f"  API key        {key}   (read, book, metrics; made for this demo)\n"
              f"  local API      curl {auth} {base}/v1/rooms\n"
              f"                 curl {auth} {base}/v1/rooms/{options.rooms[0]}/bookings\n"
              f"  event stream   curl -N {auth} {base}/v1/events\n"
              f"  book a room    curl {auth} -X POST {base}/v1/commands -d '{command}'\n"
              f"                 (the room's booking attendant answers within seconds; the result says what it "
              f"decided)\n"
              f"  metrics        {base}/metrics     OpenAPI {base}/openapi.json\n"
              f"  Exchange (sim) {info['ews_url']}  control {info['control_url']}\n"
              f"Press Ctrl-C to stop.", file=out, flush=True)

    async def announce_import(gw: Any) -> None:
        while not all(w.last_success is not None for w in gw.coordinator.workers.values()):
            await asyncio.sleep(0.2)
        importing["done"] = True
        print(f"Imported {counts['created']} bookings from {len(gw.rooms)} rooms. Live changes follow "
              f"(people booking, moving and cancelling in the simulated Outlook):", file=out, flush=True)

    try:
        return await serve(app, "127.0.0.1", port, ready, settings=(None, "--port"))
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if tmp is not None:
            tmp.cleanup()
        print(f"Stopped. {counts['created']} created, {counts['updated']} updated, {counts['deleted']} deleted "
              f"events relayed.", file=out, flush=True)

