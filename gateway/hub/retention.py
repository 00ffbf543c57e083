"""Retention: stored events older than ``retention_days`` are deleted at start and then hourly; the rooms/bookings
view stays, and so does every event a webhook has not delivered yet (docs/relay-protocol.md, section 16)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Final

import structlog

from gateway.hub.state import HubState
from gateway.web.params import iso

log = structlog.get_logger(__name__)

PRUNE_EVERY: Final = 3600.0  # seconds between retention runs (the first runs at start)
PRUNE_BATCH: Final = 1000  # events deleted per write transaction: the writer is never held for long


class Retention:
    def __init__(self, state: HubState) -> None:
        self.state = state

    async def run(self) -> None:
        while True:
            try:
                await self.prune()
            except Exception:  # a failed run (disk trouble) must not end retention: the next hour tries again
                log.exception("hub.prune_failed")
            await asyncio.sleep(PRUNE_EVERY)

    async def prune(self) -> int:
        """Delete the events stored more than ``retention_days`` ago, except those a webhook has not delivered
        yet. Batch by batch, each its own short write transaction, so event writes queued meanwhile go in between.
        Returns how many were deleted."""
        state = self.state
        days = state.settings.retention_days
        if not days:
            return 0
        before = state.clock() - timedelta(days=days)
        total = 0
        for customer in await state.read(state.store.customers):
            while True:
                n: int = await state.write(state.store.prune_events, customer.id, before, PRUNE_BATCH)
                total += n
                if n < PRUNE_BATCH:
                    break
        state.metrics.pruned.inc(total)
        log.info("hub.pruned", count=total, retention_days=days, before=iso(before))
        return total
