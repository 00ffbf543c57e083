"""What Exchange Online refuses before it looks at a request: an application access policy that leaves a mailbox
out (403), more than four concurrent requests of one app to one mailbox (429 ``MailboxConcurrency``), and a
throttling storm a test switches on (every request 429 with ``Retry-After``)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.simulator.graph.errors import GraphError

RAOP = "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings."


class Limits:
    def __init__(self, mailbox_concurrency: int = 4) -> None:
        self.mailbox_concurrency = mailbox_concurrency
        self.active: Counter[tuple[str, str]] = Counter()  # (app id, mailbox) -> requests in flight
        self.policy: frozenset[str] | None = None  # mailboxes the access policy's group holds; None: no policy
        self.storm_until = 0.0  # time.monotonic() until which every request is throttled
        self.storm_retry_after = 1
        self.throttled = 0  # 429 answers given

    def check_policy(self, smtp: str) -> None:
        if self.policy is not None and smtp.lower() not in self.policy:
            raise GraphError(403, "ErrorAccessDenied", RAOP)

    def storm(self, seconds: float, retry_after: int = 1) -> None:
        """Throttle every Graph request for ``seconds`` (0 ends a storm)."""
        self.storm_until = time.monotonic() + seconds if seconds > 0 else 0.0
        self.storm_retry_after = retry_after

    def check_storm(self) -> None:
        if self.storm_until and time.monotonic() < self.storm_until:
            self.throttled += 1
            raise GraphError(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.",
                             {"Retry-After": str(self.storm_retry_after)})

    @contextmanager
    def slot(self, app_id: str, smtp: str) -> Iterator[None]:
        key = (app_id, smtp.lower())
        if self.active[key] >= self.mailbox_concurrency:
            self.throttled += 1
            raise GraphError(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.",
                             {"Retry-After": "1"})
        self.active[key] += 1
        try:
            yield
        finally:
            self.active[key] -= 1
            if not self.active[key]:
                del self.active[key]
