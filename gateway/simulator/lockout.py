"""Account lockout, as Active Directory applies it behind Exchange's logons: ``threshold`` failed logons within
``window_minutes`` lock the account for ``duration_minutes`` (0: until an administrator unlocks it). While it is
locked every logon fails, the right password too, with the text Exchange's IIS answers ("The referenced account is
currently locked out"); such a logon counts no bad password. A logon that works resets the count, as AD's
badPwdCount does. Threshold 0 (the default) locks nothing. A connection NTLM authenticated before the lock stays
authenticated (IIS does the same): a client meets the lock at its next new connection.

Accounts are named by their mailbox's address, whatever logon name (DOMAIN\\user, UPN) was used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LOCKED_TEXT = "401 - Unauthorized: The referenced account is currently locked out and may not be logged on to.\n"


@dataclass
class _Account:
    bad: list[float] = field(default_factory=list)  # when each counted bad password was tried
    locked_at: float | None = None
    logons_while_locked: int = 0


class Lockouts:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.threshold = 0
        self.window_minutes = 30.0
        self.duration_minutes = 30.0
        self._accounts: dict[str, _Account] = {}

    def set_policy(self, threshold: int, window_minutes: float, duration_minutes: float) -> None:
        self.threshold, self.window_minutes, self.duration_minutes = threshold, window_minutes, duration_minutes

    def policy(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "window_minutes": self.window_minutes,
                "duration_minutes": self.duration_minutes}

    def locked(self, account: str) -> bool:
        """Whether a logon as ``account`` is refused for the lock now (and counted as such)."""
        a = self._accounts.get(account)
        if a is None or not self._is_locked(a):
            return False
        a.logons_while_locked += 1
        return True

    def failed(self, account: str) -> None:
        """A wrong password for ``account``."""
        a = self._accounts.setdefault(account, _Account())
        now = self.clock()
        a.bad = [t for t in a.bad if now - t < self.window_minutes * 60] + [now]
        if self.threshold and len(a.bad) >= self.threshold and not self._is_locked(a):
            a.locked_at = now

    def succeeded(self, account: str) -> None:
        a = self._accounts.get(account)
        if a is not None:
            a.bad.clear()

    def unlock(self, account: str) -> None:
        a = self._accounts.get(account)
        if a is not None:
            a.locked_at = None
            a.bad.clear()

    def state(self) -> dict[str, Any]:
        return {"policy": self.policy(),
                "accounts": {name: {"locked": self._is_locked(a), "bad_password_count": len(a.bad),
                                    "logons_while_locked": a.logons_while_locked}
                             for name, a in sorted(self._accounts.items())}}

    def _is_locked(self, a: _Account) -> bool:
        if a.locked_at is None:
            return False
        if self.duration_minutes and self.clock() - a.locked_at >= self.duration_minutes * 60:
            a.locked_at = None  # the lockout has run out; AD starts counting afresh
            a.bad.clear()
            return False
        return True
