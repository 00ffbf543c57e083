"""The gateway's side of the relay: one outbound WebSocket to the hub carrying events out and commands in.

The gateway dials ``relay.hub_url`` (wss only; the hub's certificate is verified against ``relay.ca_bundle`` or
the system store, never skipped), through ``relay.proxy_url`` with CONNECT when one is configured, answers the
hub's challenge with its Ed25519 key (gateway/security/identity.py) and then, until the connection drops:

- sends the outbox in ``seq`` order, from the hub's acknowledgement on, keeping at most ``window`` events
  unacknowledged, in ``events`` messages of up to ``protocol.MAX_BATCH`` events (and below the frame limit);
- records every ``ack`` in the store (in a worker thread, coalesced: one write per burst of acks);
- runs each ``command`` through the CommandHandler (at most ``command_concurrency`` at once) and answers with
  exactly one ``result`` on the connection the command came on (a result whose connection has gone is dropped:
  the hub retries the same idempotency key and gets the journaled answer);
- rotates its key when asked (``rotate_key()``) or when the key is older than ``rotate_after``.

Resume rule: the hub's acknowledgement (``welcome.ack``) is the truth for what the hub has, so sending restarts
right after it, even when the local store recorded a higher ack (a hub restored from a backup lost those events
and must get them again; store.ack never moves backwards, so the local record is not lowered). Events sent but
not acknowledged are kept encoded in memory and resent from there after a reconnect, so a resume does not
re-read and re-encode them.

Failures: a refused handshake (``unauthorized``, ``revoked``) is logged once and retried rarely (from
``auth_retry_seconds``, doubling, capped at an hour; the identity is re-read from the vault first, in case the
gateway was enrolled again). Anything else reconnects with capped exponential back-off and full jitter, reset
after a session that lasted ``STABLE_SECONDS``. Each kind of failure is logged once, and the recovery once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
import structlog

from gateway import __version__
from gateway.config import RelayConfig
from gateway.errors import ConfigError, GatewayError, ProtocolError, Unavailable
from gateway.model import Command, failed
from gateway.observability.metrics import Metrics
from gateway.ports import CommandHandler, OutboxEntry, Store
from gateway.relay import protocol
from gateway.security.identity import GatewayIdentity

log = structlog.get_logger(__name__)

AGENT: Final = f"exchange-gateway/{__version__}"
STABLE_SECONDS: Final = 60.0  # a session that lasted this long resets the back-off
BACKOFF_BASE: Final = 0.5
BACKOFF_FLOOR: Final = 0.1  # full jitter may draw ~0; never reconnect in a tight loop
AUTH_RETRY_MAX: Final = 3600.0
POLL_SECONDS: Final = 5.0  # re-read the outbox this often even without a notification (other writers)
ROTATION_PAUSE: Final = 3600.0  # between automatic key rotation attempts
ROTATION_CHECK: Final = 300.0  # how often a connected tunnel looks for a rotation asked for in the vault
MAX_QUEUED_COMMANDS: Final = 1000  # commands waiting or running; beyond this the answer is rate_limited
_FRAME_BUDGET: Final = protocol.MAX_MESSAGE_BYTES - 1024  # room for the envelope
_EVENTS_HEAD: Final = '{"type":"events","events":['
_EVENTS_TAIL: Final = "]}"

STATES: Final = ("connecting", "connected", "backing_off", "unauthorized", "revoked", "stopped")
CLOSE_GRACE: Final = 1.0  # after a failed send: how long the hub's close frame may take to explain it
# The close codes a hub sends (docs/relay-protocol.md, section 2), in words for the log.
CLOSE_MEANINGS: Final = {
    1000: "closed normally", 1001: "the hub is shutting down", 1006: "the connection was lost without a close frame",
    1009: "a frame was too large", 1011: "the hub could not store events", 4400: "a bad handshake",
    4401: "unauthorized", 4403: "this gateway was revoked", 4408: "no hello in time",
    4409: "replaced by a newer connection of this gateway",
}


class Notifier(Protocol):
    """Wakes the sender when new outbox entries were committed (gateway.api.EventHub fits)."""

    def subscribe(self) -> asyncio.Event: ...

    def unsubscribe(self, ev: asyncio.Event) -> None: ...


class Refused(GatewayError):
    """The hub refused the gateway's identity (error unauthorized / revoked in the handshake)."""

    key = "unauthorized"
    remedy = "enroll the gateway again with `gateway enroll --force --hub https://HUB --token TOKEN`"

    def __init__(self, message: str, *, key: str, key_id: str | None) -> None:
        super().__init__(message, key=key)
        self.key_id = key_id  # the key the refused hello was signed with (None: refused before the hello)


