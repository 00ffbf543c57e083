"""Source kinds by name: the configuration's ``kind`` is looked up here. Besides the application's wiring this is
the only module that names concrete kinds; the coordinator, store, commands, API and metrics know none of them.

A kind is made once per application, on first use, with the application's metrics registry (``Kinds``), since it
may keep metrics of its own there (the ews kind: gateway_ews_*); reading its settings from the configuration needs
no instance. Tests add kinds with ``with_kind``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry

from gateway.errors import ConfigError
from gateway.ports import SourceKind

KindLoader = Callable[[], type[SourceKind]]


def _ews() -> type[SourceKind]:
    from gateway.sources.ews.kind import EwsKind  # exchangelib is loaded only when an ews source is used

    return EwsKind


def _graph() -> type[SourceKind]:
    from gateway.sources.graph.kind import GraphKind  # msal is loaded only when a graph source is used

    return GraphKind


def _memory() -> type[SourceKind]:
    from gateway.sources.memory import MemoryKind

    return MemoryKind


class SourceRegistry:
    def __init__(self, kinds: Mapping[str, KindLoader]) -> None:
        self._kinds = dict(kinds)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._kinds))

    def with_kind(self, name: str, kind: type[SourceKind]) -> SourceRegistry:
        """A registry that also knows ``kind`` as ``name`` (tests)."""
        return SourceRegistry({**self._kinds, name: lambda: kind})

    def kind(self, name: str) -> type[SourceKind]:
        loader = self._kinds.get(name)
        if loader is None:
            raise ConfigError(f"there is no source kind {name!r}", remedy=f"use one of {', '.join(self.names)}")
        return loader()

    def kinds(self, metrics: CollectorRegistry) -> Kinds:
        """The kinds of one application."""
        return Kinds(self, metrics)


class Kinds:
    """The kinds of one application, each made on first use with the application's metrics registry."""

    def __init__(self, registry: SourceRegistry, metrics: CollectorRegistry) -> None:
        self._registry = registry
        self._metrics = metrics
        self._made: dict[str, SourceKind] = {}

    def __call__(self, name: str) -> SourceKind:
        kind = self._made.get(name)
        if kind is None:
            kind = self._made[name] = self._registry.kind(name)(self._metrics)
        return kind


def default_registry() -> SourceRegistry:
    """The kinds the gateway ships: ews, graph, and memory (for tests)."""
    return SourceRegistry({"ews": _ews, "graph": _graph, "memory": _memory})
