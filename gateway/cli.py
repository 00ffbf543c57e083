"""The ``gateway`` command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import structlog

from gateway import __version__

log = structlog.get_logger("gateway.cli")

DESCRIPTION = "On-premise Exchange room-calendar gateway."
EPILOG = "Run `gateway COMMAND --help` for a command's options and examples."

SIMULATOR_EPILOG = """\
Once it is ready, the simulator prints exactly one JSON line on stdout:
  {"ews_url": ..., "service_account": {"username": ..., "password": ...}, "users": [{"email", "password"}...],
   "rooms": [{"email", "name"}...], "control_url": ..., "control_token": ...}
Logs (and the human-readable hints) go to stderr. It runs until SIGINT or SIGTERM.

Point exchangelib at ews_url with the service account (NTLM or Basic; it impersonates the rooms). Drive the
organisation through control_url with "Authorization: Bearer <control_token>", for example:
  curl -H "Authorization: Bearer $TOKEN" $CONTROL_URL/state
  curl -H "Authorization: Bearer $TOKEN" -X POST $CONTROL_URL/meetings -d '{"organizer": "alice@contoso.com",
       "rooms": ["room1@contoso.com"], "start": "2030-01-07T10:00", "end": "2030-01-07T11:00", "wait": true}'

Examples:
  gateway simulator --port 8080 --rooms 20 --users 30
  gateway simulator --port 0 --activity 0 --log-format json
"""

BENCH_EPILOG = """\
(a) starts `gateway simulator` in a subprocess pinned to one CPU core and drives it from this process, pinned
    to another core, with an aiohttp client over keep-alive connections (Basic auth, impersonating rooms):
    small GetFolder and FindItem/CalendarView calls. Prints calls per second and latency percentiles.
(b) builds N room mailboxes with a year of bookings in a fresh subprocess and prints its peak RSS (VmHWM), the
    items and occurrences it holds and how long seeding took.

Example:
  gateway simulator-bench --calls 20000 --concurrency 16 --rooms 10000
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    sim = subs.add_parser("simulator", help="run the Exchange 2016 (EWS) simulator with seeded rooms, people and "
                                            "a year of bookings",
                          description="Run the built-in Exchange 2016 (EWS) simulator.", epilog=SIMULATOR_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    sim.add_argument("--port", type=int, required=True, help="TCP port to listen on (0 picks a free one)")
    sim.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    sim.add_argument("--rooms", type=_count, default=10, metavar="N",
                     help="room mailboxes to create (default: %(default)s)")
    sim.add_argument("--users", type=_count, default=20, metavar="N",
                     help="user mailboxes to create (default: %(default)s)")
    sim.add_argument("--seed", type=int, default=1, metavar="S",
                     help="seed for bookings and activity (default: %(default)s)")
    sim.add_argument("--activity", type=_rate, default=0.5, metavar="RATE",
                     help="live booking changes per second; 0 for none (default: %(default)s)")
    sim.add_argument("--rba-delay", type=_seconds, default=2.0, metavar="SECONDS",
                     help="how long a room's booking attendant takes to answer (default: %(default)s)")
    sim.add_argument("--no-bookings", action="store_true", help="start with empty calendars (no seeded year)")
    sim.add_argument("--tls", action="store_true",
                     help="serve HTTPS with a certificate generated at start-up (its PEM is in the JSON line)")
    _logging_options(sim)

    bench = subs.add_parser("simulator-bench", help="measure the simulator: EWS calls/s on one core, memory for "
                                                    "10,000 rooms",
                            description="Measure the EWS simulator: throughput on one core, memory for many rooms.",
                            epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--calls", type=_count, default=10_000, metavar="N",
                       help="EWS calls to time (default: %(default)s)")
    bench.add_argument("--concurrency", type=_count, default=16, metavar="C",
                       help="requests in flight, one keep-alive connection each (default: %(default)s)")
    bench.add_argument("--rooms", type=_count, default=10_000, metavar="N",
                       help="rooms with a year of bookings for the memory measurement (default: %(default)s)")
    bench.add_argument("--ews-rooms", type=_count, default=100, metavar="N",
                       help="rooms (with a year of bookings) in the simulator the calls go to (default: %(default)s)")
    bench.add_argument("--skip-throughput", action="store_true", help="only measure memory")
    bench.add_argument("--skip-memory", action="store_true", help="only measure throughput")
    bench.add_argument("--json", action="store_true", help="print the results as one JSON object")
    _logging_options(bench, default_level="info")
    return parser


def _logging_options(p: argparse.ArgumentParser, default_level: str = "info") -> None:
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                   help="log format on stderr: console on a terminal, JSON otherwise (default: %(default)s)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=default_level,
                   help="log level (default: %(default)s)")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be between 0 and 1000 changes per second")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from gateway.observability.logging import configure_logging

    configure_logging(args.log_level, args.log_format)
    if args.command == "simulator":
        return asyncio.run(run_simulator(args))
    if args.command == "simulator-bench":
        return run_bench(args)
    parser.error(f"unknown command {args.command}")
    return 2


