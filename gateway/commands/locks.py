"""Locks by name (an idempotency key, a room), for the command service: a second command on the same key or room
waits for the first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass


class KeyedLocks:
    """asyncio locks by name, dropped once nobody holds or waits for them (keys are unbounded)."""

    @dataclass
    class _Slot:
        lock: asyncio.Lock
        users: int = 0

    def __init__(self) -> None:
        self._slots: dict[str, KeyedLocks._Slot] = {}

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = KeyedLocks._Slot(asyncio.Lock())
        slot.users += 1
        try:
            async with slot.lock:
                yield
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._slots[name]
