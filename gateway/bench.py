"""`gateway bench`: the simulator on one core, the gateway on the other, and numbers.

Measures, against a simulated Exchange with per-call latency:
- the initial import (rooms x bookings, seconds, bookings per second);
- change-to-event latency percentiles under a steady rate of changes (create, move, cancel of room bookings);
- EWS calls the gateway makes per change in that steady state;
- the gateway process's peak RSS;
- with several room counts (``--rooms 100,1000,10000``), each of these once per count, to see how cost grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from gateway import collector
from gateway.app import GatewayOptions, start_gateway, stop_gateway
from gateway.model import EVENT_TYPES
from gateway.observability.metrics import Metrics
from gateway.ports import OutboxEntry
from gateway.sources.ews.source import EwsSettings
from gateway.sync.coordinator import SyncSettings


@dataclass
class BenchArgs:
    rooms: int = 1000
    scale: tuple[int, ...] = ()  # several room counts: one sync run each, in a process of its own
    rate: float = 20.0
    duration: float = 30.0
    latency_ms: float = 20.0
    concurrency: int = 10  # EWS requests in flight (exchange.max_concurrent_requests; the docs advise about 10)
    as_json: bool = False
    sync: bool = True  # the import and change-latency part
    relay: bool = True  # the tunnel throughput and command round-trip part
    events: int = 50_000
    commands: int = 100
    rba_delay: float = 0.5
    graph: bool = False  # Exchange Online rooms through Graph (bench_graph.py): opt-in, it runs two imports
    poll_interval: float = 5.0  # the Graph part's polling phase
    restart: bool = True  # after the steady state, a new gateway on the same store (the sync part)


@dataclass
class Results:
    rooms: int = 0
    bookings: int = 0
    concurrency: int = 0
    import_seconds: float = 0.0
    changes: int = 0
    latencies: list[float] = field(default_factory=list)
    ews_calls: int = 0
    missed: int = 0
    rss_mb: float = 0.0
    import_cpu_gateway: float = 0.0
    import_cpu_simulator: float = 0.0
    import_ews_calls: int = 0
    import_rss_mb: float = 0.0  # the gateway's peak RSS when the import ended
    restart_seconds: float | None = None  # a new gateway on the store: until every room was read in full again
    restart_caught_up_seconds: float = 0.0  # until every room had synced from its stored state
    restart_change_seconds: float | None = None  # until the meeting booked while it was down had its event
    restart_cpu_gateway: float = 0.0
    restart_cpu_simulator: float = 0.0
    restart_ews_calls: int = 0
    restart_ews_calls_until_idle: int = 0  # and its subscriptions' catch-up syncs
    restart_booking_events: int = 0  # besides the meeting booked while it was down

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 1)
        def per_booking(cpu: float) -> float | None:
            return round(cpu * 1000 / self.bookings, 3) if self.bookings else None
        return {
            "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "max": pct(100), "samples": len(lat)},
            "ews_calls_per_change": round(self.ews_calls / self.changes, 2) if self.changes else None,
            "import": {"rooms": self.rooms, "bookings": self.bookings, "concurrency": self.concurrency,
                       "seconds": round(self.import_seconds, 1),
                       "bookings_per_second": round(self.bookings / self.import_seconds) if self.import_seconds
                       else None, "cpu_seconds": {"gateway": round(self.import_cpu_gateway, 1),
                                                  "simulator": round(self.import_cpu_simulator, 1)},
                       "cpu_ms_per_booking": {"gateway": per_booking(self.import_cpu_gateway),
                                              "simulator": per_booking(self.import_cpu_simulator)},
                       "ews_calls": self.import_ews_calls, "rss_mb": round(self.import_rss_mb, 1)},
            "changes": self.changes,
            "missed_changes": self.missed,
            "rss_mb": round(self.rss_mb, 1),
            "restart": None if self.restart_seconds is None else {
                "seconds": round(self.restart_seconds, 1),
                "caught_up_seconds": round(self.restart_caught_up_seconds, 1),
                "change_made_while_down_seconds": None if self.restart_change_seconds is None else
                round(self.restart_change_seconds, 1),
                "cpu_seconds": {"gateway": round(self.restart_cpu_gateway, 1),
                                "simulator": round(self.restart_cpu_simulator, 1)},
                "cpu_ms_per_booking": {"gateway": per_booking(self.restart_cpu_gateway),
                                       "simulator": per_booking(self.restart_cpu_simulator)},
                "ews_calls": self.restart_ews_calls, "ews_calls_until_idle": self.restart_ews_calls_until_idle,
                "other_booking_events": self.restart_booking_events},
        }


STALL_SECONDS = 120.0  # an import that moves no room and no booking for this long has failed: say why


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _cpus() -> list[int]:
    with contextlib.suppress(AttributeError, OSError):
        return sorted(os.sched_getaffinity(0))
    return []


# The CPUs this process may use, read before it pins itself: a child started after that (the simulator) inherits
# the pinned set, and would otherwise stay on the gateway's core.
_CPUS = _cpus()


def _pin(index: int) -> None:
    """Keep this process on one CPU (the ``index``-th it was allowed at start), when it was allowed several."""
    if len(_CPUS) > 1:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setaffinity(0, {_CPUS[index % len(_CPUS)]})


LOCK_NAME = "exchange-gateway-bench.lock"  # in the temporary directory: one benchmark at a time on a machine
_LOCK_OWNER = "GATEWAY_BENCH_LOCK_OWNER"  # set while a benchmark holds the lock: the benchmarks it starts share it


@contextlib.contextmanager
def one_at_a_time() -> Iterator[None]:
    """Hold the machine's benchmark lock; a benchmark started meanwhile waits for it, and says so. Two at once
    share the cores: each reports the other's load as its own cost (a 30 s import read 68 s that way). The
    benchmarks this one starts (one process per room count) inherit the lock through the environment."""
    if os.environ.get(_LOCK_OWNER):
        yield
        return
    path = Path(tempfile.gettempdir()) / LOCK_NAME
    try:  # (never through a link: the file is in a directory every user can write)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        _say(f"could not take the benchmark lock {path} ({e.strerror}): not waiting for other benchmarks")
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "a process"
            _say(f"waiting for the benchmark already running on this machine ({holder}) to end: two at once "
                 "share the cores, and both would report wrong figures")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        os.environ[_LOCK_OWNER] = str(os.getpid())
        try:
            yield
        finally:
            os.environ.pop(_LOCK_OWNER, None)
    finally:
        os.close(fd)  # (releases the lock)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one by default)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def simulator_command(args: BenchArgs) -> list[str]:
    """The simulator for a benchmark: its answers are not checked against the schema (the suite does that), so the
    simulator's CPU is the cost of serving, not of checking itself."""
    return [sys.executable, "-m", "gateway", "simulator", "--port", "0", "--rooms", str(args.rooms),
            "--users", str(max(20, args.rooms // 10)), "--activity", "0", "--rba-delay", "0.05",
            "--graph-rooms", "0", "--latency-ms", str(args.latency_ms), "--no-response-validation",
            "--log-level", "warning", "--log-format", "json"]


def start_simulator(args: BenchArgs) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    return launch_simulator(simulator_command(args))


def launch_simulator(cmd: list[str]) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """The simulator on core 0, and its ready line. Its stdout is drained afterwards: it logs there, and once the
    pipe is full it would stop answering (an import of thousands of rooms logs that much)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=lambda: _pin(0))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("the simulator did not start; run the command above by hand to see why")
    out = proc.stdout
    threading.Thread(target=out.read, name="simulator-stdout", daemon=True).start()
    return proc, json.loads(line)


class Arrivals:
    """What the gateway commits, as a benchmark watches it (a coordinator listener): bookings created, and when each
    bench change (a subject starting with bench-) first arrived, by "subject:created|updated"."""

    def __init__(self) -> None:
        self.created = 0
        self.booking_events = 0  # created, updated or deleted
        self.seen: dict[str, float] = {}

    def __call__(self, entries: list[OutboxEntry]) -> None:
        # (the benchmark's own work is counted as the gateway's CPU: a lookup an event, and its data, a dict the
        # gateway makes only when read, read only for a bench change, found in the event's text)
        now = time.monotonic()
        for e in entries:
            kind = _BOOKING_KINDS.get(e.event.type)
            if kind is None:
                continue
            self.booking_events += 1
            if kind == "created":
                self.created += 1
            text = e.event.data_json
            if text is not None and _BENCH_SUBJECT not in text:
                continue
            subject = e.event.data.get("subject")
            if subject and subject.startswith("bench-"):
                self.seen.setdefault(f"{subject}:{kind}", now)


_BOOKING_KINDS = {EVENT_TYPES[kind]: kind for kind in ("created", "updated", "deleted")}
_BENCH_SUBJECT = '"subject": "bench-'  # (as a booking's JSON text writes a bench change's subject)


async def run(args: BenchArgs) -> Results:
    _pin(1)
    res = Results(rooms=args.rooms, concurrency=args.concurrency)
    _say(f"starting the simulator: {args.rooms} rooms with a year of bookings, {args.latency_ms:g} ms per call")
    t0 = time.monotonic()
    proc, info = start_simulator(args)
    _say(f"  simulator ready in {time.monotonic() - t0:.1f} s")
    rooms = [r["email"] for r in info["rooms"]]
    sa = info["service_account"]
    work = tempfile.TemporaryDirectory(prefix="gateway-bench-", ignore_cleanup_errors=True)
    store = Path(work.name) / "gateway.sqlite"  # 0.4 GB a 1,000 rooms: removed at the end
    options = GatewayOptions(
        ews=EwsSettings(ews_url=info["ews_url"], username=sa["username"], default_timezone="Europe/Berlin",
                        max_workers=args.concurrency),
        password=sa["password"], rooms=tuple(rooms),
        sync=SyncSettings(debounce_seconds=0.1, max_concurrent_rooms=args.concurrency,
                          reconcile_seconds=24 * 3600,
                          roll_seconds=24 * 3600),
        store_path=store, feed="streaming", stream_timeout_minutes=30)
    arrivals = Arrivals()

    gw = None
    try:
        t0 = time.monotonic()
        cpu0, sim_cpu0 = cpu_seconds(), cpu_seconds(proc.pid)
        metrics = Metrics()
        collector.settle()  # as `gateway run` does
        gw = await start_gateway(options, metrics)
        gw.coordinator.listeners.append(arrivals)
        await _until_in_sync(gw, arrivals, t0, "import")
        res.import_seconds = time.monotonic() - t0
        res.import_cpu_gateway = cpu_seconds() - cpu0
        res.import_cpu_simulator = cpu_seconds(proc.pid) - sim_cpu0
        res.import_ews_calls = ews_requests(metrics)
        res.import_rss_mb = peak_rss_mb()
        res.bookings = arrivals.created
        _say(f"  imported {arrivals.created} bookings in {res.import_seconds:.1f} s")
        await _until_idle(gw, len(rooms))
        _say(f"  subscribed and idle after {time.monotonic() - t0 - res.import_seconds:.1f} s")
        await steady_state(args, info, rooms, arrivals.seen, res, lambda: ews_requests(metrics))
        if args.restart:
            await stop_gateway(gw)
            gw = None
            gw = await restart(options, res, info, rooms, proc.pid)
    finally:
        res.rss_mb = peak_rss_mb()
        if gw is not None:
            await stop_gateway(gw)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        work.cleanup()
    return res


async def restart(options: GatewayOptions, res: Results, info: dict[str, Any], rooms: list[str],
                  simulator: int) -> Any:
    """A new gateway on the store the first one left (an upgrade, a moved pod), with one meeting booked in the last
    room while none ran: how long until that meeting's event comes, until every room has caught up with what
    happened meanwhile and until every room has been read in full again; the CPU and EWS calls that cost, and the
    booking events besides the meeting's (none: a restart that emits any repairs what was not broken)."""
    _say(f"restart: a new gateway on the same store, {len(rooms)} rooms known, a meeting booked meanwhile")
    last = max(r.lower() for r in rooms)  # (the rooms start in order: the last is read last)
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    async with _control(info) as http:
        await _book(http, info, last, "bench-restart", start)
    arrivals = Arrivals()
    metrics = Metrics()
    t0 = time.monotonic()
    cpu0, sim_cpu0 = cpu_seconds(), cpu_seconds(simulator)
    gw = await start_gateway(options, metrics)
    gw.coordinator.listeners.append(arrivals)
    await _until_in_sync(gw, arrivals, t0, "restart: caught up", lambda w: w.last_success is not None)
    res.restart_caught_up_seconds = time.monotonic() - t0
    await _until_in_sync(gw, arrivals, t0, "restart: read in full", lambda w: w.horizon is not None)
    res.restart_seconds = time.monotonic() - t0
    res.restart_cpu_gateway = cpu_seconds() - cpu0
    res.restart_cpu_simulator = cpu_seconds(simulator) - sim_cpu0
    res.restart_ews_calls = ews_requests(metrics)
    seen = arrivals.seen.get("bench-restart:created")
    res.restart_change_seconds = None if seen is None else seen - t0
    _say(f"  every room caught up after {res.restart_caught_up_seconds:.1f} s, read in full after "
         f"{res.restart_seconds:.1f} s")
    await _until_idle(gw, len(rooms))
    res.restart_ews_calls_until_idle = ews_requests(metrics)
    res.restart_booking_events = arrivals.booking_events - (seen is not None)
    return gw


def _control(info: dict[str, Any]) -> aiohttp.ClientSession:
    """A session on the simulator's control API (what people do in Exchange)."""
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {info['control_token']}"})


async def _book(http: aiohttp.ClientSession, info: dict[str, Any], room: str, subject: str, start: datetime) -> str:
    """A 30-minute appointment in the room's own calendar, through the simulator; its UID."""
    body = {"organizer": room, "rooms": [], "subject": subject, "start": start.isoformat(),
            "end": (start + timedelta(minutes=30)).isoformat()}
    async with http.post(f"{info['control_url'].rstrip('/')}/meetings", json=body) as r:
        r.raise_for_status()
        data = await r.json()
    return str(data.get("uid") or data.get("meeting", {}).get("uid"))


async def _until_idle(gw: Any, rooms: int) -> None:
    """Wait until every room is subscribed and the syncs that its subscription set off are done."""
    feed = gw.feed
    while feed is not None and getattr(feed, "subscriptions", 0) < rooms:
        await asyncio.sleep(0.2)
    # Every new subscription marks its room for a catch-up sync: let that wave pass before measuring.
    quiet_since, deadline = time.monotonic(), time.monotonic() + 300
    while time.monotonic() - quiet_since < 3.0 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if any(w.dirty.is_set() for w in gw.coordinator.workers.values()):
            quiet_since = time.monotonic()


async def _until_in_sync(gw: Any, arrivals: Arrivals, t0: float, what: str,
                         done: Callable[[Any], bool] = lambda w: w.horizon is not None) -> None:
    """Wait until every room of the gateway is ``done`` (by default: read in full once), saying how far it is
    every 5 s; fail with the rooms' states when nothing moved for STALL_SECONDS."""
    last_report = time.monotonic()
    workers = gw.coordinator.workers
    progress, moved = (0, 0), time.monotonic()
    waiting = [w for w in workers.values() if not done(w)]  # (a room done stays done: only these are looked at)
    while waiting:
        await asyncio.sleep(0.2)
        waiting = [w for w in waiting if not done(w)]
        now_at = (len(workers) - len(waiting), arrivals.created)
        if now_at != progress:
            progress, moved = now_at, time.monotonic()
        elif time.monotonic() - moved > STALL_SECONDS:
            states = Counter(f"{w.state}: {w.stored.reason if w.stored else ''}" for w in waiting)
            raise SystemExit(f"gateway bench: the {what} made no progress for {STALL_SECONDS:.0f} s; rooms not "
                             f"read, by state: {dict(states.most_common(5))}. The gateway's log (stderr, "
                             "--log-level info) says why.")
        if time.monotonic() - last_report > 5:
            last_report = time.monotonic()
            _say(f"  {what}: {now_at[0]}/{len(workers)} rooms, {arrivals.created} bookings "
                 f"({time.monotonic() - t0:.0f} s)")
        if time.monotonic() - t0 > 1800:
            _say(f"  {what} did not finish within 30 minutes; measuring what there is")
            break


def ews_requests(metrics: Metrics) -> int:
    """The EWS requests the gateway made so far (gateway_ews_requests_total, every operation and answer)."""
    return int(sum(sample.value for family in metrics.registry.collect() if family.name == "gateway_ews_requests"
                   for sample in family.samples if sample.name == "gateway_ews_requests_total"))


async def steady_state(args: BenchArgs, info: dict[str, Any], rooms: list[str], seen: dict[str, float],
                       res: Results, ews_calls: Callable[[], int], settle: float = 2.0) -> None:
    """``settle``: seconds a meeting is left alone before it is moved or cancelled (changes closer than the
    debounce, or than a polling interval, coalesce into one and their events never come)."""
    rng = random.Random(1)
    base = info["control_url"].rstrip("/")
    pending: dict[str, float] = {}  # expected event key -> time of the change
    live: list[tuple[str, str, str]] = []  # (uid, subject, room)
    touched: dict[str, float] = {}  # uid -> time of its last change: changes closer than the debounce coalesce
    total = int(args.rate * args.duration)
    calls_before = ews_calls()
    _say(f"steady state: {total} changes at {args.rate:g}/s")
    async with _control(info) as http:
        t_start = time.monotonic()
        for n in range(total):
            due = t_start + n / args.rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            room = rng.choice(rooms)
            ripe = [i for i, (uid, _, _) in enumerate(live) if time.monotonic() - touched.get(uid, 0) > settle]
            action = "create" if len(ripe) < 5 or rng.random() < 0.5 else rng.choice(["move", "cancel"])
            sent = time.monotonic()
            if action == "create":
                subject = f"bench-{n}"
                start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=rng.randint(1, 200),
                                                                             minutes=rng.randint(0, 600))
                uid = await _book(http, info, room, subject, start)
                live.append((uid, subject, room))
                touched[uid] = time.monotonic()
                pending[f"{subject}:created"] = (sent + time.monotonic()) / 2
            elif action == "move":
                uid, subject, room = live[rng.choice(ripe)]
                touched[uid] = time.monotonic()
                start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=rng.randint(1, 200))
                async with http.post(f"{base}/meetings/{uid}/move", json={"start": start.isoformat()}) as r:
                    await r.read()
                pending[f"{subject}:updated"] = (sent + time.monotonic()) / 2
                seen.pop(f"{subject}:updated", None)
            else:
                uid, subject, room = live.pop(rng.choice(ripe))
                async with http.delete(f"{base}/meetings/{uid}") as r:
                    await r.read()
                pending[f"{subject}:deleted"] = (sent + time.monotonic()) / 2
            res.changes += 1
            for key in [k for k in pending if k in seen]:
                res.latencies.append(max(0.0, seen[key] - pending.pop(key)))
            if n and n % max(1, total // 10) == 0:
                _say(f"  {n}/{total} changes")
        deadline = time.monotonic() + 20
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            for key in [k for k in pending if k in seen]:
                res.latencies.append(max(0.0, seen[key] - pending.pop(key)))
    res.missed = len(pending)
    res.ews_calls = ews_calls() - calls_before


def scale_command(args: BenchArgs, rooms: int) -> list[str]:
    """The sync part for one room count, in a process of its own (so that its peak RSS is its own)."""
    return [sys.executable, "-m", "gateway", "bench", "--rooms", str(rooms), "--only", "sync", "--json",
            "--rate", str(args.rate), "--duration", str(args.duration), "--latency-ms", str(args.latency_ms),
            "--concurrency", str(args.concurrency), "--log-level", "warning",
            *(() if args.restart else ("--no-restart",))]


def run_scale(args: BenchArgs, run_one: Callable[[list[str]], str] | None = None) -> list[dict[str, Any]]:
    """The sync part once per room count of ``args.scale``, each in a fresh process (simulator included)."""
    def subprocess_run(cmd: list[str]) -> str:
        return subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout

    runs = []
    for rooms in args.scale:
        _say(f"scale: {rooms} rooms")
        runs.append(json.loads((run_one or subprocess_run)(scale_command(args, rooms)).strip().splitlines()[-1]))
    return runs


def _print_import(out: dict[str, Any]) -> None:
    imp = out["import"]
    per = imp.get("cpu_ms_per_booking") or {}
    print(f"import:   {imp['rooms']} rooms, {imp['bookings']} bookings in {imp['seconds']} s "
          f"({imp['bookings_per_second']} bookings/s; CPU: gateway {imp['cpu_seconds']['gateway']} s, "
          f"simulator {imp['cpu_seconds']['simulator']} s; per booking: gateway {per.get('gateway')} ms, "
          f"simulator {per.get('simulator')} ms; {imp.get('ews_calls')} EWS calls; RSS {imp.get('rss_mb')} MB)")


def _print_restart(out: dict[str, Any]) -> None:
    r = out.get("restart")
    if r:
        print(f"restart:  a meeting booked while down came after {r['change_made_while_down_seconds']} s, every "
              f"room caught up in {r['caught_up_seconds']} s and read in full in {r['seconds']} s "
              f"(CPU: gateway {r['cpu_seconds']['gateway']} s, simulator {r['cpu_seconds']['simulator']} s; "
              f"{r['ews_calls']} EWS calls, {r['ews_calls_until_idle']} until subscribed and idle; "
              f"{r['other_booking_events']} other booking events)")


def main(args: BenchArgs) -> int:
    with one_at_a_time():
        return _main(args)


def _main(args: BenchArgs) -> int:
    from gateway import bench_graph, bench_relay

    out: dict[str, Any] = {}
    if args.sync and len(args.scale) > 1:
        out["scale"] = run_scale(args)
    elif args.sync:
        out.update(asyncio.run(run(args)).as_dict())
    if args.relay:
        relay = bench_relay.main(bench_relay.RelayBenchArgs(events=args.events, commands=args.commands,
                                                            rba_delay=args.rba_delay, latency_ms=args.latency_ms))
        if "tunnel" in relay:
            out["tunnel_events_per_s"] = relay["tunnel"]["per_second"]
            out["tunnel"] = relay["tunnel"]
        if "commands" in relay:
            out["command_ms"] = relay["commands"]
    if args.graph:
        runs = [{"rooms": rooms, **bench_graph.main(bench_graph.GraphBenchArgs(
                    rooms=rooms, rate=args.rate, duration=args.duration, latency_ms=args.latency_ms,
                    poll_interval=args.poll_interval))} for rooms in (args.scale or (args.rooms,))]
        if len(runs) == 1:
            out["graph"] = {k: v for k, v in runs[0].items() if k != "rooms"}
        else:
            out["graph_scale"] = runs
    if args.as_json:
        print(json.dumps(out))
        return 0
    for run_out in out.get("scale", ()):
        _print_import(run_out)
        print(f"          then EWS calls per change {run_out['ews_calls_per_change']}, change-to-event p99 "
              f"{run_out['latency_ms']['p99']} ms, peak RSS {run_out['rss_mb']} MB")
        _print_restart(run_out)
    if "import" in out:
        lat = out["latency_ms"]
        _print_import(out)
        print(f"latency:  p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms, max {lat['max']} ms "
              f"({lat['samples']} changes seen, {out['missed_changes']} missed)")
        print(f"EWS calls per change: {out['ews_calls_per_change']}")
        print(f"peak RSS: {out['rss_mb']} MB")
        _print_restart(out)
    if "tunnel" in out:
        t = out["tunnel"]
        print(f"tunnel:   {t['events']} events through one tunnel in {t['seconds']} s: {t['per_second']} events/s")
    if "command_ms" in out:
        c = out["command_ms"]
        print(f"commands: create round trip p50 {c['p50']} ms, p95 {c['p95']} ms, p99 {c['p99']} ms, max {c['max']} ms "
              f"({c['samples']} creates, attendant delay {c['rba_delay_s']:g} s; outcomes {c['outcomes']})")
    for graph in [out["graph"]] if "graph" in out else out.get("graph_scale", ()):
        bench_graph.print_lines(graph)
    return 0
