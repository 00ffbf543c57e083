"""Exchange's EWS throttling budgets, as the gateway meets them.

- EWSMaxConcurrency: concurrent requests per logon account (default 27); the next one gets a SOAP fault
  ErrorServerBusy with BackOffMilliseconds.
- HangingConnectionLimit: open streaming connections per account charged (the impersonated mailbox's
  budget clone; default 10); the next GetStreamingEvents gets ErrorExceededConnectionCount.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from gateway.simulator.soap import EwsError


@dataclass
class Throttle:
    max_concurrent: int = 27
    max_streams: int = 10
    back_off_ms: int = 2000
    active: Counter[str] = field(default_factory=Counter)
    streams: Counter[str] = field(default_factory=Counter)
    busy_answers: int = 0
    connection_count_answers: int = 0

    @contextmanager
    def request(self, account: str) -> Iterator[None]:
        if self.active[account] >= self.max_concurrent:
            self.busy_answers += 1
            raise EwsError("ErrorServerBusy", "The server cannot service this request right now. Try again later.",
                           fault=True, back_off_ms=self.back_off_ms)
        self.active[account] += 1
        try:
            yield
        finally:
            self.active[account] -= 1
            if self.active[account] <= 0:
                del self.active[account]

    def open_stream(self, account: str) -> None:
        if self.streams[account] >= self.max_streams:
            self.connection_count_answers += 1
            raise EwsError("ErrorExceededConnectionCount",
                           "You have exceeded the available concurrent connections for your account. "
                           "Try again once your other requests have completed.")
        self.streams[account] += 1

    def close_stream(self, account: str) -> None:
        self.streams[account] -= 1
        if self.streams[account] <= 0:
            del self.streams[account]
