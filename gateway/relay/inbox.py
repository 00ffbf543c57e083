"""Pokes from outside, as the tunnel receives them: the NotificationInbox (gateway/ports.py) of a relayed gateway.

Microsoft Graph posts change notifications to the gateway's two URLs at the hub, which forwards each down the
tunnel as a ``notification`` message (docs/relay-protocol.md §17). The tunnel hands this inbox the URLs from
``welcome``, every notification, and the session going up and down; sources listen. The inbox exists before the
sources are opened (they subscribe at start-up) although the tunnel connects later: until the first ``welcome``
there are no URLs and ``connected()`` is False, so a source polls, and learns from ``on_connected(True)`` when it
may subscribe. The URLs are kept after a disconnect (the hub keeps them for this gateway).

Listeners run on the event loop; one that raises is logged and never reaches the tunnel.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import structlog
from prometheus_client import CollectorRegistry, Counter

from gateway.ports import Poke

log = structlog.get_logger(__name__)

POKE_KINDS: Final = ("notification", "lifecycle")


class RelayInbox:
    """The NotificationInbox a relayed gateway gives its sources (SourceSpec.inbox)."""

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.clock = clock
        self._urls: tuple[str, str] | None = None
        self._connected = False
        self._listeners: list[tuple[Callable[[Poke], None], Callable[[bool], None]]] = []
        self.pokes = Counter("gateway_relay_pokes", "Change notifications that came down the tunnel from the hub, by "
                             "kind (lifecycle: Graph's lifecycle events)", ["kind"], registry=registry)
        for kind in POKE_KINDS:
            self.pokes.labels(kind)

    # -- what a source sees ---------------------------------------------------------------------------------
    def urls(self) -> tuple[str, str] | None:
        return self._urls

    def connected(self) -> bool:
        return self._connected

    def listen(self, on_poke: Callable[[Poke], None], on_connected: Callable[[bool], None]) -> Callable[[], None]:
        entry = (on_poke, on_connected)
        self._listeners.append(entry)

        def stop() -> None:
            if entry in self._listeners:
                self._listeners.remove(entry)
        return stop

    # -- what the tunnel tells it ---------------------------------------------------------------------------
    def session_up(self, urls: tuple[str, str] | None) -> None:
        """A tunnel session began; ``urls`` from its welcome (None: a hub that does not relay Graph webhooks)."""
        if urls != self._urls:
            log.info("relay.notification_urls", available=urls is not None)
        self._urls = urls
        self._set_connected(True)

    def session_down(self) -> None:
        self._set_connected(False)

    def deliver(self, body: dict[str, Any], *, lifecycle: bool) -> None:
        """One notification from the hub: every listener gets it as a Poke."""
        self.pokes.labels("lifecycle" if lifecycle else "notification").inc()
        poke = Poke(body=body, lifecycle=lifecycle, received_at=self.clock())
        for on_poke, _ in list(self._listeners):
            self._call("poke", on_poke, poke)

    def _set_connected(self, up: bool) -> None:
        if up == self._connected:
            return
        self._connected = up
        for _, on_connected in list(self._listeners):
            self._call("connected", on_connected, up)

    @staticmethod
    def _call(what: str, listener: Callable[[Any], None], arg: Any) -> None:
        try:
            listener(arg)
        except Exception:  # a source's bug must not end the tunnel session that delivers to everyone
            log.exception("relay.inbox_listener_failed", call=what, listener=getattr(listener, "__qualname__", None))
