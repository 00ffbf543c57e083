"""The gateway's side of the relay: one outbound WebSocket to the hub carrying events out and commands in.

The gateway dials ``relay.hub_url`` (connection.py: wss only, the hub's certificate verified, through
``relay.proxy_url`` when configured), answers the hub's challenge with its Ed25519 key
(gateway/security/identity.py) and then, until the connection drops:

- sends the outbox from the hub's acknowledgement on, windowed (window.py), and records every ``ack``;
- runs each ``command`` through the CommandHandler (at most ``command_concurrency`` at once) and answers with
  exactly one ``result`` on the connection the command came on (a result whose connection has gone is dropped:
  the hub retries the same idempotency key and gets the journaled answer);
- rotates its key when asked (``rotate_key()``) or when the key is older than ``rotate_after`` (rotation.py);
- hands the inbox (inbox.py) the Graph webhook URLs from ``welcome``, each ``notification``, and the session going
  up and down.

Failures: a refused handshake (``unauthorized``, ``revoked``) is logged once and retried rarely (from
``auth_retry_seconds``, doubling, capped at an hour; the identity is re-read from the vault first, in case the
gateway was enrolled again). Anything else reconnects with capped exponential back-off and full jitter
(gateway/retry.py), reset after a session that lasted ``STABLE_SECONDS``. Each kind of failure is logged once, and
the recovery once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import aiohttp
import structlog

from gateway.config import RelayConfig
from gateway.errors import ConfigError, GatewayError, ProtocolError, Unavailable
from gateway.model import Command, failed
from gateway.observability.metrics import Metrics
from gateway.ports import CommandHandler, Store
from gateway.relay import protocol
from gateway.relay.connection import (
    AGENT,
    Ended,
    Session,
    client_ssl_context,
    describe_connect_error,
    ended,
    probe,
    proxy_headers,
    receive,
)
from gateway.relay.inbox import RelayInbox
from gateway.relay.rotation import ROTATION_CHECK, KeyRotation
from gateway.relay.window import FRAME_BUDGET, OutboxWindow, encode_event, frames
from gateway.retry import Backoff
from gateway.security.identity import GatewayIdentity

log = structlog.get_logger(__name__)

__all__ = ["AGENT", "STATES", "Notifier", "Refused", "Tunnel", "client_ssl_context", "describe_connect_error",
           "encode_event", "frames", "probe", "proxy_headers"]

STABLE_SECONDS: Final = 60.0  # a session that lasted this long resets the back-off
BACKOFF_BASE: Final = 0.5
BACKOFF_FLOOR: Final = 0.1  # full jitter may draw ~0; never reconnect in a tight loop
AUTH_RETRY_MAX: Final = 3600.0
MAX_QUEUED_COMMANDS: Final = 1000  # commands waiting or running; beyond this the answer is rate_limited
STATES: Final = ("connecting", "connected", "backing_off", "unauthorized", "revoked", "stopped")
CLOSE_GRACE: Final = 1.0  # after a failed send: how long the hub's close frame may take to explain it


class Notifier(Protocol):
    """Wakes the sender when new outbox entries were committed (gateway.api.EventHub fits)."""

    def subscribe(self) -> asyncio.Event: ...

    def unsubscribe(self, ev: asyncio.Event) -> None: ...


class Refused(GatewayError):
    """The hub refused the gateway's identity (error unauthorized / revoked in the handshake)."""

    key = "unauthorized"
    remedy = "enroll the gateway again with `gateway enroll --force --hub https://HUB --token TOKEN`"

    def __init__(self, message: str, *, key_id: str | None) -> None:
        super().__init__(message)
        self.key_id = key_id  # the key the refused hello was signed with (None: refused before the hello)


class Revoked(Refused):
    """The hub revoked this gateway: only enrolling again (a new identity) brings it back."""

    key = "revoked"


