"""The application factory: every long-lived part is one cleanup context, wired from typed options."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from gateway.api import ROUTES, Api, EventHub, auth_middleware, is_loopback
from gateway.commands.service import CommandService
from gateway.config import CommandsConfig, Config, RelayConfig
from gateway.credentials import open_vault, resolve_password, resolve_secret
from gateway.errors import ConfigError
from gateway.model import ROOM_STATES
from gateway.observability.metrics import Metrics, StateCollector
from gateway.relay.tunnel import Tunnel
from gateway.security.identity import GatewayIdentity
from gateway.sources.ews.directory import EwsDirectory
from gateway.sources.ews.source import CALLS, EwsSettings, EwsSource
from gateway.sources.ews.streaming import PullFeed, StreamingFeed
from gateway.sources.ews.writer import EwsWriter
from gateway.store.journal import CommandJournal
from gateway.store.sqlite import SqliteStore
from gateway.sync.coordinator import Coordinator, SyncSettings
from gateway.sync.privacy import PrivacyPolicy

log = structlog.get_logger("gateway.app")
STOP_SECONDS = 10.0  # each part gets this long to stop before the next one is stopped anyway


@dataclass(frozen=True)
class GatewayOptions:
    ews: EwsSettings
    password: str = field(repr=False)
    rooms: tuple[str, ...] = ()
    room_lists: tuple[str, ...] = ()
    sync: SyncSettings = field(default_factory=SyncSettings)
    store_path: Path = Path("data/gateway.sqlite")
    feed: str = "streaming"  # streaming, pull, poll
    stream_timeout_minutes: int = 10
    group_size: int = 200
    pull_interval_seconds: float = 10.0
    feed_retry_seconds: float = 5.0  # first back-off before a room that could not be subscribed is tried again
    privacy: Callable[[str], PrivacyPolicy] | None = None
    source_name: str = "urn:exchange-gateway"
    clock: Callable[[], datetime] | None = None  # the sync window's "now" (tests move it; default: the real clock)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    identity: GatewayIdentity | None = None  # required when relay.enabled (loaded from the vault)
    proxy_password: str | None = field(default=None, repr=False)
    api_loopback_only: bool = True  # the local API listens on loopback only: /metrics needs no key
    journal_retention_days: int = 30


@dataclass
class Gateway:
    """The running parts, reachable from tests and the CLI through ``app[GATEWAY]``."""

    options: GatewayOptions
    metrics: Metrics
    store: SqliteStore
    source: EwsSource
    coordinator: Coordinator
    hub: EventHub
    api: Api
    feed: StreamingFeed | PullFeed | None = None
    feed_task: asyncio.Task[None] | None = None
    rooms: list[str] = field(default_factory=list)
    commands: CommandService | None = None
    tunnel: Tunnel | None = None
    tunnel_task: asyncio.Task[None] | None = None
    housekeeping_task: asyncio.Task[None] | None = None


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


def options_from_config(cfg: Config, env: Mapping[str, str] | None = None) -> GatewayOptions:
    """Typed options for the running gateway, from a validated configuration (the password from the vault)."""
    ex = cfg.calendar_sources[0]
    if not ex.ews_url:
        raise ConfigError("exchange.ews_url is not set; Autodiscover is not supported yet",
                          remedy="set exchange.ews_url to https://<your CAS>/EWS/Exchange.asmx")
    password = resolve_password(cfg, env if env is not None else os.environ).reveal()

    def policy_for(room: str) -> PrivacyPolicy:
        p = cfg.rooms.privacy.rooms.get(room.lower(), cfg.rooms.privacy.default)
        return PrivacyPolicy(subjects=p.subject, private_subject=p.private_subject,
                             hide_private_organizer=p.hide_private_organizer)

    identity = proxy_password = None
    environ = env if env is not None else os.environ
    if cfg.relay.enabled:
        vault = open_vault(cfg.vault, environ)
        if not GatewayIdentity.exists(vault):
            raise ConfigError("relay.enabled is true but this gateway has no identity yet", key="not_enrolled",
                              remedy="enroll it once with `gateway enroll --hub https://HUB --token TOKEN`")
        identity = GatewayIdentity.load(vault)
        if cfg.relay.proxy_password_ref is not None:
            proxy_password = resolve_secret(cfg.relay.proxy_password_ref, cfg.vault, environ).reveal()
    s = cfg.sync
    return GatewayOptions(
        ews=EwsSettings(ews_url=ex.ews_url, username=ex.username, auth=ex.auth, version=ex.version,
                        ca_bundle=str(ex.ca_bundle) if ex.ca_bundle else None, timeout=ex.timeout_seconds,
                        max_workers=ex.max_concurrent_requests, default_timezone=ex.default_timezone),
        password=password,
        rooms=ex.mailboxes,
        room_lists=ex.room_lists,
        sync=SyncSettings(days_back=cfg.rooms.days_back, days_ahead=cfg.rooms.days_ahead,
                          debounce_seconds=s.debounce_seconds,
                          poll_seconds=s.poll_interval_seconds if s.mode == "poll" else 0.0,
                          reconcile_seconds=s.reconcile_interval_seconds,
                          max_concurrent_rooms=ex.max_concurrent_requests),
        store_path=cfg.store.path,
        feed=s.mode,
        stream_timeout_minutes=s.streaming_connection_timeout_minutes,
        group_size=s.group_size,
        pull_interval_seconds=s.poll_interval_seconds,
        privacy=policy_for,
        commands=cfg.commands,
        relay=cfg.relay,
        identity=identity,
        proxy_password=proxy_password,
        api_loopback_only=is_loopback(cfg.api.host),
    )


def init_app(options: GatewayOptions, *, metrics: Metrics | None = None) -> web.Application:
    holder: dict[str, Api] = {}
    app = web.Application(middlewares=[auth_middleware(lambda: holder.get("api"))])

    async def gateway_ctx(app: web.Application) -> AsyncIterator[None]:
        gw = await start_gateway(options, metrics or Metrics())
        app[GATEWAY] = gw
        holder["api"] = gw.api
        yield
        await stop_gateway(gw)

    app.cleanup_ctx.append(gateway_ctx)

    async def forward(request: web.Request) -> web.StreamResponse:
        api = holder.get("api")
        if api is None:
            raise web.HTTPServiceUnavailable(text="starting")
        handler = getattr(api, request.match_info.route.name or "", None)
        assert handler is not None
        return await handler(request)

    for route in ROUTES:
        app.router.add_route(route.method, route.path, forward, name=route.name)
    return app


async def start_gateway(options: GatewayOptions, metrics: Metrics) -> Gateway:
    options.store_path.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(options.store_path)
    streams_expected = 0
    if options.feed == "streaming":
        streams_expected = max(1, len(options.rooms) // max(1, options.group_size) + 2)
    source = EwsSource(options.ews, options.password, extra_connections=streams_expected)
    CALLS.listeners.append(metrics.ews_call)
    coordinator = Coordinator(source, store, options.sync, policy=options.privacy, metrics=metrics,
                              clock=options.clock, source_name=options.source_name)
    hub = EventHub()
    coordinator.listeners.append(hub.notify)

    def room_states() -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {email: {"state": w.state, "reason": "", "remedy": ROOM_STATES.get(w.state, ""),
                        "last_sync_age_seconds": None if w.last_success is None else round(now - w.last_success, 3)}
                for email, w in coordinator.workers.items()}

    journal = CommandJournal(store)
    commands = CommandService(EwsWriter(source), store, journal, options.commands,
                              rooms=lambda: coordinator.workers.keys(),
                              resync=lambda room, uids: coordinator.mark_dirty(room, "command", uids),
                              metrics=metrics,
                              window=coordinator.window)
    tunnel = None
    if options.relay.enabled:
        if options.identity is None:
            raise ConfigError("relay.enabled is true but no gateway identity was loaded", key="not_enrolled",
                              remedy="enroll it once with `gateway enroll --hub https://HUB --token TOKEN`")
        tunnel = Tunnel(options.relay, options.identity, store, commands, notifier=hub, metrics=metrics,
                        proxy_password=options.proxy_password)

    def ready() -> bool:
        # A hub outage does not make the gateway unready: local clients are still served, events wait in the outbox.
        return bool(coordinator.workers) and any(w.state == "verified" for w in coordinator.workers.values())

    api = Api(store, metrics, hub, room_states=room_states, ready=ready,
              commands=commands if options.commands.enabled else None, loopback_only=options.api_loopback_only,
              relay_state=(lambda: str(tunnel.status()["state"])) if tunnel is not None else None)
    gw = Gateway(options, metrics, store, source, coordinator, hub, api, commands=commands, tunnel=tunnel)
    metrics.watch(StateCollector(
        rooms=lambda: {e: (w.state, w.last_success) for e, w in coordinator.workers.items()},
        outbox=store.outbox_stats,
        streams=lambda: _stream_counts(gw.feed),
    ))
    rooms = list(options.rooms)
    for room_list in options.room_lists:
        rooms += [r.email for r in await EwsDirectory(source).rooms(room_list)]
    gw.rooms = sorted({r.lower() for r in rooms})
    await coordinator.start(gw.rooms)
    if options.feed == "streaming":
        gw.feed = StreamingFeed(source, connection_timeout=options.stream_timeout_minutes,
                                group_size=options.group_size, retry_seconds=options.feed_retry_seconds,
                                metrics=metrics)
    elif options.feed == "pull":
        gw.feed = PullFeed(source, interval=options.pull_interval_seconds)
    if gw.feed is not None:
        gw.feed_task = asyncio.get_running_loop().create_task(gw.feed.watch(gw.rooms, coordinator.mark_dirty))
    loop = asyncio.get_running_loop()
    if tunnel is not None:
        gw.tunnel_task = loop.create_task(tunnel.run())
    gw.housekeeping_task = loop.create_task(_housekeeping(gw, journal))
    log.info("gateway.started", rooms=len(gw.rooms), feed=options.feed, store=str(options.store_path),
             relay=options.relay.enabled)
    return gw


def _stream_counts(feed: StreamingFeed | PullFeed | None) -> tuple[int, int]:
    if isinstance(feed, StreamingFeed):
        return feed.subscriptions, feed.open_streams
    return 0, 0


HOUSEKEEPING_SECONDS = 3600.0
OUTBOX_RETENTION = timedelta(days=7)  # acknowledged events stay this long (local SSE clients resume from them)


async def _housekeeping(gw: Gateway, journal: CommandJournal) -> None:
    """Hourly: drop old outbox events (only acknowledged ones while a hub consumes the outbox) and old command
    journal rows."""
    while True:
        await asyncio.sleep(HOUSEKEEPING_SECONDS)
        try:
            relayed = gw.tunnel is not None
            pruned = await asyncio.to_thread(partial(gw.store.prune, OUTBOX_RETENTION, acked_only=relayed))
            forgotten = await asyncio.to_thread(journal.prune, timedelta(days=gw.options.journal_retention_days))
            if pruned or forgotten:
                log.info("housekeeping.pruned", outbox=pruned, journal=forgotten)
        except Exception as e:  # never let housekeeping take the gateway down
            log.warning("housekeeping.failed", error=str(e))


async def stop_gateway(gw: Gateway) -> None:
    for task in (gw.tunnel_task, gw.housekeeping_task):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), STOP_SECONDS)
    if gw.tunnel is not None:
        with contextlib.suppress(Exception):
            await gw.tunnel.close()
    if isinstance(gw.feed, StreamingFeed):
        gw.feed.stop()
    if gw.feed_task is not None:
        gw.feed_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(gw.feed_task), STOP_SECONDS)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(gw.coordinator.stop(), STOP_SECONDS)
    gw.api.close()
    with contextlib.suppress(ValueError):
        CALLS.listeners.remove(gw.metrics.ews_call)
    await gw.source.close()
    gw.store.close()
    log.info("gateway.stopped")
