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
        # The streaming feed grows the source's session pool for each stream it opens (make_room_for_streams).
        source = EwsSource(spec.settings, spec.secret or "", calls=CallCounter(self.metrics.call))
        current: list[StreamingFeed | PullFeed | None] = [None]

        def new_feed() -> StreamingFeed | PullFeed | None:
            """A fresh feed (a failed one is restarted as a new one: a feed that has ended does not run again)."""
            old = current[0]
            if old is not None:
                if isinstance(old, StreamingFeed):
                    old.stop()  # close what a failed feed still holds open (hanging connections are rationed)
                self.metrics.forget(old)
            made: StreamingFeed | PullFeed | None = None
            if feed.mode == "streaming":
                made = StreamingFeed(source, connection_timeout=feed.stream_timeout_minutes,
                                     group_size=feed.group_size, retry_seconds=feed.retry_seconds)
            elif feed.mode == "pull":
                made = PullFeed(source, interval=feed.pull_interval_seconds)
            if made is not None:
                self.metrics.watch(made)
            current[0] = made
            return made

        def stop_feed() -> None:
            if isinstance(current[0], StreamingFeed):
                current[0].stop()

        async def close() -> None:
            if current[0] is not None:
                self.metrics.forget(current[0])
            await source.close()

        return OpenedSource(spec.name, self.name, self.capabilities, source, close, directory=EwsDirectory(source),
                            writer=EwsWriter(source), feed=new_feed(), stop_feed=stop_feed, new_feed=new_feed,
                            outage=source.gate, set_secret=source.set_password)
