"""The Graph part of `gateway bench`: Exchange Online rooms read through Microsoft Graph.

Two phases, each with a fresh simulator (on one core; every room online, a year of bookings) and a fresh gateway with
one Graph source over HTTPS (the simulator's CA):
- notifications: a real hub (TLS on loopback, certificates made for the run, trusted by the simulator's Graph side),
  the gateway enrolled and its tunnel up; each room subscribed at the hub, changes arrive as webhooks forwarded down
  the tunnel;
- polling: no relay; each room's delta is asked every ``poll_interval`` seconds.
For each: the import (seconds, Graph calls), change-to-event latency percentiles under a steady rate of changes,
Graph calls per change in that steady state (idle polls included: they are the price of polling), and CPU seconds
of the bench process (the gateway, and in the notifications phase the hub too) and of the simulator.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import collector
from gateway.app import GatewayOptions, start_gateway, stop_gateway
from gateway.bench import (
    Arrivals,
    BenchArgs,
    Results,
    _pin,
    _say,
    cpu_seconds,
    launch_simulator,
    peak_rss_mb,
    steady_state,
)
from gateway.bench_relay import _hub, _identity
from gateway.config import RelayConfig
from gateway.hub.server import RunningHub
from gateway.observability.metrics import Metrics
from gateway.ports import SourceSpec
from gateway.security.certs import Pki, make_pki
from gateway.sources.graph.settings import GraphSettings
from gateway.sync.coordinator import SyncSettings

PHASES = ("notifications", "polling")


@dataclass
class GraphBenchArgs:
    rooms: int = 100
    rate: float = 5.0
    duration: float = 30.0
    latency_ms: float = 20.0
    poll_interval: float = 5.0
    phases: tuple[str, ...] = PHASES


def simulator_command(args: GraphBenchArgs, notify_ca: Path | None) -> list[str]:
    """Every room online; answers not checked against the schema (the simulator's CPU is the cost of serving)."""
    cmd = [sys.executable, "-m", "gateway", "simulator", "--port", "0", "--rooms", str(args.rooms),
           "--graph-rooms", str(args.rooms), "--users", "20", "--graph-users", "0", "--activity", "0",
           "--rba-delay", "0.05", "--latency-ms", str(args.latency_ms), "--no-response-validation",
           "--log-level", "warning", "--log-format", "json"]
    return cmd + (["--graph-notify-ca", str(notify_ca)] if notify_ca is not None else [])


def graph_requests(metrics: Metrics) -> int:
    """The Graph requests the gateway made so far (gateway_graph_requests_total, every operation and status)."""
    return int(sum(sample.value for family in metrics.registry.collect() if family.name == "gateway_graph_requests"
                   for sample in family.samples if sample.name == "gateway_graph_requests_total"))


def requests_by_operation(metrics: Metrics) -> dict[str, int]:
    """The Graph requests so far by operation (delta, getEvent, instances, ...), every status."""
    out: dict[str, int] = {}
    for family in metrics.registry.collect():
        if family.name == "gateway_graph_requests":
            for sample in family.samples:
                if sample.name == "gateway_graph_requests_total":
                    op = sample.labels["operation"]
                    out[op] = out.get(op, 0) + int(sample.value)
    return out


def hub_posts(running: RunningHub | None) -> dict[str, int]:
    """The Graph posts the hub answered so far, by outcome (forwarded down the tunnel, rate_limited with 429: Graph
    retries those later, which shows in the latency)."""
    if running is None:
        return {}
    registry = running.hub.metrics.registry
    return {o: int(registry.get_sample_value("gateway_hub_graph_notifications_total", {"outcome": o}) or 0)
            for o in ("forwarded", "rate_limited", "dropped_offline")}


def rooms_in_mode(metrics: Metrics, mode: str) -> int:
    return int(metrics.registry.get_sample_value("gateway_graph_rooms", {"mode": mode}) or 0)


async def _until(check: Any, seconds: float, what: str) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            _say(f"  {what}: not within {seconds:.0f} s; measuring what there is")
            return False
        await asyncio.sleep(0.2)
    return True


async def phase(args: GraphBenchArgs, mode: str, work: Path, pki: Pki) -> dict[str, Any]:
    _say(f"graph ({mode}): starting the simulator: {args.rooms} online rooms with a year of bookings, "
         f"{args.latency_ms:g} ms per call")
    proc, info = launch_simulator(simulator_command(args, pki.ca_file if mode == "notifications" else None))
    g = info["graph"]
    rooms = [r["email"] for r in info["rooms"] if r["source"] == "graph"]
    res = Results(rooms=len(rooms))
    arrivals = Arrivals()

    running = gw = None
    try:
        relay, identity = RelayConfig(), None
        if mode == "notifications":
            running, token = await _hub(work, pki)
            identity, relay = await _identity(work, running, token, pki)
        settings = GraphSettings(tenant_id=g["tenant_id"], client_id=g["client_id"], credential="client_secret",
                                 authority_host=g["authority"].rsplit("/", 1)[0], graph_url=g["url"],
                                 ca_bundle=g["ca_bundle"], poll_interval_seconds=args.poll_interval)
        options = GatewayOptions(
            sources=(SourceSpec("online", "graph", settings, g["client_secret"], rooms=tuple(rooms)),),
            sync=SyncSettings(debounce_seconds=0.1, max_concurrent_rooms=10, reconcile_seconds=24 * 3600,
                              roll_seconds=24 * 3600),
            store_path=work / f"gateway-{mode}.sqlite", relay=relay, identity=identity)
        metrics = Metrics()
        t0 = time.monotonic()
        cpu0, sim_cpu0 = cpu_seconds(), cpu_seconds(proc.pid)
        collector.settle()  # as `gateway run` does
        gw = await start_gateway(options, metrics)
        gw.coordinator.listeners.append(arrivals)
        workers = gw.coordinator.workers
        await _until(lambda: all(w.last_success is not None for w in workers.values()), 1800, "import")
        res.import_seconds = time.monotonic() - t0
        res.import_cpu_gateway = cpu_seconds() - cpu0
        res.import_cpu_simulator = cpu_seconds(proc.pid) - sim_cpu0
        res.import_ews_calls = graph_requests(metrics)
        res.import_rss_mb = peak_rss_mb()
        res.bookings = arrivals.created
        _say(f"  imported {arrivals.created} bookings in {res.import_seconds:.1f} s")
        await _until(lambda: rooms_in_mode(metrics, mode) == len(rooms), 300, f"every room in {mode} mode")
        # Let the catch-up after subscribing pass before measuring. (Polled rooms have none, and are never quiet for
        # long: each is marked in its turn of the interval.)
        quiet_since, deadline = time.monotonic(), time.monotonic() + (300 if mode == "notifications" else 0)
        while time.monotonic() - quiet_since < 3.0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            if any(w.dirty.is_set() for w in workers.values()):
                quiet_since = time.monotonic()
        ready_modes = {m: rooms_in_mode(metrics, m) for m in PHASES}
        cpu1, sim_cpu1 = cpu_seconds(), cpu_seconds(proc.pid)
        posts0 = hub_posts(running)
        ops0, steady0 = requests_by_operation(metrics), time.monotonic()
        # Polling sees a meeting changed twice within one interval as one change: leave each alone for longer.
        settle = 2.0 + (args.poll_interval if mode == "polling" else 0.0)
        await steady_state(BenchArgs(rate=args.rate, duration=args.duration), info, rooms, arrivals.seen, res,
                           lambda: graph_requests(metrics), settle=settle)
        posts = {k: v - posts0.get(k, 0) for k, v in hub_posts(running).items()}
        steady_seconds = time.monotonic() - steady0
        ops = {k: v - ops0.get(k, 0) for k, v in sorted(requests_by_operation(metrics).items())}
        cpu_steady = (cpu_seconds() - cpu1, cpu_seconds(proc.pid) - sim_cpu1)
    finally:
        if gw is not None:
            await stop_gateway(gw)
        if running is not None:
            await running.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    out = res.as_dict()
    imp = out["import"]
    lat = out["latency_ms"]
    _say(f"  {mode}: p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms ({lat['samples']} seen, "
         f"{out['missed_changes']} missed); Graph calls per change {out['ews_calls_per_change']}")
    return {
        "mode": mode,
        "poll_interval_s": args.poll_interval if mode == "polling" else None,
        "rooms_by_mode": ready_modes,
        # Whose CPU "gateway" counts: the bench process's, where in the notifications phase the hub runs too (it
        # takes every event the gateway relays, and Graph's posts): the polling phase's is the gateway's alone.
        "cpu_of": "gateway and hub" if mode == "notifications" else "gateway",
        "import": {"rooms": imp["rooms"], "bookings": imp["bookings"], "seconds": imp["seconds"],
                   "graph_calls": imp["ews_calls"], "cpu_seconds": imp["cpu_seconds"],
                   "cpu_ms_per_booking": imp["cpu_ms_per_booking"], "rss_mb": imp["rss_mb"]},
        "rate_per_s": args.rate,
        "changes": out["changes"],
        "missed_changes": out["missed_changes"],
        "latency_ms": out["latency_ms"],
        "graph_calls": res.ews_calls,
        "graph_calls_per_change": out["ews_calls_per_change"],
        # By operation: in the polling phase "delta" is mostly idle polls (rooms / poll_interval per second, the
        # price of polling, whatever the rate of changes); the rest is what the changes themselves cost.
        "graph_calls_by_operation": {k: v for k, v in ops.items() if v},
        "delta_calls_per_s": round(ops.get("delta", 0) / steady_seconds, 1) if steady_seconds else None,
        "cpu_seconds": {"gateway": round(cpu_steady[0], 1), "simulator": round(cpu_steady[1], 1)},
        "hub_posts": posts or None,  # Graph's posts at the hub during the changes, by outcome
    }


async def run(args: GraphBenchArgs) -> dict[str, Any]:
    _pin(1)
    with tempfile.TemporaryDirectory(prefix="gateway-graph-bench-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)  # the stores and the hub's: removed at the end
        pki = make_pki(work / "pki")
        return {mode: await phase(args, mode, work, pki) for mode in args.phases}


def main(args: GraphBenchArgs) -> dict[str, Any]:
    return asyncio.run(run(args))


def print_lines(graph: dict[str, Any]) -> None:
    for mode, p in graph.items():
        if not isinstance(p, dict):
            continue  # graph_scale's "rooms"
        imp, lat = p["import"], p["latency_ms"]
        poll = f", polled every {p['poll_interval_s']:g} s" if p["poll_interval_s"] else ""
        per = imp.get("cpu_ms_per_booking") or {}
        who = p.get("cpu_of", "gateway")
        print(f"graph ({mode}{poll}): import of {imp['rooms']} online rooms, {imp['bookings']} bookings in "
              f"{imp['seconds']} s ({imp['graph_calls']} Graph calls; CPU {who} {imp['cpu_seconds']['gateway']} s, "
              f"simulator {imp['cpu_seconds']['simulator']} s; per booking: {who} {per.get('gateway')} ms, "
              f"simulator {per.get('simulator')} ms; RSS {imp.get('rss_mb')} MB)")
        print(f"          latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms, max {lat['max']} ms "
              f"({lat['samples']} changes seen, {p['missed_changes']} missed, {p['rate_per_s']:g}/s); Graph calls "
              f"per change {p['graph_calls_per_change']} ({p['graph_calls_by_operation']}, "
              f"{p['delta_calls_per_s']} deltas/s); CPU {who} {p['cpu_seconds']['gateway']} s, "
              f"simulator {p['cpu_seconds']['simulator']} s"
              + (f"; hub posts {p['hub_posts']}" if p["hub_posts"] else ""))
