"""The reference hub: what a booking vendor runs in its cloud to receive gateways' tunnels (docs/relay-protocol.md).

One aiohttp application, its parts one module each:

- ``POST /v1/enroll`` (enrollment.py) turns a single-use enrollment token into a gateway identity;
- ``GET /v1/tunnel`` (tunnels.py) is the WebSocket every gateway dials: challenge, hello, welcome, then events in
  (stored durably before the ack), commands out (forwarding.py), results back, key rotation, revocation;
- ``POST /v1/graph/{route}/notifications`` and ``.../lifecycle`` (graph_notifications.py) take Microsoft Graph's
  change notifications for a gateway, with no key (Graph cannot authenticate), and forward them down its tunnel;
- ``/v1/customers/{customer}/...`` (vendor_api.py) is the vendor's API, one customer per API key: the booking API
  the gateway's local API serves too (gateway/web/routes.py): rooms, bookings, availability, events (SSE), commands;
- ``/admin/v1/...`` (admin_api.py) is the operator's API (one admin token), and ``/metrics`` (metrics.py) takes the
  same token; keys.py says who may call what; webhooks.py delivers events; retention.py prunes old events;
- ``/openapi.json`` documents it, built from the same routes as the local API's document.

State lives in one SQLite file (store.py), touched from worker threads (state.py). Live sessions and commands
waiting for their result live in memory: a hub restart drops the tunnels (gateways reconnect and resume from the
stored ack) and answers waiting commands ``gateway_offline`` (the vendor retries the same key; the gateway's
journal answers it).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiohttp import web

from gateway import __version__
from gateway.errors import ConfigError, GatewayError
from gateway.hub.admin_api import AdminApi
from gateway.hub.enrollment import Enrollment
from gateway.hub.forwarding import Forwarder
from gateway.hub.graph_notifications import MAX_VALIDATION_TOKEN, GraphNotifications
from gateway.hub.keys import TEXTS, HubKeys, admin_gate
from gateway.hub.metrics import HubMetrics
from gateway.hub.retention import Retention
from gateway.hub.settings import HubSettings
from gateway.hub.state import HubState
from gateway.hub.store import (
    AlreadyThere,
    Clock,
    HubStore,
    InvalidCustomerId,
    TokenSpent,
    TokenUnknown,
    Unknown,
    utc_now,
)
from gateway.hub.tunnels import FRAME_HARD_LIMIT, Session, Tunnels
from gateway.hub.vendor_api import SSE_PAGE, VendorApi
from gateway.hub.webhooks import WebhookDispatcher
from gateway.model import Command, CommandResult
from gateway.relay import protocol
from gateway.web import openapi
from gateway.web.auth import BearerAuth
from gateway.web.problem import problem_middleware
from gateway.web.routes import BOOKING_ROUTES, PROBLEM, Route, json_body, ref

log = structlog.get_logger(__name__)

__all__ = ["FRAME_HARD_LIMIT", "SSE_PAGE", "Hub", "HubSettings", "RunningHub", "create_hub_app", "run_hub",
           "start_hub"]

HTTP_STATUS: Final[tuple[tuple[type[GatewayError], int], ...]] = (  # the store's errors, the first that matches
    (TokenSpent, 410), (TokenUnknown, 401), (AlreadyThere, 409), (Unknown, 404), (InvalidCustomerId, 400),
)


def _status_of(e: GatewayError) -> int:
    return next((status for cls, status in HTTP_STATUS if isinstance(e, cls)), 400)


# -- the routes --------------------------------------------------------------------------------------------------
CUSTOMER_PARAM: Final = {"name": "customer", "in": "path", "required": True, "schema": {"type": "string"},
                         "description": "the customer the API key belongs to"}
_NOTES: Final = {
    "rooms": "The rooms the customer's gateways relay, from their room.state_changed events.",
    "bookings": "From the events stored so far; 404 room_unknown for a room never relayed.",
    "availability": "Busy intervals from the stored bookings (cancelled, declined and free ones do not count); "
                    "the availability command asks Exchange itself instead.",
    "events": "Every stored event of the customer (within the retention period), oldest first, then live; ids are "
              "the hub's per-customer sequence.",
    "command": "Forwarded to the customer's gateway; the hub waits up to its command timeout for the result.",
}


def _admin(name: str, method: str, path: str, summary: str, status: int = 200, *,
           body: bool = False) -> Route:
    op: dict[str, Any] = {"summary": summary, "operationId": name,
                          "responses": {str(status): {"description": "done", "content": {"application/json": {}}},
                                        "400": PROBLEM, "404": PROBLEM}}
    if body:
        op["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}}}}
    params = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                            for p in params]
    return Route(name, method, path, ("admin",), op)


def _graph(name: str, kind: str) -> Route:
    text = {"200": {"description": "the validation handshake: the decoded validationToken",
                    "content": {"text/plain": {"schema": {"type": "string"}}}},
            "202": {"description": "accepted: forwarded to the gateway if its tunnel is up, else dropped (it polls)"}}
    return Route(name, "POST", f"/v1/graph/{{route}}/{kind}", None, {
        "summary": f"Microsoft Graph posts {'lifecycle events' if kind == 'lifecycle' else 'change notifications'} "
                   "for one gateway here (no key: the route, told to the gateway in welcome, is unguessable)",
        "operationId": name,
        "parameters": [{"name": "route", "in": "path", "required": True, "schema": {"type": "string"}},
                       {"name": "validationToken", "in": "query", "required": False,
                        "schema": {"type": "string", "maxLength": MAX_VALIDATION_TOKEN}}],
        "requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["value"]}}}},
        "responses": {**text, "400": PROBLEM, "404": PROBLEM, "413": PROBLEM, "429": PROBLEM}})


ROUTES: Final = (
    Route("enroll", "POST", protocol.ENROLL_PATH, None, {
        "summary": "Enroll a gateway with a single-use token and its own public key (docs/relay-protocol.md §3)",
        "operationId": "enroll", "requestBody": {"required": True, "content": {"application/json": {}}},
        "responses": {"201": {"description": "enrolled", "content": {"application/json": {}}}, "400": PROBLEM,
                      "401": PROBLEM, "409": PROBLEM, "410": PROBLEM}}),
    Route("tunnel", "GET", protocol.TUNNEL_PATH, None, {
        "summary": f"The gateways' WebSocket (subprotocol {protocol.SUBPROTOCOL}, docs/relay-protocol.md §2-10)",
        "operationId": "tunnel", "responses": {"101": {"description": "switching to the WebSocket"}}}),
    _graph("graph_notifications", "notifications"), _graph("graph_lifecycle", "lifecycle"),
    *(r.under("/v1/customers/{customer}", scopes=("customer:{customer}",), params=[CUSTOMER_PARAM],
              note=_NOTES[r.name]) for r in BOOKING_ROUTES),
    _admin("list_customers", "GET", "/admin/v1/customers", "The customers"),
    _admin("add_customer", "POST", "/admin/v1/customers", "Add a customer {id, name}", 201, body=True),
    _admin("enrollment_token", "POST", "/admin/v1/customers/{customer}/enrollment-tokens",
           "Issue an enrollment token {ttl_seconds}", 201, body=True),
    _admin("api_key", "POST", "/admin/v1/customers/{customer}/api-keys", "Issue a customer API key (shown once)",
           201),
    _admin("set_webhook", "PUT", "/admin/v1/customers/{customer}/webhook", "Set or remove the webhook {url}",
           body=True),
    _admin("get_webhook", "GET", "/admin/v1/customers/{customer}/webhook", "The webhook and its delivery state"),
    _admin("list_gateways", "GET", "/admin/v1/gateways", "The gateways"),
    _admin("revoke", "POST", "/admin/v1/gateways/{gateway}/revoke", "Revoke a gateway; its live session ends"),
    Route("healthz", "GET", "/healthz", None, {
        "summary": "Liveness", "operationId": "getHealth", "responses": {"200": json_body(ref("Health"), "alive")}}),
    Route("prometheus", "GET", "/metrics", ("metrics",), {
        "summary": "Prometheus metrics (the admin token)", "operationId": "getMetrics",
        "responses": {"200": {"description": "Prometheus text exposition",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}}}),
    Route("openapi", "GET", "/openapi.json", None, {
        "summary": "This document", "operationId": "getOpenApi",
        "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}}),
)

OPENAPI: Final = openapi.build(
    title="Exchange room gateway — reference hub", version=__version__, routes=ROUTES,
    description="The booking vendor's API, one customer per API key: the booking API of the gateway's local API "
                "under /v1/customers/{customer}; enrollment and the tunnel for gateways; the operator's admin API.",
    security="A customer's API key (`ck_...`, issued by the operator with `gateway hub api-key CUSTOMER`), sent as "
             "`Authorization: Bearer <key>`: it reaches that customer's /v1/customers/{customer}/... only (scopes "
             "`read`, `book`, `customer:<id>`). The hub's admin token (scopes `admin`, `metrics`) for /admin/v1 and "
             "/metrics.",
    bearer_format="ck_<secret>")


# -- the hub -----------------------------------------------------------------------------------------------------
class Hub:
    """The parts, wired: what the application serves and what tests and tools reach into."""

    def __init__(self, settings: HubSettings, *, clock: Clock = utc_now) -> None:
        self.state = HubState(settings, clock)
        self.tunnels = Tunnels(self.state)
        self.forwarder = Forwarder(self.state)
        self.enrollment = Enrollment(self.state)
        self.vendor = VendorApi(self.state, self.forwarder)
        self.admin = AdminApi(self.state, self.tunnels)
        self.retention = Retention(self.state)
        self.graph = GraphNotifications(self.state)

    @property
    def settings(self) -> HubSettings:
        return self.state.settings

    @property
    def store(self) -> HubStore:
        return self.state.store

    @property
    def sessions(self) -> dict[str, Session]:
        return self.state.sessions

    @property
    def metrics(self) -> HubMetrics:
        return self.state.metrics

    @property
    def webhooks(self) -> WebhookDispatcher | None:
        return self.state.webhooks

    def clock(self) -> Any:
        return self.state.clock()

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.state.read(fn, *args)

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.state.write(fn, *args)

    async def prune(self) -> int:
        return await self.retention.prune()

    async def run_command(self, customer: str, cmd: Command) -> tuple[int, CommandResult]:
        return await self.forwarder.run_command(customer, cmd)

    def waiting(self, customer: str, key: str) -> int:
        return self.forwarder.waiting(customer, key)

    def routes(self) -> list[web.RouteDef]:
        handlers = {
            "enroll": self.enrollment.enroll, "tunnel": self.tunnels.tunnel,
            "rooms": self.vendor.rooms, "bookings": self.vendor.bookings, "availability": self.vendor.availability,
            "events": self.vendor.events, "command": self.vendor.command,
            "list_customers": self.admin.list_customers, "add_customer": self.admin.add_customer,
            "enrollment_token": self.admin.enrollment_token, "api_key": self.admin.api_key,
            "set_webhook": self.admin.set_webhook, "get_webhook": self.admin.get_webhook,
            "list_gateways": self.admin.list_gateways, "revoke": self.admin.revoke,
            "graph_notifications": self.graph.notifications, "graph_lifecycle": self.graph.lifecycle,
            "healthz": self.healthz, "prometheus": self.admin.prometheus, "openapi": self.openapi}
        return [web.route(r.method, r.path, handlers[r.name], name=r.name) for r in ROUTES]

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        s, state = self.settings, self.state
        await asyncio.to_thread(state.open)
        tasks: list[asyncio.Task[None]] = []
        try:
            state.webhooks = WebhookDispatcher(
                state.store, state.read, state.write, ca_file=s.webhook_ca_file, retry_base=s.webhook_retry_base,
                retry_max=s.webhook_retry_max, timeout=s.webhook_timeout,
                on_attempt=lambda outcome: state.metrics.webhooks.labels(outcome).inc())
            await state.webhooks.start()
            tasks.append(asyncio.create_task(self.tunnels.watch_revocations(), name="hub-revocations"))
            if s.retention_days:
                tasks.append(asyncio.create_task(self.retention.run(), name="hub-retention"))
            log.info("hub.started", data=str(s.data_dir), admin_api=s.admin_token is not None,
                     retention_days=s.retention_days or None)
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.graph.close()
            if state.webhooks is not None:
                await state.webhooks.close()
            await asyncio.to_thread(state.close)
            log.info("hub.stopped")

    async def shutdown(self, app: web.Application) -> None:
        """Before the handlers are waited for: end event streams and tunnels (they would run forever)."""
        self.state.end_streams()
        await self.tunnels.shutdown()

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__, "gateways_connected": len(self.sessions)})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)


HUB_KEY: Final = web.AppKey("hub", Hub)


# -- the application ---------------------------------------------------------------------------------------------
def create_hub_app(settings: HubSettings, *, clock: Clock = utc_now) -> web.Application:
    settings.validate()
    hub = Hub(settings, clock=clock)
    auth = BearerAuth(HubKeys(hub.state), {(r.method, r.path): r.scopes for r in ROUTES if r.scopes is not None},
                      TEXTS, area="hub", protected=("/v1/customers/", "/admin/"))
    app = web.Application(middlewares=[problem_middleware(_status_of), admin_gate(hub.state), auth.middleware],
                          client_max_size=protocol.MAX_COMMAND_BYTES * 2)
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
