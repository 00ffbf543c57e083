"""Prometheus metrics on a registry the app factory passes in (no module-level singletons)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.change_to_outbox = Histogram("gateway_sync_change_to_outbox_seconds",
                                          "From a room being marked changed to its events being in the outbox",
                                          buckets=LATENCY_BUCKETS, registry=self.registry)
        self.drift = Counter("gateway_sync_reconcile_drift", "Bookings a full reconciliation had to repair",
                             ["room"], registry=self.registry)
        self.room_transitions = Counter("gateway_room_state_transitions", "Room state changes", ["state"],
                                        registry=self.registry)

        # the relay (tunnel) and commands
        self.tunnel_connected = Gauge("gateway_tunnel_connected", "1 while the tunnel to the hub is up",
                                      registry=self.registry)
        self.tunnel_connects = Counter("gateway_tunnel_connects", "Tunnel connection attempts by outcome",
                                       ["outcome"], registry=self.registry)
        self.tunnel_events = Counter("gateway_tunnel_events_sent", "Events sent through the tunnel (resends too)",
                                     registry=self.registry)
        self.tunnel_acked_seq = Gauge("gateway_tunnel_acked_sequence", "The last outbox sequence the hub acknowledged",
                                      registry=self.registry)
        self.commands = Counter("gateway_commands", "Booking commands by type, status and reason",
                                ["type", "status", "reason"], registry=self.registry)
        self.command_seconds = Histogram("gateway_command_duration_seconds", "Booking command time, end to end",
                                         ["type"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.api_auth_failures = Counter("gateway_api_auth_failures", "Local API requests refused",
                                         ["reason"], registry=self.registry)

    # hooks the coordinator and the command service call (a source kind keeps its own metrics on ``registry``)
    def change_latency(self, seconds: float) -> None:
        self.change_to_outbox.observe(seconds)

    def reconcile_drift(self, room: str, changes: int) -> None:
        self.drift.labels(room).inc(changes)

    def room_state(self, room: str, state: str) -> None:
        self.room_transitions.labels(state).inc()

    def command(self, type_: str, status: str, reason: str | None, seconds: float) -> None:
        self.commands.labels(type_, status, reason or "").inc()
        self.command_seconds.labels(type_).observe(seconds)

    def watch(self, collector: Collector) -> None:
        self.registry.register(collector)


class StateCollector(Collector):
    """Gauges read at scrape time from the running parts (rooms, outbox)."""

    def __init__(self, rooms: Callable[[], dict[str, tuple[str, float | None]]],
                 outbox: Callable[[], tuple[int, datetime | None]] | None, *, states: Iterable[str] = (),
                 source_of: Callable[[str], str | None] | None = None) -> None:
        """``outbox`` gives (unacknowledged events, time of the oldest) while a hub consumes the outbox; None
        when no relay is configured: then nothing waits for delivery (local SSE clients read the outbox at their
        own pace and never acknowledge), so the depth is 0 rather than every event ever written."""
        self.rooms = rooms
        self.outbox = outbox
        self.states = tuple(states)  # every state is exported, 0 when no room is in it (alerts need the zero)
        self.source_of = source_of  # the configured source that owns a room (a hybrid estate: which side it is on)

    def collect(self) -> Iterator[Any]:
        rooms = self.rooms()
        by_state = GaugeMetricFamily("gateway_rooms", "Rooms by state", labels=["state"])
        counts: dict[str, int] = dict.fromkeys(self.states, 0)
        for state, _ in rooms.values():
            counts[state] = counts.get(state, 0) + 1
        for state, n in sorted(counts.items()):
            by_state.add_metric([state], n)
        yield by_state
        age = GaugeMetricFamily("gateway_room_last_sync_age_seconds",
                                "Seconds since the room's last successful sync", labels=["room"])
        now = time.monotonic()
        for room, (_, last) in sorted(rooms.items()):
            if last is not None:
                age.add_metric([room], now - last)
        yield age
        if self.source_of is not None:
            info = GaugeMetricFamily("gateway_room_source_info", "1 for each room, labelled with the source that "
                                     "owns it", labels=["room", "source"])
            for room in sorted(rooms):
                info.add_metric([room, self.source_of(room) or ""], 1)
            yield info
        depth, oldest = self.outbox() if self.outbox is not None else (0, None)
        yield GaugeMetricFamily("gateway_outbox_depth", "Events waiting for the hub to acknowledge them (0 without a "
                                "relay: nothing is pending delivery)", value=depth)
        oldest_age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
        yield GaugeMetricFamily("gateway_outbox_oldest_age_seconds", "Age of the oldest event waiting for the hub "
                                "(0 when none is, or without a relay)", value=oldest_age)
