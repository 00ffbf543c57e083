"""Key rotation on a live tunnel, without downtime (docs/relay-protocol.md, section 8).

The gateway makes a new key pair (kept beside the current one in the vault), sends ``rotate_key`` signed by the new
key over this connection's challenge, and switches once the hub answers ``key_rotated``. While connected, the
watcher finishes a rotation left pending (by a crash, a drop, or `gateway enroll --rotate`, which writes the next
key into the vault) and rotates once the key is older than ``rotate_after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aiohttp
import structlog

from gateway.errors import GatewayError, ProtocolError, Unavailable
from gateway.relay import protocol
from gateway.relay.connection import Session
from gateway.security.identity import GatewayIdentity

log = structlog.get_logger(__name__)

ROTATION_PAUSE: Final = 3600.0  # between automatic key rotation attempts
ROTATION_CHECK: Final = 300.0  # how often a connected tunnel looks for a rotation asked for in the vault
ROTATE_AFTER: Final = timedelta(days=90)  # a key older than this is replaced (the credential watch's "due" date)


class KeyRotation:
    def __init__(self, identity: GatewayIdentity, *, rotate_after: timedelta | None,
                 check_every: float = ROTATION_CHECK) -> None:
        self.identity = identity
        self.rotate_after = rotate_after
        self.check_every = check_every
        self._pending: tuple[str, asyncio.Future[str]] | None = None
        self._lock = asyncio.Lock()

    async def rotate(self, session: Session | None, timeout: float = 30.0) -> str:
        """Switch to a new key on ``session``; returns the new key id once the hub confirmed it."""
        async with self._lock:
            if session is None:
                raise Unavailable("the tunnel is not connected; a key rotation needs the hub",
                                  remedy="retried at the next connection")
            nxt = await asyncio.to_thread(self.identity.begin_rotation)
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._pending = (nxt.key_id, fut)
            gateway_id = self.identity.gateway_id
            signature = self.identity.sign_with(nxt.key_id,
                                                protocol.signed_rotation(session.nonce, gateway_id, nxt.key_id))
            log.info("tunnel.rotating_key", key_id=self.identity.key_id, next_key_id=nxt.key_id)
            await session.ws.send_str(protocol.encode("rotate_key", public_key=nxt.public_key_b64,
                                                      key_id=nxt.key_id, signature=protocol.b64(signature)))
            try:
                async with asyncio.timeout(timeout):
                    return await fut
            except TimeoutError:
                raise Unavailable(f"the hub did not confirm the new key {nxt.key_id} within {timeout:g} s",
                                  remedy="the rotation is retried at the next connection") from None
            finally:
                self._pending = None

    async def watch(self, session: Callable[[], Session | None]) -> None:
        """While connected: rotate when a rotation is pending or due — at most one automatic attempt per
        ROTATION_PAUSE unless a new key was asked for."""
        last_attempt: str | None = None  # the pending key id the last attempt was for
        attempted_at = -ROTATION_PAUSE
        while True:
            with contextlib.suppress(GatewayError):
                await asyncio.to_thread(self.identity.reload)
            pending = self.identity.next_key
            due = self.rotate_after is not None and \
                datetime.now(UTC) >= self.identity.key_created_at + self.rotate_after
            now = time.monotonic()
            fresh_request = pending is not None and pending.key_id != last_attempt
            if (pending is not None or due) and (fresh_request or now - attempted_at >= ROTATION_PAUSE):
                last_attempt, attempted_at = (pending.key_id if pending else None), now
                try:
                    key_id = await self.rotate(session())
                    log.info("tunnel.key_rotated", key_id=key_id)
                except (GatewayError, ConnectionError, aiohttp.ClientError) as e:
                    log.warning("tunnel.rotation_failed", error=str(e))
                continue
            await asyncio.sleep(self.check_every)

    async def on_key_rotated(self, msg: dict[str, Any]) -> None:
        key_id = msg.get("key_id")
        if not isinstance(key_id, str):
            raise ProtocolError("key_rotated.key_id must be a string", key="bad_message")
        nxt = self.identity.next_key
        if nxt is None or nxt.key_id != key_id:
            log.warning("tunnel.unexpected_key_rotated", key_id=key_id)
            return
        await asyncio.to_thread(self.identity.commit_rotation, key_id)
        if self._pending is not None and self._pending[0] == key_id and not self._pending[1].done():
            self._pending[1].set_result(key_id)

    def refused(self, code: object, text: str) -> None:
        """The hub answered ``rotate_key`` with an error."""
        if self._pending is not None and not self._pending[1].done():
            self._pending[1].set_exception(ProtocolError(f"the hub refused the new key: {code} {text}",
                                                         key=str(code or "unexpected")))

    def abandon(self) -> None:
        """The tunnel closed before the hub confirmed the key."""
        if self._pending is not None and not self._pending[1].done():
            self._pending[1].set_exception(Unavailable("the tunnel closed before the hub confirmed the key"))
