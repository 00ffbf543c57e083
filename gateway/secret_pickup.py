"""A secret replaced with `gateway credentials set` reaches what uses it without a restart.

Each user of a secret (a source's service account; the directory's bind account) is a ``SecretUser``: how to read
its secret afresh (from the vault or the environment) and how to hand a changed one over (``OpenedSource.set_secret``
for a source). The running gateway looks at the vault file every few seconds — its inode, size and modification
time, a stat and no decryption — and on SIGHUP; when it changed, every user's secret is read again and a changed one
handed over. Besides, while a source's credentials are refused, app.py reads its secret again every 30 s whatever the
file says (an ``env:`` reference, or a vault restored with its old time stamp).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("gateway.secret_pickup")

Fingerprint = tuple[int, int, int] | None


@dataclass
class SecretUser:
    """Something that logs on with a secret: ``read`` gives it afresh, ``use`` hands a changed one over."""

    name: str  # "source onprem", "directory corp"
    read: Callable[[], str] = field(repr=False)
    use: Callable[[str], None] = field(repr=False)
    current: str | None = field(default=None, repr=False)
    _failing: bool = False

    async def refresh(self) -> bool:
        """Read the secret again; True when it changed and was handed over. A read that fails is logged (once until
        one works) and changes nothing."""
        try:
            secret = await asyncio.to_thread(self.read)
        except Exception as e:  # the vault unreadable now (a wrong key file put in place): say so, keep the old one
            if not self._failing:
                self._failing = True
                log.warning("credentials.reread_failed", user=self.name, error=str(e))
            return False
        self._failing = False
        if secret == self.current:
            return False
        self.current = secret
        self.use(secret)
        log.info("credentials.picked_up", user=self.name)
        return True


def fingerprint(path: Path | None) -> Fingerprint:
    """What tells a rewritten file apart cheaply: (inode, size, mtime in ns); None when there is no file."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class SecretPickup:
    """Watches the vault file (and SIGHUP, through ``wake``) and refreshes every user when it changed."""

    def __init__(self, users: Sequence[SecretUser], vault_path: Path | None, every: float, *,
                 on_change: Callable[[], Awaitable[object]] | None = None) -> None:
        self.users = list(users)
        self.vault_path = vault_path
        self.every = every
        self.on_change = on_change  # after a secret was handed over (the credential watch checks again)
        self._woken = asyncio.Event()
        # Not looked at yet: the first look reads every secret (one that changed while the gateway started is used).
        self._seen: Fingerprint | str = "unread"

    def wake(self) -> None:
        """Look now (SIGHUP), whatever the file's time stamp says."""
        self._woken.set()

    async def refresh_all(self, why: str) -> int:
        """Every user's secret read again; how many changed."""
        changed = 0
        for user in self.users:
            changed += await user.refresh()
        log.info("credentials.reread", why=why, changed=changed)
        if changed and self.on_change is not None:
            with contextlib.suppress(Exception):
                await self.on_change()
        return changed

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.every)
            woken = self._woken.is_set()
            self._woken.clear()
            now = fingerprint(self.vault_path)
            if woken or now != self._seen:
                why = "signal" if woken else "start" if self._seen == "unread" else "vault_changed"
                self._seen = now
                await self.refresh_all(why)
