"""Which replica owns a room: rendezvous (highest-random-weight) hashing over the replica ordinals (design.md §6).

Every replica of a StatefulSet, and the hub, compute the same answer from the room's address and the replica count
alone: no coordination, no shared state. The weight is blake2b over (ordinal, room), never Python's ``hash()``
(salted per process). Changing the count from n to n+1 moves only the rooms the new ordinal wins (about 1/(n+1) of
them); going back moves exactly those back. Pure: the standard library only (the hub imports it too).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

MAX_REPLICAS: Final = 1000
_ORDINAL_RE: Final = re.compile(r"-(\d+)$")


def weight(room: str, ordinal: int) -> int:
    """The room's weight at ``ordinal``: 8 bytes of blake2b over both (the room case-folded)."""
    digest = hashlib.blake2b(f"{ordinal}\x00{room.strip().lower()}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(room: str, count: int) -> int:
    """The ordinal in [0, count) that owns ``room``."""
    if count <= 1:
        return 0
    return max(range(count), key=lambda ordinal: weight(room, ordinal))


def ordinal_from_name(name: str) -> int | None:
    """A StatefulSet pod's ordinal from its stable name (``gateway-2`` -> 2); None when it has none."""
    m = _ORDINAL_RE.search(name.strip())
    return int(m[1]) if m else None


@dataclass(frozen=True)
class Shard:
    """This replica's place among ``count``: it owns the rooms that hash to ``ordinal``."""

    ordinal: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_REPLICAS:
            raise ValueError(f"the replica count must be between 1 and {MAX_REPLICAS}, not {self.count}")
        if not 0 <= self.ordinal < self.count:
            raise ValueError(f"the replica ordinal must be between 0 and {self.count - 1} (the count is "
                             f"{self.count}), not {self.ordinal}")

    @property
    def single(self) -> bool:
        return self.count == 1

    def owns(self, room: str) -> bool:
        return self.single or owner(room, self.count) == self.ordinal

    def owner(self, room: str) -> int:
        return owner(room, self.count)
