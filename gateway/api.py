"""The local HTTP API: rooms, bookings, availability, booking commands, the event stream (SSE, resumable),
OpenAPI, metrics and health.

Every /v1/* request needs an API key (``Authorization: Bearer gwk_...``, made with ``gateway api-keys create``)
with the scope its route names in ``ROUTES``: 401 without a valid key, 403 without the scope. /healthz, /readyz
and /openapi.json are open; /metrics needs the ``metrics`` scope unless the API listens on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import __version__
from gateway.errors import GatewayError, ProtocolError
from gateway.model import Command, CommandResult, failed, to_json
from gateway.observability.health import Readiness
from gateway.observability.metrics import Metrics
from gateway.ports import CommandHandler, OutboxEntry, Store
from gateway.relay import protocol
from gateway.store.apikeys import CACHE_SECONDS, SCOPES, ApiKey, ApiKeys, key_id_of
from gateway.store.sqlite import SqliteStore

log = structlog.get_logger(__name__)

SSE_PAGE = 100  # outbox rows read and encoded at once per stream: hundreds of clients replaying hold little
SSE_KEEPALIVE_SECONDS = 15.0
MAX_RANGE = timedelta(days=731)
REFUSAL_LOG_SECONDS = 60.0  # one log line per refused client and reason per minute; the metric counts them all
API_KEY: web.RequestKey[ApiKey] = web.RequestKey("api_key", ApiKey)
CREATE_HINT: Final = "create one with `gateway api-keys create NAME --scope read` and send it as " \
                     "'Authorization: Bearer <key>'"


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # the Api method that serves it (and the aiohttp route name)
    method: str
    path: str
    scope: str | None  # the scope a key needs; None: open to anyone


ROUTES: Final = (
    Route("rooms", "GET", "/v1/rooms", "read"),
    Route("bookings", "GET", "/v1/rooms/{room}/bookings", "read"),
    Route("events", "GET", "/v1/events", "read"),
    Route("availability", "GET", "/v1/availability", "read"),
    Route("command", "POST", "/v1/commands", "book"),
    Route("openapi", "GET", "/openapi.json", None),
    Route("prometheus", "GET", "/metrics", "metrics"),
    Route("healthz", "GET", "/healthz", None),
    Route("readyz", "GET", "/readyz", None),
)
_SCOPE_OF: Final = {(r.method, r.path): r.scope for r in ROUTES}
_ANY_KEY: Final = ""  # an unknown /v1 path: any valid key gets the 404, nobody else learns which paths exist


def is_loopback(host: str) -> bool:
    """Whether an API bound to ``host`` can be reached from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EventHub:
    """Wakes SSE streams when the coordinator commits new outbox entries."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Event] = set()

    def notify(self, entries: list[OutboxEntry] | None = None) -> None:
        for w in list(self._waiters):
            w.set()

    def subscribe(self) -> asyncio.Event:
        ev = asyncio.Event()
        self._waiters.add(ev)
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        self._waiters.discard(ev)


class Api:
    """The handlers, and the middleware that authenticates them (see ``auth_middleware`` for the app factory).

    ``keys``: the API keys (default: the ``api_keys`` table of ``store``). ``commands``: what executes booking
    commands; None answers 503 (commands disabled). ``loopback_only``: the API is bound to a loopback address, so
    /metrics needs no key.
    """

    def __init__(self, store: Store, metrics: Metrics, hub: EventHub, *,
                 room_states: Callable[[], dict[str, dict[str, Any]]], ready: Callable[[], Readiness | bool],
                 keys: ApiKeys | None = None, commands: CommandHandler | None = None,
                 loopback_only: bool = False, relay_state: Callable[[], str] | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.hub = hub
        self.room_states = room_states
        self.ready = ready
        self.relay_state = relay_state  # the tunnel's state (connected, backing_off, revoked...), if there is one
        if keys is None:
            if not isinstance(store, SqliteStore):
                raise TypeError("pass keys= when the store is not a SqliteStore")
            keys = ApiKeys(store)
        self.keys = keys
        self.commands = commands
        self.loopback_only = loopback_only
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="api-read")
        self._running: set[asyncio.Task[CommandResult]] = set()
        self._refusals_logged: dict[tuple[str, str], float] = {}

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._readers, lambda: fn(*args))

    def routes(self) -> list[web.RouteDef]:
        return [web.route(r.method, r.path, getattr(self, r.name), name=r.name) for r in ROUTES]

    def app(self) -> web.Application:
        """A web application serving this API alone (tools and tests; the gateway uses app.init_app)."""
        app = web.Application(middlewares=[self.middleware])
        app.add_routes(self.routes())
        return app

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)

    # -- authentication ---------------------------------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        scope = self._scope_for(request)
        if scope is not None:
            request[API_KEY] = await self._authorize(request, scope)
        return await handler(request)

    def _scope_for(self, request: web.Request) -> str | None:
        method = "GET" if request.method == "HEAD" else request.method
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else None
        if canonical is not None and (method, canonical) in _SCOPE_OF:
            scope = _SCOPE_OF[(method, canonical)]
            return None if scope == "metrics" and self.loopback_only else scope
        return _ANY_KEY if request.path.startswith("/v1/") else None

    async def _authorize(self, request: web.Request, scope: str) -> ApiKey:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if not header:
            raise self._refuse(request, 401, "missing", "missing_api_key",
                               f"this endpoint needs an API key; {CREATE_HINT}")
        if scheme.lower() != "bearer" or not token:
            raise self._refuse(request, 401, "malformed", "invalid_api_key",
                               "send the key as 'Authorization: Bearer <key>'")
        try:
            verdict = self.keys.check(token, load=False) or await self._read(self.keys.check, token)
        except GatewayError as e:
            log.warning("api.keys_unavailable", key=e.key, error=str(e))
            raise _problem(503, e.key, f"API keys cannot be checked right now: {e}") from None
        key = verdict.key
        if key is None:
            revoked = verdict.reason == "revoked"
            message = ("this API key was revoked" if revoked else "this is not a valid API key for this gateway")
            raise self._refuse(request, 401, verdict.reason, "revoked_api_key" if revoked else "invalid_api_key",
                               f"{message}; {CREATE_HINT}", key_id_of(token))
        if scope and scope not in key.scopes:
            raise self._refuse(request, 403, "scope", "insufficient_scope",
                               f"API key {key.id} ('{key.name}') lacks the scope '{scope}' this endpoint needs; "
                               f"create a key with it: `gateway api-keys create NAME --scope {scope}`",
                               key.id, scope=scope)
        if self.keys.use_due(key.id):
            with contextlib.suppress(RuntimeError):  # the pool is closed: the gateway is stopping
                asyncio.get_running_loop().run_in_executor(self._readers, self._record_use, key.id)
        return key

    def _record_use(self, key_id: str) -> None:
        try:
            self.keys.record_use(key_id)
        except Exception as e:  # last_used_at is informational; a busy store must not fail anything
            log.warning("api.key_use_not_recorded", key_id=key_id, error=str(e))

    def _refuse(self, request: web.Request, status: int, reason: str, code: str, message: str,
                key_id: str | None = None, *, scope: str | None = None) -> web.HTTPException:
        self.metrics.api_auth_failures.labels(reason).inc()
        who = key_id or request.remote or "?"
        now = time.monotonic()
        if now - self._refusals_logged.get((reason, who), -REFUSAL_LOG_SECONDS) >= REFUSAL_LOG_SECONDS:
            if len(self._refusals_logged) > 1000:
                self._refusals_logged.clear()
            self._refusals_logged[(reason, who)] = now
            log.info("api.auth_refused", reason=reason, key_id=key_id, remote=request.remote,
                     method=request.method, path=request.path)
        if status == 403:
            challenge = f'Bearer realm="gateway", error="insufficient_scope", scope="{scope}"'
        elif reason == "missing":
            challenge = 'Bearer realm="gateway"'
        else:
            challenge = 'Bearer realm="gateway", error="invalid_token"'
        return _problem(status, code, message, headers={"WWW-Authenticate": challenge})

    async def _still_authorized(self, request: web.Request) -> bool:
        """For long-lived streams: the key has not been revoked since the stream began."""
        key = request.get(API_KEY)
        if key is None:
            return True
        token = request.headers.get("Authorization", "").strip().partition(" ")[2].strip()
        with contextlib.suppress(GatewayError):
            verdict = self.keys.check(token, load=False) or await self._read(self.keys.check, token)
            return verdict.key is not None
        return True  # the store is busy: keep the stream; the next check decides

    # -- reading ----------------------------------------------------------------------------------------------
    async def rooms(self, request: web.Request) -> web.Response:
        stored = {r.email: r for r in await self._read(self.store.rooms)}
        live = self.room_states()
        out = []
        for email in sorted(set(stored) | set(live)):
            r = stored.get(email)
            info = live.get(email, {})
            out.append({
                "email": email,
                "state": info.get("state") or (r.state if r else "pending"),
                "reason": info.get("reason") or (r.reason if r else ""),
                "remedy": info.get("remedy") or (r.remedy if r else ""),
                "last_sync_age_seconds": info.get("last_sync_age_seconds"),
            })
        return web.json_response({"rooms": out})

    async def bookings(self, request: web.Request) -> web.Response:
        room = request.match_info["room"].lower()
        known = {r.email for r in await self._read(self.store.rooms)} | set(self.room_states())
        if room not in known:
            raise _problem(404, "room_unknown", f"no room {room} is connected; see GET /v1/rooms")
        now = datetime.now(UTC)
        start = _parse_time(request.query.get("start"), "start", now)
        end = _parse_time(request.query.get("end"), "end", start + timedelta(days=7))
        if end <= start:
            raise _problem(400, "invalid_range", "end must be after start")
        if end - start > MAX_RANGE:
            raise _problem(400, "invalid_range", "the range may span at most two years")
        items = await self._read(self.store.bookings, room, start, end)
        return web.json_response({"room": room, "start": _iso(start), "end": _iso(end),
                                  "bookings": [to_json(b) for b in items]})

    async def events(self, request: web.Request) -> web.StreamResponse:
        raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
        try:
            after = protocol.parse_event_id(raw)
        except ProtocolError as e:
            raise _problem(400, e.key, str(e)) from None
        last = await self._read(self.store.last_seq)
        if after > last:  # waiting for that id to come would skip every event until then, silently
            raise web.HTTPConflict(text=json.dumps(protocol.event_id_ahead(after, last)),
                                   content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        wake = self.hub.subscribe()
        recheck_at = time.monotonic() + SSE_KEEPALIVE_SECONDS
        try:
            await resp.write(b"retry: 2000\n\n")
            while True:
                wake.clear()
                if time.monotonic() >= recheck_at:  # however busy the stream: a revoked key's stream ends
                    if not await self._still_authorized(request):
                        log.info("api.stream_closed", reason="key_revoked", key_id=request[API_KEY].id)
                        break
                    recheck_at = time.monotonic() + SSE_KEEPALIVE_SECONDS
                chunk, upto, rows = await self._read(self._sse_page, after)
                if rows:
                    await resp.write(chunk)
                    after = upto
                    if rows == SSE_PAGE:
                        continue
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation (shutdown).
                    async with asyncio.timeout(SSE_KEEPALIVE_SECONDS):
                        await wake.wait()
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.hub.unsubscribe(wake)
        return resp

    def _sse_page(self, after: int) -> tuple[bytes, int, int]:
        """In a reader thread: the outbox page after ``after`` as SSE text, (text, its last seq, rows). The rows
        are gone when it returns, so a stream holds one page of text at most, whatever it replays."""
        entries = self.store.outbox_after(after, SSE_PAGE)
        if not entries:
            return b"", after, 0
        text = "".join(f"id: {e.seq}\nevent: {e.event.type}\ndata: "
                       f"{json.dumps(e.event.to_cloudevent(), separators=(',', ':'))}\n\n" for e in entries)
        return text.encode(), entries[-1].seq, len(entries)

    # -- commands ---------------------------------------------------------------------------------------------
    async def command(self, request: web.Request) -> web.Response:
        """POST /v1/commands: one command in, its result out (200 for every outcome the handler reports)."""
        commands = self._commands()
        body = await _read_limited(request, protocol.MAX_COMMAND_BYTES)
        if body is None:
            return _rejected(None, "invalid_command",
                             f"the command is larger than {protocol.MAX_COMMAND_BYTES} bytes")
        try:
            doc = protocol.loads(body)
        except ValueError as e:
            return _rejected(None, "invalid_command", f"the body is not a usable JSON command: {e}")
        try:
            cmd = protocol.parse_command(doc)
        except ProtocolError as e:
            return _rejected(e.command_key, e.key, str(e))
        result = await self._execute(commands, cmd)
        caller = request.get(API_KEY)
        log.info("api.command", key=cmd.key, type=cmd.type, status=result.status, reason=result.reason,
                 key_id=caller.id if caller else None)
        return web.json_response(result.to_json())

    async def availability(self, request: web.Request) -> web.Response:
        """GET /v1/availability?rooms=a,b&start=&end=: an availability command with a generated key."""
        commands = self._commands()
        q = request.query
        doc: dict[str, Any] = {"key": f"api-availability-{uuid.uuid4().hex}", "type": "availability"}
        if "rooms" in q:
            doc["rooms"] = [r.strip() for r in q["rooms"].split(",") if r.strip()]
        doc.update({name: q[name] for name in ("start", "end") if name in q})
        try:
            cmd = protocol.parse_command(doc)
        except ProtocolError as e:
            raise _problem(400, e.key, str(e)) from None
        result = await self._execute(commands, cmd)
        if result.status == "accepted":
            data = result.data or {}
            return web.json_response({"start": _iso(cmd.start), "end": _iso(cmd.end), "rooms": data.get("rooms", {})})
        raise _problem(_status_of(result), result.reason or result.status, result.message or result.status,
                       retryable=result.retryable if result.status == "failed" else None)

    def _commands(self) -> CommandHandler:
        if self.commands is None:
            raise _problem(503, "commands_disabled",
                           "booking commands are disabled on this gateway; set commands.enabled: true")
        return self.commands

    async def _execute(self, commands: CommandHandler, cmd: Command) -> CommandResult:
        # Shielded: a client that hangs up does not cancel a write into Exchange half-way. The command finishes and
        # its result is journaled, so retrying the same key returns it.
        task = asyncio.get_running_loop().create_task(self._run(commands, cmd))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    @staticmethod
    async def _run(commands: CommandHandler, cmd: Command) -> CommandResult:
        try:
            return await commands.execute(cmd)
        except Exception:  # the handler promises a result for every outcome; this is a bug, not a client error
            log.exception("api.command_crashed", key=cmd.key, type=cmd.type)
            return failed(cmd.key, "internal", "an unexpected error; the gateway logged it", retryable=True)

    # -- the rest ---------------------------------------------------------------------------------------------
    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def prometheus(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})

    async def readyz(self, request: web.Request) -> web.Response:
        state = self.ready()
        ok, reasons = (state, ()) if isinstance(state, bool) else (state.ready, state.reasons)
        body: dict[str, Any] = {"ready": ok, "reasons": list(reasons)}
        if self.relay_state is not None:  # open endpoint: the tunnel's state only, no addresses or errors
            body["relay"] = self.relay_state()
        return web.json_response(body, status=200 if ok else 503)


def auth_middleware(current: Callable[[], Api | None]) -> Middleware:
    """The Api's middleware for an application built before the Api exists (app.init_app): until it does, requests
    pass through to handlers that answer 503."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        api = current()
        if api is None:
            return await handler(request)
        return await api.middleware(request, handler)
    return middleware


