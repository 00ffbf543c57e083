"""The hub's Prometheus metrics, on a registry of its own (served at GET /metrics to the admin token)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.hub.store import HubStore
from gateway.model import DECLINE_REASONS, CommandResult
from gateway.relay import protocol

COMMAND_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # the attendant may take 30 s
CONNECT_OUTCOMES: Final = ("accepted", "unauthorized", "revoked", "bad_handshake", "unsupported_protocol",
                           "hello_timeout", "abandoned")
GRAPH_OUTCOMES: Final = ("validation", "forwarded", "dropped_offline", "rate_limited", "invalid", "unknown_route")
COMMAND_REASONS: Final = frozenset((*DECLINE_REASONS, *protocol.ERROR_CODES))  # anything else counts as "other"


class HubMetrics:
    """The hub's Prometheus metrics, on a registry of its own (served at GET /metrics with the admin token). The
    counters are bumped where things happen, in memory; the per-customer gauges are read from the store at
    scrape time (index lookups, see HubStore.event_stats)."""

    def __init__(self, *, sessions: Callable[[], int], store: Callable[[], HubStore],
                 clock: Callable[[], datetime]) -> None:
        self.registry = r = CollectorRegistry()
        self.sessions = Gauge("gateway_hub_sessions_connected", "Gateways with a live tunnel", registry=r)
        self.sessions.set_function(sessions)
        self.connects = Counter("gateway_hub_connects", "Tunnel handshakes by outcome", ["outcome"], registry=r)
        for outcome in CONNECT_OUTCOMES:
            self.connects.labels(outcome)
        self.events_stored = Counter("gateway_hub_events_stored", "Events stored (new ones, not redeliveries)",
                                     registry=r)
        self.duplicates = Counter("gateway_hub_events_duplicate", "Redelivered events dropped: their id was stored "
                                                                  "already", registry=r)
        self.acks = Counter("gateway_hub_acks_sent", "ack messages sent to gateways", registry=r)
        self.commands = Counter("gateway_hub_commands", "Vendor commands answered, by the result's status and reason "
                                "('' when accepted, 'other' for a code this hub does not know)",
                                ["status", "reason"], registry=r)
        self.command_timeouts = Counter("gateway_hub_command_timeouts", "Commands the gateway did not answer within "
                                        "the command timeout (answered 504 gateway_offline)", registry=r)
        self.command_seconds = Histogram("gateway_hub_command_round_trip_seconds", "From sending a command down the "
                                         "tunnel to the gateway's result", buckets=COMMAND_BUCKETS, registry=r)
        self.webhooks = Counter("gateway_hub_webhook_deliveries", "Webhook delivery attempts by outcome "
                                "(failed ones are retried)", ["outcome"], registry=r)
        for outcome in ("delivered", "failed"):
            self.webhooks.labels(outcome)
        self.graph_notifications = Counter(
            "gateway_hub_graph_notifications", "Posts to the gateways' Graph webhook URLs by outcome: validation "
            "(the handshake answered), forwarded (over the tunnel), dropped_offline (no tunnel: the gateway catches "
            "up by delta), rate_limited (429), invalid (not JSON, too large), unknown_route (404)", ["outcome"],
            registry=r)
        for outcome in GRAPH_OUTCOMES:
            self.graph_notifications.labels(outcome)
        self.pruned = Counter("gateway_hub_events_pruned", "Events deleted by retention", registry=r)
        r.register(_StoreCollector(store, clock))

    def command(self, result: CommandResult) -> None:
        reason = result.reason or ""
        self.commands.labels(result.status, reason if not reason or reason in COMMAND_REASONS else "other").inc()

    def render(self) -> bytes:
        """The exposition text. Blocking (the store gauges read SQLite): call it in a reader thread."""
        return generate_latest(self.registry)


class _StoreCollector(Collector):
    """Per-customer gauges read from the store at scrape time (bounded by the number of customers)."""

    def __init__(self, store: Callable[[], HubStore], clock: Callable[[], datetime]) -> None:
        self.store = store
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.store().event_stats()
        now = self.clock()
        age = GaugeMetricFamily("gateway_hub_newest_event_age_seconds", "Seconds since the customer's newest event "
                                "was stored (none: no events yet)", labels=["customer"])
        kept = GaugeMetricFamily("gateway_hub_events_retained", "Events of the customer in the store now (what SSE "
                                 "can replay; retention removes the oldest)", labels=["customer"])
        backlog = GaugeMetricFamily("gateway_hub_webhook_backlog_events", "Stored events not yet delivered to the "
                                    "customer's webhook (customers with a webhook)", labels=["customer"])
        for st in stats:
            kept.add_metric([st.customer], st.events)
            if st.newest_at is not None:
                age.add_metric([st.customer], max(0.0, (now - st.newest_at).total_seconds()))
            if st.webhook_backlog is not None:
                backlog.add_metric([st.customer], st.webhook_backlog)
        yield from (age, kept, backlog)
