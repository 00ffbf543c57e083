"""The garbage collector's settings for a gateway process (`gateway.collector`)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from gateway import collector


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


@pytest.fixture
def restored() -> Iterator[None]:
    """This test process's collector as it was: the suite keeps the defaults."""
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored")
def test_settle_frees_startups_cycles_freezes_the_rest_and_still_frees_later_cycles() -> None:
    older = gc.get_threshold()[1:]
    dropped = _Node()
    dropped_ref = weakref.ref(dropped)
    kept = _Node()
    del dropped
    collector.settle()
    assert dropped_ref() is None  # collected before the freeze, not kept forever
    assert gc.get_freeze_count() > 0 and gc.is_tracked(kept)
    assert gc.get_threshold() == (collector.YOUNG, *older)
    later = _Node()
    later_ref = weakref.ref(later)
    del later
    gc.collect()
    assert later_ref() is None  # a cycle made after settling is still found
