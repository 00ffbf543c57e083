"""Vendor commands forwarded down the tunnel to the customer's gateway, and its result back (section 7).

A second request with a key that is still under way shares the first one's outcome instead of forwarding it
again. Several gateways of one customer: the command goes to the one that relayed its room, else the newest; with
replicas sharing the rooms (hello.replica), to the replica that owns the room by rendezvous hash, or nowhere.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from gateway import sharding
from gateway.hub.state import HubState
from gateway.hub.tunnels import Session
from gateway.model import Command, CommandResult, failed
from gateway.relay import protocol
from gateway.web.commands import status_of

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class _Inflight:
    request_hash: str
    task: asyncio.Task[tuple[int, CommandResult]]
    waiters: int = 1


class Forwarder:
    def __init__(self, state: HubState) -> None:
        self.state = state
        self._inflight: dict[tuple[str, str], _Inflight] = {}

    async def run_command(self, customer: str, cmd: Command) -> tuple[int, CommandResult]:
        """Forward a validated command to the customer's gateway and wait for its result: (HTTP status, result)."""
        slot = (customer, cmd.key)
        digest = cmd.request_hash()
        current = self._inflight.get(slot)
        if current is not None:
            if current.request_hash != digest:
                result = failed(cmd.key, "idempotency_conflict", "a different command with this key is under way; "
                                "use a new key for a new request", retryable=False)
                return status_of(result), result
            current.waiters += 1
            return await asyncio.shield(current.task)
        task = asyncio.create_task(self._forward(customer, cmd), name=f"command-{cmd.key}")
        entry = _Inflight(digest, task)
        self._inflight[slot] = entry

        def done(_: object) -> None:
            if self._inflight.get(slot) is entry:
                del self._inflight[slot]

        task.add_done_callback(done)
        return await asyncio.shield(task)

    def waiting(self, customer: str, key: str) -> int:
        """How many requests wait for the command with this key (0: none under way)."""
        entry = self._inflight.get((customer, key))
        return entry.waiters if entry is not None else 0

    async def _route(self, customer: str, cmd: Command) -> Session | CommandResult:
        """The session that runs ``cmd``, or the failed result that says why none may (docs/relay-protocol.md §7)."""
        live = [s for s in self.state.sessions.values() if s.customer == customer]
        if not live:
            return failed(cmd.key, "gateway_offline", f"no gateway of customer {customer!r} is connected to the hub; "
                          "retry later with the same key", retryable=True)
        if len(live) == 1 and live[0].replica is None:
            return live[0]
        room = cmd.room or (cmd.rooms[0] if cmd.rooms else None)
        relayed_by = await self.state.read(self.state.store.gateway_for_room, customer, room) if room else None
        for s in live:
            if s.gateway_id == relayed_by and s.replica is None:  # a gateway of its own (another site), not a replica
                return s
        replicas = [s for s in live if s.replica is not None]
        if replicas:
            return _owner(customer, cmd, replicas)
        return max(live, key=lambda s: s.connected_at)  # the newest connection: the likeliest to be healthy

    async def _forward(self, customer: str, cmd: Command) -> tuple[int, CommandResult]:
        session = await self._route(customer, cmd)
        if isinstance(session, CommandResult):
            return status_of(session), session
        offline = failed(cmd.key, "gateway_offline", f"the tunnel to gateway {session.gateway_id} closed; retry later "
                         "with the same key", retryable=True)
        fut: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        session.pending[cmd.key] = fut
        started = time.monotonic()
        timeout = self.state.settings.command_timeout
        try:
            try:
                await session.send(protocol.encode("command", command=protocol.command_to_json(cmd)))
            except (ConnectionError, RuntimeError):
                return status_of(offline), offline
            try:
                async with asyncio.timeout(timeout):
                    result = await fut
            except TimeoutError:
                self.state.metrics.command_timeouts.inc()
                log.warning("hub.command_timeout", customer=customer, key=cmd.key, gateway_id=session.gateway_id)
                return 504, failed(cmd.key, "gateway_offline", f"the gateway did not answer within {timeout:g} s; "
                                   "retry with the same key to learn the outcome", retryable=True)
        finally:
            if session.pending.get(cmd.key) is fut:
                del session.pending[cmd.key]
        elapsed = time.monotonic() - started
        if result.reason != "gateway_offline":  # that one is the hub's own answer: the tunnel closed meanwhile
            self.state.metrics.command_seconds.observe(elapsed)
        log.info("hub.command_done", customer=customer, key=cmd.key, type=cmd.type, status=result.status,
                 reason=result.reason, ms=round(elapsed * 1000))
        return status_of(result), result


def _owner(customer: str, cmd: Command, replicas: list[Session]) -> Session | CommandResult:
    """The replica that owns the command's room(s) by rendezvous hash over the count the newest replica announced
    (during a rolling change of the count, the older count's sessions are on their way out). Never another replica:
    it does not sync the room, so it must not write to it."""
    newest = max(replicas, key=lambda s: s.connected_at)
    assert newest.replica is not None
    count = newest.replica[1]
    rooms = [cmd.room] if cmd.room else list(cmd.rooms)
    by_owner: dict[int, list[str]] = {}
    for room in rooms:
        by_owner.setdefault(sharding.owner(room, count), []).append(room)
    if len(by_owner) > 1:
        groups = "; ".join(f"replica {o}: {', '.join(r)}" for o, r in sorted(by_owner.items()))
        return failed(cmd.key, "invalid_command", f"these rooms are synced by different replicas of the gateway "
                      f"({groups}): send one {cmd.type} command per replica's rooms, or read GET "
                      f"/v1/customers/{customer}/availability, which answers for every room", retryable=False)
    ordinal = next(iter(by_owner), 0)
    owners = [s for s in replicas if s.replica == (ordinal, count)]
    if not owners:
        log.info("hub.command_owner_offline", customer=customer, key=cmd.key, room=rooms[0] if rooms else None,
                 ordinal=ordinal, count=count)
        return failed(cmd.key, "gateway_offline", f"the replica that owns {rooms[0] if rooms else 'the room'} "
                      f"(ordinal {ordinal} of {count}) is not connected to the hub; retry later with the same key",
                      retryable=True)
    return max(owners, key=lambda s: s.connected_at)
