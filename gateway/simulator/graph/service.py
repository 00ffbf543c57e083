"""The Graph side's HTTP face: the token endpoint and ``/v1.0`` over HTTPS, bearer tokens, the limits, errors in
Graph's shape, and ``$batch``. Routes live in reads.py, writes.py, delta.py and subscriptions.py; they all act on
the simulator's one organisation (gateway/simulator/mailboxes.py), so the EWS side sees the same calendars."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
import weakref
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import structlog
from aiohttp import web

from gateway.simulator.calendar import CalendarItem, Instance
from gateway.simulator.graph import ids
from gateway.simulator.graph.errors import GraphError, bad_request, not_found
from gateway.simulator.graph.limits import Limits
from gateway.simulator.graph.router import GraphRequest, GraphResponse, Router
from gateway.simulator.graph.tokens import AppRegistration, TokenService
from gateway.simulator.mailboxes import Mailbox
from gateway.simulator.soap import EwsError

if TYPE_CHECKING:
    from gateway.simulator.server import Simulator

log = structlog.get_logger("gateway.simulator.graph")

VERSION_PREFIX = "/v1.0"
MAX_BATCH = 20


@dataclass
class GraphConfig:
    """The Exchange Online tenant of the simulated organisation and its one registered application."""

    tenant_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    client_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    token_lifetime: int = 3599  # seconds, as Entra's app tokens (about an hour)
    mailbox_concurrency: int = 4  # per (app, mailbox); the fifth concurrent request gets 429
    subscription_max_minutes: int = 4230  # the longest expirationDateTime granted to an event subscription
    validation_timeout: float = 10.0  # seconds a notification URL has to echo the validation token
    notify_ca_bundle: str | None = None  # PEM that verifies notification URLs (a test hub's CA); system CAs else
    delivery_backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # seconds between delivery attempts
    delivery_timeout: float = 10.0  # seconds a notification URL has to answer (Graph wants 3; loaded CI is slower)
    latency: float = 0.0  # seconds every Graph call takes (benchmarks)


class GraphService:
    def __init__(self, sim: Simulator, config: GraphConfig | None = None) -> None:
        self.sim = sim
        self.config = config or GraphConfig()
        cfg = self.config
        self.tokens = TokenService(cfg.tenant_id, AppRegistration(cfg.client_id, cfg.client_secret),
                                   cfg.token_lifetime)
        self.limits = Limits(cfg.mailbox_concurrency)
        self.router = Router()
        self.base_url = ""  # https://host:port once served
        self.calls: Counter[tuple[str, int]] = Counter()  # (method + route pattern, status)
        # Graph's transactionId of events created through it (the item itself has no such field in EWS).
        self.transactions: weakref.WeakKeyDictionary[CalendarItem, str] = weakref.WeakKeyDictionary()
        self._by_object_id: dict[str, str] = {}
        from gateway.simulator.graph import reads
        from gateway.simulator.graph.delta import Delta

        self.reads = reads.add_routes(self)
        from gateway.simulator.graph.users import Users

        self.users = Users(self)
        self.users.add_routes()
        self.delta = Delta(self, self.reads)
        from gateway.simulator.graph import writes

        writes.add_routes(self)
        from gateway.simulator.graph.subscriptions import Subscriptions

        self.subscriptions = Subscriptions(self)
        self.router.add("POST", "/$batch", self._batch)

    # -- addresses ----------------------------------------------------------------------------------
    def serving(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.tokens.base_url = self.base_url

    @property
    def graph_url(self) -> str:
        return self.base_url + VERSION_PREFIX

    @property
    def authority(self) -> str:
        return f"{self.base_url}/{self.config.tenant_id}"

    # -- the HTTP face ------------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        self.tokens.add_routes(app)
        app.router.add_route("*", VERSION_PREFIX + "/{tail:.*}", self.handle)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.subscriptions.close()

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path[len(VERSION_PREFIX):] or "/"
        raw = await request.read()
        try:
            app_id = self._authenticate(request.headers.get("Authorization", ""))
            body = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as e:
                    raise bad_request("Unable to read JSON request payload. Please ensure Content-Type header is "
                                      "set and payload is of valid JSON format.") from e
            greq = GraphRequest(request.method, path, dict(request.query), {k.lower(): v for k, v in
                                                                             request.headers.items()}, body, app_id)
        except GraphError as e:
            return self._error_response(e)
        answer = await self.dispatch(greq)
        headers = dict(answer.headers)
        headers.setdefault("request-id", str(uuid.uuid4()))
        if answer.body is None:
            return web.Response(status=answer.status, headers=headers)
        return web.json_response(answer.body, status=answer.status, headers=headers,
                                 content_type="application/json")

    def _error_response(self, e: GraphError) -> web.Response:
        return web.json_response(e.body(), status=e.status, headers=e.headers)

    def _authenticate(self, header: str) -> str:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        app_id = self.tokens.client_of(token.strip())
        if app_id is None:
            raise GraphError(401, "InvalidAuthenticationToken",
                             "Lifetime validation failed, the token is expired.")
        return app_id

    async def dispatch(self, req: GraphRequest) -> GraphResponse:
        """Run one request (from the socket or a ``$batch``): limits, route, Graph's error shape."""
        route = "?"
        try:
            self.limits.check_storm()
            handler = self.router.resolve(req)
            route = getattr(handler, "__name__", "?")
            user = req.params.get("user")
            if user is None or route == "user":  # the directory's user object, not its mailbox
                answer = await handler(req)
            else:
                mailbox = self.mailbox(user)
                with self.limits.slot(req.app_id, mailbox.smtp):
                    if self.config.latency:
                        await asyncio.sleep(self.config.latency)
                    answer = await handler(req)
        except GraphError as e:
            self.calls[(f"{req.method} {route}", e.status)] += 1
            return GraphResponse(e.status, e.body(), dict(e.headers))
        except EwsError as e:  # the shared calendar logic speaks EWS: say it in Graph's words
            status = 404 if "NotFound" in e.code or "NonExistent" in e.code else 400
            self.calls[(f"{req.method} {route}", status)] += 1
            return GraphResponse(status, GraphError(status, e.code, e.text).body())
        self.calls[(f"{req.method} {route}", answer.status)] += 1
        return answer

    async def _batch(self, req: GraphRequest) -> GraphResponse:
        requests = (req.body or {}).get("requests") if isinstance(req.body, dict) else None
        if not isinstance(requests, list) or not requests:
            raise bad_request("Invalid batch payload format.", "BadRequest")
        if len(requests) > MAX_BATCH:
            raise bad_request(f"Number of requests in batch exceeds the limit of {MAX_BATCH}.", "BadRequest")
        responses = []
        for member in requests:  # in order: Outlook works through one mailbox's members a few at a time anyway
            if not isinstance(member, dict) or "id" not in member or "url" not in member:
                raise bad_request("Each batch request needs an id, a method and a url.", "BadRequest")
            url = str(member["url"])
            if url.lower().startswith(VERSION_PREFIX):
                url = url[len(VERSION_PREFIX):]
            sub = GraphRequest.of(str(member.get("method", "GET")), "/" + url.lstrip("/"),
                                  {str(k): str(v) for k, v in (member.get("headers") or {}).items()},
                                  member.get("body"))
            sub.app_id = req.app_id
            answer = await self.dispatch(sub)
            item: dict[str, Any] = {"id": str(member["id"]), "status": answer.status,
                                    "headers": {"Content-Type": "application/json", **answer.headers}}
            if answer.body is not None:
                item["body"] = answer.body
            responses.append(item)
        return GraphResponse(200, {"responses": responses})

    # -- what routes share --------------------------------------------------------------------------
    def mailbox(self, user: str) -> Mailbox:
        """The Exchange Online mailbox ``/users/{user}`` names (by address or object id), after the access policy."""
        mb = self.directory_object(user)
        if mb.side != "graph":
            raise GraphError(404, "MailboxNotEnabledForRESTAPI",
                             "The mailbox is either inactive, soft-deleted, or is hosted on-premise.")
        self.limits.check_policy(mb.smtp)
        return mb

    def directory_object(self, user: str) -> Mailbox:
        """A user of the directory by address or object id, on either side (Entra ID knows synchronised users)."""
        d = self.sim.directory
        if "@" in user:
            mb = d.find(user)
        else:
            if len(self._by_object_id) != len(d.by_idx):  # mailboxes were added: index the new ones
                self._by_object_id = {ids.object_id(m.smtp): m.smtp for m in d.by_idx}
            smtp = self._by_object_id.get(user.lower())
            mb = d.find(smtp) if smtp else None
        if mb is None:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{user}' is invalid.")
        return mb

    def find_event(self, mailbox: Mailbox, event_id: str) -> tuple[CalendarItem, Instance]:
        """An event of ``mailbox`` by its Graph id: (the stored item, the instance the id names)."""
        parsed = ids.parse_event_id(event_id)
        if parsed is None:
            raise GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")
        mailbox_idx, iid, original = parsed
        item = self.sim.directory.item(iid)
        if mailbox_idx != mailbox.idx or item is None or item.folder is not mailbox.calendar:
            raise not_found()
        if original is None:
            return item, Instance(item, 0, None)
        if item.recurrence is None or original in (item.deleted or ()) or item.index_of(original) is None:
            raise not_found()
        return item, Instance(item, item.index_of(original) or 0, original)

    def next_link(self, req: GraphRequest, **query: str) -> str:
        merged = {**req.query, **query}
        return f"{self.graph_url}{req.path}?{urlencode(merged)}"

    def context(self, fragment: str) -> str:
        return f"{self.graph_url}/$metadata#{fragment}"


def parse_instant(value: str, what: str) -> datetime:
    """A query's date-time: an offset or ``Z`` means exactly that; none means UTC (Graph's rule)."""
    from datetime import UTC

    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise GraphError(400, "ErrorInvalidParameter", f"The value '{value}' of {what} is not a valid date and "
                                                       "time.") from e
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
