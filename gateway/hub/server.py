"""The reference hub: what a booking vendor runs in its cloud to receive gateways' tunnels (docs/relay-protocol.md).

One aiohttp application:

- ``POST /v1/enroll`` turns a single-use enrollment token into a gateway identity (its Ed25519 public key);
- ``GET /v1/tunnel`` is the WebSocket every gateway dials: challenge, hello, welcome, then events in (stored
  durably before the ack), commands out, results back, key rotation; a revoked gateway is refused and its live
  session ended;
- ``/v1/customers/{customer}/...`` is the vendor's API, one customer per API key: rooms, bookings, availability
  (from the events stored so far), the event stream (SSE, resumable) and the command endpoint;
- ``/admin/v1/...`` is the operator's API (one admin token): customers, enrollment tokens, API keys, gateways,
  revocation, webhooks (gateway/hub/webhooks.py); ``/metrics`` (Prometheus) takes the same token.

Stored events older than the retention period are deleted hourly (``Hub.prune``); the rooms/bookings view stays.

State lives in one SQLite file (gateway/hub/store.py), touched from worker threads: one writer thread (SQLite
has one writer anyway) and a few readers. Live sessions and commands waiting for their result live in memory: a
hub restart drops the tunnels (gateways reconnect and resume from the stored ack) and answers waiting commands
``gateway_offline`` (the vendor retries the same key; the gateway's journal answers it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import secrets
import signal
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

import structlog
from aiohttp import WSCloseCode, WSMsgType, web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.errors import ConfigError, GatewayError, ProtocolError
from gateway.hub.store import Clock, EventItem, HubStore, Stored, utc_now
from gateway.hub.webhooks import WebhookDispatcher
from gateway.model import DECLINE_REASONS, RESULT_STATUSES, Command, CommandResult, failed
from gateway.relay import protocol
from gateway.security.secret import Secret

log = structlog.get_logger(__name__)

# WebSocket close codes (the 4000-4999 range is the application's): the gateway reads the error message first.
CLOSE_BAD_HANDSHAKE: Final = 4400  # not a hello, bad JSON, unsupported protocol version
CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_REVOKED: Final = 4403
CLOSE_HELLO_TIMEOUT: Final = 4408
CLOSE_REPLACED: Final = 4409  # a newer connection of the same gateway took over
FRAME_HARD_LIMIT: Final = 4 * protocol.MAX_MESSAGE_BYTES  # above this aiohttp closes with 1009; below, error too_large
SSE_PAGE: Final = 100  # stored events read and joined at once per stream: many replaying clients hold little
MAX_RANGE: Final = timedelta(days=731)
MAX_TOKEN_TTL: Final = timedelta(days=30)
MIN_ADMIN_TOKEN: Final = 16
LOOPBACK_NAMES: Final = ("localhost",)
PRUNE_EVERY: Final = 3600.0  # seconds between retention runs (the first runs at start)
PRUNE_BATCH: Final = 1000  # events deleted per write transaction: the writer is never held for long
COMMAND_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # the attendant may take 30 s
CONNECT_OUTCOMES: Final = ("accepted", "unauthorized", "revoked", "bad_handshake", "unsupported_protocol",
                           "hello_timeout", "abandoned")
COMMAND_REASONS: Final = frozenset((*DECLINE_REASONS, *protocol.ERROR_CODES))  # anything else counts as "other"

HTTP_STATUS: Final = {  # GatewayError keys from the store -> HTTP status
    "invalid_token": 401, "token_used": 410, "token_expired": 410, "key_in_use": 409,
    "customer_unknown": 404, "customer_exists": 409, "gateway_unknown": 404, "invalid_customer_id": 400,
}
RESULT_HTTP_STATUS: Final = {"invalid_command": 400, "unsupported_command": 400, "too_large": 413,
                             "idempotency_conflict": 409, "gateway_offline": 503}


# -- settings ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HubSettings:
    """How the hub runs. TLS is required, except on a loopback address with ``insecure_http`` (development)."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8443
    cert_file: Path | None = None  # PEM server certificate (chain)
    key_file: Path | None = None  # PEM private key
    insecure_http: bool = False
    admin_token: Secret | None = None  # None: the admin HTTP API is off (the CLI still works on the data dir)
    public_url: str | None = None  # https://hub.vendor.example; default: the address each request came to
    command_timeout: float = 60.0  # longer than the gateway's own attendant timeout (30 s by default)
    token_ttl: float = 3600.0  # enrollment tokens, when the request names no ttl
    webhook_ca_file: Path | None = None  # CAs to trust for webhook endpoints (default: the system store)
    heartbeat: float = 20.0  # WebSocket ping interval; a peer silent for that long after a ping is dropped
    hello_timeout: float = 10.0
    revocation_check: float = 5.0  # how often live sessions are checked against the store (a CLI revoke)
    sse_keepalive: float = 15.0
    webhook_retry_base: float = 1.0
    webhook_retry_max: float = 300.0
    webhook_timeout: float = 10.0
    synchronous: str = "NORMAL"  # SQLite; FULL survives power loss too, at some throughput cost
    retention_days: int = 30  # stored events older than this are deleted (undelivered webhook ones kept); 0: never

    def validate(self) -> None:
        if not self.insecure_http:
            if self.cert_file is None or self.key_file is None:
                raise ConfigError("the hub serves TLS only, and no certificate and key were given",
                                  key="hub_tls_required",
                                  remedy="pass --cert FILE --key FILE (PEM); for a development hub on a loopback "
                                         "address only, --insecure-http")
            for option, path in (("--cert", self.cert_file), ("--key", self.key_file)):
                if not Path(path).is_file():
                    raise ConfigError(f"the TLS file {path} ({option}) does not exist", key="hub_tls_unreadable",
                                      remedy=f"check the path given with {option}")
        elif not _is_loopback(self.host):
            raise ConfigError(f"--insecure-http is for development on a loopback address, not {self.host}",
                              key="hub_tls_required",
                              remedy="listen on 127.0.0.1 (or ::1), or serve TLS with --cert and --key")
        if self.public_url is not None:
            scheme = urlsplit(self.public_url).scheme
            if scheme not in (("http", "https") if self.insecure_http else ("https",)):
                raise ConfigError(f"the public URL {self.public_url!r} must start with https://",
                                  key="invalid_public_url", remedy="give the address gateways reach the hub at, "
                                                                   "e.g. https://hub.vendor.example")
        if self.webhook_ca_file is not None and not Path(self.webhook_ca_file).is_file():
            raise ConfigError(f"the webhook CA bundle {self.webhook_ca_file} does not exist",
                              key="webhook_ca_unreadable",
                              remedy="check the path given with --webhook-ca (a PEM file of CA certificates)")
        if self.admin_token is not None and len(self.admin_token.reveal()) < MIN_ADMIN_TOKEN:
            raise ConfigError(f"the admin token is shorter than {MIN_ADMIN_TOKEN} characters", key="weak_admin_token",
                              remedy="use a long random value, e.g. `openssl rand -base64 32`")
        if type(self.retention_days) is not int or self.retention_days < 0:
            raise ConfigError(f"the hub setting retention_days must be a whole number of days >= 0, not "
                              f"{self.retention_days!r}", key="invalid_hub_setting",
                              remedy="give --retention-days N (0 keeps events for ever)")
        for name in ("command_timeout", "token_ttl", "heartbeat", "hello_timeout", "revocation_check",
                     "sse_keepalive", "webhook_retry_base", "webhook_retry_max", "webhook_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"the hub setting {name} must be positive", key="invalid_hub_setting")

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.insecure_http:
            return None
        assert self.cert_file is not None and self.key_file is not None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"the TLS certificate {self.cert_file} or key {self.key_file} cannot be used: {e}",
                              key="hub_tls_unreadable",
                              remedy="give a PEM certificate (chain) and its matching PEM private key") from None
        return ctx


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- live sessions -----------------------------------------------------------------------------------------------
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


