"""`gateway demo`: the simulator, the gateway against it, and relayed bookings live in the terminal.

What a newcomer needs stays findable: the hints (API key, curl lines, a booking command for a slot that is free)
are printed once the calendars are imported and repeated in short form every ``HINTS_EVERY`` lines; a recurring
series that changes prints one line, not one per occurrence. Nothing is left behind however the demo ends: a small
watcher process, started first, kills the simulator and removes the temporary folder when the demo's end of a
pipe closes (also on ``kill -9``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from aiohttp import web

from gateway.app import GATEWAY, GatewayOptions, init_app
from gateway.errors import GatewayError
from gateway.model import Booking
from gateway.ports import OutboxEntry, SourceSpec
from gateway.service import serve
from gateway.sources.ews.source import EwsSettings
from gateway.sources.graph.settings import GraphSettings
from gateway.store.apikeys import ApiKeys
from gateway.sync.coordinator import SyncSettings

TZ = "Europe/Berlin"
IMPORT_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("demo_import_task")
HINTS_EVERY = 30  # event lines between two reminders of the API key and the booking command
SLOT = timedelta(minutes=30)
MARGIN = timedelta(minutes=30)  # free time kept around the proposed slot, so live activity is unlikely to take it
SUBJECT_NOTE = ("SUBJECT is what the room's calendar holds. For meetings marked * it is the organiser's name: "
                "Exchange's booking attendant replaces the subject in the room's copy by default "
                "(Set-CalendarProcessing -AddOrganizerToSubject $true -DeleteSubject $true), and the gateway reads "
                "the room's calendar.")

# The watcher: it reads what to clean up from its stdin; end of file without "done" means the demo died.
WATCHER = """\
import os, shutil, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the demo, which then cleans up itself
pids, folders = [], []
for line in sys.stdin:
    kind, _, value = line.rstrip("\\n").partition(" ")
    if kind == "done":
        sys.exit(0)
    (pids if kind == "pid" else folders).append(value)
for pid in pids:
    try:
        os.kill(int(pid), signal.SIGKILL)
    except OSError:
        pass
for folder in folders:
    shutil.rmtree(folder, ignore_errors=True)
