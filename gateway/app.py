"""The application factory: every long-lived part is one cleanup context, wired from typed options."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
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
from gateway.errors import ConfigError, GatewayError, is_shared
from gateway.model import ROOM_STATES
from gateway.observability.metrics import Metrics, StateCollector
from gateway.relay.tunnel import Tunnel
from gateway.security.identity import GatewayIdentity
from gateway.sources.ews.source import CALLS, EwsSettings, EwsSource
from gateway.sources.ews.streaming import PullFeed, StreamingFeed
from gateway.sources.ews.writer import EwsWriter
from gateway.store.journal import CommandJournal
from gateway.store.sqlite import SqliteStore
from gateway.supervisor import supervise, watch_task
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
    # The password again, read afresh (from the vault): while Exchange refuses the credentials, it is re-read every
    # ``password_check_seconds`` and a changed one is tried at once (no waiting out the long auth back-off).
    password_source: Callable[[], str] | None = field(default=None, repr=False)
    password_check_seconds: float = 30.0
    feed_restart_seconds: float = 5.0  # first back-off before a change feed that failed is started again


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
    feed_up: bool = False  # the feed has subscribed and not failed since
    credentials_task: asyncio.Task[None] | None = None
    lists_task: asyncio.Task[None] | None = None  # room lists that could not be read at start, read later
    rooms: list[str] = field(default_factory=list)
    commands: CommandService | None = None
    tunnel: Tunnel | None = None
    tunnel_task: asyncio.Task[None] | None = None
    housekeeping_task: asyncio.Task[None] | None = None


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


def options_from_config(cfg: Config, env: Mapping[str, str] | None = None) -> GatewayOptions:
    """Typed options for the running gateway, from a validated configuration (the password from the vault)."""
    ex = cfg.exchange
    if not ex.ews_url:
        raise ConfigError("exchange.ews_url is not set; Autodiscover is not supported yet",
                          remedy="set exchange.ews_url to https://<your CAS>/EWS/Exchange.asmx")
    password = resolve_password(cfg, env if env is not None else os.environ).reveal()

    def password_again() -> str:
        return resolve_password(cfg, env if env is not None else os.environ).reveal()

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
        rooms=cfg.rooms.mailboxes,
        room_lists=cfg.rooms.room_lists,
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
        password_source=password_again,
    )


def listen_error(e: OSError, host: str, port: int, *, host_setting: str | None, port_setting: str) -> GatewayError:
    """Why the local API cannot listen on ``host:port``, with the setting that fixes it: a port in use, a host that
    is not this machine's or not known at all, a privileged port."""
    anywhere = "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
    host_fix = f"set {host_setting} to an address of this machine: {anywhere}" if host_setting else \
        "listen on 127.0.0.1"
    if isinstance(e, socket.gaierror):
        return ConfigError(f"cannot listen on {host}:{port}: there is no host {host!r} ({e.strerror})",
                           key="unknown_listen_host", remedy=host_fix)
    if e.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"cannot listen on {host}:{port}: {host} is not an address of this machine",
                           key="listen_address_unavailable", remedy=host_fix)
    if e.errno == errno.EADDRINUSE:
        return ConfigError(f"cannot listen on {host}:{port}: another program already listens on port {port}",
                           key="port_in_use",
                           remedy=f"stop that program (`ss -ltnp 'sport = :{port}'` shows which) or choose a free "
                                  f"port with {port_setting}")
    if e.errno == errno.EACCES:
        return ConfigError(f"cannot listen on {host}:{port}: ports below 1024 need privileges",
                           key="port_not_permitted", remedy=f"choose a port above 1023 with {port_setting}")
    return ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}", key="cannot_listen",
                       remedy=f"check {host_setting + ' and ' if host_setting else ''}{port_setting}")


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
    store = SqliteStore(options.store_path)  # creates its folder 0700, or names the path and the fix
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
        return bool(coordinator.workers) and any(w.state in ("verified", "polling")
                                                 for w in coordinator.workers.values())

    def not_ready_reason() -> str:
        # /readyz is open: counts and states only, no addresses, hosts or error texts.
        if not coordinator.workers:
            return "no rooms are configured, or none has been found yet"
        counts: dict[str, int] = {}
        for w in coordinator.workers.values():
            counts[w.state] = counts.get(w.state, 0) + 1
        states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return f"no room is in sync ({states}); see /v1/rooms or `gateway rooms` for each room's reason and remedy"

    api = Api(store, metrics, hub, room_states=room_states, ready=ready, ready_reason=not_ready_reason,
              commands=commands if options.commands.enabled else None, loopback_only=options.api_loopback_only,
              relay_state=(lambda: str(tunnel.status()["state"])) if tunnel is not None else None)
    gw = Gateway(options, metrics, store, source, coordinator, hub, api, commands=commands, tunnel=tunnel)
    metrics.watch(StateCollector(
        rooms=lambda: {e: (w.state, w.last_success) for e, w in coordinator.workers.items()},
        outbox=store.outbox_stats if tunnel is not None else None,  # only a hub acknowledges; see StateCollector
        streams=lambda: _stream_counts(gw.feed),
        states=ROOM_STATES,
        feed_up=lambda: None if options.feed not in ("streaming", "pull") else gw.feed_up,
    ))
    loop = asyncio.get_running_loop()

    def outage_changed(failure: Exception | None) -> None:
        """Exchange is back (whichever call found out, a room's or the feed's): the waiting rooms retry now."""
        if failure is None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the gateway is stopping
                loop.call_soon_threadsafe(coordinator.exchange_recovered)
    source.gate.listeners.append(outage_changed)
    rooms = list(options.rooms)
    unread: list[str] = []
    for room_list in options.room_lists:
        try:
            rooms += await source.room_list_members(room_list)
        except GatewayError as e:
            if not is_shared(e):
                raise  # a list that does not exist: the configuration is wrong
            # Refused credentials or Exchange away: start anyway (exiting would be restarted, and every restart is
            # another failed logon), keep the rooms known from before so that none is disconnected for want of its
            # list, and read the lists once Exchange answers.
            if not unread:
                log.error("gateway.room_lists_unreadable", key=e.key, reason=str(e.args[0]) if e.args else e.key,
                          remedy=e.remedy, lists=len(options.room_lists))
            unread.append(room_list)
    if unread:
        rooms += [r.email for r in await coordinator.db(store.rooms)]
    gw.rooms = sorted({r.lower() for r in rooms})
    await coordinator.start(gw.rooms)
    if options.feed in ("streaming", "pull"):
        gw.feed_task = loop.create_task(_run_feed(gw), name="feed")
    if tunnel is not None:
        gw.tunnel_task = loop.create_task(tunnel.run(), name="tunnel")
        watch_task("tunnel", gw.tunnel_task)
    gw.housekeeping_task = loop.create_task(_housekeeping(gw, journal), name="housekeeping")
    watch_task("housekeeping", gw.housekeeping_task)
    if options.password_source is not None:
        gw.credentials_task = loop.create_task(_watch_credentials(gw), name="credentials")
        watch_task("credentials", gw.credentials_task)
    if unread:
        gw.lists_task = loop.create_task(_read_room_lists_later(gw, unread), name="room-lists")
        watch_task("room-lists", gw.lists_task)
    log.info("gateway.started", rooms=len(gw.rooms), feed=options.feed, store=str(options.store_path),
             relay=options.relay.enabled)
    return gw


