"""The Graph adapter's metrics, on the registry the application passes in: requests by operation and HTTP status,
throttling answers, and the rooms by how they hear of changes (``gateway_graph_rooms{mode}``: notifications through
the hub, or delta polling). One GraphMetrics serves every Graph source of an application."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

MODES = ("notifications", "polling")


class GraphMetrics(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("gateway_graph_requests", "Graph requests by operation and HTTP status",
                                ["operation", "status"], registry=registry)
        self.throttled = Counter("gateway_graph_throttled", "Graph answers 429 or 503 (the request waited and retried)",
                                 registry=registry)
        self.pokes = Counter("gateway_graph_notifications", "Graph change notifications received, by outcome "
                             "(accepted, unknown_subscription, bad_client_state, rate_limited, lifecycle)",
                             ["outcome"], registry=registry)
        self._feeds: list[Any] = []  # the Graph change feeds: their rooms' modes, read at scrape time
        registry.register(self)

    def call(self, operation: str, status: int) -> None:
        self.requests.labels(operation, str(status)).inc()
        if status in (429, 503):
            self.throttled.inc()

    def watch(self, feed: Any) -> None:
        self._feeds.append(feed)

    def forget(self, feed: Any) -> None:
        if feed in self._feeds:
            self._feeds.remove(feed)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("gateway_graph_rooms", "Graph rooms by how changes reach the gateway: "
                                   "notifications (webhooks through the hub) or polling (delta on a timer)",
                                   labels=["mode"])
        counts = dict.fromkeys(MODES, 0)
        for feed in list(self._feeds):
            for mode in feed.modes().values():
                counts[mode] = counts.get(mode, 0) + 1
        for mode, n in counts.items():
            family.add_metric([mode], n)
        yield family
