"""The graph source kind: Exchange Online rooms through Microsoft Graph. It builds a GraphSource with its
directory, writer and change feed for one configured source, and keeps the Graph metrics on the application's
registry."""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any, ClassVar

import structlog
from prometheus_client import CollectorRegistry

from gateway.errors import ConfigError
from gateway.ports import Capabilities, CredentialExpiry, FeedSettings, OpenedSource, SourceSpec
from gateway.sources.graph.auth import TokenSource
from gateway.sources.graph.client import GraphClient
from gateway.sources.graph.directory import GraphDirectory
from gateway.sources.graph.feed import GraphFeed
from gateway.sources.graph.metrics import GraphMetrics
from gateway.sources.graph.settings import GraphSettings
from gateway.sources.graph.source import GraphSource
from gateway.sources.graph.writer import GraphWriter

log = structlog.get_logger("gateway.sources.graph")


class GraphCredentials:
    """When the source's credential ends: the certificate's notAfter, or the configured end of the client secret."""

    def __init__(self, name: str, settings: GraphSettings, tokens: TokenSource) -> None:
        self.name = name
        self.settings = settings
        self.tokens = tokens

    async def credential_expiry(self) -> list[CredentialExpiry]:
        label = f"source:{self.name}"
        cert = self.tokens.certificate
        if cert is not None:
            return [CredentialExpiry(label, "certificate", cert.not_after)]
        ends = self.settings.secret_expires
        if ends is None:
            return [CredentialExpiry(label, "client_secret", None, known=False,
                                     detail="the secret's end date is not configured (secret_expires); Entra ID "
                                            "shows it under the app registration's Certificates & secrets")]
        return [CredentialExpiry(label, "client_secret", datetime.combine(ends, time(), UTC))]


class GraphKind:
    name: ClassVar[str] = "graph"
    capabilities: ClassVar[Capabilities] = Capabilities(
        notifications=("streaming", "pull", "poll"),
        writes=frozenset({"create", "update", "cancel", "decline", "availability"}), directory=True,
        token_window=True)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.metrics = GraphMetrics(registry)

    @staticmethod
    def settings(section: Any, place: str) -> GraphSettings:
        """GraphSettings from a source's configuration (a GraphSourceConfig)."""
        if section.certificate_ref is None and section.client_secret_ref is None:
            raise ConfigError(f"{place} has no credential for the app registration",
                              remedy=f"set {place}.certificate_ref (preferred: vault:NAME with the PEM of the key and "
                                     f"certificate) or {place}.client_secret_ref")
        return GraphSettings(tenant_id=section.tenant_id, client_id=section.client_id,
                             credential=section.credential, authority_host=section.authority_host,
                             graph_url=section.graph_url,
                             ca_bundle=str(section.ca_bundle) if section.ca_bundle else None,
                             timeout=section.timeout_seconds, secret_expires=section.secret_expires,
                             poll_interval_seconds=section.poll_interval_seconds)

    def open(self, spec: SourceSpec, feed: FeedSettings) -> OpenedSource:
        if not isinstance(spec.settings, GraphSettings):
            raise TypeError(f"source {spec.name}: a graph source needs GraphSettings, "
                            f"not {type(spec.settings).__name__}")
        settings = spec.settings
        tokens = TokenSource(settings, spec.secret or "")
        client = GraphClient(settings, tokens, on_call=self.metrics.call)
        source = GraphSource(settings, client)
        current: list[GraphFeed | None] = [None]

        def new_feed() -> GraphFeed | None:
            old = current[0]
            if old is not None:
                self.metrics.forget(old)
            made = None if feed.mode == "poll" else GraphFeed(
                client, spec.inbox, poll_interval=settings.poll_interval_seconds,
                on_poke=lambda outcome: self.metrics.pokes.labels(outcome).inc())
            if made is not None:
                self.metrics.watch(made)
            current[0] = made
            return made

        async def close() -> None:
            if current[0] is not None:
                self.metrics.forget(current[0])
            await source.close()

        def set_secret(secret: str) -> None:
            """New credentials from the vault (re-read while Entra ID refuses the old ones); an unusable one (a PEM
            without its key) is said and the old ones stay."""
            try:
                tokens.set_secret(secret)
            except ConfigError as e:
                log.error("graph.credentials_unusable", source=spec.name, reason=str(e.args[0]), remedy=e.remedy)
                return
            log.info("graph.credentials_changed", source=spec.name)
            client.gate.retry_now()

        return OpenedSource(spec.name, self.name, self.capabilities, source, close,
                            directory=GraphDirectory(client, spec.name), writer=GraphWriter(source), feed=new_feed(),
                            new_feed=new_feed,
                            outage=client.gate, set_secret=set_secret,
                            credentials=GraphCredentials(spec.name, settings, tokens))