_STATUS: Final[dict[int, type[web.HTTPException]]] = {
    400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden, 404: web.HTTPNotFound,
    422: web.HTTPUnprocessableEntity, 429: web.HTTPTooManyRequests, 500: web.HTTPInternalServerError,
    503: web.HTTPServiceUnavailable,
}


def _problem(status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
             retryable: bool | None = None) -> web.HTTPException:
    doc: dict[str, Any] = {"error": code, "message": message}
    if retryable is not None:
        doc["retryable"] = retryable
    return _STATUS[status](text=json.dumps(doc), content_type="application/json", headers=headers)


def _rejected(key: str | None, reason: str, message: str) -> web.Response:
    """400 with the failed result of a command that could not be parsed (without a key when it had none)."""
    doc = failed(key or "", reason, message, retryable=False).to_json()
    if not key:
        doc.pop("key")
    return web.json_response(doc, status=400)


def _status_of(result: CommandResult) -> int:
    """The HTTP status of a GET that runs a command which was not accepted."""
    if result.status == "declined":
        return {"room_unknown": 404, "not_permitted": 403}.get(result.reason or "", 422)
    if result.reason in ("invalid_command", "unsupported_command"):
        return 400
    if result.reason == "rate_limited":
        return 429
    return 503 if result.retryable else 500


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is longer than ``limit`` (the rest is never buffered)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_time(value: str | None, name: str, default: datetime) -> datetime:
    if value is None:
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        example = "2026-11-23T08:00:00Z"
        raise _problem(400, "invalid_time", f"{name} must be an ISO 8601 date-time, e.g. {example}") from None
    if parsed.tzinfo is None:
        raise _problem(400, "invalid_time", f"{name} needs a time zone offset or Z")
    return parsed.astimezone(UTC)


