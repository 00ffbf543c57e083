"""`gateway simulator-bench`: the simulator's throughput on one core and its memory for many rooms."""

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
from typing import Any

import structlog

log = structlog.get_logger("gateway.simulator.bench")


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
from gateway.simulator.bench import memory_probe
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

