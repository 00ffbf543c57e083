"""The relay part of `gateway bench`: events per second through one tunnel, and booking command round trips.

- tunnel: a real hub (TLS on loopback, certificates made for the run) and a gateway identity enrolled at it; an
  outbox filled with N booking events; the time from starting the tunnel until the hub has stored and acknowledged
  the last of them (connect and handshake included).
- commands: the simulator (its booking attendant answering after --rba-delay), a gateway synced to it with the
  tunnel up, and the vendor's create commands sent to the hub's REST API; the round trip as the vendor sees it:
  POST /commands -> hub -> tunnel -> gateway -> Exchange (meeting in the organizer's calendar) -> the attendant's
  answer -> result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from gateway import collector
from gateway.api import EventHub
from gateway.app import GatewayOptions, start_gateway, stop_gateway
from gateway.config import CommandsConfig, RelayConfig
from gateway.hub.server import HubSettings, RunningHub, start_hub
from gateway.model import EVENT_TYPES, Booking, Command, CommandResult, Event, Room, failed, to_json
from gateway.observability.metrics import Metrics
from gateway.relay.enroll import enroll
from gateway.relay.tunnel import Tunnel
from gateway.security.certs import Pki, make_pki
from gateway.security.identity import GatewayIdentity
from gateway.security.vault import Vault, parse_key
from gateway.sources.ews.source import EwsSettings
from gateway.store.sqlite import SqliteStore
from gateway.sync.coordinator import SyncSettings

CUSTOMER = "bench"


@dataclass
class RelayBenchArgs:
    events: int = 50_000
    commands: int = 100
    concurrency: int = 5
    rba_delay: float = 0.5
    latency_ms: float = 20.0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentiles(samples: list[float]) -> dict[str, float | int | None]:
    s = sorted(samples)

    def pct(p: float) -> float | None:
        return round(s[min(len(s) - 1, int(p / 100 * len(s)))] * 1000, 1) if s else None
    return {"p50": pct(50), "p95": pct(95), "p99": pct(99), "max": pct(100), "samples": len(s)}


class _NoCommands:
    async def execute(self, cmd: Command) -> CommandResult:
        return failed(cmd.key, "internal", "the tunnel benchmark runs no commands", retryable=False)


async def _hub(work: Path, pki: Pki) -> tuple[RunningHub, str]:
    running = await start_hub(HubSettings(data_dir=work / f"hub-{secrets.token_hex(4)}", cert_file=pki.cert_file,
                                          key_file=pki.key_file, port=0))
    hub = running.hub
    await hub.write(hub.store.add_customer, CUSTOMER, "Benchmark")
    token, _ = await hub.write(hub.store.issue_token, CUSTOMER, timedelta(hours=1))
    return running, token


async def _identity(work: Path, running: RunningHub, token: str, pki: Pki) -> tuple[GatewayIdentity, RelayConfig]:
    import base64

    key = parse_key(base64.b64encode(secrets.token_bytes(32)).decode(), "bench")
    vault = Vault(work / f"credentials-{secrets.token_hex(4)}.vault", key)
    relay = RelayConfig(enabled=True, ca_bundle=pki.ca_file, reconnect_max_seconds=1)
    identity = await enroll(running.url, token, vault=vault, relay=relay, name="bench")
    return identity, RelayConfig(enabled=True, hub_url=identity.hub_url, ca_bundle=pki.ca_file,
                                 reconnect_max_seconds=1)


def _fill(store: SqliteStore, n: int, rooms: int = 50) -> int:
    t0 = datetime(2031, 1, 6, 8, tzinfo=UTC)
    last = 0
    for r in range(rooms):
        store.upsert_room(Room(f"room{r}@bench.example"))
    per_batch = 500
    for b0 in range(0, n, per_batch):
        room = f"room{(b0 // per_batch) % rooms}@bench.example"
        bookings = [Booking(room=room, uid=f"uid-{i}", start=t0 + timedelta(minutes=30 * i),
                            end=t0 + timedelta(minutes=30 * i + 25), subject=f"Meeting {i}",
                            organizer=None) for i in range(b0, min(n, b0 + per_batch))]
        entries = store.commit_sync(room, upserts=bookings, deletes=(), events=[
            Event(id=f"ev-{b.uid}", type=EVENT_TYPES["created"], room=room, subject=b.id, time=t0, data=to_json(b))
            for b in bookings])
        last = entries[-1].seq
    return last


async def tunnel_throughput(args: RelayBenchArgs, work: Path, pki: Pki) -> dict[str, Any]:
    running, token = await _hub(work, pki)
    try:
        identity, relay = await _identity(work, running, token, pki)
        store = SqliteStore(work / "tunnel.sqlite")
        _say(f"tunnel: filling an outbox with {args.events} booking events")
        last = await asyncio.to_thread(_fill, store, args.events)
        tunnel = Tunnel(relay, identity, store, _NoCommands(), notifier=EventHub())
        t0 = time.monotonic()
        task = asyncio.create_task(tunnel.run())
        try:
            while store.acked() < last:
                await asyncio.sleep(0.01)
            seconds = time.monotonic() - t0
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await tunnel.close()
        stored = await running.hub.read(running.hub.store.event_count, CUSTOMER)
        store.close()
        rate = args.events / seconds
        _say(f"  {args.events} events stored and acknowledged by the hub in {seconds:.2f} s: {rate:,.0f} events/s")
        return {"events": args.events, "seconds": round(seconds, 2), "per_second": round(rate),
                "hub_stored": stored}
    finally:
        await running.close()


def _simulator(args: RelayBenchArgs, rooms: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    cmd = [sys.executable, "-m", "gateway", "simulator", "--port", "0", "--rooms", str(rooms), "--users", "20",
           "--activity", "0", "--no-bookings", "--rba-delay", str(args.rba_delay), "--graph-rooms", "0",
           "--latency-ms", str(args.latency_ms), "--log-level", "warning", "--log-format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("the simulator did not start; run the command above by hand to see why")
    return proc, json.loads(line)


async def command_latency(args: RelayBenchArgs, work: Path, pki: Pki) -> dict[str, Any]:
    rooms = 20
    proc, info = _simulator(args, rooms)
    running = gw = None
    try:
        running, token = await _hub(work, pki)
        identity, relay = await _identity(work, running, token, pki)
        org = info["organizer_account"]
        room_list = [r["email"] for r in info["rooms"]]
        users = [u["email"] for u in info["users"]]
        options = GatewayOptions(
            ews=EwsSettings(ews_url=info["ews_url"], username=org["username"], default_timezone="Europe/Berlin",
                            max_workers=10),
            password=org["password"], rooms=tuple(room_list), sync=SyncSettings(debounce_seconds=0.1),
            store_path=work / "commands.sqlite", feed="streaming", relay=relay, identity=identity,
            commands=CommandsConfig(rate_per_minute=100_000, burst=1000))
        collector.settle()  # as `gateway run` does
        gw = await start_gateway(options, Metrics())
        while running.hub.sessions.get(identity.gateway_id) is None:
            await asyncio.sleep(0.05)
        api_key = await running.hub.write(running.hub.store.issue_api_key, CUSTOMER)
        url = f"{running.url}/v1/customers/{CUSTOMER}/commands"
        headers = {"Authorization": f"Bearer {api_key}"}
        ssl_ctx = pki.client_context()
        day = (datetime.now(UTC) + timedelta(days=2)).replace(hour=0, minute=0, second=0, microsecond=0)
        latencies: list[float] = []
        outcomes: dict[str, int] = {}
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.commands):
            queue.put_nowait(i)
        _say(f"commands: {args.commands} creates for directory users, {args.concurrency} at a time, the booking "
             f"attendant answering after {args.rba_delay:g} s, Exchange latency {args.latency_ms:g} ms per call")

        async def worker(session: aiohttp.ClientSession) -> None:
            while not queue.empty():
                i = queue.get_nowait()
                start = day + timedelta(hours=i // rooms)
                cmd = {"key": f"bench-{i}", "type": "create", "room": room_list[i % rooms],
                       "start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "end": (start + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "subject": f"Bench {i}", "organizer": {"email": users[i % len(users)]}}
                t0 = time.monotonic()
                async with session.post(url, json=cmd, headers=headers, ssl=ssl_ctx) as r:
                    body = await r.json()
                latencies.append(time.monotonic() - t0)
                status = body.get("status", "error")
                outcomes[status] = outcomes.get(status, 0) + 1

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
        out = {**percentiles(latencies), "outcomes": outcomes, "rba_delay_s": args.rba_delay}
        _say(f"  round trip p50 {out['p50']} ms, p95 {out['p95']} ms, p99 {out['p99']} ms, max {out['max']} ms; "
             f"outcomes {outcomes}")
        return out
    finally:
        if gw is not None:
            await stop_gateway(gw)
        if running is not None:
            await running.close()
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


async def run(args: RelayBenchArgs) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gateway-relay-bench-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)  # the tunnel's and the hub's stores: removed at the end
        pki = make_pki(work / "pki")
        results: dict[str, Any] = {}
        if args.events:
            results["tunnel"] = await tunnel_throughput(args, work, pki)
        if args.commands:
            results["commands"] = await command_latency(args, work, pki)
        return results


def main(args: RelayBenchArgs) -> dict[str, Any]:
    return asyncio.run(run(args))
