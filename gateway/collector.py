"""Python's cyclic garbage collector, set for a process that is the gateway (`gateway run`, the benchmarks).

Almost everything a gateway makes is freed by reference counting; the cyclic collector only finds the rare cycle.
With its defaults it ran a young collection every 700 container allocations and, 18 times in a 1,000-room import,
a full collection walking every object the process holds (exchangelib's and the schemas' included): 3.1 s of the
import's 26 s of CPU, measured with `gc.callbacks`. Freezing what startup built keeps it out of every later
collection, and a larger young generation makes collections rarer: 0.6 s in all with 10,000, 0.3 s with 50,000
(the rooms' bookings in flight between their read and their commit are tens of thousands of objects: a smaller
young generation collected them again and again, and moved them on to be collected again in the next). One-shot
commands and the tests keep the defaults: a test process starts hundreds of gateways and would freeze each one's
leftovers.
"""

from __future__ import annotations

import gc

# Young-generation threshold: collections after this many more container allocations than frees. A cycle lives at
# most this long (some 10 MB at worst); the older generations keep their default ratios.
YOUNG = 50_000


def settle() -> None:
    """Call once the process has built what it keeps (modules, settings, the application) and before its work."""
    gc.collect()  # what startup made and dropped goes now: frozen objects are never collected
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG, older, oldest)