def _stream_counts(feed: StreamingFeed | PullFeed | None) -> tuple[int, int]:
    if isinstance(feed, StreamingFeed):
        return feed.subscriptions, feed.open_streams
    if isinstance(feed, PullFeed):
        return feed.subscriptions, 0
    return 0, 0


def _new_feed(gw: Gateway) -> StreamingFeed | PullFeed:
    o = gw.options
    if o.feed == "streaming":
        return StreamingFeed(gw.source, connection_timeout=o.stream_timeout_minutes, group_size=o.group_size,
                             retry_seconds=o.feed_retry_seconds, metrics=gw.metrics)
    return PullFeed(gw.source, interval=o.pull_interval_seconds)


async def _run_feed(gw: Gateway) -> None:
    """The change feed, supervised: when it fails (a bug, a malformed answer: anything that is not Exchange's
    error for a room), the rooms poll meanwhile and say so, and a fresh feed starts after a back-off."""
    coordinator = gw.coordinator

    def on_dirty(room: str, why: str) -> None:
        if why == "subscribed" and not gw.feed_up:
            gw.feed_up = True
            asyncio.get_running_loop().create_task(coordinator.feed_running())
        coordinator.mark_dirty(room, why)

    async def run() -> None:
        gw.feed = feed = _new_feed(gw)
        try:
            await feed.watch(gw.rooms, on_dirty)
        finally:
            if isinstance(feed, StreamingFeed):
                feed.stop()  # close what a failed feed still holds open (hanging connections are rationed)

    async def down(error: BaseException, restart_seconds: float) -> None:
        gw.feed_up = False
        what = f"{type(error).__name__}: {error}"  # no restart time: the rooms' reason stays put while it repeats
        await coordinator.feed_stopped(what if len(what) <= 120 else what[:119] + "\u2026")

    await supervise(f"feed:{gw.options.feed}", run, retry_seconds=gw.options.feed_restart_seconds, on_down=down)


