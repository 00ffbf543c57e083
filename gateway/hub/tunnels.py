"""The hub's end of the gateways' tunnels (GET /v1/tunnel, docs/relay-protocol.md sections 2-9).

Challenge, hello, welcome; then events in (stored durably before the ack), results back for the commands the
forwarder sent (gateway/hub/forwarding.py), key rotation; a revoked gateway is refused and its live session ended.
A session is ended from its own serving task with the WebSocket closing handshake, so the gateway gets the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from gateway.errors import ProtocolError
from gateway.hub.graph_notifications import graph_urls
from gateway.hub.messages import event_items, raw_key, result_of, verified
from gateway.hub.state import HubState
from gateway.hub.store import Stored
from gateway.model import CommandResult, failed
from gateway.relay import protocol

log = structlog.get_logger(__name__)

# WebSocket close codes (the 4000-4999 range is the application's): the gateway reads the error message first.
CLOSE_BAD_HANDSHAKE: Final = 4400  # not a hello, bad JSON, unsupported protocol version
CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_REVOKED: Final = 4403
CLOSE_HELLO_TIMEOUT: Final = 4408
CLOSE_REPLACED: Final = 4409  # a newer connection of the same gateway took over
FRAME_HARD_LIMIT: Final = 4 * protocol.MAX_MESSAGE_BYTES  # above this aiohttp closes with 1009; below, error too_large


@dataclass(eq=False)
class Session:
    """One authenticated tunnel."""

    id: str
    gateway_id: str
    customer: str
    key_id: str
    nonce: str  # this connection's challenge: key rotations sign over it
    ws: web.WebSocketResponse
    connected_at: float = field(default_factory=time.monotonic)
    replica: tuple[int, int] | None = None  # (ordinal, count) announced in hello: it owns the rooms hashed to it
    pending: dict[str, asyncio.Future[CommandResult]] = field(default_factory=dict)
    events_in: int = 0
    ending: bool = False  # revoked: being closed (the watcher must not end it twice)
    close_code: int | None = None  # the code the hub closed it with (None: the gateway closed, or the network)
    close_message: bytes = b""
    end_requested: asyncio.Event = field(default_factory=asyncio.Event)  # set by end(): _serve closes

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    def end(self, code: int, message: bytes) -> None:
        """Close the tunnel with ``code``: the serving task stops reading and closes with the WebSocket closing
        handshake, so the gateway gets the code (a close from another task would drop the TCP connection right
        after the close frame, and the gateway would often see 1006 instead)."""
        if self.close_code is None:
            self.close_code, self.close_message = code, message
            self.end_requested.set()


class Tunnels:
    """Serves the tunnel endpoint and keeps the live sessions in ``state.sessions``."""

    def __init__(self, state: HubState) -> None:
        self.state = state

    async def shutdown(self) -> None:
        """End every tunnel at once, without waiting for each gateway to echo the close: the process is going."""
        sessions = list(self.state.sessions.values())
        for session in sessions:
            session.close_code = WSCloseCode.GOING_AWAY
        await asyncio.gather(*(s.ws.close(code=WSCloseCode.GOING_AWAY, message=b"hub shutting down")
                               for s in sessions), return_exceptions=True)

    async def tunnel(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=(protocol.SUBPROTOCOL,), heartbeat=self.state.settings.heartbeat,
                                   max_msg_size=FRAME_HARD_LIMIT)
        await ws.prepare(request)
        peer = request.remote
        if ws.ws_protocol != protocol.SUBPROTOCOL:
            await self._refuse_hello(ws, "unsupported_protocol", "unsupported_protocol", f"offer the WebSocket "
                                     f"subprotocol {protocol.SUBPROTOCOL}", CLOSE_BAD_HANDSHAKE)
            return ws
        session = await self._handshake(ws, peer, self.state.settings.public_url or f"{request.scheme}://{request.host}")
        if session is None:
            return ws
        try:
            await self._serve(session)
        finally:
            self._ended(session)
        return ws

    async def _handshake(self, ws: web.WebSocketResponse, peer: str | None, hub_name: str) -> Session | None:
        nonce = protocol.b64(os.urandom(protocol.NONCE_BYTES))
        await ws.send_str(protocol.encode("challenge", nonce=nonce, hub=hub_name))
        try:
            msg = await ws.receive(timeout=self.state.settings.hello_timeout)
        except TimeoutError:
            await self._refuse_hello(ws, "hello_timeout", "unexpected",
                                     f"no hello within {self.state.settings.hello_timeout:g} s", CLOSE_HELLO_TIMEOUT)
            return None
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            self.state.metrics.connects.labels("abandoned").inc()
            return None
        if msg.type != WSMsgType.TEXT:
            await self._refuse_hello(ws, "bad_handshake", "bad_message", "frames must be JSON text",
                                     CLOSE_BAD_HANDSHAKE)
            return None
        try:
            hello = protocol.decode(msg.data)
        except ProtocolError as e:
            log.info("hub.handshake_refused", reason="bad_handshake", error=str(e)[:200], peer=peer)
            await self._refuse_hello(ws, "bad_handshake", e.key, str(e), CLOSE_BAD_HANDSHAKE)
            return None
        if hello["type"] != "hello":
            await self._refuse_hello(ws, "bad_handshake", "unexpected", f"expected hello, got {hello['type']}",
                                     CLOSE_BAD_HANDSHAKE)
            return None
        version = hello.get("protocol")
        if type(version) is not int or version != protocol.PROTOCOL_VERSION:
            await self._refuse_hello(ws, "unsupported_protocol", "unsupported_protocol", f"this hub speaks "
                                     f"protocol {protocol.PROTOCOL_VERSION}, not {str(version)[:20]}",
                                     CLOSE_BAD_HANDSHAKE)
            return None
        gateway_id, key_id, signature = hello.get("gateway_id"), hello.get("key_id"), hello.get("signature")
        if not all(isinstance(v, str) and 0 < len(v) <= 200 for v in (gateway_id, key_id, signature)):
            log.info("hub.handshake_refused", reason="bad_handshake", error="hello without gateway_id, key_id or "
                     "signature", peer=peer)
            await self._refuse_hello(ws, "bad_handshake", "bad_message", "hello needs gateway_id, key_id and "
                                     "signature", CLOSE_BAD_HANDSHAKE)
            return None
        assert isinstance(gateway_id, str) and isinstance(key_id, str) and isinstance(signature, str)
        try:
            replica = protocol.hello_replica(hello)
        except ProtocolError as e:
            await self._refuse_hello(ws, "bad_handshake", e.key, str(e), CLOSE_BAD_HANDSHAKE)
            return None
        record = await self.state.read(self.state.store.gateway, gateway_id)
        key = next((k for k in record.keys if k.key_id == key_id and not k.retired), None) if record else None
        if key is None or not verified(key.public_key, signature,
                                        protocol.signed_challenge(nonce, gateway_id, key_id)):
            log.warning("hub.handshake_refused", reason="unauthorized", gateway_id=gateway_id, key_id=key_id,
                        peer=peer, known_gateway=record is not None, known_key=key is not None)
            await self._refuse_hello(ws, "unauthorized", "unauthorized", "unknown gateway or key, or the signature "
                                     "does not answer this connection's challenge", CLOSE_UNAUTHORIZED)
            return None
        assert record is not None
        if record.revoked_at:
            log.warning("hub.handshake_refused", reason="revoked", gateway_id=gateway_id, peer=peer)
            await self._refuse_hello(ws, "revoked", "revoked", f"this gateway was revoked at {record.revoked_at}; "
                                     "enroll it again with a new token", CLOSE_REVOKED)
            return None
        agent = hello.get("agent") if isinstance(hello.get("agent"), str) else None
        ack = await self.state.write(self.state.store.authenticated, gateway_id, key_id, agent)
        last_seq = hello.get("last_seq")
        if type(last_seq) is int and 0 <= last_seq < ack:
            # The gateway has written fewer events than the hub acknowledged: its store is new or restored. Its
            # next events reuse sequence numbers the hub has seen, so take the ack back; redeliveries are dropped
            # by event id.
            log.warning("hub.gateway_stream_restarted", gateway_id=gateway_id, hub_ack=ack, gateway_last_seq=last_seq)
            await self.state.write(self.state.store.reset_ack, gateway_id, last_seq)
            ack = last_seq
        extra: dict[str, Any] = {}
        if hub_name.startswith("https://"):  # Graph posts to https only
            route = await self.state.write(self.state.store.graph_route, gateway_id)
            extra["notifications"] = graph_urls(hub_name, route)
        session = Session(id="s_" + secrets.token_urlsafe(9), gateway_id=gateway_id, customer=record.customer,
                          key_id=key_id, nonce=nonce, ws=ws, replica=replica)
        old = self.state.sessions.get(gateway_id)
        self.state.sessions[gateway_id] = session
        if old is not None:
            log.info("hub.session_replaced", gateway_id=gateway_id, old=old.id, new=session.id)
            old.end(CLOSE_REPLACED, b"replaced by a newer connection of this gateway")
        await ws.send_str(protocol.encode("welcome", ack=ack, session=session.id, window=protocol.DEFAULT_WINDOW,
                                          heartbeat=self.state.settings.heartbeat, **extra))
        self.state.metrics.connects.labels("accepted").inc()
        log.info("hub.gateway_connected", gateway_id=gateway_id, customer=record.customer, session=session.id,
                 key_id=key_id, ack=ack, agent=agent, peer=peer,
                 replica=None if replica is None else f"{replica[0]}/{replica[1]}")
        return session

    async def _refuse_hello(self, ws: web.WebSocketResponse, outcome: str, code: str, message: str,
                            close_code: int) -> None:
        self.state.metrics.connects.labels(outcome).inc()
        await _close_with_error(ws, code, message, close_code)

    async def _serve(self, session: Session) -> None:
        ws = session.ws
        stop = asyncio.ensure_future(session.end_requested.wait())
        try:
            while True:
                receive = asyncio.ensure_future(ws.receive())
                await asyncio.wait((receive, stop), return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():  # Session.end: stop reading, then close from here (below)
                    receive.cancel()
                    await asyncio.gather(receive, return_exceptions=True)
                    break
                msg = receive.result()
                if msg.type == WSMsgType.TEXT:
                    await self._on_frame(session, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await self._send_error(session, "bad_message", "frames must be JSON text, not binary")
                elif msg.type == WSMsgType.ERROR:
                    self._on_receive_error(session, msg.data)
                    break
                else:  # CLOSE, CLOSING, CLOSED
                    break
        finally:
            stop.cancel()
        if session.end_requested.is_set() and not ws.closed:
            assert session.close_code is not None
            await ws.close(code=session.close_code, message=session.close_message)

    def _on_receive_error(self, session: Session, error: object) -> None:
        code = getattr(error, "code", None)
        if code == WSCloseCode.MESSAGE_TOO_BIG:  # aiohttp refused it from its header, unread, and closed 1009
            session.close_code = code
            log.warning("hub.frame_too_large", gateway_id=session.gateway_id, close_code=code,
                        limit=FRAME_HARD_LIMIT, error=str(error)[:200])
        else:
            log.info("hub.tunnel_error", gateway_id=session.gateway_id, error=str(error)[:200])

    def _ended(self, session: Session) -> None:
        if self.state.sessions.get(session.gateway_id) is session:
            del self.state.sessions[session.gateway_id]
        for key, fut in list(session.pending.items()):
            if not fut.done():
                fut.set_result(failed(key, "gateway_offline", "the tunnel to the gateway closed while the command "
                                      "was under way; retry with the same key to learn its outcome", retryable=True))
        session.pending.clear()
        log.info("hub.gateway_disconnected", gateway_id=session.gateway_id, session=session.id,
                 close_code=_code(session.close_code if session.close_code is not None else session.ws.close_code),
                 closed_by="hub" if session.close_code is not None else "peer", events=session.events_in)

    async def _send_error(self, session: Session, code: str, message: str, ref: str | None = None) -> None:
        fields: dict[str, Any] = {"code": code, "message": message[:500]}
        if ref is not None:
            fields["ref"] = ref
        with contextlib.suppress(ConnectionError, RuntimeError):
            await session.send(protocol.encode("error", **fields))

    async def _on_frame(self, session: Session, text: str) -> None:
        try:
            msg = protocol.decode(text)
        except ProtocolError as e:
            log.info("hub.bad_frame", gateway_id=session.gateway_id, reason=e.key, error=str(e))
            await self._send_error(session, e.key, str(e))
            return
        kind = msg["type"]
        try:
            if kind == "events":
                await self._on_events(session, msg)
            elif kind == "result":
                self._on_result(session, msg)
            elif kind == "rotate_key":
                await self._on_rotate_key(session, msg)
            elif kind == "error":
                log.warning("hub.gateway_error", gateway_id=session.gateway_id, code=msg.get("code"),
                            message=str(msg.get("message", ""))[:500], ref=msg.get("ref"))
            else:
                await self._send_error(session, "unexpected", f"a gateway does not send {kind!r} here", ref=kind)
        except ProtocolError as e:
            log.info("hub.bad_message", gateway_id=session.gateway_id, type=kind, reason=e.key, error=str(e))
            await self._send_error(session, e.key, str(e), ref=kind)

    async def _on_events(self, session: Session, msg: dict[str, Any]) -> None:
        items = event_items(msg)
        try:
            stored: Stored = await self.state.write(self.state.store.store_events, session.gateway_id,
                                                    session.customer, items)
        except Exception as e:  # nothing was acknowledged: the gateway sends these again after reconnecting
            log.exception("hub.store_failed", gateway_id=session.gateway_id)
            await self._send_error(session, "internal", f"the hub could not store the events ({e.__class__.__name__})",
                                   ref="events")
            session.end(WSCloseCode.INTERNAL_ERROR, b"storage failed")
            return
        m = self.state.metrics
        m.events_stored.inc(stored.stored)
        m.duplicates.inc(stored.duplicates)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await session.send(protocol.encode("ack", seq=stored.ack))
            m.acks.inc()
        session.events_in += stored.stored
        if stored.duplicates:
            log.debug("hub.events_redelivered", gateway_id=session.gateway_id, duplicates=stored.duplicates)
        if stored.stored:
            self.state.stored(session.customer)

    def _on_result(self, session: Session, msg: dict[str, Any]) -> None:
        raw = msg.get("result")
        key = raw.get("key") if isinstance(raw, dict) else None
        fut = session.pending.pop(key, None) if isinstance(key, str) else None
        try:
            result = result_of(raw)
        except ProtocolError:
            if fut is not None and not fut.done():
                fut.set_result(failed(str(key), "internal", "the gateway answered with a malformed result",
                                      retryable=True))
            raise
        if fut is None or fut.done():
            log.info("hub.result_unmatched", gateway_id=session.gateway_id, key=result.key, status=result.status)
            return
        fut.set_result(result)

    async def _on_rotate_key(self, session: Session, msg: dict[str, Any]) -> None:
        public_key, key_id, signature = msg.get("public_key"), msg.get("key_id"), msg.get("signature")
        if not (isinstance(public_key, str) and isinstance(key_id, str) and isinstance(signature, str)):
            raise ProtocolError("rotate_key needs public_key, key_id and signature", key="bad_message")
        raw = raw_key(public_key)
        if raw is None or protocol.key_id_for(raw) != key_id:
            raise ProtocolError("public_key must be a raw 32-byte Ed25519 key (base64url) and key_id its "
                                "key_id_for()", key="bad_message")
        if not verified(raw, signature, protocol.signed_rotation(session.nonce, session.gateway_id, key_id)):
            raise ProtocolError("the signature by the new key over this session's challenge does not verify",
                                key="unauthorized")
        if not await self.state.write(self.state.store.add_key, session.gateway_id, raw, key_id):
            raise ProtocolError("that key belongs to another gateway", key="unauthorized")
        log.info("hub.key_added", gateway_id=session.gateway_id, key_id=key_id, current_key_id=session.key_id)
        await session.send(protocol.encode("key_rotated", key_id=key_id))

    async def watch_revocations(self) -> None:
        """End live sessions of gateways revoked elsewhere (``gateway hub revoke`` on the data directory)."""
        while True:
            await asyncio.sleep(self.state.settings.revocation_check)
            if not self.state.sessions:
                continue
            try:
                revoked = await self.state.read(self.state.store.revoked_among, list(self.state.sessions))
            except Exception:
                log.exception("hub.revocation_check_failed")
                continue
            for gateway_id in revoked:
                await self.end_revoked(gateway_id)

    async def end_revoked(self, gateway_id: str) -> None:
        session = self.state.sessions.get(gateway_id)
        if session is None or session.ending:
            return
        session.ending = True
        log.warning("hub.session_revoked", gateway_id=gateway_id, session=session.id)
        await self._send_error(session, "revoked", "this gateway was revoked at the hub; enroll it again with a "
                                                   "new token")
        session.end(CLOSE_REVOKED, b"revoked")



async def _close_with_error(ws: web.WebSocketResponse, code: str, message: str, close_code: int) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_str(protocol.encode("error", code=code, message=message))
    await ws.close(code=close_code, message=code.encode())


def _code(close_code: int | None) -> int | None:
    return None if close_code is None else int(close_code)  # WSCloseCode logs as its repr otherwise


