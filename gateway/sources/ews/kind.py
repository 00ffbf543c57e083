"""The ews source kind: on-premise Exchange 2013-2019 over EWS. It builds an EwsSource with its directory, writer
and change feed for one configured source, and keeps the EWS metrics on the application's registry."""

from __future__ import annotations

from typing import Any, ClassVar

from prometheus_client import CollectorRegistry

from gateway.errors import ConfigError
from gateway.ports import Capabilities, FeedSettings, OpenedSource, SourceSpec
from gateway.sources.ews.directory import EwsDirectory
from gateway.sources.ews.metrics import CallCounter, EwsMetrics
from gateway.sources.ews.source import EwsSettings, EwsSource
from gateway.sources.ews.streaming import PullFeed, StreamingFeed
from gateway.sources.ews.writer import EwsWriter


class EwsKind:
    name: ClassVar[str] = "ews"
    capabilities: ClassVar[Capabilities] = Capabilities(notifications=("streaming", "pull", "poll"),
                                writes=frozenset({"create", "update", "cancel", "decline", "availability"}),
                                directory=True, token_window=False)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.metrics = EwsMetrics(registry)

    @staticmethod
    def settings(section: Any, place: str) -> EwsSettings:
        """EwsSettings from a source's configuration (an EwsSourceConfig, or exchange: in the single-source form)."""
        if not section.ews_url:
            raise ConfigError(f"{place}.ews_url is not set; Autodiscover is not supported yet",
                              remedy=f"set {place}.ews_url to https://<your CAS>/EWS/Exchange.asmx")
        return EwsSettings(ews_url=section.ews_url, username=section.username, auth=section.auth,
                           version=section.version, ca_bundle=str(section.ca_bundle) if section.ca_bundle else None,
                           timeout=section.timeout_seconds, max_workers=section.max_concurrent_requests,
                           default_timezone=section.default_timezone)

    def open(self, spec: SourceSpec, feed: FeedSettings) -> OpenedSource:
        if not isinstance(spec.settings, EwsSettings):
            raise TypeError(f"source {spec.name}: an ews source needs EwsSettings, not {type(spec.settings).__name__}")
        streams = max(1, len(spec.rooms) // max(1, feed.group_size) + 2) if feed.mode == "streaming" else 0
        source = EwsSource(spec.settings, spec.secret or "", extra_connections=streams,
                           calls=CallCounter(self.metrics.call))
        stream = pull = None
        if feed.mode == "streaming":
            stream = StreamingFeed(source, connection_timeout=feed.stream_timeout_minutes, group_size=feed.group_size,
                                   retry_seconds=feed.retry_seconds)
            self.metrics.watch(stream)
        elif feed.mode == "pull":
            pull = PullFeed(source, interval=feed.pull_interval_seconds)

        async def close() -> None:
            if stream is not None:
                self.metrics.forget(stream)
            await source.close()

        return OpenedSource(spec.name, self.name, self.capabilities, source, close, directory=EwsDirectory(source),
                            writer=EwsWriter(source), feed=stream or pull,
                            stop_feed=stream.stop if stream is not None else lambda: None)