async def _read_room_lists_later(gw: Gateway, lists: list[str]) -> None:
    """Read the room lists that could not be read at start, once Exchange answers (every attempt passes the
    source's outage gate, so waiting costs no request); their new rooms join, and the change feed starts again
    with them. Rooms kept from before that are no longer in a list stay until the next start."""
    lists = list(lists)
    while lists:
        await asyncio.sleep(gw.options.sync.retry_seconds)
        found: set[str] = set()
        for room_list in list(lists):
            try:
                found.update(r.lower() for r in await gw.source.room_list_members(room_list))
            except GatewayError as e:
                if is_shared(e):
                    break  # still away: try again later
                log.error("gateway.room_list_failed", room_list=room_list, key=e.key, reason=str(e))
            lists.remove(room_list)
        new = sorted(found - set(gw.rooms))
        if new:
            gw.rooms = sorted(set(gw.rooms) | found)
            for room in new:
                gw.coordinator.add_room(room)
            log.info("gateway.room_lists_read", new_rooms=len(new), rooms=len(gw.rooms))
            await _restart_feed(gw)


async def _restart_feed(gw: Gateway) -> None:
    """Start the change feed again (with ``gw.rooms`` as they are now)."""
    if gw.feed_task is None:
        return
    if isinstance(gw.feed, StreamingFeed):
        gw.feed.stop()
    gw.feed_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await gw.feed_task
    gw.feed_task = asyncio.get_running_loop().create_task(_run_feed(gw), name="feed")


async def _watch_credentials(gw: Gateway) -> None:
    """While Exchange refuses the service account, read the password again every ``password_check_seconds``
    (a local vault read); a changed one is handed to the source, which tries it at once."""
    source, read = gw.source, gw.options.password_source
    assert read is not None
    current = gw.options.password
    while True:
        await asyncio.sleep(gw.options.password_check_seconds)
        failure = source.gate.failure
        if failure is None or failure.key not in ("invalid_auth", "account_locked"):
            continue
        try:
            password = await asyncio.to_thread(read)
        except Exception as e:  # the vault is being rewritten, or now unreadable: say so, try again later
            log.warning("credentials.reread_failed", error=str(e))
            continue
        if password != current:
            current = password
            source.set_password(password)


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
    for task in (gw.tunnel_task, gw.housekeeping_task, gw.credentials_task, gw.lists_task):
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
