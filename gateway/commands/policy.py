"""What the cloud may write: which rooms, how long a booking, how many commands a minute (config.CommandsConfig)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from datetime import datetime, timedelta

from gateway.config import CommandsConfig


class RateLimiter:
    """A token bucket: ``burst`` commands at once, refilled at ``rate_per_minute`` (0 or less: no limit)."""

    def __init__(self, rate_per_minute: int, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate_per_minute / 60.0  # tokens per second
        self._burst = float(max(burst, 1))
        self._clock = clock
        self._tokens = self._burst
        self._last = clock()
        self._lock = threading.Lock()  # the local API and the tunnel may call from different threads

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def try_acquire(self) -> bool:
        if self._rate <= 0:
            return True
        with self._lock:
            self._refill()
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    def retry_after(self) -> float:
        """Seconds until the next command would be admitted."""
        if self._rate <= 0:
            return 0.0
        with self._lock:
            self._refill()
            return max(0.0, (1.0 - self._tokens) / self._rate)


class Policy:
    """The gateway-side rules a write command must pass before Exchange is asked."""

    def __init__(self, settings: CommandsConfig) -> None:
        rooms = {r.strip().lower() for r in settings.writable_rooms}
        self.all_rooms = "*" in rooms
        self.rooms = frozenset(rooms - {"*"})
        # 0 means unlimited, as Exchange's MaximumDurationInMinutes does.
        self.max_duration = timedelta(minutes=settings.max_duration_minutes) if settings.max_duration_minutes > 0 \
            else None

    def writable(self, room: str, synced: Collection[str]) -> bool:
        """May commands write to ``room``? "*" means every room the gateway syncs."""
        room = room.lower()
        if room not in {r.lower() for r in synced}:
            return False
        return self.all_rooms or room in self.rooms

    def too_long(self, start: datetime, end: datetime) -> bool:
        return self.max_duration is not None and end - start > self.max_duration