@dataclass(eq=False)
class _Inflight:
    request_hash: str
    task: asyncio.Task[tuple[int, CommandResult]]
    waiters: int = 1


class _Refusal(Exception):
    """An HTTP error answer: JSON ``{error, message}`` (and ``extra`` fields)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers
        self.extra = extra or {}


def _refuse(status: int, code: str, message: str, **headers: str) -> NoReturn:
    raise _Refusal(status, code, message, dict(headers) or None)


# -- metrics -----------------------------------------------------------------------------------------------------
class HubMetrics:
    """The hub's Prometheus metrics, on a registry of its own (served at GET /metrics with the admin token). The
    counters are bumped where things happen, in memory; the per-customer gauges are read from the store at
    scrape time (index lookups, see HubStore.event_stats)."""

    def __init__(self, hub: Hub) -> None:
        self.registry = r = CollectorRegistry()
        self.sessions = Gauge("gateway_hub_sessions_connected", "Gateways with a live tunnel", registry=r)
        self.sessions.set_function(lambda: len(hub.sessions))
        self.connects = Counter("gateway_hub_connects", "Tunnel handshakes by outcome", ["outcome"], registry=r)
        for outcome in CONNECT_OUTCOMES:
            self.connects.labels(outcome)
        self.events_stored = Counter("gateway_hub_events_stored", "Events stored (new ones, not redeliveries)",
                                     registry=r)
        self.duplicates = Counter("gateway_hub_events_duplicate", "Redelivered events dropped: their id was stored "
                                                                  "already", registry=r)
        self.acks = Counter("gateway_hub_acks_sent", "ack messages sent to gateways", registry=r)
        self.commands = Counter("gateway_hub_commands", "Vendor commands answered, by the result's status and reason "
                                "('' when accepted, 'other' for a code this hub does not know)",
                                ["status", "reason"], registry=r)
        self.command_timeouts = Counter("gateway_hub_command_timeouts", "Commands the gateway did not answer within "
                                        "the command timeout (answered 504 gateway_offline)", registry=r)
        self.command_seconds = Histogram("gateway_hub_command_round_trip_seconds", "From sending a command down the "
                                         "tunnel to the gateway's result", buckets=COMMAND_BUCKETS, registry=r)
        self.webhooks = Counter("gateway_hub_webhook_deliveries", "Webhook delivery attempts by outcome "
                                "(failed ones are retried)", ["outcome"], registry=r)
        for outcome in ("delivered", "failed"):
            self.webhooks.labels(outcome)
        self.pruned = Counter("gateway_hub_events_pruned", "Events deleted by retention", registry=r)
        r.register(_StoreCollector(hub))

    def command(self, result: CommandResult) -> None:
        reason = result.reason or ""
        self.commands.labels(result.status, reason if not reason or reason in COMMAND_REASONS else "other").inc()

    def render(self) -> bytes:
        """The exposition text. Blocking (the store gauges read SQLite): call it in a reader thread."""
        return generate_latest(self.registry)


class _StoreCollector(Collector):
    """Per-customer gauges read from the store at scrape time (bounded by the number of customers)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.hub.store.event_stats()
        now = self.hub.clock()
        age = GaugeMetricFamily("gateway_hub_newest_event_age_seconds", "Seconds since the customer's newest event "
                                "was stored (none: no events yet)", labels=["customer"])
        kept = GaugeMetricFamily("gateway_hub_events_retained", "Events of the customer in the store now (what SSE "
                                 "can replay; retention removes the oldest)", labels=["customer"])
        backlog = GaugeMetricFamily("gateway_hub_webhook_backlog_events", "Stored events not yet delivered to the "
                                    "customer's webhook (customers with a webhook)", labels=["customer"])
        for st in stats:
            kept.add_metric([st.customer], st.events)
            if st.newest_at is not None:
                age.add_metric([st.customer], max(0.0, (now - st.newest_at).total_seconds()))
            if st.webhook_backlog is not None:
                backlog.add_metric([st.customer], st.webhook_backlog)
        yield from (age, kept, backlog)


