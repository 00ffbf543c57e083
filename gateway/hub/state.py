"""What the hub's parts share: its settings and clock, the store and the threads that touch it (one writer, a few
readers), the live tunnel sessions, the wake-ups of event streams and webhooks, and the metrics."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from gateway.hub.metrics import HubMetrics
from gateway.hub.settings import HubSettings
from gateway.hub.store import Clock, HubStore

if TYPE_CHECKING:
    from gateway.hub.tunnels import Session
    from gateway.hub.webhooks import WebhookDispatcher


class HubState:
    def __init__(self, settings: HubSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock  # wall-clock time for stored times, retention and event ages (injectable for tests)
        self.sessions: dict[str, Session] = {}  # gateway id -> its live session
        self.metrics = HubMetrics(sessions=lambda: len(self.sessions), store=lambda: self.store, clock=clock)
        self.webhooks: WebhookDispatcher | None = None
        self.closing = False  # shutting down: event streams end
        self._store: HubStore | None = None
        self._writer: ThreadPoolExecutor | None = None  # one thread: SQLite has one writer anyway
        self._readers: ThreadPoolExecutor | None = None
        self._wakes: dict[str, set[asyncio.Event]] = defaultdict(set)  # event streams per customer

    @property
    def store(self) -> HubStore:
        assert self._store is not None, "the hub is not started"
        return self._store

    def open(self) -> None:
        """Blocking: open the store (call it in a thread) and start the threads that use it."""
        s = self.settings
        self._store = HubStore.in_dir(s.data_dir, synchronous=s.synchronous, clock=self.clock)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="hub-write")
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="hub-read")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        if self._store is not None:
            self._store.close()

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._writer is not None, "the hub is not started"
        return await asyncio.get_running_loop().run_in_executor(self._writer, lambda: fn(*args))

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._readers is not None, "the hub is not started"
        return await asyncio.get_running_loop().run_in_executor(self._readers, lambda: fn(*args))

    # -- new events ---------------------------------------------------------------------------------------------
    def subscribe(self, customer: str) -> asyncio.Event:
        wake = asyncio.Event()
        self._wakes[customer].add(wake)
        return wake

    def unsubscribe(self, customer: str, wake: asyncio.Event) -> None:
        self._wakes[customer].discard(wake)

    def stored(self, customer: str) -> None:
        """New events of ``customer`` are stored: wake its streams and its webhook."""
        for wake in self._wakes.get(customer, ()):
            wake.set()
        if self.webhooks is not None:
            self.webhooks.notify(customer)

    def end_streams(self) -> None:
        self.closing = True
        for wakes in self._wakes.values():
            for wake in wakes:
                wake.set()
