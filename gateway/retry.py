"""Waiting before trying again, one policy everywhere: capped exponential back-off with full jitter.

    Backoff(base=0.5, cap=60).next()   # the n-th failure in a row: uniform(0, min(cap, base * 2**n)), >= floor

Full jitter spreads many clients that failed at the same moment (a hub restart, an Exchange outage) over the whole
interval instead of bringing them back in waves. Reconnect loops (the tunnel, the streaming feed, webhook delivery)
hold a ``Backoff``, call ``next()`` after a failure and ``reset()`` once the connection held. Retries of a single
operation use tenacity (``retrying``) with the same waits. Pure: the standard library and tenacity.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, stop_never


@dataclass
class Backoff:
    base: float  # the first interval's upper bound
    cap: float  # no wait is longer
    floor: float = 0.0  # no wait is shorter (full jitter may draw ~0: never retry in a tight loop)
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (1: the first)."""
        high = min(self.cap, self.base * 2 ** min(max(failures - 1, 0), 62))
        return max(self.floor, self.rng.uniform(0, high))

    def next(self) -> float:
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        self.failures = 0

    def wait(self, state: RetryCallState) -> float:
        """As tenacity's ``wait``."""
        return self.delay(state.attempt_number)


def retrying(backoff: Backoff, *, on: type[BaseException] | tuple[type[BaseException], ...],
             attempts: int | None = None,
             before_sleep: Callable[[RetryCallState], Awaitable[None] | None] | None = None) -> AsyncRetrying:
    """Retry one operation on ``on`` with ``backoff``'s waits, at most ``attempts`` times (None: until it works);
    the last failure is raised as it was."""
    return AsyncRetrying(retry=retry_if_exception_type(on), wait=backoff.wait,
                         stop=stop_after_attempt(attempts) if attempts else stop_never, reraise=True,
                         before_sleep=before_sleep)
