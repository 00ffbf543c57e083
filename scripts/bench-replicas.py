#!/usr/bin/env python3
"""How the cost grows when replicas share the rooms: one simulated Exchange, the initial import by one gateway of
every room, then by N replica processes each importing its share (gateway/sharding.py).

    python3 scripts/bench-replicas.py --rooms 3000 --replicas 3 [--latency-ms 20] [--json]

Per run: the wall time until every room is imported (the slowest replica), the bookings imported, and per process
its import time, CPU seconds and peak RSS. Each replica is its own process with its own SQLite store, as in a
StatefulSet; on a machine with fewer cores than replicas they compete for CPU, which the numbers then show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.app import GatewayOptions, start_gateway, stop_gateway
from gateway.bench import BenchArgs, cpu_seconds, peak_rss_mb, start_simulator
from gateway.observability.logging import configure_logging
from gateway.observability.metrics import Metrics
from gateway.sharding import Shard
from gateway.sources.ews.source import EwsSettings
from gateway.sync.coordinator import SyncSettings


async def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One replica: import its share of the rooms, then say how long it took and what it cost."""
    shard = Shard(spec["ordinal"], spec["count"])
    options = GatewayOptions(
        ews=EwsSettings(ews_url=spec["ews_url"], username=spec["username"], default_timezone="Europe/Berlin",
                        max_workers=10),
        password=spec["password"], rooms=tuple(spec["rooms"]),
        sync=SyncSettings(debounce_seconds=0.1, max_concurrent_rooms=10, reconcile_seconds=24 * 3600,
                          roll_seconds=24 * 3600),
        store_path=Path(spec["store"]), feed="poll", shard=shard, replicated=shard.count > 1)
    t0, cpu0 = time.monotonic(), cpu_seconds()
    gw = await start_gateway(options, Metrics())
    try:
        workers = gw.coordinator.workers
        while not all(w.last_success is not None for w in workers.values()):
            await asyncio.sleep(0.2)
            if time.monotonic() - t0 > 3600:
                break
        seconds, cpu, rss = time.monotonic() - t0, cpu_seconds() - cpu0, peak_rss_mb()
        # counted after the peak RSS is read: the whole outbox as objects would be most of it
        bookings = sum(1 for e in gw.store.outbox_after(0, 10_000_000) if e.event.type.endswith("created.v1"))
        return {"ordinal": shard.ordinal, "rooms": len(workers), "bookings": bookings,
                "import_seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "rss_mb": round(rss, 1)}
    finally:
        await stop_gateway(gw)


def run(info: dict[str, Any], count: int, workdir: Path) -> dict[str, Any]:
    rooms = [r["email"] for r in info["rooms"]]
    sa = info["service_account"]
    procs = []
    t0 = time.monotonic()
    for ordinal in range(count):
        spec = {"ordinal": ordinal, "count": count, "ews_url": info["ews_url"], "username": sa["username"],
                "password": sa["password"], "rooms": rooms, "store": str(workdir / f"{count}-{ordinal}.sqlite")}
        # Its answer in a file, its log in another: a pipe nobody reads while waiting on another replica would
        # fill and stall it.
        spec["result"] = str(workdir / f"{count}-{ordinal}.json")
        with open(workdir / f"{count}-{ordinal}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)],
                                          stdout=log, stderr=subprocess.STDOUT))
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a replica failed: see {workdir}")
    replicas = [json.loads(Path(workdir / f"{count}-{n}.json").read_text()) for n in range(count)]
    return {"replicas": count, "wall_seconds": round(time.monotonic() - t0, 1),
            "rooms": sum(r["rooms"] for r in replicas), "bookings": sum(r["bookings"] for r in replicas),
            "rss_mb_total": round(sum(r["rss_mb"] for r in replicas), 1),
            "cpu_seconds_total": round(sum(r["cpu_seconds"] for r in replicas), 1), "per_replica": replicas}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=3000)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        configure_logging("warning", "json")
        spec = json.loads(args.child)
        Path(spec["result"]).write_text(json.dumps(asyncio.run(child(spec))))
        return 0
    t0 = time.monotonic()
    sim, info = start_simulator(BenchArgs(rooms=args.rooms, latency_ms=args.latency_ms))
    print(f"simulator ready: {args.rooms} rooms in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
            results = [run(info, n, Path(tmp)) for n in (1, args.replicas)]
    finally:
        sim.send_signal(signal.SIGINT)
        try:
            sim.wait(timeout=15)
        except subprocess.TimeoutExpired:
            sim.kill()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['replicas']} replica(s): {r['rooms']} rooms, {r['bookings']} bookings imported in "
                  f"{r['wall_seconds']} s (wall); CPU {r['cpu_seconds_total']} s, "
                  f"peak RSS {r['rss_mb_total']} MB in all")
            for p in r["per_replica"]:
                print(f"  replica {p['ordinal']}: {p['rooms']} rooms, {p['bookings']} bookings, "
                      f"{p['import_seconds']} s, CPU {p['cpu_seconds']} s, peak RSS {p['rss_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
