"""One back-off policy (gateway/retry.py): capped exponential intervals with full jitter, and tenacity retries of a
single operation with the same waits."""

from __future__ import annotations

import random

import pytest

from gateway.retry import Backoff, retrying


def test_waits_are_drawn_from_a_doubling_capped_interval_and_never_below_the_floor():
    b = Backoff(base=0.5, cap=4.0, floor=0.1, rng=random.Random(3))
    draws = [[b.delay(n) for _ in range(400)] for n in range(1, 7)]
    for n, waits in enumerate(draws, start=1):
        high = min(4.0, 0.5 * 2 ** (n - 1))
        assert all(0.1 <= w <= high for w in waits), n
        assert max(waits) > 0.8 * high and min(waits) < 0.2 * high + 0.1  # the whole interval: full jitter
    assert b.next() <= 0.5 and b.next() <= 1.0 and b.failures == 2
    b.reset()
    assert b.failures == 0 and b.next() <= 0.5


async def test_a_single_operation_is_retried_on_the_named_error_then_the_last_failure_is_raised():
    calls: list[int] = []
    slept: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("not yet")
        return "done"

    async for attempt in retrying(Backoff(0.001, 0.002), on=ConnectionError,
                                  before_sleep=lambda s: slept.append(s.attempt_number)):
        with attempt:
            result = await flaky()
    assert (result, len(calls), slept) == ("done", 3, [1, 2])

    calls.clear()
    with pytest.raises(ConnectionError):
        async for attempt in retrying(Backoff(0.001, 0.002), on=ConnectionError, attempts=2):
            with attempt:
                await flaky()
    assert len(calls) == 2

    with pytest.raises(KeyError):  # anything else is not retried
        async for attempt in retrying(Backoff(0.001, 0.002), on=ConnectionError):
            with attempt:
                calls.append(1)
                raise KeyError("x")
    assert len(calls) == 3