def _iso(value: datetime | None) -> str:
    assert value is not None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the OpenAPI document --------------------------------------------------------------------------------------
def _packaged_schema(name: str) -> dict[str, Any]:
    """A published JSON Schema, embedded whole (with its $id), so the document needs nothing from the network."""
    doc: dict[str, Any] = json.loads((resources.files("gateway") / "schemas" / name).read_text())
    return doc


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _secured(route: Route, operation: dict[str, Any]) -> dict[str, Any]:
    if route.scope is None:
        return {**operation, "security": []}
    errors = {"401": {"$ref": "#/components/responses/Unauthorized"},
              "403": {"$ref": "#/components/responses/Forbidden"}}
    operation = {**operation, "security": [{"apiKey": [route.scope]}]}
    if route.scope == "metrics":
        operation["security"].append({})  # loopback only: no key needed
    operation["responses"] = {**operation["responses"], **errors}
    return operation


def build_openapi() -> dict[str, Any]:
    problem = {"$ref": "#/components/responses/Problem"}
    time_param = {"type": "string", "format": "date-time"}
    operations: dict[str, dict[str, Any]] = {
        "rooms": {"summary": "Connected rooms and their state", "operationId": "listRooms",
                  "responses": {"200": _json(_ref("RoomList"), "the rooms")}},
        "bookings": {
            "summary": "A room's bookings overlapping [start, end)", "operationId": "listBookings",
            "parameters": [
                {"name": "room", "in": "path", "required": True, "schema": {"type": "string", "format": "email"}},
                {"name": "start", "in": "query", "schema": time_param, "description": "default: now"},
                {"name": "end", "in": "query", "schema": time_param,
                 "description": "default: start + 7 days; at most two years after start"}],
            "responses": {"200": _json(_ref("BookingList"), "the bookings"), "400": problem, "404": problem}},
        "events": {
            "summary": "Booking events as Server-Sent Events (CloudEvents 1.0 JSON in each data field)",
            "operationId": "streamEvents",
            "description": "Each event's SSE id is its outbox sequence; reconnect with Last-Event-ID to resume "
                           "after the last event you processed. Delivery is at-least-once; events of one room "
                           "arrive in order; a CloudEvent id never changes, so duplicates can be dropped. The stream "
                           f"of a key that is revoked ends within {SSE_KEEPALIVE_SECONDS + CACHE_SECONDS:g} "
                           "seconds. A Last-Event-ID past the last event is refused (409 last_event_id_ahead, with "
                           "the stream's last_event_id): the gateway's store was reset or restored since, so read "
                           "the rooms and bookings again and resume from that id.",
            "parameters": [{"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer"}},
                           {"name": "after", "in": "query", "schema": {"type": "integer"}}],
            "responses": {"200": {"description": "the stream", "content": {"text/event-stream": {
                "schema": {"type": "string"}}}}, "400": problem, "409": problem}},
        "availability": {
            "summary": "Busy times of rooms in [start, end)", "operationId": "getAvailability",
            "description": "Runs an availability command (the same as POST /v1/commands with type availability) "
                           "with a generated key, read from Exchange.",
            "parameters": [
                {"name": "rooms", "in": "query", "required": True, "schema": {"type": "string"},
                 "description": f"room addresses, comma-separated (1 to {protocol.MAX_AVAILABILITY_ROOMS})"},
                {"name": "start", "in": "query", "required": True, "schema": time_param},
                {"name": "end", "in": "query", "required": True, "schema": time_param,
                 "description": f"at most {protocol.MAX_AVAILABILITY_RANGE.days} days after start"}],
            "responses": {"200": _json(_ref("Availability"), "busy times per room"), "400": problem,
                          "403": problem, "404": problem, "422": problem, "429": problem, "503": problem}},
        "command": {
            "summary": "Execute a booking command", "operationId": "executeCommand",
            "description": "create, update, cancel, decline, resync or availability. Every command carries an "
                           "idempotency key: retrying the same key (after a timeout, a crash, a lost answer) never "
                           "books twice and returns the same outcome. Every outcome the gateway decides is a 200 "
                           "with a result: accepted; declined with a reason code; failed with retryable true or "
                           "false.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Command")}},
                            "description": f"at most {protocol.MAX_COMMAND_BYTES} bytes"},
            "responses": {
                "200": _json(_ref("CommandResult"), "the command's outcome"),
                "400": _json(_ref("RejectedCommand"), "not a valid command (bad JSON, too large, schema, times "
                                                      "in the past or reversed); nothing was done"),
                "503": problem}},
        "openapi": {"summary": "This document", "operationId": "getOpenApi",
                    "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}},
        "prometheus": {"summary": "Prometheus metrics", "operationId": "getMetrics",
                       "description": "Needs the metrics scope, unless the API listens on a loopback address only.",
                       "responses": {"200": {"description": "Prometheus text exposition",
                                             "content": {"text/plain": {"schema": {"type": "string"}}}}}},
        "healthz": {"summary": "Liveness", "operationId": "getHealth",
                    "responses": {"200": _json(_ref("Health"), "alive")}},
        "readyz": {"summary": "Readiness: every source that owns rooms has one in sync (a gateway that owns no rooms "
                              "is ready)", "operationId": "getReadiness",
                   "responses": {"200": _json(_ref("Ready"), "ready"), "503": _json(_ref("Ready"), "not ready")}},
    }
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _secured(route, operations[route.name])

    scopes = "\n".join(f"- `{name}`: {what}" for name, what in SCOPES.items())
    rejected = {"type": "object", "required": ["status", "reason", "retryable", "message"], "properties": {
        "key": {"type": "string", "description": "present when the command had a usable key"},
        "status": {"const": "failed"}, "reason": {"enum": ["invalid_command", "unsupported_command"]},
        "retryable": {"const": False}, "message": {"type": "string", "description": "what is wrong"}}}
    busy = {"type": "object", "required": ["start", "end", "status"], "properties": {
        "start": time_param, "end": time_param, "status": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Exchange room gateway — local API", "version": __version__,
                 "description": "Rooms, bookings, availability, booking commands and the booking event stream "
                                "of one gateway."},
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"apiKey": {
                "type": "http", "scheme": "bearer", "bearerFormat": "gwk_<id>_<secret>",
                "description": "An API key made with `gateway api-keys create NAME --scope SCOPE`, sent as "
                               f"`Authorization: Bearer <key>`. Scopes:\n{scopes}\nA revoked key is refused "
                               f"within {CACHE_SECONDS:g} seconds."}},
            "schemas": {
                "Room": {"type": "object", "required": ["email", "state", "reason", "remedy"], "properties": {
                    "email": {"type": "string"}, "state": {"type": "string"}, "reason": {"type": "string"},
                    "remedy": {"type": "string"}, "last_sync_age_seconds": {"type": ["number", "null"]}}},
                "RoomList": {"type": "object", "required": ["rooms"], "properties": {
                    "rooms": {"type": "array", "items": _ref("Room")}}},
                "Booking": _packaged_schema("booking.v1.json"),
                "BookingList": {"type": "object", "required": ["room", "start", "end", "bookings"], "properties": {
                    "room": {"type": "string"}, "start": time_param, "end": time_param,
                    "bookings": {"type": "array", "items": _ref("Booking")}}},
                "Availability": {"type": "object", "required": ["start", "end", "rooms"], "properties": {
                    "start": time_param, "end": time_param,
                    "rooms": {"type": "object", "additionalProperties": {"type": "array", "items": busy}}}},
                "Command": _packaged_schema("relay/command.v1.json"),
                "CommandResult": _packaged_schema("relay/result.v1.json"),
                "RejectedCommand": rejected,
                "Problem": {"type": "object", "required": ["error", "message"], "properties": {
                    "error": {"type": "string", "description": "a stable code"},
                    "message": {"type": "string", "description": "what went wrong and what to do"},
                    "retryable": {"type": "boolean"},
                    "last_event_id": {"type": "integer", "description": "with last_event_id_ahead: the id of the "
                                      "stream's last event, where to resume"}}},
                "Health": {"type": "object", "required": ["status", "version"], "properties": {
                    "status": {"const": "ok"}, "version": {"type": "string"}}},
                "Ready": {"type": "object", "required": ["ready", "reasons"], "properties": {
                    "ready": {"type": "boolean"},
                    "reasons": {"type": "array", "items": {"type": "string"}, "description": "why not ready, one "
                                "line per part (e.g. 'source onprem: no room in sync yet (auth_required 3)'); empty "
                                "when ready"},
                    "relay": {"type": "string", "description": "the tunnel's state when the relay is enabled: "
                              "connecting, connected, backing_off, unauthorized, revoked"}}},
            },
            "responses": {
                "Problem": _json(_ref("Problem"), "what went wrong and what to do"),
                "Unauthorized": {**_json(_ref("Problem"), "no API key, or not a valid one (missing_api_key, "
                                                          "invalid_api_key, revoked_api_key)"),
                                 "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
                "Forbidden": {**_json(_ref("Problem"), "the key lacks the scope (insufficient_scope)"),
                              "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
            },
        },
    }


OPENAPI: Final = build_openapi()