# -- gateway simulator -------------------------------------------------------------------------------------
async def run_simulator(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway.simulator.control import Control
    from gateway.simulator.seed import ORGANIZER_ACCOUNT, seed_bookings, standard_org
    from gateway.simulator.server import Simulator, SimulatorConfig, self_signed_context

    sim = Simulator(SimulatorConfig(rba_delay=args.rba_delay))
    org = standard_org(sim.directory, rooms=args.rooms, users=args.users)
    if not args.no_bookings and args.rooms:
        started = time.perf_counter()
        stats = seed_bookings(sim.directory, seed=args.seed)
        gc.freeze()  # the seeded year lives as long as the process: keep it out of every later collection
        log.info("simulator.seeded", rooms=stats.rooms, items=stats.items, occurrences=stats.occurrences,
                 seconds=round(time.perf_counter() - started, 2))
    ssl_ctx, cert_pem = (None, None)
    if args.tls:
        ssl_ctx, cert_pem = self_signed_context("localhost" if args.host in ("127.0.0.1", "::1") else args.host)
    runner = web.AppRunner(sim.make_app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, ssl_context=ssl_ctx)
    await site.start()
    server: Any = site._server
    port = server.sockets[0].getsockname()[1]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(args.host, args.host)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    base = f"{'https' if args.tls else 'http'}://{netloc}"
    ctl = Control.of(sim)
    if args.activity > 0:
        ctl.start_activity(args.activity, args.seed)
    ready: dict[str, Any] = {
        "ews_url": f"{base}/EWS/Exchange.asmx",
        "service_account": {"username": org.service_account, "password": org.service_password},
        "organizer_account": {"username": f"{sim.directory.netbios}\\{ORGANIZER_ACCOUNT}",
                              "password": org.service_password},
        "users": [{"email": email, "password": password} for email, password in org.users],
        "rooms": [{"email": smtp, "name": sim.directory.get(smtp).name} for smtp in org.rooms],
        "room_lists": org.room_lists,
        "control_url": f"{base}/control",
        "control_token": sim.config.control_token,
    }
    if cert_pem is not None:
        ready["tls_certificate_pem"] = cert_pem.decode()
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    log.info("simulator.ready", ews_url=ready["ews_url"], service_account=org.service_account,
             control_url=ready["control_url"], rooms=len(org.rooms), users=len(org.users), activity=args.activity,
             hint="point exchangelib at ews_url with service_account (NTLM or Basic, impersonating the rooms); "
                  "the password and the control token are in the JSON line on stdout")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("simulator.stopping")
        ctl.stop_activity()
        await runner.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("simulator.stopped")
    return 0


# -- gateway simulator-bench -------------------------------------------------------------------------------
SOAP_HEAD = ('<?xml version="1.0" encoding="utf-8"?>'
             '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
             'xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" '
             'xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">'
             '<s:Header><t:RequestServerVersion Version="Exchange2016"/>'
             '<t:ExchangeImpersonation><t:ConnectingSID><t:SmtpAddress>{room}</t:SmtpAddress></t:ConnectingSID>'
             '</t:ExchangeImpersonation></s:Header><s:Body>')
SOAP_TAIL = "</s:Body></s:Envelope>"
GET_FOLDER = ('<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>'
              '<m:FolderIds><t:DistinguishedFolderId Id="calendar"/></m:FolderIds></m:GetFolder>')
FIND_ITEM = ('<m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape>'
             '<t:AdditionalProperties><t:FieldURI FieldURI="item:Subject"/><t:FieldURI FieldURI="calendar:Start"/>'
             '<t:FieldURI FieldURI="calendar:End"/><t:FieldURI FieldURI="calendar:UID"/>'
             '<t:FieldURI FieldURI="calendar:CalendarItemType"/><t:FieldURI FieldURI="calendar:Organizer"/>'
             '<t:FieldURI FieldURI="calendar:LegacyFreeBusyStatus"/><t:FieldURI FieldURI="calendar:IsCancelled"/>'
             '</t:AdditionalProperties></m:ItemShape>'
             '<m:CalendarView MaxEntriesReturned="100" StartDate="{start}" EndDate="{end}"/>'
             '<m:ParentFolderIds><t:DistinguishedFolderId Id="calendar"/></m:ParentFolderIds></m:FindItem>')


def run_bench(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {}
    if not args.skip_throughput:
        results["throughput"] = bench_throughput(args)
    if not args.skip_memory:
        results["memory"] = bench_memory(args.rooms)
    if args.json:
        print(json.dumps(results))
    else:
        _print_results(results)
    return 0


def _print_results(results: dict[str, Any]) -> None:
    t = results.get("throughput")
    if t:
        print(f"EWS throughput ({t['cores']}): {t['calls']} calls ({', '.join(t['operations'])}), "
              f"concurrency {t['concurrency']}, {t['ews_rooms']} seeded rooms")
        print(f"  {t['calls_per_second']:.0f} calls/s   latency p50 {t['p50_ms']:.2f} ms   "
              f"p95 {t['p95_ms']:.2f} ms   p99 {t['p99_ms']:.2f} ms   errors {t['errors']}   "
              f"server CPU {t['server_cpu_percent']}%")
        print(f"  aim: >= 1000 calls/s on one core: {'met' if t['calls_per_second'] >= 1000 else 'MISSED'}")
    m = results.get("memory")
    if m:
        print(f"Memory: {m['rooms']} rooms, {m['users']} users, {m['items']} calendar items, "
              f"{m['occurrences']} occurrences in room calendars")
        print(f"  peak RSS {m['peak_rss_mb']:.0f} MB (baseline before seeding {m['baseline_rss_mb']:.0f} MB), "
              f"seeding took {m['seed_seconds']:.1f} s")
        print(f"  aim: < 2 GB: {'met' if m['peak_rss_mb'] < 2048 else 'MISSED'}")


def _cores() -> tuple[int | None, int | None]:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) >= 2:
        return cpus[0], cpus[1]
    return (cpus[0], cpus[0]) if cpus else (None, None)


def bench_throughput(args: argparse.Namespace) -> dict[str, Any]:
    server_cpu, client_cpu = _cores()

    def pin() -> None:
        if server_cpu is not None:
            os.sched_setaffinity(0, {server_cpu})

    cmd = [sys.executable, "-m", "gateway", "simulator", "--port", "0", "--rooms", str(args.ews_rooms),
           "--users", str(max(5, args.ews_rooms // 5)), "--activity", "0", "--log-level", "warning",
           "--log-format", "json"]
    log.info("bench.starting_simulator", cpu=server_cpu, rooms=args.ews_rooms)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, preexec_fn=pin, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the simulator did not start (exit code {proc.wait(timeout=10)})")
        ready = json.loads(line)
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})
        result = asyncio.run(_drive(ready, args.calls, args.concurrency, proc.pid))
        result["cores"] = (f"server on CPU {server_cpu}, client on CPU {client_cpu}"
                           if server_cpu != client_cpu else "server and client share one CPU")
        result["ews_rooms"] = args.ews_rooms
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (Linux), to show how busy the server's core was."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


async def _drive(ready: dict[str, Any], calls: int, concurrency: int, pid: int | None = None) -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta

    import aiohttp

    url = ready["ews_url"]
    account = ready["service_account"]
    rooms = [r["email"] for r in ready["rooms"]]
    monday = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    monday -= timedelta(days=monday.weekday())
    view = {"start": monday.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end": (monday + timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    bodies: list[bytes] = []
    for i, room in enumerate(rooms):
        op = GET_FOLDER if i % 2 == 0 else FIND_ITEM.format(**view)
        bodies.append((SOAP_HEAD.format(room=room) + op + SOAP_TAIL).encode())
    if len(bodies) == 1:
        bodies.append((SOAP_HEAD.format(room=rooms[0]) + FIND_ITEM.format(**view) + SOAP_TAIL).encode())
    auth = aiohttp.BasicAuth(account["username"], account["password"])
    headers = {"Content-Type": "text/xml; charset=utf-8"}
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, auth=auth, headers=headers) as session:
        counter = iter(range(10**12))

        async def worker(total: int, record: bool) -> None:
            nonlocal errors
            while True:
                n = next(counter)
                if n >= total:
                    return
                body = bodies[n % len(bodies)]
                t0 = time.perf_counter()
                async with session.post(url, data=body) as resp:
                    payload = await resp.read()
                elapsed = time.perf_counter() - t0
                if resp.status != 200 or b'ResponseClass="Success"' not in payload:
                    errors += 1
                if record:
                    latencies.append(elapsed)

        warm = min(500, max(50, calls // 10))
        log.info("bench.warming_up", calls=warm)
        await asyncio.gather(*(worker(warm, False) for _ in range(concurrency)))
        counter = iter(range(10**12))
        errors = 0
        log.info("bench.measuring", calls=calls, concurrency=concurrency)
        started, cpu_before = time.perf_counter(), _cpu_seconds(pid)
        await asyncio.gather(*(worker(calls, True) for _ in range(concurrency)))
        wall = time.perf_counter() - started
        server_cpu = _cpu_seconds(pid) - cpu_before
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0.0

    return {"calls": len(latencies), "concurrency": concurrency, "seconds": round(wall, 3),
            "calls_per_second": round(len(latencies) / wall, 1) if wall else 0.0, "p50_ms": round(pct(0.50), 3),
            "p95_ms": round(pct(0.95), 3), "p99_ms": round(pct(0.99), 3), "errors": errors,
            "server_cpu_percent": round(100 * server_cpu / wall, 1) if wall and pid else None,
            "operations": ["GetFolder (calendar)", "FindItem (CalendarView, one week)"]}


MEMORY_PROBE = """
import json, sys, time
from gateway.observability.logging import configure_logging
configure_logging("info", "auto")
from gateway.cli import memory_probe
print(json.dumps(memory_probe(int(sys.argv[1]))), flush=True)
"""


def bench_memory(rooms: int) -> dict[str, Any]:
    log.info("bench.memory_probe_starting", rooms=rooms, hint="builds the rooms in a fresh subprocess")
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(rooms)], stdout=subprocess.PIPE, stderr=None,
                         text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _vm(field: str) -> float:
    """A /proc/self/status value in MB (VmHWM: peak resident set size; VmRSS: now)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def memory_probe(rooms: int) -> dict[str, Any]:
    """Build ``rooms`` rooms with a year of bookings in this process and report what it costs."""
    from gateway.simulator import schema
    from gateway.simulator.seed import seed_bookings, standard_org
    from gateway.simulator.server import Simulator, SimulatorConfig

    sim = Simulator(SimulatorConfig())
    schema.ews_schema()  # a serving simulator holds the compiled schema too
    users = max(5, rooms // 5)
    org = standard_org(sim.directory, rooms=rooms, users=users)
    baseline = _vm("VmRSS")
    log.info("bench.seeding", rooms=rooms, users=users)
    started = time.perf_counter()
    stats = seed_bookings(sim.directory, seed=1)
    seconds = time.perf_counter() - started
    gc.freeze()
    log.info("bench.seeded", items=stats.items, seconds=round(seconds, 1))
    return {"rooms": len(org.rooms), "users": users, "items": len(sim.directory.items),
            "occurrences": stats.occurrences, "series": stats.series, "single_bookings": stats.singles,
            "seed_seconds": round(seconds, 2), "baseline_rss_mb": round(baseline, 1),
            "peak_rss_mb": round(_vm("VmHWM"), 1), "seed_stats": stats.as_dict()}


if __name__ == "__main__":
    raise SystemExit(main())