"""


class Leftovers:
    """What the demo must not leave behind, handed to the watcher process as soon as it exists."""

    def __init__(self) -> None:
        # Its own session: neither Ctrl-C in the terminal nor a kill of the demo's process group reaches it.
        self._watcher = subprocess.Popen([sys.executable, "-c", WATCHER], stdin=subprocess.PIPE, text=True,
                                         start_new_session=True)

    def add(self, kind: str, value: object) -> None:
        assert self._watcher.stdin is not None
        self._watcher.stdin.write(f"{kind} {value}\n")
        self._watcher.stdin.flush()

    def release(self) -> None:
        """The demo cleaned up itself: the watcher exits without touching anything."""
        assert self._watcher.stdin is not None
        with contextlib.suppress(OSError):
            self._watcher.stdin.write("done\n")
            self._watcher.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._watcher.wait(timeout=5)


def start_simulator(rooms: int, users: int, activity: float, seed: int,
                    leftovers: Leftovers | None = None) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    cmd = [sys.executable, "-m", "gateway", "simulator", "--port", "0", "--rooms", str(rooms), "--users",
           str(users), "--activity", str(activity), "--seed", str(seed), "--rba-delay", "1.0",
           "--log-level", "warning", "--log-format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    if leftovers is not None:
        leftovers.add("pid", proc.pid)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        raise GatewayError("the simulator did not start", key="simulator_failed",
                           remedy=f"run `{' '.join(cmd[2:])}` by hand to see why")
    info = json.loads(line)
    if leftovers is not None and "graph" in info:  # the folder of its Graph CA, which a SIGKILL would leave behind
        leftovers.add("dir", os.path.dirname(info["graph"]["ca_bundle"]))
    return proc, info


# -- what is printed -------------------------------------------------------------------------------------------
def header(tz: ZoneInfo) -> str:
    return (textwrap.fill(f"Times are {tz.key} time. {SUBJECT_NOTE}", width=110, break_on_hyphens=False) + "\n"
            f"{'TIME':<8}  {'ROOM':<8} {'EVENT':<8} {'WHEN':<27} {'SUBJECT':<28} ORGANISER")


def _when(d: Mapping[str, Any], tz: ZoneInfo) -> str:
    if d.get("all_day"):
        return f"{d.get('start_date')} all day"
    if not d.get("start"):
        return "?"
    start = _local(d["start"], tz)
    end = _local(d["end"], tz)
    return f"{start:%a %d %b %H:%M}-{end:%H:%M %Z}"


def _local(text: str, tz: ZoneInfo) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(tz)


def describe(entry: OutboxEntry, tz: ZoneInfo, occurrences: Sequence[OutboxEntry] = ()) -> str:
    """One line for an event; ``occurrences`` (all of one series, this one first) make it the series' line."""
    e = entry.event
    kind = e.type.rsplit(".", 2)[-2].replace("_", " ")
    room = e.room.split("@")[0]
    stamp = datetime.now(tz).strftime("%H:%M:%S")
    d = e.data or {}
    if "booking" not in e.type:
        return f"{stamp}  {room:<8} room {d.get('state', '?')}{'  (' + d['reason'] + ')' if d.get('reason') else ''}"
    who = (d.get("organizer") or {}).get("email") or "hidden"
    subject = f"{d.get('subject') or '-'}{'*' if d.get('subject_is_organizer_name') else ''}"
    if len(occurrences) > 1:
        series = f"  ({_series(occurrences, tz)})"
    else:
        series = "  (one occurrence of a series)" if d.get("series_id") else ""
    return f"{stamp}  {room:<8} {kind:<8} {_when(d, tz):<27} {subject:<28} {who}{series}"


def _series(occurrences: Sequence[OutboxEntry], tz: ZoneInfo) -> str:
    starts = sorted(_local(o.event.data["start"], tz) for o in occurrences if o.event.data.get("start"))
    gaps = {(b.date() - a.date()).days for a, b in itertools.pairwise(starts)}
    pattern = {frozenset({1}): "daily ", frozenset({7}): "weekly ", frozenset({14}): "fortnightly "}.get(
        frozenset(gaps), "monthly " if gaps and all(28 <= g <= 31 for g in gaps) else "")
    last = f", the last on {starts[-1]:%a %d %b}" if starts else ""
    return f"{pattern}series, {len(occurrences)} occurrences{last}"


def group(entries: Iterable[OutboxEntry]) -> list[list[OutboxEntry]]:
    """Events in order, those of one series with the same kind (created, deleted...) gathered behind the first."""
    groups: list[list[OutboxEntry]] = []
    by_series: dict[tuple[str, str, str], list[OutboxEntry]] = {}
    for entry in entries:
        d = entry.event.data or {}
        series = d.get("series_id") if "booking" in entry.event.type else None
        if series is None:
            groups.append([entry])
            continue
        key = (entry.event.room, series, entry.event.type)
        if key in by_series:
            by_series[key].append(entry)
        else:
            by_series[key] = [entry]
            groups.append(by_series[key])
    return groups


# -- a booking that will be accepted ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    room: str
    start: datetime  # UTC
    end: datetime