class _Ended(Exception):
    """The connection ended (closed by either side); not an error in itself."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


@dataclass(slots=True)
class _Session:
    ws: aiohttp.ClientWebSocketResponse
    nonce: str  # the challenge of this connection: rotations sign over it
    key_id: str
    window: int
    session_id: str | None
    started: float


# -- TLS and connection errors (shared with `gateway enroll`) ----------------------------------------------------
def client_ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """Verified TLS: the CAs in ``ca_bundle`` (only those) or the system store. Never unverified."""
    if ca_bundle is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_bundle))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"relay.ca_bundle ({ca_bundle}) cannot be used: {getattr(e, 'strerror', None) or e}",
                          key="ca_bundle_unreadable",
                          remedy="point relay.ca_bundle at a readable PEM file of CA certificates") from None


def proxy_headers(settings: RelayConfig, password: str | None) -> dict[str, str] | None:
    """Basic credentials for the proxy's CONNECT (only the proxy sees them; the hub never does)."""
    if not settings.proxy_url or not settings.proxy_username:
        return None
    return {"Proxy-Authorization": aiohttp.encode_basic_auth(settings.proxy_username, password or "")}


def describe_connect_error(e: BaseException, *, what: str, ca_bundle: Path | None,
                           proxy_url: str | None) -> tuple[str, str]:
    """(stable key, message with the remedy) for a failure to reach the hub."""
    if isinstance(e, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError | ssl.SSLError):
        detail = getattr(e, "certificate_error", None) or getattr(e, "os_error", None) or e
        if ca_bundle is not None:
            hint = (f"relay.ca_bundle ({ca_bundle}) does not hold the CA that issued the hub's certificate, or the "
                    "certificate does not name the hub's host; fix relay.ca_bundle")
        else:
            hint = ("the system's trusted CAs do not include the one that issued the hub's certificate; set "
                    "relay.ca_bundle to a PEM file with that CA")
        return "tls_error", f"the TLS connection to {what} was refused: {detail}; {hint}"
    if isinstance(e, aiohttp.ClientHttpProxyError):
        if e.status in (401, 407):  # 407 by the book; tinyproxy, for one, answers 401
            return "proxy_auth", (f"the proxy {proxy_url} refused the credentials ({e.status}); check "
                                  "relay.proxy_username and relay.proxy_password_ref")
        return "proxy_error", f"the proxy {proxy_url} refused to connect to {what} ({e.status} {e.message})"
    if isinstance(e, aiohttp.ClientProxyConnectionError):
        return "proxy_unreachable", f"cannot reach the proxy {proxy_url} ({e.os_error}); check relay.proxy_url"
    if isinstance(e, aiohttp.WSServerHandshakeError):
        hint = "check relay.hub_url (it ends in /v1/tunnel)" if e.status in (404, 405) else "the hub said no"
        return "hub_refused", f"{what} did not open a tunnel ({e.status} {e.message}); {hint}"
    if isinstance(e, aiohttp.ClientConnectorError):
        return "cannot_connect", (f"cannot reach {what} ({e.os_error.strerror or e.os_error}); check the address, "
                                  "DNS and that the firewall lets the gateway out" +
                                  (" (or set relay.proxy_url)" if proxy_url is None else ""))
    if isinstance(e, TimeoutError):
        return "timeout", f"{what} did not answer in time"
    if isinstance(e, aiohttp.ClientError | OSError):
        return "cannot_connect", f"the connection to {what} failed: {e.__class__.__name__}: {e}"
    return "error", f"{e.__class__.__name__}: {e}"


