"""Supervision of the gateway's long-running tasks: none of them may end unnoticed.

``supervise`` runs a task again after it ended with an exception: the traceback is logged once per distinct
failure (a repeat is one warning line), the restart waits out the gateway's back-off (gateway/retry.py: doubling up
to a maximum, jittered, starting over after a run that lasted ``stable_seconds``), and ``on_down`` is told so that
the app can fall back (for the change feed: the rooms poll). ``watch_task`` is for tasks that supervise themselves:
it only logs an unexpected end.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from gateway.retry import Backoff

log = structlog.get_logger("gateway.supervisor")


async def supervise(name: str, run: Callable[[], Awaitable[None]], *, retry_seconds: float = 5.0,
                    max_retry_seconds: float = 300.0, stable_seconds: float = 300.0,
                    on_down: Callable[[BaseException, float], Any] | None = None,
                    clock: Callable[[], float] = time.monotonic) -> None:
    """Run ``run()`` until it returns or the supervisor is cancelled, restarting it after an exception."""
    backoff = Backoff(base=retry_seconds, cap=max_retry_seconds, floor=retry_seconds / 2)
    logged: tuple[type[BaseException], str] | None = None
    while True:
        started = clock()
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if clock() - started >= stable_seconds:
                backoff.reset()
            delay = backoff.next()
            failures = backoff.failures
            signature = (type(e), str(e))
            if signature != logged:
                log.error("task.failed", task=name, error=f"{type(e).__name__}: {e}",
                          restart_seconds=round(delay, 1), exc_info=e)
                logged = signature
            else:
                log.warning("task.failed_again", task=name, error=f"{type(e).__name__}: {e}", failures=failures,
                            restart_seconds=round(delay, 1))
            if on_down is not None:
                result = on_down(e, delay)
                if inspect.isawaitable(result):
                    await result
            await asyncio.sleep(delay)
            log.info("task.restarting", task=name, failures=failures)


def watch_task(name: str, task: asyncio.Task[Any]) -> None:
    """Log (with its traceback) a task that ends with an exception instead of running until cancelled."""
    def done(t: asyncio.Task[Any]) -> None:
        if t.cancelled():
            return
        error = t.exception()
        if error is not None:
            log.error("task.ended", task=name, error=f"{type(error).__name__}: {error}", exc_info=error)
    task.add_done_callback(done)