def free_slot(rooms: Sequence[str], bookings_of: Any, now: datetime, tz: ZoneInfo, days: int = 14) -> Slot | None:
    """The first half hour on a working day from tomorrow, 09:00-17:00 local time, in which a room holds nothing
    within ``MARGIN``: what a booking command can ask for and have accepted. ``bookings_of(room, start, end)``
    reads the room's bookings (the store, once the calendars are imported)."""
    first = now.astimezone(tz).date() + timedelta(days=1)
    for day in (first + timedelta(days=n) for n in range(days)):
        if day.weekday() >= 5:
            continue
        opening = datetime.combine(day, time(9, 0), tz)
        closing = datetime.combine(day, time(17, 0), tz)
        for room in rooms:
            busy: list[Booking] = bookings_of(room, opening - MARGIN, closing + MARGIN)
            start = opening
            while start + SLOT <= closing:
                end = start + SLOT
                if not any(b.start < end + MARGIN and b.end > start - MARGIN for b in busy):
                    return Slot(room, start.astimezone(UTC), end.astimezone(UTC))
                start += SLOT
    return None


def booking_command(slot: Slot, organizer: str) -> str:
    return json.dumps({"key": "demo-1", "type": "create", "room": slot.room,
                       "start": slot.start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "end": slot.end.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "subject": "Booked from the API", "organizer": {"email": organizer}})


# -- the demo --------------------------------------------------------------------------------------------------
async def run(rooms: int = 5, users: int = 10, activity: float = 0.5, port: int = 8088, seed: int = 1,
              store: Path | None = None, out: TextIO = sys.stdout) -> int:
    print(f"Starting the Exchange simulator ({rooms} rooms with a year of bookings, {activity:g} changes/s)...",
          file=out, flush=True)
    leftovers = Leftovers()
    tmp = None
    if store is None:
        tmp = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
        leftovers.add("folder", tmp)
        store = tmp / "gateway.sqlite"
    proc = None
    try:
        proc, info = start_simulator(rooms, users, activity, seed, leftovers)
        return await _run(info, store, port, out)
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        leftovers.release()


