"""The outage gate: what every call of one account passes, so a failure that every mailbox shares costs one
request, not one per room.

A shared failure (errors.is_shared: refused credentials, an unreachable server, throttling) is the same answer
for every mailbox. While it lasts, calls fail at once with a copy of it and no request leaves; one call at a time
probes again after a back-off that doubles (refused credentials wait far longer: every failed logon counts towards
the account's lockout threshold in Active Directory). Before anything has been answered, the first call goes
alone and the others wait for its answer: that is what keeps a wrong password at one failed logon, not one per
room. Throttling is not held here (the source waits out BackOffMilliseconds itself), only logged.

The outage is logged once when it starts (a warning; refused credentials an error), as a reminder every
``remind_seconds`` while it lasts, and once when it ends (info): never per room or per retry.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable

import structlog

from gateway.errors import AuthError, GatewayError, Throttled, is_shared

log = structlog.get_logger("gateway.sources.outage")


class OutageGate:
    def __init__(self, *, retry_seconds: float = 5.0, max_retry_seconds: float = 60.0,
                 auth_retry_seconds: float = 300.0, auth_max_retry_seconds: float = 3600.0,
                 remind_seconds: float = 300.0, what: str = "Exchange",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.auth_retry_seconds = auth_retry_seconds
        self.auth_max_retry_seconds = auth_max_retry_seconds
        self.remind_seconds = remind_seconds
        self.what = what
        self.clock = clock
        self.failure: GatewayError | None = None  # the shared failure going on, if any
        self.since = 0.0
        self.retry_at = 0.0
        self.attempts = 0  # failed probes in this outage
        self.listeners: list[Callable[[GatewayError | None], None]] = []  # told (from any thread) on start and end
        self._cond = threading.Condition()
        self._settled = False  # some call has been answered (or refused for all): calls no longer go one by one
        self._probing = False
        self._reminded = 0.0
        self._last_failure = 0.0

    # -- around every call -----------------------------------------------------------------------------------
    def admit(self) -> bool:
        """Before a call. Returns True when the call is the probe (the one call let through to find out); raises a
        copy of the shared failure while it lasts and no probe is due. Blocks only while the very first call is
        out."""
        if self.failure is None and self._settled:
            return False  # the common case, without the lock
        with self._cond:
            while True:
                failure = self.failure
                if failure is None:
                    if self._settled:
                        return False
                    if not self._probing:
                        self._probing = True
                        return True
                    self._cond.wait()
                    continue
                if isinstance(failure, Throttled):
                    return False
                if not self._probing and self.clock() >= self.retry_at:
                    self._probing = True
                    return True
                self._remind()
                raise held(failure)

    def record(self, probe: bool, error: BaseException | None) -> None:
        """After a call: ``error`` is what it raised (mapped into the gateway's tree), None when it succeeded.
        Any answer from the server that is not a shared failure ends an outage."""
        if not probe and error is None and self.failure is None and self._settled:
            return  # the common case, without the lock
        if isinstance(error, GatewayError) and getattr(error, "held", False):
            return
        with self._cond:
            if probe:
                self._probing = False
            if error is None or (isinstance(error, GatewayError) and not is_shared(error)):
                self._settled = True
                if not self._still_throttled():
                    self._end()
            elif isinstance(error, GatewayError):
                self._settled = True
                self._fail(error, probe)
            # else: an unexpected exception tells nothing about the account; the next call probes again
            self._cond.notify_all()

    def retry_now(self) -> None:
        """Something changed (new credentials): let the next call probe at once."""
        with self._cond:
            if self.failure is not None:
                self.retry_at = self.clock()
                self.attempts = 0

    @property
    def status(self) -> tuple[str, str] | None:
        """(key, reason) of the shared failure going on, or None."""
        failure = self.failure
        return None if failure is None else (failure.key, _message(failure))

    # -- state changes (under the lock) ---------------------------------------------------------------------------
    def _fail(self, error: GatewayError, probe: bool) -> None:
        now = self.clock()
        self._last_failure = now
        current = self.failure
        if current is None or current.key != error.key:
            self.failure, self.since, self.attempts, self._reminded = error, now, 1, now
            self.retry_at = now + self._delay(error, 1)
            fields = {"key": error.key, "reason": _message(error), "remedy": error.remedy,
                      "retry_seconds": round(self.retry_at - now, 1)}
            if current is not None:
                fields["previous"] = current.key
            (log.error if _refused(error) else log.warning)("exchange.outage_started", **fields)
            self._tell(error)
            return
        self.failure = error  # the newest detail (a status, a back-off)
        if probe:  # calls that were already out when it started do not stretch the back-off
            self.attempts += 1
            self.retry_at = now + self._delay(error, self.attempts)
        self._remind()

    def _still_throttled(self) -> bool:
        """Under throttling some requests pass and others are refused: it has ended only once a request passes
        well after the last refusal (otherwise every pass and refusal would be logged)."""
        failure = self.failure
        if not isinstance(failure, Throttled):
            return False
        quiet = 2 * max(failure.back_off or 0.0, self.retry_seconds)
        return self.clock() - self._last_failure < quiet

    def _end(self) -> None:
        failure = self.failure
        if failure is None:
            return
        self.failure = None
        log.info("exchange.outage_ended", key=failure.key, seconds=round(self.clock() - self.since, 1),
                 attempts=self.attempts)
        self._tell(None)

    def _remind(self) -> None:
        failure = self.failure
        now = self.clock()
        if failure is None or now - self._reminded < self.remind_seconds:
            return
        self._reminded = now
        log.warning("exchange.outage_continues", key=failure.key, reason=_message(failure), remedy=failure.remedy,
                    seconds=round(now - self.since, 1), attempts=self.attempts,
                    next_attempt_seconds=round(max(0.0, self.retry_at - now), 1))

    def _delay(self, error: GatewayError, attempts: int) -> float:
        if isinstance(error, Throttled):
            return error.back_off or self.retry_seconds
        base, most = ((self.auth_retry_seconds, self.auth_max_retry_seconds) if _refused(error)
                      else (self.retry_seconds, self.max_retry_seconds))
        return float(min(base * 2 ** (attempts - 1), most))

    def _tell(self, error: GatewayError | None) -> None:
        for listener in list(self.listeners):
            try:
                listener(error)
            except Exception:  # a listener's bug must not break the calls that pass here
                log.exception("exchange.outage_listener_failed")


def held(failure: GatewayError) -> GatewayError:
    """A fresh copy of the ongoing failure for a call that was not let through (no traceback shared between
    threads); marked, so that recording it changes nothing."""
    e = copy.copy(failure)
    e.held = True  # type: ignore[attr-defined]
    return e


def _refused(e: GatewayError) -> bool:
    return type(e) is AuthError


def _message(e: GatewayError) -> str:
    return str(e.args[0]) if e.args else e.key
