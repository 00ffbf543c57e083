"""Fault injection: what a test can make the simulated Exchange do wrong."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Faults:
    latency: dict[str, float] = field(default_factory=dict)  # operation (or "*") -> seconds added
    http_503_next: int = 0  # answer the next N requests with HTTP 503
    http_503_rate: float = 0.0  # and this fraction of the rest
    # Behaviours of EWS servers that are not Exchange (the gateway must cope with them too); off by default.
    unsupported: set[str] = field(default_factory=set)  # operations answered as not implemented
    room_as_required: bool = False  # a new meeting lists its rooms among the required attendees, not Resources
    no_response_type: bool = False  # organizers' copies carry no ResponseType for their attendees
    quiet_declines: bool = False  # a DeclineItem is applied in place: no change SyncFolderItems would report
    unexpanded_series: bool = False  # a CalendarView returns a series as its RecurringMaster, not its occurrences
    # operation -> local names of elements left out of its answer (a malformed response from another server,
    # e.g. {"Subscribe": {"Watermark"}}: a SubscribeResponse without the watermark)
    omit: dict[str, set[str]] = field(default_factory=dict)
    # operation -> an EWS error code it is answered with as a SOAP fault (e.g. a code exchangelib does not know)
    refuse: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    _rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)

    async def delay(self, operation: str) -> None:
        seconds = self.latency.get(operation, self.latency.get("*", 0.0))
        if seconds > 0:
            await asyncio.sleep(seconds)

    def take_503(self) -> bool:
        if self.http_503_next > 0:
            self.http_503_next -= 1
            return True
        return self.http_503_rate > 0 and self._rng.random() < self.http_503_rate

    def mangle(self, operation: str, result: Any) -> None:
        """Leave the elements named in ``omit`` out of an operation's answer (an lxml element, changed in place)."""
        names = self.omit.get(operation)
        if not names:
            return
        for el in list(result.iter()):
            if isinstance(el.tag, str) and el.tag.rsplit("}", 1)[-1] in names and el.getparent() is not None:
                el.getparent().remove(el)

    def clear(self) -> None:
        self.latency.clear()
        self.omit.clear()
        self.refuse.clear()
        self.http_503_next = 0
        self.http_503_rate = 0.0
        self.unsupported.clear()
        self.room_as_required = self.no_response_type = self.quiet_declines = self.unexpanded_series = False
