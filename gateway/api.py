"""The local HTTP API: the booking API (rooms, bookings, availability, commands, the event stream) under ``/v1``,
OpenAPI, metrics and health — on the HTTP layer it shares with the hub (gateway/web/).

Every /v1/* request needs an API key (``Authorization: Bearer gwk_...``, made with ``gateway api-keys create``)
with the scope its route names in ``ROUTES``: 401 without a valid key, 403 without the scope. /healthz, /readyz
and /openapi.json are open; /metrics needs the ``metrics`` scope unless the API listens on loopback only. Errors
are problem documents (gateway/web/problem.py); a command's answer is its result (gateway/web/commands.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import __version__
from gateway.errors import ProtocolError
from gateway.model import Command, CommandResult, CommandType, ResultStatus, failed, to_json
from gateway.observability.health import Readiness
from gateway.observability.metrics import Metrics
from gateway.ports import CommandHandler, OutboxEntry, Store
from gateway.relay import protocol
from gateway.store.apikeys import CACHE_SECONDS, SCOPES, ApiKeys, key_id_of
from gateway.store.sqlite import SqliteStore
from gateway.web import commands as command_answers
from gateway.web import openapi, sse
from gateway.web.auth import PRINCIPAL, AuthTexts, BearerAuth, Principal, Verdict
from gateway.web.params import availability_query, iso, time_range
from gateway.web.problem import problem, problem_middleware
from gateway.web.routes import BOOKING_ROUTES, Route, json_body, ref

log = structlog.get_logger(__name__)

SSE_PAGE: Final = sse.PAGE  # outbox rows read and encoded at once per stream
SSE_KEEPALIVE_SECONDS = 15.0  # the ping, and how often a stream checks that its key still holds
MAX_RANGE: Final = timedelta(days=731)
CREATE_HINT: Final = "create one with `gateway api-keys create NAME --scope read` and send it as " \
                     "'Authorization: Bearer <key>'"
TEXTS: Final = AuthTexts(
    realm="gateway", missing=f"this endpoint needs an API key; {CREATE_HINT}",
    invalid=f"this is not a valid API key for this gateway; {CREATE_HINT}",
    revoked=f"this API key was revoked; {CREATE_HINT}",
    lacking=lambda scope, who: f"API key {who.id} ('{who.name}') lacks the scope '{scope}' this endpoint needs; "
                               f"create a key with it: `gateway api-keys create NAME --scope {scope}`")

ROUTES: Final = (
    *(r.under("/v1") for r in BOOKING_ROUTES),
    Route("people", "GET", "/v1/people", ("read",), {
        "summary": "The directory's people, as last relayed (person.* events carry each change)",
        "operationId": "listPeople",
        "responses": {"200": json_body({"type": "object", "required": ["people"], "properties": {
            "people": {"type": "array", "items": openapi.packaged_schema("person.v1.json")}}}, "the people"),
            "404": json_body(ref("Problem"), "no directory is configured")}}),
    Route("openapi", "GET", "/openapi.json", None, {
        "summary": "This document", "operationId": "getOpenApi",
        "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}}),
    Route("prometheus", "GET", "/metrics", ("metrics",), {
        "summary": "Prometheus metrics", "operationId": "getMetrics",
        "description": "Needs the metrics scope, unless the API listens on a loopback address only.",
        "responses": {"200": {"description": "Prometheus text exposition",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}}}),
    Route("healthz", "GET", "/healthz", None, {
        "summary": "Liveness", "operationId": "getHealth", "responses": {"200": json_body(ref("Health"), "alive")}}),
    Route("readyz", "GET", "/readyz", None, {
        "summary": "Readiness: every source that owns rooms has one in sync (verified, or polling while its change "
                   "feed restarts; a gateway that owns no rooms is ready)",
        "operationId": "getReadiness",
        "responses": {"200": json_body(ref("Ready"), "ready"), "503": json_body(ref("Ready"), "not ready")}}),
)


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


class LocalKeys:
    """The gateway's API keys (gateway/store/apikeys.py) as the shared middleware's KeyChecker: the cache first on
    the event loop, the store in a reader thread; ``last_used_at`` written at most once a minute per key."""

    def __init__(self, keys: ApiKeys, readers: ThreadPoolExecutor) -> None:
        self.keys = keys
        self._readers = readers

    async def check(self, token: str) -> Verdict:
        loop = asyncio.get_running_loop()
        verdict = self.keys.check(token, load=False) or await loop.run_in_executor(self._readers, self.keys.check,
                                                                                    token)
        assert verdict is not None  # with the store loaded, check always decides
        key = verdict.key
        if key is None:
            if verdict.reason == "malformed":
                return Verdict(None, "malformed", key_id_of(token))
            return Verdict(None, "revoked" if verdict.reason == "revoked" else "unknown", key_id_of(token))
        if self.keys.use_due(key.id):
            with contextlib.suppress(RuntimeError):  # the pool is closed: the gateway is stopping
                loop.run_in_executor(self._readers, self._record_use, key.id)
        return Verdict(Principal(key.id, key.name, key.scopes))

    def _record_use(self, key_id: str) -> None:
        try:
            self.keys.record_use(key_id)
        except Exception as e:  # last_used_at is informational; a busy store must not fail anything
            log.warning("api.key_use_not_recorded", key_id=key_id, error=str(e))


FORWARDED_BY: Final = "X-Gateway-Forwarded-By"  # a command one replica forwarded to another: never forwarded again
FORWARD_TIMEOUT_SECONDS: Final = 120.0  # a create waits for the booking attendant (commands.attendant_timeout_seconds)


@dataclass(frozen=True)
class Peers:
    """The other replicas sharing the rooms (gateway/sharding.py), as the local API sees them: which one owns a room
    this one does not sync, and where its API is (``url_template`` with ``{ordinal}``; None: not reachable, so a
    command for its room is refused with a pointer instead of forwarded)."""

    ordinal: int
    elsewhere: Callable[[], Mapping[str, int]]  # the rooms other replicas own, each with its owner's ordinal
    url_template: str | None = None

    def owner_of(self, room: str) -> int | None:
        """Another replica's ordinal for a room it owns; None: a room of this replica, or unknown."""
        return self.elsewhere().get(room.lower())

    def pointer(self, ordinal: int) -> dict[str, Any]:
        url = None if self.url_template is None else self.url_template.replace("{ordinal}", str(ordinal))
        return {"ordinal": ordinal, "url": url}

    def misdirected(self, room: str, ordinal: int, what: str) -> web.HTTPException:
        owner = self.pointer(ordinal)
        where = f" at {owner['url']}" if owner["url"] else ""
        return problem(421, "misdirected", f"room {room} is synced by replica {ordinal}{where}, not by this one "
                       f"(replica {self.ordinal}): {what} it there", owner=owner)