# -- the tunnel --------------------------------------------------------------------------------------------------
class Tunnel:
    def __init__(self, settings: RelayConfig, identity: GatewayIdentity, store: Store, commands: CommandHandler,
                 *, notifier: Notifier | None = None, metrics: Metrics | None = None,
                 proxy_password: str | None = None, rotate_after: timedelta | None = timedelta(days=90),
                 command_concurrency: int = 32, auth_retry_seconds: float = 300.0,
                 handshake_timeout: float = 30.0, rng: random.Random | None = None,
                 rotation_check: float = ROTATION_CHECK) -> None:
        if not settings.hub_url:
            raise ConfigError("relay.hub_url is not set", key="relay_not_configured",
                              remedy="enroll with `gateway enroll` and put the hub_url it prints in the config")
        self.settings = settings
        self.identity = identity
        self.store = store
        self.commands = commands
        self.notifier = notifier
        self.metrics = metrics
        self.rotate_after = rotate_after
        self.rotation_check = rotation_check
        self.auth_retry_seconds = auth_retry_seconds
        self.handshake_timeout = handshake_timeout
        self._proxy_headers = proxy_headers(settings, proxy_password)
        self._rng = rng or random.Random()
        self._sem = asyncio.Semaphore(command_concurrency)

        self._state = "connecting"
        self._since = datetime.now(UTC)
        self._last_error: str | None = None
        self._failure_key: str | None = None  # the kind of the last logged failure: log each kind once
        self._failures = 0

        self._cursor: int | None = None  # the highest seq read from the outbox (None: take the hub's ack)
        self._unacked: deque[tuple[int, str]] = deque()  # sent on this session, not acknowledged
        self._resend: deque[tuple[int, str]] = deque()  # from an earlier session, to send again
        self._sent_max = 0
        self._acked = 0  # the hub's acknowledgement, as last heard
        self._stored_ack = 0  # what the store has recorded through this tunnel
        self._window_open = asyncio.Event()
        self._ack_due = asyncio.Event()
        self._wake: asyncio.Event | None = None

        self._session: _Session | None = None
        self._http: aiohttp.ClientSession | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # running commands
        self._try_next_key = False
        self._rotation: tuple[str, asyncio.Future[str]] | None = None
        self._rotation_lock = asyncio.Lock()
        self._refusals = 0
        self._queued_commands = 0

    # -- what it is doing -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For /readyz and logs: state (connecting, connected, backing_off, unauthorized, revoked, stopped)."""
        return {"state": self._state, "since": self._since.isoformat().replace("+00:00", "Z"),
                "acked_seq": self._acked, "last_error": self._last_error, "hub_url": self.settings.hub_url,
                "key_id": self.identity.key_id, "in_flight": len(self._unacked)}

    @property
    def state(self) -> str:
        return self._state

    @property
    def connected(self) -> bool:
        return self._session is not None

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self._since = datetime.now(UTC)

    # -- the connect loop -----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, serve, reconnect — until cancelled (or ``close()``)."""
        self._runner = asyncio.current_task()
        self._wake = self.notifier.subscribe() if self.notifier is not None else None
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
                                           trust_env=False)
        acker = asyncio.create_task(self._ack_writer(), name="tunnel-acks")
        attempt = 0
        try:
            while True:
                self._set_state("connecting")
                started = time.monotonic()
                delay: float | None = None
                try:
                    await self._connect_once()
                except Refused as e:
                    delay = self._on_refused(e)
                except _Ended as e:
                    self._disconnected(e, started)
                except (GatewayError, aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as e:
                    self._failed(e)
                except Exception as e:  # a bug here must not end the tunnel for good: log it, back off, retry
                    log.exception("tunnel.crashed")
                    self._failed(e)
                if delay == 0:  # the current key was refused while a rotation is pending: try the next one now
                    continue
                if delay is None:
                    if time.monotonic() - started >= STABLE_SECONDS:
                        attempt = 0
                    cap = min(self.settings.reconnect_max_seconds, BACKOFF_BASE * 2 ** min(attempt, 30))
                    delay = max(BACKOFF_FLOOR, self._rng.uniform(0, cap))
                    attempt += 1
                    self._set_state("backing_off")
                log.debug("tunnel.backing_off", seconds=round(delay, 2), state=self._state)
                await asyncio.sleep(delay)
                if self._state in ("unauthorized", "revoked"):
                    with contextlib.suppress(GatewayError):  # enrolled again meanwhile? then use the new key
                        await asyncio.to_thread(self.identity.reload)
        finally:
            self._set_state("stopped")
            acker.cancel()
            await asyncio.gather(acker, return_exceptions=True)
            if self._wake is not None and self.notifier is not None:
                self.notifier.unsubscribe(self._wake)
            if self._http is not None:
                await self._http.close()
                self._http = None

    async def close(self) -> None:
        """Stop: cancel the connect loop and running commands, close the WebSocket and the HTTP session."""
        runner, self._runner = self._runner, None
        if runner is not None and runner is not asyncio.current_task() and not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.ws.close()
            self._session = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        self._set_state("stopped")

    def _on_refused(self, e: Refused) -> float | None:
        used_current = e.key_id == self.identity.key_id
        if e.key == "unauthorized" and used_current and self.identity.next_key is not None and not self._try_next_key:
            # the hub may have switched to our next key before we heard key_rotated (a crash, a dropped
            # connection): answer the next challenge with it
            log.info("tunnel.trying_next_key", key_id=self.identity.next_key.key_id)
            self._try_next_key = True
            return 0.0
        self._try_next_key = False
        self._count("revoked" if e.key == "revoked" else "unauthorized")
        self._set_state("revoked" if e.key == "revoked" else "unauthorized")
        self._last_error = str(e)
        if self._failure_key != e.key:
            log.error("tunnel.refused", reason=e.key, message=str(e), gateway_id=self._gateway_id(),
                      key_id=e.key_id)
        self._failure_key = e.key
        self._refusals += 1
        base = min(AUTH_RETRY_MAX, self.auth_retry_seconds * 2 ** min(self._refusals - 1, 20))
        return self._rng.uniform(0.5, 1.0) * base

    def _failed(self, e: BaseException) -> None:
        self._try_next_key = False
        key, message = describe_connect_error(e, what=f"the hub ({self.settings.hub_url})",
                                              ca_bundle=self.settings.ca_bundle, proxy_url=self.settings.proxy_url)
        if isinstance(e, GatewayError):
            key, message = e.key, str(e)
        self._count(key)
        self._last_error = message
        self._failures += 1
        if self._failure_key != key:
            log.warning("tunnel.connect_failed", reason=key, error=message)
        else:
            log.debug("tunnel.connect_failed", reason=key, error=message, failures=self._failures)
        self._failure_key = key

    def _disconnected(self, e: _Ended, started: float) -> None:
        self._last_error = str(e)
        log.info("tunnel.disconnected", reason=str(e), close_code=e.close_code,
                 seconds=round(time.monotonic() - started, 1), acked_seq=self._acked)
        self._failure_key = None

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.tunnel_connects.labels(outcome).inc()

    def _gateway_id(self) -> str | None:
        return self.identity.gateway_id if self.identity.enrolled else None

    # -- one connection -------------------------------------------------------------------------------------
    async def _connect_once(self) -> None:
        assert self._http is not None and self.settings.hub_url
        ctx = client_ssl_context(self.settings.ca_bundle)
        async with asyncio.timeout(self.handshake_timeout):
            ws = await self._http.ws_connect(
                self.settings.hub_url, protocols=(protocol.SUBPROTOCOL,), heartbeat=self.settings.heartbeat_seconds,
                max_msg_size=protocol.MAX_MESSAGE_BYTES, ssl=ctx, proxy=self.settings.proxy_url,
                proxy_headers=self._proxy_headers, headers={"User-Agent": AGENT})
        try:
            if ws.protocol != protocol.SUBPROTOCOL:
                raise ProtocolError(f"the hub did not agree to the subprotocol {protocol.SUBPROTOCOL} "
                                    f"(it chose {ws.protocol!r}); is relay.hub_url a hub's /v1/tunnel address?",
                                    key="unsupported_protocol")
            try:
                async with asyncio.timeout(self.handshake_timeout):
                    session = await self._handshake(ws)
            except _Ended as e:  # a failure to connect, not the end of a session
                raise Unavailable(f"{e} (before the welcome)", key="handshake_failed") from None
            await self._serve(session)
        finally:
            await ws.close()

    async def _handshake(self, ws: aiohttp.ClientWebSocketResponse) -> _Session:
        msg = await _receive(ws)
        if msg["type"] == "error":
            raise self._refusal_or_error(msg, None)
        nonce = msg.get("nonce")
        if msg["type"] != "challenge" or not isinstance(nonce, str) or not nonce:
            raise ProtocolError(f"the hub opened with {msg['type']!r} instead of a challenge", key="unexpected")
        identity = self.identity
        gateway_id = identity.gateway_id
        next_key = identity.next_key
        key_id = next_key.key_id if self._try_next_key and next_key is not None else identity.key_id
        signature = identity.sign_with(key_id, protocol.signed_challenge(nonce, gateway_id, key_id))
        last_seq = await asyncio.to_thread(self._last_seq)
        await ws.send_str(protocol.encode("hello", protocol=protocol.PROTOCOL_VERSION, gateway_id=gateway_id,
                                          key_id=key_id, signature=protocol.b64(signature), agent=AGENT,
                                          last_seq=last_seq))
        msg = await _receive(ws)
        if msg["type"] == "error":
            raise self._refusal_or_error(msg, key_id)
        if msg["type"] != "welcome":
            raise ProtocolError(f"the hub answered hello with {msg['type']!r} instead of welcome", key="unexpected")
        ack = msg.get("ack")
        if not isinstance(ack, int) or isinstance(ack, bool) or ack < 0:
            raise ProtocolError("welcome.ack must be a sequence number (an integer >= 0)", key="bad_message")
        window = msg.get("window")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            window = protocol.DEFAULT_WINDOW
        session = _Session(ws, nonce, key_id, min(window, self.settings.window),
                           msg.get("session") if isinstance(msg.get("session"), str) else None, time.monotonic())
        if self._try_next_key:  # the hub accepted the next key: the rotation happened, record it
            self._try_next_key = False
            await asyncio.to_thread(self.identity.commit_rotation, key_id)
        self._resume(ack)
        return session

    def _refusal_or_error(self, msg: dict[str, Any], key_id: str | None) -> Exception:
        code, text = str(msg.get("code", "")), str(msg.get("message", ""))[:500]
        if code in ("unauthorized", "revoked"):
            return Refused(f"the hub refused this gateway: {code}" + (f" ({text})" if text else ""), key=code,
                           key_id=key_id)
        return ProtocolError(f"the hub refused the handshake: {code or 'error'}" + (f" ({text})" if text else ""),
                             key=code if code in protocol.ERROR_CODES else "unexpected")

    def _last_seq(self) -> int:
        last = getattr(self.store, "last_seq", None)
        if callable(last):
            return int(last())
        return max(self._cursor or 0, self._acked)

    def _resume(self, hub_ack: int) -> None:
        """Line the outgoing stream up with what the hub has (its ack is the truth)."""
        if hub_ack < self._acked:
            log.warning("tunnel.hub_ack_went_back", hub_ack=hub_ack, previous_ack=self._acked,
                        why="the hub lost events it had acknowledged (restored?); they are sent again")
        # Invariant: every outbox entry in (self._acked, self._cursor] is in _unacked + _resend, in order.
        pending = deque(self._unacked)
        pending.extend(self._resend)
        self._unacked.clear()
        if self._cursor is None or hub_ack < self._acked or hub_ack >= self._cursor:
            pending.clear()  # nothing cached covers what the hub needs: read the outbox from its ack
            self._cursor = hub_ack
        while pending and pending[0][0] <= hub_ack:
            pending.popleft()
        self._resend = pending
        self._sent_max = hub_ack
        self._acked = hub_ack
        self._ack_due.set()
        self._window_open.set()
        if self.metrics is not None:
            self.metrics.tunnel_acked_seq.set(hub_ack)

    async def _serve(self, session: _Session) -> None:
        self._session = session
        self._set_state("connected")
        self._last_error = None
        self._refusals = 0
        if self._failures or self._failure_key:
            log.info("tunnel.recovered", after_failures=self._failures)
        self._failures = 0
        self._failure_key = None
        self._count("connected")
        if self.metrics is not None:
            self.metrics.tunnel_connected.set(1)
        log.info("tunnel.connected", hub=self.settings.hub_url, session=session.session_id, key_id=session.key_id,
                 ack=self._acked, window=session.window, resend=len(self._resend))
        sender = asyncio.create_task(self._send_loop(session), name="tunnel-send")
        reader = asyncio.create_task(self._read_loop(session), name="tunnel-read")
        rotation = asyncio.create_task(self._rotation_watch(), name="tunnel-rotation")
        try:
            done, _ = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                reader.result()  # raises the reason the session ended (_Ended)
            try:
                sender.result()  # the sender only ever ends with an exception
            except (ConnectionError, aiohttp.ClientError) as e:
                # the hub's close frame may be right behind the failure it caused: let the reader say why
                done, _ = await asyncio.wait({reader}, timeout=CLOSE_GRACE)
                if reader in done:
                    reader.result()
                raise _Ended(f"the connection broke while sending ({e.__class__.__name__}: {e})") from None
        finally:
            for t in (sender, reader, rotation):
                t.cancel()
            await asyncio.gather(sender, reader, rotation, return_exceptions=True)
            self._session = None
            if self.metrics is not None:
                self.metrics.tunnel_connected.set(0)
            if self._rotation is not None and not self._rotation[1].done():
                self._rotation[1].set_exception(Unavailable("the tunnel closed before the hub confirmed the key"))

    # -- sending --------------------------------------------------------------------------------------------
    async def _send_loop(self, session: _Session) -> None:
        ws = session.ws
        while True:
            room = session.window - len(self._unacked)
            if room <= 0:
                self._window_open.clear()
                await self._window_open.wait()
                continue
            limit = min(room, protocol.MAX_BATCH)
            if self._resend:
                batch = [self._resend.popleft() for _ in range(min(limit, len(self._resend)))]
            else:
                if self._wake is not None:
                    self._wake.clear()  # before reading: a commit after this read sets it again
                assert self._cursor is not None
                batch, last = await asyncio.to_thread(self._read_encoded, self._cursor, limit)
                if last is None:
                    await self._wait_for_events()
                    continue
                self._cursor = last
                if not batch:
                    continue
            # In flight from here (no await since the batch was taken): if a send fails or the session ends
            # halfway, _resume finds every one of them and they go out again.
            self._unacked.extend(batch)
            for chunk in _frames(batch):
                await ws.send_str(_EVENTS_HEAD + ",".join(f for _, f in chunk) + _EVENTS_TAIL)
                self._sent_max = chunk[-1][0]
                if self.metrics is not None:
                    self.metrics.tunnel_events.inc(len(chunk))

    async def _wait_for_events(self) -> None:
        if self._wake is None:
            await asyncio.sleep(POLL_SECONDS / 5)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POLL_SECONDS):
                await self._wake.wait()

    def _read_encoded(self, after: int, limit: int) -> tuple[list[tuple[int, str]], int | None]:
        """(encoded events after ``after``, the last seq read or None when there was none) — in a worker thread,
        encoding included, so the event loop only joins strings."""
        entries = self.store.outbox_after(after, limit=limit)
        if not entries:
            return [], None
        out = []
        for e in entries:
            frag = encode_event(e)
            if len(frag) > _FRAME_BUDGET:
                # it could never be sent; holding it would stop the stream for good
                log.error("tunnel.event_too_large", seq=e.seq, event_id=e.event.id, bytes=len(frag),
                          limit=_FRAME_BUDGET)
                continue
            out.append((e.seq, frag))
        return out, entries[-1].seq

    # -- receiving ------------------------------------------------------------------------------------------
    async def _read_loop(self, session: _Session) -> None:
        ws = session.ws
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                await self._on_frame(session, msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await self._send_error(ws, "bad_message", "frames must be JSON text, not binary")
            else:  # ERROR, CLOSE, CLOSING, CLOSED
                raise _ended(ws, msg)

    async def _on_frame(self, session: _Session, text: str) -> None:
        try:
            msg = protocol.decode(text)
        except ProtocolError as e:
            log.warning("tunnel.bad_frame", reason=e.key, error=str(e))
            await self._send_error(session.ws, e.key, str(e))
            return
        kind = msg["type"]
        try:
            if kind == "ack":
                self._on_ack(msg)
            elif kind == "command":
                await self._on_command(session, msg, len(text))
            elif kind == "key_rotated":
                await self._on_key_rotated(msg)
            elif kind == "error":
                self._on_error(msg)
            else:
                await self._send_error(session.ws, "unexpected", f"{kind!r} is not valid from the hub here")
        except ProtocolError as e:
            log.warning("tunnel.bad_message", type=kind, reason=e.key, error=str(e))
            await self._send_error(session.ws, e.key, str(e))

    def _on_ack(self, msg: dict[str, Any]) -> None:
        seq = msg.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ProtocolError("ack.seq must be an integer >= 0", key="bad_message")
        if seq <= self._acked:
            return
        if seq > self._sent_max:
            log.warning("tunnel.ack_ahead", seq=seq, sent=self._sent_max)
            seq = self._sent_max  # never record more than was sent
            if seq <= self._acked:
                return
        self._acked = seq
        unacked = self._unacked
        while unacked and unacked[0][0] <= seq:
            unacked.popleft()
        self._window_open.set()
        self._ack_due.set()
        if self.metrics is not None:
            self.metrics.tunnel_acked_seq.set(seq)

    async def _ack_writer(self) -> None:
        """Record acknowledgements in the store, one write per burst (acks arrive faster than fsyncs)."""
        failing = False
        while True:
            await self._ack_due.wait()
            self._ack_due.clear()
            seq = self._acked
            if seq <= self._stored_ack:
                continue
            try:
                await asyncio.to_thread(self.store.ack, seq)
                self._stored_ack = seq
                failing = False
            except ProtocolError as e:
                # the hub acknowledges events this store never issued (a restored gateway backup): say it once
                if not failing:
                    log.error("tunnel.ack_not_recorded", seq=seq, reason=e.key, error=str(e),
                              remedy="the hub has more of this gateway's events than its store ever wrote; "
                                     "ask the hub operator to reset this gateway's stream")
                failing = True
                self._stored_ack = seq  # do not retry the same value
            except Exception as e:
                log.error("tunnel.ack_not_recorded", seq=seq, error=f"{e.__class__.__name__}: {e}")
                await asyncio.sleep(1.0)
                self._ack_due.set()

    async def _on_command(self, session: _Session, msg: dict[str, Any], size: int) -> None:
        raw = msg.get("command")
        key = raw.get("key") if isinstance(raw, dict) and isinstance(raw.get("key"), str) else None
        try:
            if size > protocol.MAX_COMMAND_BYTES + 256:
                raise ProtocolError(f"the command is {size} bytes; at most {protocol.MAX_COMMAND_BYTES} are allowed",
                                    key="too_large", command_key=key if key and len(key) <= 128 else None)
            cmd = protocol.parse_command(raw)
        except ProtocolError as e:
            log.info("tunnel.command_refused", key=e.command_key, reason=e.key, error=str(e))
            if e.command_key:
                await self._send(session.ws, protocol.result_message(
                    failed(e.command_key, e.key, str(e), retryable=False)))
            else:
                await self._send_error(session.ws, e.key, str(e))
            return
        if self._queued_commands >= MAX_QUEUED_COMMANDS:
            await self._send(session.ws, protocol.result_message(failed(
                cmd.key, "rate_limited", "the gateway is busy with too many commands; retry later", retryable=True)))
            return
        self._spawn(self._execute(session, cmd), "command")

    async def _execute(self, session: _Session, cmd: Command) -> None:
        self._queued_commands += 1
        try:
            async with self._sem:
                result = await self.commands.execute(cmd)
        except Exception as e:  # the handler promises not to raise; if it does, still answer
            log.exception("tunnel.command_crashed", key=cmd.key, type=cmd.type)
            result = failed(cmd.key, "internal", f"the gateway failed to run the command "
                                                 f"({e.__class__.__name__}); it logged the details", retryable=True)
        finally:
            self._queued_commands -= 1
        if session.ws.closed or self._session is not session:
            log.info("tunnel.result_undelivered", key=cmd.key, status=result.status,
                     why="the connection it came on has closed; the hub's retry gets the journaled result")
            return
        text = protocol.result_message(result)
        if len(text) > _FRAME_BUDGET:  # the hub would refuse the frame (or close the tunnel) and never learn more
            log.warning("tunnel.result_too_large", key=cmd.key, type=cmd.type, bytes=len(text), limit=_FRAME_BUDGET)
            text = protocol.result_message(failed(
                cmd.key, "too_large", f"the result is {len(text)} bytes, more than a relay message may carry "
                f"({protocol.MAX_MESSAGE_BYTES}); ask for fewer rooms or a shorter range", retryable=False))
        await self._send(session.ws, text)

    async def _on_key_rotated(self, msg: dict[str, Any]) -> None:
        key_id = msg.get("key_id")
        if not isinstance(key_id, str):
            raise ProtocolError("key_rotated.key_id must be a string", key="bad_message")
        nxt = self.identity.next_key
        if nxt is None or nxt.key_id != key_id:
            log.warning("tunnel.unexpected_key_rotated", key_id=key_id)
            return
        await asyncio.to_thread(self.identity.commit_rotation, key_id)
        if self._rotation is not None and self._rotation[0] == key_id and not self._rotation[1].done():
            self._rotation[1].set_result(key_id)

    def _on_error(self, msg: dict[str, Any]) -> None:
        code, text, ref = msg.get("code"), str(msg.get("message", ""))[:500], msg.get("ref")
        log.warning("tunnel.hub_error", code=code, message=text, ref=ref)
        if code in ("unauthorized", "revoked"):
            self._last_error = f"the hub refused this gateway: {code}"
        if ref == "rotate_key" and self._rotation is not None and not self._rotation[1].done():
            self._rotation[1].set_exception(ProtocolError(f"the hub refused the new key: {code} {text}",
                                                          key=str(code or "unexpected")))

    async def _send_error(self, ws: aiohttp.ClientWebSocketResponse, code: str, message: str) -> None:
        await self._send(ws, protocol.encode("error", code=code, message=message[:500]))

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
        try:
            await ws.send_str(text)
        except (ConnectionError, aiohttp.ClientError) as e:
            log.debug("tunnel.send_failed", error=str(e))  # the read loop notices the closed connection

    # -- key rotation ---------------------------------------------------------------------------------------
    async def rotate_key(self, timeout: float = 30.0) -> str:
        """Switch to a new key without dropping the tunnel; returns the new key id once the hub confirmed it."""
        async with self._rotation_lock:
            session = self._session
            if session is None:
                raise Unavailable("the tunnel is not connected; a key rotation needs the hub",
                                  remedy="retried at the next connection")
            nxt = await asyncio.to_thread(self.identity.begin_rotation)
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._rotation = (nxt.key_id, fut)
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
                self._rotation = None

    async def _rotation_watch(self) -> None:
        """While connected: finish a rotation that is pending (left by a crash or a drop, or asked for with
        `gateway enroll --rotate`, which writes the next key into the vault), and rotate once the key is older
        than rotate_after — at most one automatic attempt per ROTATION_PAUSE unless a new key was asked for."""
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
                await self._auto_rotate()
                continue
            await asyncio.sleep(self.rotation_check)

    async def _auto_rotate(self) -> None:
        try:
            key_id = await self.rotate_key()
            log.info("tunnel.key_rotated", key_id=key_id)
        except (GatewayError, ConnectionError, aiohttp.ClientError) as e:
            log.warning("tunnel.rotation_failed", error=str(e))

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# -- encoding ----------------------------------------------------------------------------------------------------
_dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode


def encode_event(entry: OutboxEntry) -> str:
    """One element of an ``events`` message, as JSON text (ASCII, so its length is its size in bytes)."""
    return f'{{"seq":{entry.seq},"room_seq":{entry.room_seq},"event":{_dumps(entry.event.to_cloudevent())}}}'


def _frames(batch: Iterable[tuple[int, str]]) -> Iterable[list[tuple[int, str]]]:
    """Split encoded events into messages below the frame limit."""
    chunk: list[tuple[int, str]] = []
    size = 0
    for item in batch:
        n = len(item[1]) + 1
        if chunk and size + n > _FRAME_BUDGET:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        yield chunk


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive()
    if msg.type == aiohttp.WSMsgType.TEXT:
        return protocol.decode(msg.data)
    if msg.type == aiohttp.WSMsgType.BINARY:
        raise ProtocolError("the hub sent a binary frame", key="bad_message")
    raise _ended(ws, msg, " during the handshake")


def _ended(ws: aiohttp.ClientWebSocketResponse, msg: aiohttp.WSMessage, during: str = "") -> _Ended:
    """Why the connection ended, with the close code it ended with. For a close frame that is the code in the
    frame: ``ws.close_code`` can have turned into 1006 by then, when aiohttp's echo of the close found the TCP
    connection already gone."""
    if msg.type == aiohttp.WSMsgType.CLOSE:
        sent = int(msg.data)
        said = f", {str(msg.extra)[:100]!r}" if msg.extra else ""
        return _Ended(f"the hub closed the connection{during} (code {sent}: {_meaning(sent)}{said})", sent)
    code = None if ws.close_code is None else int(ws.close_code)
    if msg.type == aiohttp.WSMsgType.ERROR:  # this side closed, e.g. 1009 for a frame from the hub above the limit
        return _Ended(f"the connection failed{during} (code {code}: {ws.exception() or msg.data})", code)
    return _Ended(f"the connection closed{during} (code {code}: {_meaning(code)})", code)


def _meaning(code: int | None) -> str:
    return CLOSE_MEANINGS.get(code or 0, "an unknown close code")



async def probe(settings: RelayConfig, proxy_password: str | None = None, timeout: float = 15.0) -> None:
    """Reach the hub the way the tunnel does (TLS verified, through the proxy) and read its challenge, then leave
    without answering: a running gateway's session is not disturbed. GatewayError with a key and remedy if not."""
    if not settings.hub_url:
        raise ConfigError("relay.hub_url is not set", key="no_hub_url",
                          remedy="set it to the tunnel_url `gateway enroll` printed")
    what = f"the hub at {settings.hub_url}"
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
            ws = await http.ws_connect(settings.hub_url, protocols=(protocol.SUBPROTOCOL,),
                                       ssl=client_ssl_context(settings.ca_bundle), proxy=settings.proxy_url,
                                       proxy_headers=proxy_headers(settings, proxy_password),
                                       headers={"User-Agent": AGENT})
            try:
                msg = await _receive(ws)
            finally:
                await ws.close()
    except GatewayError:
        raise
    except _Ended as e:
        raise Unavailable(f"{what}: {e}", key="hub_closed") from None
    except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as e:
        key, message = describe_connect_error(e, what=what, ca_bundle=settings.ca_bundle, proxy_url=settings.proxy_url)
        raise Unavailable(message, key=key) from None
    if msg.get("type") != "challenge":
        raise ProtocolError(f"{what} answered {msg.get('type')!r} instead of a challenge", key="unexpected")
