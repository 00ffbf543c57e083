"""`gateway simulator`: serve a seeded simulated Exchange until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import signal
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from gateway.simulator.server import SimulatorConfig

log = structlog.get_logger("gateway.simulator")


def simulator_config(args: argparse.Namespace) -> SimulatorConfig:
    """The simulator's settings from its command line. Answers are checked against the EWS schema unless a benchmark
    asks not to (the check costs about a tenth of the simulator's CPU; the test suite keeps it on)."""
    from gateway.simulator.server import SimulatorConfig

    return SimulatorConfig(rba_delay=args.rba_delay,
                           validate_responses=not getattr(args, "no_response_validation", False))


async def run_simulator(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway.simulator.control import Control
    from gateway.simulator.graph.tls import GraphTls
    from gateway.simulator.seed import ORGANIZER_ACCOUNT, place_online, seed_bookings, standard_org
    from gateway.simulator.server import Simulator, self_signed_context

    sim = Simulator(simulator_config(args))
    if getattr(args, "latency_ms", 0):
        sim.faults.latency["*"] = args.latency_ms / 1000  # every EWS call takes this long, like a busy server
        sim.graph.config.latency = args.latency_ms / 1000  # and every Graph call
    if getattr(args, "graph_notify_ca", None):
        ssl.create_default_context(cafile=args.graph_notify_ca)  # an unreadable bundle stops the start, not a delivery
        sim.graph.config.notify_ca_bundle = args.graph_notify_ca
    org = standard_org(sim.directory, rooms=args.rooms, users=args.users)
    graph_rooms = args.rooms // 3 if getattr(args, "graph_rooms", None) is None else min(args.graph_rooms, args.rooms)
    graph_users = args.users // 3 if getattr(args, "graph_users", None) is None else min(args.graph_users, args.users)
    online_rooms, online_users = place_online(sim.directory, org, rooms=graph_rooms, users=graph_users)
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
    # The Exchange Online side: HTTPS with a CA made now, whose PEM lands in a private temporary folder.
    graph_dir = Path(tempfile.mkdtemp(prefix="graph-sim-"))
    graph_tls = GraphTls(graph_dir, ("127.0.0.1", "localhost") if host in ("127.0.0.1", "::1") else (host,))
    graph_runner = web.AppRunner(sim.graph.make_app(), access_log=None, handler_cancellation=True)
    await graph_runner.setup()
    graph_site = web.TCPSite(graph_runner, args.host, getattr(args, "graph_port", 0), ssl_context=graph_tls.context)
    await graph_site.start()
    graph_server: Any = graph_site._server
    graph_port = graph_server.sockets[0].getsockname()[1]
    sim.graph.serving(f"https://{f'[{host}]' if ':' in host else host}:{graph_port}")
    ctl = Control.of(sim)
    if args.activity > 0:
        ctl.start_activity(args.activity, args.seed)
    ready: dict[str, Any] = {
        "ews_url": f"{base}/EWS/Exchange.asmx",
        "service_account": {"username": org.service_account, "password": org.service_password},
        "organizer_account": {"username": f"{sim.directory.netbios}\\{ORGANIZER_ACCOUNT}",
                              "password": org.service_password},
        "users": [{"email": email, "password": password} for email, password in org.users],
        "rooms": [{"email": smtp, "name": sim.directory.get(smtp).name,
                   "source": "graph" if smtp in online_rooms else "ews"} for smtp in org.rooms],
        "room_lists": org.room_lists,
        "control_url": f"{base}/control",
        "control_token": sim.config.control_token,
        "graph": {"url": sim.graph.graph_url, "authority": sim.graph.authority,
                  "tenant_id": sim.graph.config.tenant_id, "client_id": sim.graph.config.client_id,
                  "client_secret": sim.graph.config.client_secret, "ca_bundle": str(graph_tls.ca_bundle),
                  "users": online_users},
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
        await graph_runner.cleanup()
        await runner.cleanup()
        shutil.rmtree(graph_dir, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("simulator.stopped")
    return 0


