"""The outage gate: what every call of one account passes, so a failure that every mailbox shares costs one
request, not one per room.

A shared failure (errors.is_shared: refused credentials, an unreachable server, throttling) is the same answer
for every mailbox. While it lasts, calls fail at once with a copy of it and no request leaves; one call at a time
probes again after a back-off that doubles (refused credentials wait far longer: every failed logon counts towards
the account's lockout threshold in Active Directory). Before anything has been answered, the first call goes
alone and the others wait for its answer: that is what keeps a wrong password at one failed logon, not one per
room. Throttling is not held here (the source waits out BackOffMilliseconds itself). The back-off is plain
doubling, not gateway/retry.py's jittered one: there is one probe per account, nothing to spread, and the schedule
is what an administrator weighs against the account's lockout threshold.

The directory may know first: while Active Directory says the account is locked out, the credential watch ``hold``s
the gate (no logon that would only prolong the lockout), and ``release``s it when AD says unlocked.

The gate only decides who may call; the sync coordinator tells people (one log line when an outage starts and one
when it ends). ``listeners`` hear of the start and the end, from whichever thread found out.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable

from gateway.errors import AccountLocked, AuthError, GatewayError, Throttled, is_shared


class OutageGate:
    def __init__(self, *, retry_seconds: float = 5.0, max_retry_seconds: float = 60.0,
                 auth_retry_seconds: float = 300.0, auth_max_retry_seconds: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.auth_retry_seconds = auth_retry_seconds
        self.auth_max_retry_seconds = auth_max_retry_seconds
        self.clock = clock
        self.failure: GatewayError | None = None  # the shared failure going on, if any
        self.retry_at = 0.0
        self.attempts = 0  # failed probes in this outage
        self.outages = 0  # outages begun so far (a call's answer ends only an outage begun before it was let through)
        self.listeners: list[Callable[[GatewayError | None], None]] = []  # told on start (the error) and end (None)
        self._cond = threading.Condition()
        self._settled = False  # some call has been answered (or refused for all): calls no longer go one by one
        self._probing = False

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
                raise held(failure)

    def admit_nowait(self) -> bool | None:
        """``admit`` for callers on an event loop, which must not block: None where ``admit`` would wait (the very
        first call is out); the caller tries again shortly."""
        if self.failure is None and self._settled:
            return False
        with self._cond:
            if self.failure is None and not self._settled and self._probing:
                return None
        return self.admit()

    def record(self, probe: bool, error: BaseException | None, since: int | None = None) -> None:
        """After a call: ``error`` is what it raised (mapped into the gateway's tree), None when it succeeded.
        Any answer from the server that is not a shared failure ends an outage, unless the call was let through
        before the outage began (``since``: ``outages`` read before ``admit``): a request sent before Exchange went
        away may be answered, and its answer heard, after another request found it gone; that says nothing of
        now. The probe's answer always does."""
        if not probe and error is None and self.failure is None and self._settled:
            return  # the common case, without the lock
        if isinstance(error, GatewayError) and getattr(error, "held", False):
            return
        told: list[GatewayError | None] = []
        with self._cond:
            if probe:
                self._probing = False
            if error is None or (isinstance(error, GatewayError) and not is_shared(error)):
                self._settled = True
                if self.failure is not None and (probe or since is None or since == self.outages):
                    self.failure = None
                    told.append(None)
            elif isinstance(error, GatewayError):
                self._settled = True
                if self._fail(error, probe):
                    told.append(error)
            # else: an unexpected exception tells nothing about the account; the next call probes again
            self._cond.notify_all()
        for news in told:
            for listener in list(self.listeners):
                listener(news)

    def hold(self, failure: GatewayError) -> None:
        """Someone who knows says every call would fail (the directory: the account is locked out, and a logon
        would only add to it): calls are held as if a probe had just failed with ``failure``, the very first one
        too. One probes again after the back-off, or at once after ``release``."""
        with self._cond:
            self._settled = True
            started = self._fail(failure, probe=False)
            self._cond.notify_all()
        if started:
            for listener in list(self.listeners):
                listener(failure)

    def release(self) -> None:
        """The directory says the lockout is over: the next call probes at once (only a lockout is the directory's
        to lift; refused credentials wait for new ones)."""
        if isinstance(self.failure, AccountLocked):
            self.retry_now()

    def retry_now(self) -> None:
        """Something changed (new credentials): let the next call probe at once."""
        with self._cond:
            if self.failure is not None:
                self.retry_at = self.clock()
                self.attempts = 0

    def _fail(self, error: GatewayError, probe: bool) -> bool:
        """Record a shared failure; True when an outage starts (or turns into another kind)."""
        now = self.clock()
        current = self.failure
        self.failure = error  # the newest detail (a status, a back-off)
        if current is None or current.key != error.key:
            self.outages += 1
            self.attempts = 1
            self.retry_at = now + self._delay(error, 1)
            return True
        if probe:  # calls that were already out when it started do not stretch the back-off
            self.attempts += 1
            self.retry_at = now + self._delay(error, self.attempts)
        return False

    def _delay(self, error: GatewayError, attempts: int) -> float:
        if isinstance(error, Throttled):
            return error.back_off or self.retry_seconds
        base, most = ((self.auth_retry_seconds, self.auth_max_retry_seconds) if isinstance(error, AuthError)
                      else (self.retry_seconds, self.max_retry_seconds))
        return float(min(base * 2 ** (attempts - 1), most))


def held(failure: GatewayError) -> GatewayError:
    """A fresh copy of the ongoing failure for a call that was not let through (no traceback shared between
    threads); marked, so that recording it changes nothing, and stamped (``time.monotonic``) so that whoever
    receives it late can tell it from a new outage: the probe that ends the outage may be heard first
    (sync/coordinator.py, OutageLog.is_over)."""
    e = copy.copy(failure)
    e.held = True  # type: ignore[attr-defined]
    e.held_at = time.monotonic()  # type: ignore[attr-defined]
    return e
