"""The EWS adapter's metrics, on the registry the application passes in: requests by operation and answer,
throttling, the change feeds' subscriptions and connections (only those Exchange answered), and whether every feed
runs (``gateway_ews_feed_up``). The names are the gateway's
(``gateway_ews_*``); one EwsMetrics serves every EWS source of an application."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class CallCounter:
    """The EWS requests of one source, by (operation, answer); ``on_call`` is told of each (the metrics)."""

    def __init__(self, on_call: Callable[[str, str], None] | None = None) -> None:
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str], int] = {}
        self._on_call = on_call

    def add(self, operation: str, code: str) -> None:
        with self._lock:
            self.counts[(operation, code)] = self.counts.get((operation, code), 0) + 1
        if self._on_call is not None:
            self._on_call(operation, code)

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


class EwsMetrics(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("gateway_ews_requests", "EWS requests by operation and answer",
                                ["operation", "code"], registry=registry)
        self.throttled = Counter("gateway_ews_throttled", "Times Exchange asked the gateway to back off",
                                 registry=registry)
        self._feeds: list[Any] = []  # the change feeds (subscriptions, open_streams, up), read at scrape time
        registry.register(self)

    def call(self, operation: str, code: str) -> None:
        self.requests.labels(operation, code).inc()
        if code == "ErrorServerBusy":
            self.throttled.inc()

    def watch(self, feed: Any) -> None:
        self._feeds.append(feed)

    def forget(self, feed: Any) -> None:
        if feed in self._feeds:
            self._feeds.remove(feed)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        feeds = list(self._feeds)
        yield GaugeMetricFamily("gateway_ews_subscriptions",
                                "EWS subscriptions being listened to (on an open stream, or pulled)",
                                value=sum(f.subscriptions for f in feeds))
        yield GaugeMetricFamily("gateway_ews_streaming_connections",
                                "EWS streaming connections open now (Exchange answered and the stream is read)",
                                value=sum(getattr(f, "open_streams", 0) for f in feeds))
        if feeds:  # only with a change feed (streaming or pull); in poll mode there is none to be up
            yield GaugeMetricFamily("gateway_ews_feed_up", "1 while the change feed (streaming or pull) runs; 0 while "
                                    "it is down and restarting, and the rooms are polled",
                                    value=1 if all(f.up for f in feeds) else 0)