async def _run(info: dict[str, Any], store: Path, port: int, out: TextIO) -> int:
    # The organizer-scoped account, so booking commands for people become meetings in their calendars (a
    # rooms-only account works too: those bookings then go into the room's own calendar).
    sa = info["organizer_account"]
    onprem = tuple(r["email"] for r in info["rooms"] if r.get("source", "ews") == "ews")
    online = tuple(r["email"] for r in info["rooms"] if r.get("source") == "graph")
    ews = EwsSettings(ews_url=info["ews_url"], username=sa["username"], default_timezone=TZ, max_workers=4)
    sources: tuple[SourceSpec, ...] = ()
    if online and "graph" in info:  # a hybrid estate: the online rooms through Graph, one stream for both sides
        g = info["graph"]
        graph = GraphSettings(tenant_id=g["tenant_id"], client_id=g["client_id"], credential="client_secret",
                              authority_host=g["authority"].rsplit("/", 1)[0], graph_url=g["url"],
                              ca_bundle=g["ca_bundle"], poll_interval_seconds=10.0)
        sources = (SourceSpec("onprem", "ews", ews, sa["password"], onprem),
                   SourceSpec("online", "graph", graph, g["client_secret"], online))
    options = GatewayOptions(
        ews=ews, password=sa["password"], rooms=onprem, sources=sources,
        sync=SyncSettings(debounce_seconds=0.5), store_path=store, feed="streaming", stream_timeout_minutes=5)
    app = init_app(options)
    tz = ZoneInfo(TZ)
    counts = {"created": 0, "updated": 0, "deleted": 0}
    state: dict[str, Any] = {"importing": True, "lines": 0, "reminder": ""}
    room_states: dict[str, str] = {}

    def emit(line: str) -> None:
        print(line, file=out, flush=True)
        state["lines"] += 1
        if state["reminder"] and state["lines"] % HINTS_EVERY == 0:
            print(state["reminder"], file=out, flush=True)

    def show(entries: list[OutboxEntry]) -> None:
        for entry in entries:
            kind = entry.event.type.rsplit(".", 2)[-2]
            if kind in counts:
                counts[kind] += 1
        for members in group(entries):
            entry = members[0]
            if "booking" not in entry.event.type:
                # Only news: a room that stops working or recovers, not every sync (verified, syncing, verified...)
                room_state = (entry.event.data or {}).get("state", "?")
                if room_state == "syncing":
                    continue
                before = room_states.get(entry.event.room, "verified")
                room_states[entry.event.room] = room_state
                if room_state != before:
                    emit(describe(entry, tz))
            elif not state["importing"]:
                emit(describe(entry, tz, members))

    async def ready(app: web.Application, bound: int) -> None:
        gw = app[GATEWAY]
        gw.coordinator.listeners.append(show)
        # The demo's store is throw-away, so its key may be shown; a real one comes from `gateway api-keys create`.
        key = await asyncio.to_thread(ApiKeys(gw.store).create, "demo", ["read", "book", "metrics"])
        print(f"Gateway listening on http://127.0.0.1:{bound}. Importing the rooms' calendars...", file=out,
              flush=True)
        app[IMPORT_TASK] = asyncio.get_running_loop().create_task(announce_import(gw, key, bound))

    async def announce_import(gw: Any, key: str, bound: int) -> None:
        while not all(w.last_success is not None for w in gw.coordinator.workers.values()):
            await asyncio.sleep(0.2)
        slot = await asyncio.to_thread(free_slot, onprem or online, gw.store.bookings, datetime.now(UTC), tz)
        online_slot = await asyncio.to_thread(free_slot, online, gw.store.bookings, datetime.now(UTC), tz) \
            if sources else None
        base = f"http://127.0.0.1:{bound}"
        auth = f"-H 'Authorization: Bearer {key}'"
        book = "(every room is booked for the next two weeks)"
        when = ""
        if slot is not None:
            book = f"curl {auth} -X POST {base}/v1/commands -d '{booking_command(slot, info['users'][0]['email'])}'"
            when = (f"                 ({slot.room}, {slot.start.astimezone(tz):%a %d %b %H:%M}-"
                    f"{slot.end.astimezone(tz):%H:%M %Z}, free now; the room's booking attendant answers within "
                    f"seconds and the result says what it decided)\n")
        online_book = ""
        if online_slot is not None:
            organizer = (info["graph"].get("users") or [info["users"][0]["email"]])[0]
            command = booking_command(online_slot, organizer).replace('"demo-1"', '"demo-2"')
            online_book = (f"  book online    curl {auth} -X POST {base}/v1/commands -d '{command}'\n"
                           f"                 ({online_slot.room} lives in Exchange Online: the same command, "
                           "written through Microsoft Graph)\n")
        state["importing"] = False
        state["reminder"] = (f"-- reminder: API key {key}\n"
                             f"   rooms: curl {auth} {base}/v1/rooms\n"
                             f"   book a room: {book}")
        print(f"Imported {counts['created']} bookings from {len(gw.rooms)} rooms.\n"
              f"  API key        {key}   (read, book, metrics; made for this demo)\n"
              f"  local API      curl {auth} {base}/v1/rooms\n"
              f"                 curl {auth} {base}/v1/rooms/{(onprem or online)[0]}/bookings\n"
              f"  event stream   curl -N {auth} {base}/v1/events\n"
              f"  book a room    {book}\n"
              f"{when}"
              f"{online_book}"
              f"  metrics        {base}/metrics     OpenAPI {base}/openapi.json\n"
              f"  Exchange (sim) {info['ews_url']}  control {info['control_url']}\n"
              + (f"  Graph (sim)    {info['graph']['url']}  ({len(online)} of {len(onprem) + len(online)} rooms in "
                 "Exchange Online)\n" if sources else "") +
              f"These hints come back every {HINTS_EVERY} lines. Press Ctrl-C to stop.\n\n"
              f"Live changes (people booking, moving and cancelling in the simulated Outlook):\n{header(tz)}",
              file=out, flush=True)

    try:
        return await serve(app, "127.0.0.1", port, ready, settings=(None, "--port"))
    finally:
        print(f"Stopped. {counts['created']} created, {counts['updated']} updated, {counts['deleted']} deleted "
              f"events relayed.", file=out, flush=True)
