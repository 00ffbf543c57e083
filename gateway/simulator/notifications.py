"""Subscriptions and their event queues (streaming and pull). Placeholder until the full hub lands."""

from __future__ import annotations

from typing import Any


class NotificationHub:
    def __init__(self, sim: Any) -> None:
        self.sim = sim

    def close_all(self) -> None:
        pass

    def restart(self) -> None:
        pass