class Api:
    """The handlers, and the middleware that authenticates them (see ``auth_middleware`` for the app factory).

    ``keys``: the API keys (default: the ``api_keys`` table of ``store``). ``commands``: what executes booking
    commands; None answers 503 (commands disabled). ``loopback_only``: the API is bound to a loopback address, so
    /metrics needs no key.
    """

    def __init__(self, store: Store, metrics: Metrics, hub: EventHub, *,
                 room_states: Callable[[], dict[str, dict[str, Any]]], ready: Callable[[], Readiness | bool],
                 keys: ApiKeys | None = None, commands: CommandHandler | None = None,
                 loopback_only: bool = False, relay_state: Callable[[], str] | None = None,
                 peers: Peers | None = None,
                 people: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.store = store
        self.peers = peers  # None: the only replica (every room is here)
        self.metrics = metrics
        self.hub = hub
        self.room_states = room_states
        self.ready = ready
        self.relay_state = relay_state  # the tunnel's state (connected, backing_off, revoked...), if there is one
        self.people_of = people  # the directory's people as last relayed (None: no directory is configured)
        if keys is None:
            if not isinstance(store, SqliteStore):
                raise TypeError("pass keys= when the store is not a SqliteStore")
            keys = ApiKeys(store)
        self.keys = keys
        self.commands = commands
        self.loopback_only = loopback_only
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="api-read")
        self._running: set[asyncio.Task[CommandResult]] = set()
        scopes = {(r.method, r.path): r.scopes for r in ROUTES if r.scopes is not None
                  and not (loopback_only and r.name == "prometheus")}
        self.auth = BearerAuth(LocalKeys(keys, self._readers), scopes, TEXTS, area="api",
                               on_refused=lambda reason: metrics.api_auth_failures.labels(reason).inc())
        self.middleware = self.auth.middleware

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._readers, lambda: fn(*args))

    def routes(self) -> list[web.RouteDef]:
        return [web.route(r.method, r.path, getattr(self, r.name), name=r.name) for r in ROUTES]

    def app(self) -> web.Application:
        """A web application serving this API alone (tools and tests; the gateway uses app.init_app)."""
        app = web.Application(middlewares=[problem_middleware(), self.middleware])
        app.add_routes(self.routes())
        return app

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)

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
                "reason": info.get("reason", r.reason if r else ""),  # (a live state: its own, "" included)
                "remedy": info.get("remedy") or (r.remedy if r else ""),
                "last_sync_age_seconds": info.get("last_sync_age_seconds"),
            })
        body: dict[str, Any] = {"rooms": out}
        if self.peers is not None:
            body["elsewhere"] = [{"email": room, "owner": self.peers.pointer(ordinal)}
                                 for room, ordinal in sorted(self.peers.elsewhere().items())]
        return web.json_response(body)

    def _owner_elsewhere(self, room: str) -> int | None:
        return None if self.peers is None else self.peers.owner_of(room)

    async def bookings(self, request: web.Request) -> web.Response:
        room = request.match_info["room"].lower()
        if (ordinal := self._owner_elsewhere(room)) is not None:
            assert self.peers is not None
            raise self.peers.misdirected(room, ordinal, "read its bookings")
        known = {r.email for r in await self._read(self.store.rooms)} | set(self.room_states())
        if room not in known:
            raise problem(404, "room_unknown", f"no room {room} is connected; see GET /v1/rooms")
        start, end = time_range(request, default_days=7, limit=MAX_RANGE)
        items = await self._read(self.store.bookings, room, start, end)
        return web.json_response({"room": room, "start": iso(start), "end": iso(end),
                                  "bookings": [to_json(b) for b in items]})

    async def people(self, request: web.Request) -> web.Response:
        if self.people_of is None:
            raise problem(404, "no_directory", "no directory is configured, so the gateway knows no people: "
                                               "configure directory: (Active Directory over LDAP) or people: on a "
                                               "graph source (Entra ID)")
        return web.json_response({"people": await self._read(self.people_of)})

    async def events(self, request: web.Request) -> web.StreamResponse:
        after = sse.resume_point(request)
        sse.refuse_ahead(after, await self._read(self.store.last_seq))
        wake = self.hub.subscribe()

        async def still_authorized() -> bool:
            if await self.auth.still_authorized(request):
                return True
            log.info("api.stream_closed", reason="key_revoked", key_id=request[PRINCIPAL].id)
            return False
        try:
            return await sse.stream(request, after, read_page=lambda n: self._read(self._sse_page, n), wake=wake,
                                    keepalive=SSE_KEEPALIVE_SECONDS, still_authorized=still_authorized)
        finally:
            self.hub.unsubscribe(wake)

    def _sse_page(self, after: int) -> sse.Page:
        """In a reader thread: the outbox page after ``after``, encoded."""
        return sse.page_of(((e.seq, e.type, e.cloudevent) for e in self.store.outbox_texts_after(after, SSE_PAGE)),
                           after)

    # -- commands ---------------------------------------------------------------------------------------------
    async def command(self, request: web.Request) -> web.Response:
        """POST /v1/commands: one command in, its result out (gateway/web/commands.py says the statuses)."""
        commands = self._commands()
        cmd = await command_answers.read_command(request)
        if isinstance(cmd, CommandResult):
            return command_answers.answer(cmd)
        ordinal = self._owner(cmd, "send the command to")
        if ordinal is not None:
            return await self._forward(request, cmd, ordinal)
        result = await self._execute(commands, cmd)
        caller = request.get(PRINCIPAL)
        log.info("api.command", key=cmd.key, type=cmd.type, status=result.status, reason=result.reason,
                 key_id=caller.id if caller else None)
        return command_answers.answer(result)

    async def availability(self, request: web.Request) -> web.Response:
        """GET /v1/availability?rooms=a,b&start=&end=: an availability command with a generated key."""
        commands = self._commands()
        rooms, start, end = availability_query(request)
        doc = {"key": f"api-availability-{uuid.uuid4().hex}", "type": CommandType.AVAILABILITY, "rooms": rooms,
               "start": iso(start), "end": iso(end)}
        try:
            cmd = protocol.parse_command(doc)
        except ProtocolError as e:
            raise problem(400, e.key, str(e)) from None
        if (ordinal := self._owner(cmd, "ask")) is not None:
            assert self.peers is not None
            raise self.peers.misdirected(rooms[0], ordinal, "ask for its availability")
        result = await self._execute(commands, cmd)
        if result.status is ResultStatus.ACCEPTED:
            data = result.data or {}
            return web.json_response({"start": iso(start), "end": iso(end), "rooms": data.get("rooms", {})})
        extra: dict[str, Any] = {"retryable": result.retryable} if result.status is ResultStatus.FAILED else {}
        raise problem(_status_of_refused_read(result), result.reason or result.status,
                      result.message or result.status, **extra)

    def _owner(self, cmd: Command, what: str) -> int | None:
        """The other replica that owns the command's rooms (None: this one). Rooms of several replicas: 421 with
        each room's owner (one command per replica's rooms)."""
        if self.peers is None:
            return None
        rooms = [cmd.room] if cmd.room else list(cmd.rooms)
        owners = {room: self.peers.owner_of(room) for room in rooms}
        if len(set(owners.values())) > 1:
            groups = "; ".join(f"{room}: {'this replica' if o is None else f'replica {o}'}"
                               for room, o in owners.items())
            raise problem(421, "misdirected", f"these rooms are synced by different replicas ({groups}): {what} each "
                          "replica for its own rooms", owners={room: self.peers.pointer(self.peers.ordinal if o is None
                                                                                         else o)
                                                                for room, o in owners.items()})
        return next(iter(owners.values()), None)

    async def _forward(self, request: web.Request, cmd: Command, ordinal: int) -> web.Response:
        """A command for a room another replica owns: forwarded to it inside the cluster with the caller's API key
        (which must be valid there too), or refused with a pointer when no peer URL is configured or it came
        forwarded already (the replicas disagree on the count while it changes)."""
        assert self.peers is not None
        url = self.peers.pointer(ordinal)["url"]
        room = cmd.room or (cmd.rooms[0] if cmd.rooms else "")
        if url is None or request.headers.get(FORWARDED_BY) is not None:
            raise self.peers.misdirected(room, ordinal, "send the command to")
        headers = {"Authorization": request.headers.get("Authorization", ""), FORWARDED_BY: str(self.peers.ordinal),
                   "Content-Type": "application/json"}
        body = json.dumps(protocol.command_to_json(cmd))
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_SECONDS)) as http, \
                    http.post(f"{url.rstrip('/')}/v1/commands", data=body, headers=headers) as answer:
                text = await answer.text()
                status = answer.status
                content_type = answer.content_type
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("api.forward_failed", key=cmd.key, room=room, replica=ordinal, error=str(e) or type(e).__name__)
            result = failed(cmd.key, "gateway_offline", f"replica {ordinal}, which syncs {room}, did not answer at "
                            f"{url}; retry later with the same key", retryable=True)
            return command_answers.answer(result, 503)
        log.info("api.command_forwarded", key=cmd.key, type=cmd.type, room=room, replica=ordinal, status=status)
        return web.Response(text=text, status=status, content_type=content_type,
                            headers={"X-Gateway-Replica": str(ordinal)})

    def _commands(self) -> CommandHandler:
        if self.commands is None:
            raise problem(503, "commands_disabled",
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
    """The Api's middlewares (problem details, then keys) for an application built before the Api exists
    (app.init_app): until it does, requests pass through to handlers that answer 503."""
    problems = problem_middleware()

    @web.middleware
    async def keys(request: web.Request, handler: Handler) -> web.StreamResponse:
        api = current()
        if api is None:
            return await handler(request)
        return await api.middleware(request, handler)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await problems(request, lambda r: keys(r, handler))
    return middleware


def _status_of_refused_read(result: CommandResult) -> int:
    """The HTTP status of a GET that ran a command which was not accepted (it answers data, not a result)."""
    if result.status is ResultStatus.DECLINED:
        return {"room_unknown": 404, "not_permitted": 403, "organizer_not_permitted": 403}.get(result.reason or "", 422)
    if result.reason in ("invalid_command", "unsupported_command"):
        return 400
    if result.reason == "rate_limited":
        return 429
    return 503 if result.retryable else 500


SCOPE_LIST: Final = "\n".join(f"- `{name}`: {what}" for name, what in SCOPES.items())
OPENAPI: Final = openapi.build(
    title="Exchange room gateway — local API", version=__version__, routes=ROUTES,
    description="Rooms, bookings, availability, booking commands and the booking event stream of one gateway. "
                "GET /v1/availability asks Exchange (an availability command with a generated key).",
    security="An API key made with `gateway api-keys create NAME --scope SCOPE`, sent as `Authorization: Bearer "
             f"<key>`. Scopes:\n{SCOPE_LIST}\nA revoked key is refused within {CACHE_SECONDS:g} seconds, and its "
             f"event stream ends within {SSE_KEEPALIVE_SECONDS + CACHE_SECONDS:g} seconds.",
    bearer_format="gwk_<id>_<secret>", open_alternatives=("prometheus",),
    extra_schemas={"Ready": {"type": "object", "required": ["ready", "reasons"], "properties": {
        "ready": {"type": "boolean"},
        "reasons": {"type": "array", "items": {"type": "string"}, "description": "why not ready, one line per part "
                    "(e.g. 'source onprem: no room in sync yet (auth_required 3)'), and while no room at all is in "
                    "sync the rooms' states counted (each room's reason and remedy are in /v1/rooms); empty when "
                    "ready"},
        "relay": {"type": "string", "description": "the tunnel's state when the relay is enabled: connecting, "
                                                   "connected, backing_off, unauthorized, revoked"}}}})