class Hub:
    def __init__(self, settings: HubSettings, *, clock: Clock = utc_now) -> None:
        self.settings = settings
        self.clock = clock  # wall-clock time for stored times, retention and event ages (injectable for tests)
        self.metrics = HubMetrics(self)
        self._store: HubStore | None = None
        self._writer: ThreadPoolExecutor | None = None  # one thread: SQLite has one writer anyway
        self._readers: ThreadPoolExecutor | None = None
        self.sessions: dict[str, Session] = {}  # gateway id -> its live session
        self._inflight: dict[tuple[str, str], _Inflight] = {}
        self._wakes: dict[str, set[asyncio.Event]] = defaultdict(set)  # SSE streams per customer
        self._closing = False
        self.webhooks: WebhookDispatcher | None = None

    @property
    def store(self) -> HubStore:
        assert self._store is not None, "the hub is not started"
        return self._store

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._writer is not None, "the hub is not started"
        return await asyncio.get_running_loop().run_in_executor(self._writer, lambda: fn(*args))

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._readers is not None, "the hub is not started"
        return await asyncio.get_running_loop().run_in_executor(self._readers, lambda: fn(*args))

    # -- life cycle -----------------------------------------------------------------------------------------
    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        s = self.settings
        self._store = await asyncio.to_thread(HubStore.in_dir, s.data_dir, synchronous=s.synchronous,
                                              clock=self.clock)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="hub-write")
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="hub-read")
        tasks: list[asyncio.Task[None]] = []
        try:
            self.webhooks = WebhookDispatcher(self.store, self.read, self.write, ca_file=s.webhook_ca_file,
                                              retry_base=s.webhook_retry_base, retry_max=s.webhook_retry_max,
                                              timeout=s.webhook_timeout,
                                              on_attempt=lambda outcome: self.metrics.webhooks.labels(outcome).inc())
            await self.webhooks.start()
            tasks.append(asyncio.create_task(self._watch_revocations(), name="hub-revocations"))
            if s.retention_days:
                tasks.append(asyncio.create_task(self._prune_periodically(), name="hub-retention"))
            log.info("hub.started", data=str(s.data_dir), admin_api=s.admin_token is not None,
                     retention_days=s.retention_days or None)
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.webhooks is not None:
                await self.webhooks.close()
            self._writer.shutdown(wait=True)
            self._readers.shutdown(wait=True)
            self.store.close()
            log.info("hub.stopped")

    async def shutdown(self, app: web.Application) -> None:
        """Before the handlers are waited for: end tunnels and event streams (they would run forever)."""
        self._closing = True
        for wakes in self._wakes.values():
            for wake in wakes:
                wake.set()
        # At once, without waiting for each gateway to echo the close: the process is going away.
        sessions = list(self.sessions.values())
        for session in sessions:
            session.close_code = WSCloseCode.GOING_AWAY
        await asyncio.gather(*(s.ws.close(code=WSCloseCode.GOING_AWAY, message=b"hub shutting down")
                               for s in sessions), return_exceptions=True)

    def routes(self) -> list[web.RouteDef]:
        c = "/v1/customers/{customer}"
        return [
            web.post(protocol.ENROLL_PATH, self.enroll),
            web.get(protocol.TUNNEL_PATH, self.tunnel),
            web.get(f"{c}/rooms", self.rooms),
            web.get(f"{c}/rooms/{{room}}/bookings", self.bookings),
            web.get(f"{c}/availability", self.availability),
            web.get(f"{c}/events", self.events),
            web.post(f"{c}/commands", self.commands),
            web.get("/admin/v1/customers", self.admin_customers),
            web.post("/admin/v1/customers", self.admin_add_customer),
            web.post("/admin/v1/customers/{customer}/enrollment-tokens", self.admin_token),
            web.post("/admin/v1/customers/{customer}/api-keys", self.admin_api_key),
            web.put("/admin/v1/customers/{customer}/webhook", self.admin_set_webhook),
            web.get("/admin/v1/customers/{customer}/webhook", self.admin_webhook),
            web.get("/admin/v1/gateways", self.admin_gateways),
            web.post("/admin/v1/gateways/{gateway}/revoke", self.admin_revoke),
            web.get("/healthz", self.healthz),
            web.get("/metrics", self.prometheus),
        ]

    def _tunnel_url(self, request: web.Request) -> str:
        base = self.settings.public_url or f"{request.scheme}://{request.host}"
        parts = urlsplit(base)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{protocol.TUNNEL_PATH}"

    # -- enrollment -----------------------------------------------------------------------------------------
    async def enroll(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        token, public_key, name, signature = (body.get(k) for k in ("token", "public_key", "name", "signature"))
        if not isinstance(token, str) or not 1 <= len(token) <= 512:
            _refuse(400, "invalid_request", "'token' (the enrollment token) is required")
        if not isinstance(public_key, str) or not isinstance(signature, str):
            _refuse(400, "invalid_request", "'public_key' and 'signature' (base64url) are required")
        if name is not None and (not isinstance(name, str) or len(name) > 200):
            _refuse(400, "invalid_request", "'name' must be a string of at most 200 characters")
        raw = _raw_key(public_key)
        if raw is None:
            _refuse(400, "invalid_request", "'public_key' must be a base64url raw 32-byte Ed25519 public key")
        if not _verified(raw, signature, protocol.signed_enrollment(token, public_key)):
            _refuse(400, "bad_signature", "the signature does not verify with the public key: sign "
                                          "signed_enrollment(token, public_key) with the new private key")
        key_id = protocol.key_id_for(raw)
        enrolled = await self.write(self.store.enroll, token, raw, key_id, name or "gateway")
        log.info("hub.gateway_enrolled", gateway_id=enrolled.gateway_id, customer=enrolled.customer, key_id=key_id,
                 name=name)
        return web.json_response({"gateway_id": enrolled.gateway_id, "customer": enrolled.customer,
                                  "key_id": key_id, "tunnel_url": self._tunnel_url(request)}, status=201)

    # -- the tunnel -----------------------------------------------------------------------------------------
    async def tunnel(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=(protocol.SUBPROTOCOL,), heartbeat=self.settings.heartbeat,
                                   max_msg_size=FRAME_HARD_LIMIT)
        await ws.prepare(request)
        peer = request.remote
        if ws.ws_protocol != protocol.SUBPROTOCOL:
            await self._refuse_hello(ws, "unsupported_protocol", "unsupported_protocol", f"offer the WebSocket "
                                     f"subprotocol {protocol.SUBPROTOCOL}", CLOSE_BAD_HANDSHAKE)
            return ws
        session = await self._handshake(ws, peer, self.settings.public_url or f"{request.scheme}://{request.host}")
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
            msg = await ws.receive(timeout=self.settings.hello_timeout)
        except TimeoutError:
            await self._refuse_hello(ws, "hello_timeout", "unexpected",
                                     f"no hello within {self.settings.hello_timeout:g} s", CLOSE_HELLO_TIMEOUT)
            return None
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            self.metrics.connects.labels("abandoned").inc()
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
        record = await self.read(self.store.gateway, gateway_id)
        key = next((k for k in record.keys if k.key_id == key_id and not k.retired), None) if record else None
        if key is None or not _verified(key.public_key, signature,
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
        ack = await self.write(self.store.authenticated, gateway_id, key_id, agent)
        last_seq = hello.get("last_seq")
        if type(last_seq) is int and 0 <= last_seq < ack:
            # The gateway has written fewer events than the hub acknowledged: its store is new or restored. Its
            # next events reuse sequence numbers the hub has seen, so take the ack back; redeliveries are dropped
            # by event id.
            log.warning("hub.gateway_stream_restarted", gateway_id=gateway_id, hub_ack=ack, gateway_last_seq=last_seq)
            await self.write(self.store.reset_ack, gateway_id, last_seq)
            ack = last_seq
        session = Session(id="s_" + secrets.token_urlsafe(9), gateway_id=gateway_id, customer=record.customer,
                          key_id=key_id, nonce=nonce, ws=ws)
        old = self.sessions.get(gateway_id)
        self.sessions[gateway_id] = session
        if old is not None:
            log.info("hub.session_replaced", gateway_id=gateway_id, old=old.id, new=session.id)
            old.end(CLOSE_REPLACED, b"replaced by a newer connection of this gateway")
        await ws.send_str(protocol.encode("welcome", ack=ack, session=session.id, window=protocol.DEFAULT_WINDOW,
                                          heartbeat=self.settings.heartbeat))
        self.metrics.connects.labels("accepted").inc()
        log.info("hub.gateway_connected", gateway_id=gateway_id, customer=record.customer, session=session.id,
                 key_id=key_id, ack=ack, agent=agent, peer=peer)
        return session

    async def _refuse_hello(self, ws: web.WebSocketResponse, outcome: str, code: str, message: str,
                            close_code: int) -> None:
        self.metrics.connects.labels(outcome).inc()
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
        if self.sessions.get(session.gateway_id) is session:
            del self.sessions[session.gateway_id]
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
        items = _event_items(msg)
        try:
            stored: Stored = await self.write(self.store.store_events, session.gateway_id, session.customer, items)
        except Exception as e:  # nothing was acknowledged: the gateway sends these again after reconnecting
            log.exception("hub.store_failed", gateway_id=session.gateway_id)
            await self._send_error(session, "internal", f"the hub could not store the events ({e.__class__.__name__})",
                                   ref="events")
            session.end(WSCloseCode.INTERNAL_ERROR, b"storage failed")
            return
        m = self.metrics
        m.events_stored.inc(stored.stored)
        m.duplicates.inc(stored.duplicates)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await session.send(protocol.encode("ack", seq=stored.ack))
            m.acks.inc()
        session.events_in += stored.stored
        if stored.duplicates:
            log.debug("hub.events_redelivered", gateway_id=session.gateway_id, duplicates=stored.duplicates)
        if stored.stored:
            self._notify(session.customer)

    def _on_result(self, session: Session, msg: dict[str, Any]) -> None:
        raw = msg.get("result")
        key = raw.get("key") if isinstance(raw, dict) else None
        fut = session.pending.pop(key, None) if isinstance(key, str) else None
        try:
            result = _result(raw)
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
        raw = _raw_key(public_key)
        if raw is None or protocol.key_id_for(raw) != key_id:
            raise ProtocolError("public_key must be a raw 32-byte Ed25519 key (base64url) and key_id its "
                                "key_id_for()", key="bad_message")
        if not _verified(raw, signature, protocol.signed_rotation(session.nonce, session.gateway_id, key_id)):
            raise ProtocolError("the signature by the new key over this session's challenge does not verify",
                                key="unauthorized")
        if not await self.write(self.store.add_key, session.gateway_id, raw, key_id):
            raise ProtocolError("that key belongs to another gateway", key="unauthorized")
        log.info("hub.key_added", gateway_id=session.gateway_id, key_id=key_id, current_key_id=session.key_id)
        await session.send(protocol.encode("key_rotated", key_id=key_id))

    async def _watch_revocations(self) -> None:
        """End live sessions of gateways revoked elsewhere (``gateway hub revoke`` on the data directory)."""
        while True:
            await asyncio.sleep(self.settings.revocation_check)
            if not self.sessions:
                continue
            try:
                revoked = await self.read(self.store.revoked_among, list(self.sessions))
            except Exception:
                log.exception("hub.revocation_check_failed")
                continue
            for gateway_id in revoked:
                await self._end_revoked(gateway_id)

    # -- retention ------------------------------------------------------------------------------------------
    async def _prune_periodically(self) -> None:
        while True:
            try:
                await self.prune()
            except Exception:  # a failed run (disk trouble) must not end retention: the next hour tries again
                log.exception("hub.prune_failed")
            await asyncio.sleep(PRUNE_EVERY)

    async def prune(self) -> int:
        """Delete the events stored more than ``retention_days`` ago, except those a webhook has not delivered
        yet; the rooms/bookings view stays. Batch by batch, each its own short write transaction, so event writes
        queued meanwhile go in between. Returns how many were deleted."""
        days = self.settings.retention_days
        if not days:
            return 0
        before = self.clock() - timedelta(days=days)
        total = 0
        for customer in await self.read(self.store.customers):
            while True:
                n: int = await self.write(self.store.prune_events, customer.id, before, PRUNE_BATCH)
                total += n
                if n < PRUNE_BATCH:
                    break
        self.metrics.pruned.inc(total)
        log.info("hub.pruned", count=total, retention_days=days, before=_iso(before))
        return total

    async def _end_revoked(self, gateway_id: str) -> None:
        session = self.sessions.get(gateway_id)
        if session is None or session.ending:
            return
        session.ending = True
        log.warning("hub.session_revoked", gateway_id=gateway_id, session=session.id)
        await self._send_error(session, "revoked", "this gateway was revoked at the hub; enroll it again with a "
                                                   "new token")
        session.end(CLOSE_REVOKED, b"revoked")

    def _notify(self, customer: str) -> None:
        for wake in self._wakes.get(customer, ()):
            wake.set()
        if self.webhooks is not None:
            self.webhooks.notify(customer)

    # -- commands -------------------------------------------------------------------------------------------
    async def run_command(self, customer: str, cmd: Command) -> tuple[int, CommandResult]:
        """Forward a validated command to the customer's gateway and wait for its result: (HTTP status, result).
        A second request with the same key while the first is under way shares its outcome."""
        slot = (customer, cmd.key)
        digest = cmd.request_hash()
        current = self._inflight.get(slot)
        if current is not None:
            if current.request_hash != digest:
                return 409, failed(cmd.key, "idempotency_conflict", "a different command with this key is under "
                                   "way; use a new key for a new request", retryable=False)
            current.waiters += 1
            return await asyncio.shield(current.task)
        task = asyncio.create_task(self._forward(customer, cmd), name=f"command-{cmd.key}")
        entry = _Inflight(digest, task)
        self._inflight[slot] = entry

        def done(_: object) -> None:
            if self._inflight.get(slot) is entry:
                del self._inflight[slot]

        task.add_done_callback(done)
        return await asyncio.shield(task)

    def waiting(self, customer: str, key: str) -> int:
        """How many requests wait for the command with this key (0: none under way)."""
        entry = self._inflight.get((customer, key))
        return entry.waiters if entry is not None else 0

    async def _route(self, customer: str, cmd: Command) -> Session | None:
        live = [s for s in self.sessions.values() if s.customer == customer]
        if len(live) <= 1:
            return live[0] if live else None
        room = cmd.room or (cmd.rooms[0] if cmd.rooms else None)
        owner = await self.read(self.store.gateway_for_room, customer, room) if room else None
        for s in live:
            if s.gateway_id == owner:
                return s
        return max(live, key=lambda s: s.connected_at)  # the newest connection: the likeliest to be healthy

    async def _forward(self, customer: str, cmd: Command) -> tuple[int, CommandResult]:
        session = await self._route(customer, cmd)
        offline = failed(cmd.key, "gateway_offline", f"no gateway of customer {customer!r} is connected to the hub; "
                         "retry later with the same key", retryable=True)
        if session is None:
            return 503, offline
        fut: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        session.pending[cmd.key] = fut
        started = time.monotonic()
        try:
            try:
                await session.send(protocol.encode("command", command=protocol.command_to_json(cmd)))
            except (ConnectionError, RuntimeError):
                return 503, offline
            try:
                async with asyncio.timeout(self.settings.command_timeout):
                    result = await fut
            except TimeoutError:
                self.metrics.command_timeouts.inc()
                log.warning("hub.command_timeout", customer=customer, key=cmd.key, gateway_id=session.gateway_id)
                return 504, failed(cmd.key, "gateway_offline", f"the gateway did not answer within "
                                   f"{self.settings.command_timeout:g} s; retry with the same key to learn the outcome",
                                   retryable=True)
        finally:
            if session.pending.get(cmd.key) is fut:
                del session.pending[cmd.key]
        elapsed = time.monotonic() - started
        if result.reason != "gateway_offline":  # that one is the hub's own answer: the tunnel closed meanwhile
            self.metrics.command_seconds.observe(elapsed)
        log.info("hub.command_done", customer=customer, key=cmd.key, type=cmd.type, status=result.status,
                 reason=result.reason, ms=round(elapsed * 1000))
        return RESULT_HTTP_STATUS.get(result.reason or "", 200) if result.status == "failed" else 200, result

    async def commands(self, request: web.Request) -> web.Response:
        customer = await self._customer(request)
        status, result = await self._command(customer, request)
        self.metrics.command(result)
        return web.json_response({"result": result.to_json()}, status=status)

    async def _command(self, customer: str, request: web.Request) -> tuple[int, CommandResult]:
        raw = await request.content.read(protocol.MAX_COMMAND_BYTES + 1)
        if len(raw) > protocol.MAX_COMMAND_BYTES:
            return 413, failed("", "too_large", f"a command may be at most {protocol.MAX_COMMAND_BYTES} bytes",
                               retryable=False)
        try:
            doc = protocol.loads(raw)
        except ValueError as e:
            return 400, failed("", "invalid_command", f"the body must be a JSON command object: {e}",
                               retryable=False)
        try:
            cmd = protocol.parse_command(doc)
        except ProtocolError as e:
            return 400, failed(e.command_key or "", e.key, str(e), retryable=False)
        return await self.run_command(customer, cmd)

    # -- the vendor API -------------------------------------------------------------------------------------
    async def _customer(self, request: web.Request) -> str:
        customer = request.match_info["customer"]
        key = _bearer(request)
        if key is None:
            _refuse(401, "unauthorized", "send the customer's API key as 'Authorization: Bearer <key>'",
                    **{"WWW-Authenticate": 'Bearer realm="hub"'})
        owner = await self.read(self.store.customer_for_api_key, key)
        if owner is None:
            _refuse(401, "unauthorized", "the API key is not known at this hub; the operator issues keys with "
                                         "`gateway hub api-key CUSTOMER`", **{"WWW-Authenticate": 'Bearer realm="hub"'})
        if owner != customer:
            _refuse(403, "forbidden", f"this API key belongs to another customer, not {customer!r}")
        return customer

    async def rooms(self, request: web.Request) -> web.Response:
        customer = await self._customer(request)
        rooms = await self.read(self.store.rooms, customer)
        live = {s.gateway_id for s in self.sessions.values() if s.customer == customer}
        for r in rooms:
            r["gateway_connected"] = r.pop("gateway_id") in live
        return web.json_response({"rooms": rooms})

    async def bookings(self, request: web.Request) -> web.Response:
        customer = await self._customer(request)
        room = request.match_info["room"].lower()
        if not await self.read(self.store.has_room, customer, room):
            _refuse(404, "room_unknown", f"no gateway of {customer!r} has relayed the room {room}; see GET "
                                         f"/v1/customers/{customer}/rooms")
        start, end = _range(request, default_days=7)
        items = await self.read(self.store.bookings, customer, room, start, end)
        return web.json_response({"room": room, "start": _iso(start), "end": _iso(end), "bookings": items})

    async def availability(self, request: web.Request) -> web.Response:
        customer = await self._customer(request)
        rooms = [r.strip().lower() for r in request.query.get("rooms", "").split(",") if r.strip()]
        if not rooms or len(rooms) > protocol.MAX_AVAILABILITY_ROOMS:
            _refuse(400, "invalid_rooms", f"give 1 to {protocol.MAX_AVAILABILITY_ROOMS} rooms as "
                                          "?rooms=a@example.com,b@example.com")
        start, end = _range(request, default_days=1, limit=protocol.MAX_AVAILABILITY_RANGE)
        busy = await self.read(self.store.busy, customer, rooms, start, end)
        return web.json_response({"start": _iso(start), "end": _iso(end), "rooms": busy})

    async def events(self, request: web.Request) -> web.StreamResponse:
        customer = await self._customer(request)
        raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
        try:
            after = protocol.parse_event_id(raw)
        except ProtocolError as e:
            _refuse(400, e.key, str(e))
        record = await self.read(self.store.customer, customer)
        last = record.last_seq if record is not None else 0
        if after > last:  # the hub's store was reset or restored: waiting for that id would skip events silently
            doc = protocol.event_id_ahead(after, last)
            raise _Refusal(409, doc.pop("error"), doc.pop("message"), extra=doc)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        wake = asyncio.Event()
        self._wakes[customer].add(wake)
        try:
            await resp.write(b"retry: 2000\n\n")
            while not self._closing:
                wake.clear()  # before reading: an event stored after the read sets it again
                chunk, upto, rows = await self.read(self._sse_page, customer, after)
                if rows:
                    await resp.write(chunk)
                    after = upto
                    if rows == SSE_PAGE:
                        continue
                try:
                    async with asyncio.timeout(self.settings.sse_keepalive):
                        await wake.wait()
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
        except ConnectionResetError:
            pass
        finally:
            self._wakes[customer].discard(wake)
        return resp

    def _sse_page(self, customer: str, after: int) -> tuple[bytes, int, int]:
        """In a reader thread: the customer's events after ``after``, one page, as SSE text (text, its last seq,
        rows). The rows are gone when it returns: a stream holds one page of text at most, whatever it replays."""
        batch = self.store.events_after(customer, after, SSE_PAGE)
        if not batch:
            return b"", after, 0
        text = "".join(f"id: {e.seq}\nevent: {e.type}\ndata: {e.body}\n\n" for e in batch)
        return text.encode(), batch[-1].seq, len(batch)

    # -- the admin API --------------------------------------------------------------------------------------
    def _admin(self, request: web.Request) -> None:
        token = self.settings.admin_token
        if token is None:
            _refuse(403, "admin_api_disabled", "the admin API is off: start the hub with an admin token "
                                               "(gateway hub serve --admin-token-env VAR), or use the `gateway hub` "
                                               "commands on its data directory")
        given = _bearer(request)
        if given is None or not hmac.compare_digest(given.encode(), token.reveal().encode()):
            _refuse(401, "unauthorized", "send the hub's admin token as 'Authorization: Bearer <token>'",
                    **{"WWW-Authenticate": 'Bearer realm="hub-admin"'})

    async def admin_customers(self, request: web.Request) -> web.Response:
        self._admin(request)
        customers = await self.read(self.store.customers)
        return web.json_response({"customers": [{"id": c.id, "name": c.name, "created_at": c.created_at,
                                                 "last_seq": c.last_seq} for c in customers]})

    async def admin_add_customer(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = await _json_body(request)
        customer_id, name = body.get("id"), body.get("name")
        if not isinstance(customer_id, str) or (name is not None and not isinstance(name, str)):
            _refuse(400, "invalid_request", "send {\"id\": \"contoso\", \"name\": \"Contoso Ltd\"}")
        c = await self.write(self.store.add_customer, customer_id, name)
        log.info("hub.customer_added", customer=c.id)
        return web.json_response({"id": c.id, "name": c.name, "created_at": c.created_at}, status=201)

    async def admin_token(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = await _json_body(request, optional=True)
        ttl = body.get("ttl_seconds", self.settings.token_ttl)
        if type(ttl) not in (int, float) or not 0 < ttl <= MAX_TOKEN_TTL.total_seconds():
            _refuse(400, "invalid_ttl", f"ttl_seconds must be a number of seconds between 1 and "
                                        f"{int(MAX_TOKEN_TTL.total_seconds())}")
        customer = request.match_info["customer"]
        token, expires = await self.write(self.store.issue_token, customer, timedelta(seconds=ttl))
        log.info("hub.token_issued", customer=customer, expires_at=expires)
        return web.json_response({"token": token, "expires_at": expires, "customer": customer}, status=201)

    async def admin_api_key(self, request: web.Request) -> web.Response:
        self._admin(request)
        customer = request.match_info["customer"]
        key = await self.write(self.store.issue_api_key, customer)
        log.info("hub.api_key_issued", customer=customer)
        return web.json_response({"key": key, "customer": customer}, status=201)

    async def admin_gateways(self, request: web.Request) -> web.Response:
        self._admin(request)
        records = await self.read(self.store.gateways)
        out = []
        for g in records:
            doc = g.to_json()
            doc["connected"] = g.id in self.sessions
            out.append(doc)
        return web.json_response({"gateways": out})

    async def admin_revoke(self, request: web.Request) -> web.Response:
        self._admin(request)
        gateway_id = request.match_info["gateway"]
        at = await self.write(self.store.revoke, gateway_id)
        log.warning("hub.gateway_revoked", gateway_id=gateway_id)
        await self._end_revoked(gateway_id)
        return web.json_response({"id": gateway_id, "revoked_at": at})

    async def admin_set_webhook(self, request: web.Request) -> web.Response:
        self._admin(request)
        customer = request.match_info["customer"]
        body = await _json_body(request)
        url = body.get("url")
        if url is not None and (not isinstance(url, str) or urlsplit(url).scheme != "https"
                                or not urlsplit(url).hostname):
            _refuse(400, "invalid_url", "url must be an https:// address (or null to remove the webhook)")
        secret = await self.write(self.store.set_webhook, customer, url)
        assert self.webhooks is not None
        await self.webhooks.reconfigure(customer)
        log.info("hub.webhook_set", customer=customer, url=url)
        return web.json_response({"url": url, "secret": secret})

    async def admin_webhook(self, request: web.Request) -> web.Response:
        self._admin(request)
        customer = request.match_info["customer"]
        hook = await self.read(self.store.webhook, customer)
        if hook is None:
            _refuse(404, "no_webhook", f"{customer!r} has no webhook; set one with PUT on this address")
        return web.json_response({"url": hook.url, "cursor": hook.cursor, "error": hook.error,
                                  "failing_since": hook.failing_since})

    async def prometheus(self, request: web.Request) -> web.Response:
        """GET /metrics: the admin token's, like the admin API (the hub faces the internet)."""
        self._admin(request)
        body: bytes = await self.read(self.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__, "gateways_connected": len(self.sessions)})


HUB_KEY: Final = web.AppKey("hub", Hub)


# -- helpers -----------------------------------------------------------------------------------------------------
async def _close_with_error(ws: web.WebSocketResponse, code: str, message: str, close_code: int) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_str(protocol.encode("error", code=code, message=message))
    await ws.close(code=close_code, message=code.encode())


def _code(close_code: int | None) -> int | None:
    return None if close_code is None else int(close_code)  # WSCloseCode logs as its repr otherwise


def _raw_key(text: str) -> bytes | None:
    try:
        raw = protocol.unb64(text)
    except ProtocolError:
        return None
    return raw if len(raw) == 32 else None


def _verified(public_key: bytes, signature: str, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(protocol.unb64(signature), data)
    except (InvalidSignature, ValueError, ProtocolError):
        return False
    return True


def _event_items(msg: dict[str, Any]) -> list[EventItem]:
    events = msg.get("events")
    if not isinstance(events, list) or not events:
        raise ProtocolError("'events' must be a non-empty list", key="bad_message")
    if len(events) > protocol.MAX_BATCH:
        raise ProtocolError(f"at most {protocol.MAX_BATCH} events per message, not {len(events)}", key="bad_message")
    items: list[EventItem] = []
    previous = 0
    for n, e in enumerate(events):
        if not isinstance(e, dict):
            raise ProtocolError(f"events[{n}] must be an object", key="bad_message")
        seq, room_seq, ev = e.get("seq"), e.get("room_seq"), e.get("event")
        if type(seq) is not int or not previous < seq <= protocol.MAX_SEQ:
            raise ProtocolError(f"events[{n}].seq must be an integer above the one before it (at most "
                                f"{protocol.MAX_SEQ})", key="bad_message")
        if type(room_seq) is not int or not 1 <= room_seq <= protocol.MAX_SEQ:
            raise ProtocolError(f"events[{n}].room_seq must be an integer from 1 to {protocol.MAX_SEQ}",
                                key="bad_message")
        if not isinstance(ev, dict) or ev.get("specversion") != "1.0" or not _short_str(ev.get("id")) \
                or not _short_str(ev.get("type")) or not _short_str(ev.get("source"), 1024):
            raise ProtocolError(f"events[{n}].event must be a CloudEvent 1.0 (specversion, id, source, type)",
                                key="bad_message")
        previous = seq
        items.append(EventItem(seq, room_seq, ev))
    return items


def _short_str(value: Any, limit: int = 256) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def _result(raw: Any) -> CommandResult:
    if not isinstance(raw, dict) or not isinstance(raw.get("key"), str) or raw.get("status") not in RESULT_STATUSES:
        raise ProtocolError("'result' must be an object with a string key and a status "
                            f"({', '.join(RESULT_STATUSES)})", key="bad_message")
    reason = raw.get("reason")
    if raw["status"] == "declined" and reason not in DECLINE_REASONS:
        raise ProtocolError(f"a declined result needs a reason: one of {', '.join(DECLINE_REASONS)}",
                            key="bad_message")
    if raw["status"] == "failed" and not isinstance(reason, str):
        raise ProtocolError("a failed result needs a reason (an error code)", key="bad_message")
    if raw.get("data") is not None and not isinstance(raw["data"], dict):
        raise ProtocolError("result.data must be an object", key="bad_message")
    return CommandResult.from_json(raw)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


async def _json_body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    if optional and not request.can_read_body:
        return {}
    try:
        body = protocol.loads(await request.read())
    except ValueError as e:
        _refuse(400, "invalid_json", f"the request body must be a JSON object: {e}")
    if not isinstance(body, dict):
        _refuse(400, "invalid_json", "the request body must be a JSON object")
    return body


def _parse_time(value: str | None, name: str, default: datetime) -> datetime:
    if value is None:
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        _refuse(400, "invalid_time", f"{name} must be an ISO 8601 date-time, e.g. 2026-11-23T08:00:00Z")
    if parsed.tzinfo is None:
        _refuse(400, "invalid_time", f"{name} needs a time zone offset or Z")
    return parsed.astimezone(UTC)


def _range(request: web.Request, *, default_days: int, limit: timedelta = MAX_RANGE) -> tuple[datetime, datetime]:
    start = _parse_time(request.query.get("start"), "start", datetime.now(UTC).replace(microsecond=0))
    end = _parse_time(request.query.get("end"), "end", start + timedelta(days=default_days))
    if end <= start:
        _refuse(400, "invalid_range", "end must be after start")
    if end - start > limit:
        _refuse(400, "invalid_range", f"the range may span at most {limit.days} days")
    return start, end


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    """Every error answer is JSON ``{error, message}``."""
    try:
        return await handler(request)
    except _Refusal as e:
        return web.json_response({"error": e.code, "message": e.message, **e.extra}, status=e.status,
                                 headers=e.headers)
    except GatewayError as e:
        return web.json_response({"error": e.key, "message": str(e)}, status=HTTP_STATUS.get(e.key, 400))
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        code = (e.reason or "error").lower().replace(" ", "_")
        return web.json_response({"error": code, "message": e.reason}, status=e.status, headers={
            k: v for k, v in e.headers.items() if k.lower() in ("allow", "www-authenticate")})


# -- the application ---------------------------------------------------------------------------------------------
def create_hub_app(settings: HubSettings, *, clock: Clock = utc_now) -> web.Application:
    settings.validate()
    hub = Hub(settings, clock=clock)
    app = web.Application(middlewares=[_errors], client_max_size=protocol.MAX_COMMAND_BYTES * 2)
    app[HUB_KEY] = hub
    app.add_routes(hub.routes())
    app.cleanup_ctx.append(hub.lifecycle)
    app.on_shutdown.append(hub.shutdown)
    return app


@dataclass
class RunningHub:
    """A started hub: its base URL (``https://127.0.0.1:PORT``) and how to stop it."""

    app: web.Application
    runner: web.AppRunner
    url: str
    port: int

    @property
    def hub(self) -> Hub:
        return self.app[HUB_KEY]

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_hub(settings: HubSettings, *, clock: Clock = utc_now) -> RunningHub:
    """Start serving (port 0 picks a free one); ``close()`` stops it. ``clock``: the wall clock (tests)."""
    app = create_hub_app(settings, clock=clock)
    runner = web.AppRunner(app, shutdown_timeout=5.0, handle_signals=False)
    await runner.setup()
    ctx = settings.ssl_context()
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ctx)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ConfigError(f"the hub cannot listen on {settings.host}:{settings.port}: {e.strerror or e}",
                          key="hub_cannot_listen",
                          remedy="pick another --listen address or port, or stop what is using it") from None
    port = int(runner.addresses[0][1])
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return RunningHub(app, runner, f"{'https' if ctx else 'http'}://{host}:{port}", port)


async def run_hub(settings: HubSettings, *, ready: Callable[[RunningHub], None] | None = None) -> int:
    """Serve until SIGINT or SIGTERM."""
    running = await start_hub(settings)
    log.info("hub.listening", url=running.url, tunnel=running.url.replace("http", "ws", 1) + protocol.TUNNEL_PATH)
    if ready is not None:
        ready(running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.close()
    return 0