# -- the tunnel --------------------------------------------------------------------------------------------------
class Tunnel:
    def __init__(self, settings: RelayConfig, identity: GatewayIdentity, store: Store, commands: CommandHandler,
                 *, notifier: Notifier | None = None, metrics: Metrics | None = None,
                 proxy_password: str | None = None, rotate_after: timedelta | None = timedelta(days=90),
                 command_concurrency: int = 32, auth_retry_seconds: float = 300.0,
                 handshake_timeout: float = 30.0, rng: random.Random | None = None,
                 rotation_check: float = ROTATION_CHECK, inbox: RelayInbox | None = None,
                 replica: tuple[int, int] | None = None) -> None:
        if not settings.hub_url:
            raise ConfigError("relay.hub_url is not set", key="relay_not_configured",
                              remedy="enroll with `gateway enroll` and put the hub_url it prints in the config")
        self.settings = settings
        self.replica = replica  # (ordinal, count) when one of several replicas sharing the rooms: said in hello
        self.identity = identity
        self.store = store
        self.commands = commands
        self.notifier = notifier
        self.metrics = metrics
        self.inbox = inbox
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

        self.window = OutboxWindow(store, metrics)
        self.rotation = KeyRotation(identity, rotate_after=rotate_after, check_every=rotation_check)
        self._wake: asyncio.Event | None = None

        self._session: Session | None = None
        self._http: aiohttp.ClientSession | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # running commands
        self._try_next_key = False
        # refused identities are retried rarely: from auth_retry_seconds, never sooner than half of it
        self._refusals = Backoff(auth_retry_seconds, AUTH_RETRY_MAX, floor=min(auth_retry_seconds, AUTH_RETRY_MAX) / 2,
                                 rng=self._rng)
        self._queued_commands = 0

    # -- what it is doing -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For /readyz and logs: state (connecting, connected, backing_off, unauthorized, revoked, stopped)."""
        return {"state": self._state, "since": self._since.isoformat().replace("+00:00", "Z"),
                "acked_seq": self.window.acked, "last_error": self._last_error, "hub_url": self.settings.hub_url,
                "key_id": self.identity.key_id, "in_flight": len(self.window.unacked)}

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
        acker = asyncio.create_task(self.window.record_acks(), name="tunnel-acks")
        backoff = Backoff(BACKOFF_BASE, self.settings.reconnect_max_seconds, floor=BACKOFF_FLOOR, rng=self._rng)
        try:
            while True:
                self._set_state("connecting")
                started = time.monotonic()
                delay: float | None = None
                try:
                    await self._connect_once()
                except Refused as e:
                    delay = self._on_refused(e)
                except Ended as e:
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
                        backoff.reset()
                    delay = backoff.next()
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
        revoked = isinstance(e, Revoked)
        if not revoked and used_current and self.identity.next_key is not None and not self._try_next_key:
            # the hub may have switched to our next key before we heard key_rotated (a crash, a dropped
            # connection): answer the next challenge with it
            log.info("tunnel.trying_next_key", key_id=self.identity.next_key.key_id)
            self._try_next_key = True
            return 0.0
        self._try_next_key = False
        self._count(e.key)
        self._set_state("revoked" if revoked else "unauthorized")
        self._last_error = str(e)
        if self._failure_key != e.key:
            log.error("tunnel.refused", reason=e.key, message=str(e), gateway_id=self._gateway_id(),
                      key_id=e.key_id)
        self._failure_key = e.key
        return self._refusals.next()

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

    def _disconnected(self, e: Ended, started: float) -> None:
        self._last_error = str(e)
        log.info("tunnel.disconnected", reason=str(e), close_code=e.close_code,
                 seconds=round(time.monotonic() - started, 1), acked_seq=self.window.acked)
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
            except Ended as e:  # a failure to connect, not the end of a session
                raise Unavailable(f"{e} (before the welcome)", key="handshake_failed") from None
            await self._serve(session)
        finally:
            await ws.close()

    async def _handshake(self, ws: aiohttp.ClientWebSocketResponse) -> Session:
        msg = await receive(ws)
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
        last_seq = await asyncio.to_thread(self.window.last_seq)
        replica = {} if self.replica is None else {"replica": {"ordinal": self.replica[0], "count": self.replica[1]}}
        await ws.send_str(protocol.encode("hello", protocol=protocol.PROTOCOL_VERSION, gateway_id=gateway_id,
                                          key_id=key_id, signature=protocol.b64(signature), agent=AGENT,
                                          last_seq=last_seq, **replica))
        msg = await receive(ws)
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
        try:
            urls = protocol.notification_urls(msg)
        except ProtocolError as e:  # optional: without it Graph rooms poll, which is no reason to refuse the hub
            log.warning("tunnel.bad_notification_urls", error=str(e))
            urls = None
        session = Session(ws, nonce, key_id, min(window, self.settings.window),
                          msg.get("session") if isinstance(msg.get("session"), str) else None, time.monotonic(), urls)
        if self._try_next_key:  # the hub accepted the next key: the rotation happened, record it
            self._try_next_key = False
            await asyncio.to_thread(self.identity.commit_rotation, key_id)
        self.window.resume(ack)
        return session

    def _refusal_or_error(self, msg: dict[str, Any], key_id: str | None) -> Exception:
        code, text = str(msg.get("code", "")), str(msg.get("message", ""))[:500]
        if code in ("unauthorized", "revoked"):
            refusal = Revoked if code == "revoked" else Refused
            return refusal(f"the hub refused this gateway: {code}" + (f" ({text})" if text else ""), key_id=key_id)
        return ProtocolError(f"the hub refused the handshake: {code or 'error'}" + (f" ({text})" if text else ""),
                             key=code if code in protocol.ERROR_CODES else "unexpected")

    async def _serve(self, session: Session) -> None:
        self._session = session
        self._set_state("connected")
        self._last_error = None
        self._refusals.reset()
        if self._failures or self._failure_key:
            log.info("tunnel.recovered", after_failures=self._failures)
        self._failures = 0
        self._failure_key = None
        self._count("connected")
        if self.metrics is not None:
            self.metrics.tunnel_connected.set(1)
        log.info("tunnel.connected", hub=self.settings.hub_url, session=session.session_id, key_id=session.key_id,
                 ack=self.window.acked, window=session.window, resend=len(self.window.resend))
        if self.inbox is not None:
            self.inbox.session_up(session.notification_urls)
        sender = asyncio.create_task(self.window.send(session.ws, session.window, self._wake), name="tunnel-send")
        reader = asyncio.create_task(self._read_loop(session), name="tunnel-read")
        rotation = asyncio.create_task(self.rotation.watch(lambda: self._session), name="tunnel-rotation")
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
                raise Ended(f"the connection broke while sending ({e.__class__.__name__}: {e})") from None
        finally:
            for t in (sender, reader, rotation):
                t.cancel()
            await asyncio.gather(sender, reader, rotation, return_exceptions=True)
            self._session = None
            if self.inbox is not None:
                self.inbox.session_down()
            if self.metrics is not None:
                self.metrics.tunnel_connected.set(0)
            self.rotation.abandon()

    # -- receiving ------------------------------------------------------------------------------------------
    async def _read_loop(self, session: Session) -> None:
        ws = session.ws
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                await self._on_frame(session, msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await self._send_error(ws, "bad_message", "frames must be JSON text, not binary")
            else:  # ERROR, CLOSE, CLOSING, CLOSED
                raise ended(ws, msg)

    async def _on_frame(self, session: Session, text: str) -> None:
        try:
            msg = protocol.decode(text)
        except ProtocolError as e:
            log.warning("tunnel.bad_frame", reason=e.key, error=str(e))
            await self._send_error(session.ws, e.key, str(e))
            return
        kind = msg["type"]
        try:
            if kind == "ack":
                self.window.on_ack(msg)
            elif kind == "command":
                await self._on_command(session, msg, len(text))
            elif kind == "key_rotated":
                await self.rotation.on_key_rotated(msg)
            elif kind == "notification":
                self._on_notification(msg)
            elif kind == "error":
                self._on_error(msg)
            else:
                await self._send_error(session.ws, "unexpected", f"{kind!r} is not valid from the hub here")
        except ProtocolError as e:
            log.warning("tunnel.bad_message", type=kind, reason=e.key, error=str(e))
            await self._send_error(session.ws, e.key, str(e))

    async def _on_command(self, session: Session, msg: dict[str, Any], size: int) -> None:
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

    async def _execute(self, session: Session, cmd: Command) -> None:
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
        if len(text) > FRAME_BUDGET:  # the hub would refuse the frame (or close the tunnel) and never learn more
            log.warning("tunnel.result_too_large", key=cmd.key, type=cmd.type, bytes=len(text), limit=FRAME_BUDGET)
            text = protocol.result_message(failed(
                cmd.key, "too_large", f"the result is {len(text)} bytes, more than a relay message may carry "
                f"({protocol.MAX_MESSAGE_BYTES}); ask for fewer rooms or a shorter range", retryable=False))
        await self._send(session.ws, text)

    def _on_notification(self, msg: dict[str, Any]) -> None:
        lifecycle, body = protocol.parse_notification(msg)
        if self.inbox is None:  # nothing here subscribed (no Graph source): nothing to poke
            log.debug("tunnel.notification_ignored", lifecycle=lifecycle)
            return
        self.inbox.deliver(body, lifecycle=lifecycle)

    def _on_error(self, msg: dict[str, Any]) -> None:
        code, text, ref = msg.get("code"), str(msg.get("message", ""))[:500], msg.get("ref")
        log.warning("tunnel.hub_error", code=code, message=text, ref=ref)
        if code in ("unauthorized", "revoked"):
            self._last_error = f"the hub refused this gateway: {code}"
        if ref == "rotate_key":
            self.rotation.refused(code, text)

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
        return await self.rotation.rotate(self._session, timeout)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
